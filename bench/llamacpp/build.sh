#!/usr/bin/env bash
# Build llama.cpp's export-lora and a logits dumper from the llama.cpp source that the
# llama-cpp-python sdist vendors (no binary download). Outside any repo:
#   bench/llamacpp/build.sh /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz /work/llama-build
# Then: export LLAMA_CPP_BIN=/work/llama-build/build/bin (tests/test_gguf_llamacpp.py).
set -euo pipefail
SDIST=${1:?path to llama_cpp_python-*.tar.gz}
DEST=${2:?build folder}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$DEST" && cd "$DEST"
tar xzf "$SDIST"
SRC=$(ls -d "$DEST"/llama_cpp_python-*/vendor/llama.cpp | head -1)
cmake -S "$SRC" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_OPENMP=OFF
nice cmake --build build -j2 --target llama-export-lora llama
g++ -O2 -std=c++17 "$HERE/logits.cpp" -I "$SRC/include" -I "$SRC/ggml/include" \
  -L build/bin -lllama -lggml -lggml-base -Wl,-rpath,"$DEST/build/bin" -o build/bin/llama-logits
echo "built: $DEST/build/bin/{llama-export-lora,llama-logits}"
