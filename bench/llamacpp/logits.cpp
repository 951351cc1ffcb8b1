// Print the logits llama.cpp computes for a list of token ids, one JSON row per position.
// Built against libllama by bench/llamacpp/build.sh; used by tests/test_gguf_llamacpp.py.
//   llama-logits MODEL.gguf 1,5,9,2
// KV cache in F32 and flash attention off, so the only differences from a Hugging Face
// forward pass are llama.cpp's own kernels, not cache rounding.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static void quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKEN,TOKEN,...\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> toks;
    std::stringstream ss(argv[2]);
    for (std::string t; std::getline(ss, t, ',');) toks.push_back(std::atoi(t.c_str()));
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (uint32_t) toks.size() < 32 ? 32 : toks.size();
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.n_threads = cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    llama_batch batch = llama_batch_init((int32_t) toks.size(), 0, 1);
    for (size_t i = 0; i < toks.size(); ++i) {
        batch.token[i] = toks[i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = (int32_t) toks.size();
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    printf("[");
    for (size_t i = 0; i < toks.size(); ++i) {
        const float * l = llama_get_logits_ith(ctx, (int32_t) i);
        printf(i ? ",\n[" : "[");
        for (int j = 0; j < n_vocab; ++j) printf(j ? ",%.9g" : "%.9g", l[j]);
        printf("]");
    }
    printf("]\n");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
