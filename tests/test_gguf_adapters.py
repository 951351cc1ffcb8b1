"""kohya- and loralib-format LoRAs merged into GGUF models, and exported for llama.cpp.

Truth: the peers' own merges carried to GGUF space as ``convert_hf_to_gguf.py`` carries
weights, quantized by ``gguf.quants.quantize``: PEFT's ``merge_and_unload`` for a kohya file
holding PEFT's factors under kohya names, loralib's ``eval()`` merge for loralib checkpoints
(a Llama-shaped model with ``lora.Linear`` layers, and GPT-2 with ``lora.MergedLinear`` on
its Conv1D ``c_attn`` as loralib's NLG example trains it). Equality is byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf_helpers import expected_gguf, gguf_bytes, tiny_llama_fp32, write_tiny_gguf  # noqa: E402
from helpers import peft_adapter, read, state_dict_file  # noqa: E402

from lora_tools.adapters.options import AdapterOptions  # noqa: E402
from lora_tools.errors import MatchError, UsageError  # noqa: E402
from lora_tools.merging.gguf_merge import merge_gguf  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT = "base_model.model."


def _peft_as_kohya(folder: Path, out: Path, style: str) -> Path:
    """PEFT's saved factors under kohya names (lora_down = A, lora_up = B, alpha tensor)."""
    sd = read(folder / "adapter_model.safetensors")
    ad: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        module, _, part = key.removeprefix(PEFT).rpartition(".lora_")
        path = module if style == "full" else module.removeprefix("model.")
        name = ("lora_unet_" if style == "full" else "lora_te_") + path.replace(".", "_")
        ad[name + (".lora_down.weight" if part.startswith("A") else ".lora_up.weight")] = t
        ad[name + ".alpha"] = torch.tensor(8.0)
    return state_dict_file(ad, out)


@pytest.mark.parametrize("style", ["full", "short"])
def test_kohya_names_bitwise_equal_to_peft(tmp_path: Path, style: str) -> None:
    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp_path / "base.gguf")
    pm = peft_adapter(model, tmp_path / "peft", target_modules=ALL)
    want = expected_gguf({k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()})
    kohya = _peft_as_kohya(tmp_path / "peft", tmp_path / "kohya.safetensors", style)
    summary = merge_gguf(base, [kohya], tmp_path / "out.gguf")
    out, before = gguf_bytes(tmp_path / "out.gguf"), gguf_bytes(base)
    assert summary.changed == 14
    assert not [k for k in want if out[k] != want[k]]
    assert sum(out[k] != before[k] for k in out) == 14
    from lora_tools.merging.verify import verify

    assert verify(tmp_path / "out.gguf", base, [kohya]).ok


def test_kohya_written_by_lora_tools_uses_its_layout_record(tmp_path: Path) -> None:
    from lora_tools import convert

    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp_path / "base.gguf")
    pm = peft_adapter(model, tmp_path / "peft", target_modules=["q_proj", "k_proj", "up_proj"])
    want = expected_gguf({k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()})
    convert(tmp_path / "peft", tmp_path / "k.safetensors", to="kohya")
    merge_gguf(base, [tmp_path / "k.safetensors"], tmp_path / "out.gguf")
    out = gguf_bytes(tmp_path / "out.gguf")
    assert not [k for k in want if out[k] != want[k]]


def test_ambiguous_kohya_name_refused(tmp_path: Path) -> None:
    base = write_tiny_gguf(tiny_llama_fp32(), tmp_path / "base.gguf")
    ad = {"lora_unet_self_attn_q_proj.lora_down.weight": torch.zeros(2, 64),
          "lora_unet_self_attn_q_proj.lora_up.weight": torch.zeros(64, 2)}
    path = state_dict_file(ad, tmp_path / "k.safetensors")
    with pytest.raises(MatchError, match="lora_unet_self_attn_q_proj.*blk.0.attn_q.*blk.1.attn_q"):
        merge_gguf(base, [path], tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def _loralib_llama(tmp: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A Llama whose q/k/down projections are loralib ``lora.Linear`` layers."""
    import loralib as lora

    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp / "base.gguf")
    torch.manual_seed(3)
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "q_proj"), (layer.self_attn, "k_proj"),
                             (layer.mlp, "down_proj")):
            old = getattr(parent, name)
            new = lora.Linear(old.in_features, old.out_features, r=4, lora_alpha=16, bias=False)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.lora_A.normal_(0, 0.2)
                new.lora_B.normal_(0, 0.2)
            setattr(parent, name, new)
    model.train()
    adapter = tmp / "lora.pt"
    torch.save(lora.lora_state_dict(model), adapter)
    model.eval()  # loralib merges here
    merged = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    return base, adapter, expected_gguf(merged)


def test_loralib_llama_bitwise_equal_to_loralib_merge(tmp_path: Path) -> None:
    base, adapter, want = _loralib_llama(tmp_path)
    merge_gguf(base, [adapter], tmp_path / "out.gguf", opts=AdapterOptions(alpha=16))
    out = gguf_bytes(tmp_path / "out.gguf")
    assert not [k for k in want if out[k] != want[k]]
    with pytest.raises(UsageError, match="--alpha"):
        merge_gguf(base, [adapter], tmp_path / "out2.gguf")


def _gpt2(tmp: Path):  # type: ignore[no-untyped-def]
    """A tiny GPT-2 as GGUF, laid out as GPT2Model.modify_tensors lays it (Conv1D weights
    transposed to (out, in)); the HF model is set to the stored values."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2,
                                       n_head=4))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, 2)
    w = gguf.GGUFWriter(tmp / "gpt2.gguf", "gpt2")
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_embedding_length(64)
    Q = gguf.GGMLQuantizationType
    with torch.no_grad():
        for hf, p in model.state_dict().items():
            name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is None or hf.startswith("lm_head"):
                continue  # attention mask buffers; the tied output
            flip = hf.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            t = p.float().T if flip else p.float()
            qt = Q.F32 if t.dim() == 1 else (Q.Q8_0 if "attn" in hf else Q.F16)
            data = gguf.quants.quantize(t.contiguous().numpy(), qt)
            stored = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qt), np.float32))
            p.copy_(stored.reshape(t.shape).T if flip else stored.reshape(t.shape))
            w.add_tensor(name, data, raw_dtype=qt)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file,
                 w.close):
        step()
    return model, tmap


def test_loralib_gpt2_merged_linear_bitwise_equal_to_loralib(tmp_path: Path) -> None:
    import loralib as lora

    model, tmap = _gpt2(tmp_path)
    torch.manual_seed(4)
    for block in model.transformer.h:
        old = block.attn.c_attn
        fused = lora.MergedLinear(64, 192, r=4, lora_alpha=8, enable_lora=[True, False, True],
                                  fan_in_fan_out=True)
        proj = lora.Linear(64, 64, r=2, lora_alpha=8, fan_in_fan_out=True)  # square
        with torch.no_grad():
            fused.weight.copy_(old.weight)
            fused.bias.copy_(old.bias)
            proj.weight.copy_(block.attn.c_proj.weight)
            proj.bias.copy_(block.attn.c_proj.bias)
            for m in (fused, proj):
                m.lora_A.normal_(0, 0.2)
                m.lora_B.normal_(0, 0.2)
        block.attn.c_attn, block.attn.c_proj = fused, proj
    model.train()
    adapter = tmp_path / "lora.pt"
    sd = lora.lora_state_dict(model)
    assert len(sd) == 8
    torch.save(sd, adapter)
    before = gguf_bytes(tmp_path / "gpt2.gguf")
    model.eval()
    want = {}
    for hf, t in model.state_dict().items():
        if hf.endswith(("attn.c_attn.weight", "attn.c_proj.weight")):
            name = tmap.get_name(hf, try_suffixes=(".weight",))
            data = gguf.quants.quantize(t.T.contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
            want[name] = np.ascontiguousarray(data).tobytes()
    # PEFT-style --alpha is one value; the two layer kinds use 8 here.
    merge_gguf(tmp_path / "gpt2.gguf", [adapter], tmp_path / "out.gguf",
               opts=AdapterOptions(alpha=8, enable_lora=(True, False, True)))
    out = gguf_bytes(tmp_path / "out.gguf")
    assert len(want) == 4 and all(out[k] == want[k] for k in want)
    assert sum(out[k] != before[k] for k in out) == 4
    from lora_tools.merging.verify import verify

    assert verify(tmp_path / "out.gguf", tmp_path / "gpt2.gguf", [adapter],
                  opts=AdapterOptions(alpha=8, enable_lora=(True, False, True))).ok


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(t.data.copy()).float() for t in gguf.GGUFReader(path).tensors}


def test_convert_kohya_to_gguf_equals_peft_export(tmp_path: Path) -> None:
    from lora_tools import convert

    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp_path / "base.gguf")
    peft_adapter(model, tmp_path / "peft", target_modules=["q_proj", "k_proj", "down_proj"])
    kohya = _peft_as_kohya(tmp_path / "peft", tmp_path / "kohya.safetensors", "full")
    convert(tmp_path / "peft", tmp_path / "p.gguf", to="gguf", base=base)
    summary = convert(kohya, tmp_path / "k.gguf", to="gguf", base=base)
    assert summary.source_format == "kohya" and summary.converted == 6
    want, got = _tensors(tmp_path / "p.gguf"), _tensors(tmp_path / "k.gguf")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    alpha = gguf.GGUFReader(tmp_path / "k.gguf").fields["adapter.lora.alpha"].contents()
    assert alpha == 8.0


def test_convert_loralib_to_gguf_gives_loralib_deltas(tmp_path: Path) -> None:
    from lora_tools import convert

    base, adapter, _ = _loralib_llama(tmp_path)
    convert(adapter, tmp_path / "l.gguf", to="gguf", base=base, opts=AdapterOptions(alpha=16))
    ts = _tensors(tmp_path / "l.gguf")
    sd = torch.load(adapter, weights_only=True)
    for hf, perm in (("model.layers.1.self_attn.k_proj", True), ("model.layers.0.mlp.down_proj", False)):
        from gguf_helpers import gguf_name, to_gguf_space

        name = gguf_name(hf + ".weight")
        delta = 16 / 4 * (sd[hf + ".lora_B"] @ sd[hf + ".lora_A"])  # loralib's merge: (B@A)·α/r
        want = to_gguf_space(hf + ".weight", delta) if perm else delta
        got = 16 / 4 * (ts[name + ".lora_b"] @ ts[name + ".lora_a"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_convert_merged_linear_to_gguf_refused(tmp_path: Path) -> None:
    import loralib as lora

    _, tmap = _gpt2(tmp_path)
    fused = lora.MergedLinear(64, 192, r=4, lora_alpha=8, enable_lora=[True, False, True])
    sd = {"transformer.h.0.attn.c_attn." + k: v for k, v in fused.state_dict().items()
          if k.startswith("lora_")}
    path = tmp_path / "lora.pt"
    torch.save(sd, path)
    from lora_tools import convert

    with pytest.raises(UsageError, match="c_attn: a fused loralib MergedLinear.*merge it into"):
        convert(path, tmp_path / "l.gguf", to="gguf", base=tmp_path / "gpt2.gguf",
                opts=AdapterOptions(alpha=8, enable_lora=(True, False, True)))
    assert not (tmp_path / "l.gguf").exists()
