"""Merging a PEFT LoRA into a GGUF model, against PEFT's merge carried to GGUF space.

Truth: the tiny model's GGUF holds exactly the Hugging Face model's values; PEFT's
``merge_and_unload`` of that model, permuted as ``convert_hf_to_gguf.py`` permutes and
quantized with ``gguf.quants.quantize`` to each tensor's type, must equal our output
byte for byte; untouched tensors must keep their bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from gguf_helpers import (  # noqa: E402
    expected_gguf,
    gguf_bytes,
    tiny_llama_fp32,
    write_tiny_gguf,
)
from helpers import peft_adapter  # noqa: E402

from lora_tools.errors import MatchError, UsageError  # noqa: E402
from lora_tools.merging.gguf_merge import merge_gguf  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _setup(tmp: Path, **cfg):  # type: ignore[no-untyped-def]
    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp / "base.gguf")
    pm = peft_adapter(model, tmp / "adapter", target_modules=cfg.pop("targets", ALL), **cfg)
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, merged


def test_bitwise_equal_to_peft_in_gguf_space(tmp_path: Path) -> None:
    base, merged = _setup(tmp_path)
    summary = merge_gguf(base, [tmp_path / "adapter"], tmp_path / "out.gguf")
    out, before = gguf_bytes(tmp_path / "out.gguf"), gguf_bytes(base)
    want = expected_gguf(merged)
    assert list(out) == list(before)
    bad = [k for k in want if out[k] != want[k]]
    assert not bad, f"differs from PEFT's merge in GGUF space: {bad}"
    changed = [k for k in out if out[k] != before[k]]
    assert len(changed) == 14 == summary.changed  # 7 modules x 2 layers
    assert all(".attn_" in k or ".ffn_" in k for k in changed)


def test_row_blocks_on_threads_bitwise_equal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """Blocks of 5 rows (uneven, crossing head boundaries of the q/k permutation) on 3
    worker threads give gguf's quantize of PEFT's whole merged tensor, byte for byte."""
    from lora_tools.merging import gguf_kernel

    monkeypatch.setattr(gguf_kernel, "BLOCK_VALUES", 5 * 96)
    monkeypatch.setattr(gguf_kernel, "PEER_THREADS", 3)
    base, merged = _setup(tmp_path)
    merge_gguf(base, [tmp_path / "adapter"], tmp_path / "out.gguf")
    out, want = gguf_bytes(tmp_path / "out.gguf"), expected_gguf(merged)
    assert not [k for k in want if out[k] != want[k]]


def test_types_metadata_and_provenance_kept(tmp_path: Path) -> None:
    base, _ = _setup(tmp_path, targets=["q_proj", "v_proj"])
    merge_gguf(base, [tmp_path / "adapter"], tmp_path / "out.gguf")
    a, b = gguf.GGUFReader(base), gguf.GGUFReader(tmp_path / "out.gguf")
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    for key, f in a.fields.items():
        if not key.startswith("GGUF."):
            assert b.fields[key].contents() == f.contents(), key
    history = json.loads(b.fields["lora_tools.merging.provenance"].contents())
    assert history[0]["op"] == "merge" and history[0]["merged_modules"] == 4


def test_merging_twice_refused_by_provenance(tmp_path: Path) -> None:
    from lora_tools.errors import ProvenanceError

    base, _ = _setup(tmp_path, targets=["q_proj"])
    merge_gguf(base, [tmp_path / "adapter"], tmp_path / "out.gguf")
    with pytest.raises(ProvenanceError, match="already merged"):
        merge_gguf(tmp_path / "out.gguf", [tmp_path / "adapter"], tmp_path / "out2.gguf")


def test_weights_and_two_adapters(tmp_path: Path) -> None:
    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp_path / "base.gguf")
    pm = peft_adapter(model, tmp_path / "a1", target_modules=["q_proj", "down_proj"])
    m1 = pm.merge_and_unload()
    pm2 = peft_adapter(m1, tmp_path / "a2", seed=5, target_modules=["k_proj", "q_proj"])
    merged = {k: v.clone() for k, v in pm2.merge_and_unload().state_dict().items()}
    merge_gguf(base, [tmp_path / "a1", tmp_path / "a2"], tmp_path / "out.gguf")
    out, want = gguf_bytes(tmp_path / "out.gguf"), expected_gguf(merged)
    assert not [k for k in want if out[k] != want[k]]


def test_k_quant_refused_by_default_then_written_as_chosen(tmp_path: Path) -> None:
    from gguf_helpers import gguf_name

    from lora_tools.io.gguf_file import can_quantize
    from lora_tools.merging.verify import verify

    assert can_quantize("Q8_0") and can_quantize("Q4_0") and can_quantize("BF16")
    assert not can_quantize("Q6_K") and not can_quantize("Q4_K")
    types = {"attn_q": "Q6_K", "attn_k": "Q6_K"}  # rows of 256: whole K-quant blocks
    model = tiny_llama_fp32(hidden=256, layers=1)
    base = write_tiny_gguf(model, tmp_path / "base.gguf", types=types)
    pm = peft_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "v_proj"])
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    with pytest.raises(UsageError, match=r"Q6_K .*--gguf-type Q8_0\|F16\|BF16"):
        merge_gguf(base, [tmp_path / "adapter"], tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
    with pytest.raises(UsageError, match="cannot produce"):
        merge_gguf(base, [tmp_path / "adapter"], tmp_path / "o.gguf", gguf_type="Q4_K")
    s = merge_gguf(base, [tmp_path / "adapter"], tmp_path / "o.gguf", gguf_type="Q8_0")
    assert len([w for w in s.warnings if "Q6_K cannot be re-quantized" in w]) == 2
    out, before = gguf_bytes(tmp_path / "o.gguf"), gguf_bytes(base)
    want = expected_gguf(merged, types)  # v: own type (F16), bit-identical
    assert out[gguf_name("model.layers.0.self_attn.v_proj.weight")] == \
        want[gguf_name("model.layers.0.self_attn.v_proj.weight")]
    rewant = expected_gguf(merged, {"attn_q": "Q8_0", "attn_k": "Q8_0"})
    for k in ("attn_q", "attn_k"):
        assert out[f"blk.0.{k}.weight"] == rewant[f"blk.0.{k}.weight"]
    assert out["blk.0.ffn_up.weight"] == before["blk.0.ffn_up.weight"]
    r = gguf.GGUFReader(tmp_path / "o.gguf")
    assert {t.name: t.tensor_type.name for t in r.tensors}["blk.0.attn_q.weight"] == "Q8_0"
    assert verify(tmp_path / "o.gguf", base, [tmp_path / "adapter"], gguf_type="Q8_0").ok


def test_unmatched_and_unsupported_arch(tmp_path: Path) -> None:
    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp_path / "base.gguf")
    peft_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    with pytest.raises(UsageError, match="lm_head.weight: DoRA, lora_bias, saved whole"):
        merge_gguf(base, [tmp_path / "adapter"], tmp_path / "out.gguf")  # saved lm_head copy
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "bloom")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UsageError, match="'bloom' is not supported"):
        merge_gguf(tmp_path / "gpt2.gguf", [tmp_path / "adapter"], tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_adapter_for_another_model_refused(tmp_path: Path) -> None:
    from helpers import tiny_llama

    base = write_tiny_gguf(tiny_llama_fp32(), tmp_path / "base.gguf")
    peft_adapter(tiny_llama(), tmp_path / "adapter")  # hidden 32, not 64
    with pytest.raises(MatchError, match="base shape"):
        merge_gguf(base, [tmp_path / "adapter"], tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_verify_passes_on_merge_and_catches_tampering(tmp_path: Path) -> None:
    from lora_tools.merging.verify import verify

    base, _ = _setup(tmp_path, targets=["q_proj", "k_proj", "up_proj"])
    out = tmp_path / "out.gguf"
    merge_gguf(base, [tmp_path / "adapter"], out)
    rep = verify(out, base, [tmp_path / "adapter"])
    assert rep.ok, rep.failures
    assert len(rep.adapted) == 6 and rep.untouched == rep.tensors - 6
    merge_gguf(base, [tmp_path / "adapter"], tmp_path / "twice.gguf", weights=[2.0])
    rep = verify(tmp_path / "twice.gguf", base, [tmp_path / "adapter"])
    assert {f.name for f in rep.failures} == {f"blk.{i}.{k}.weight" for i in (0, 1)
                                              for k in ("attn_q", "attn_k", "ffn_up")}
    assert all(f.check == "values" for f in rep.failures)
    data = bytearray(out.read_bytes())
    ck = gguf.GGUFReader(out)
    norm = next(t for t in ck.tensors if t.name == "output_norm.weight")
    data[norm.data_offset] ^= 1
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    rep = verify(tmp_path / "bad.gguf", base, [tmp_path / "adapter"])
    assert [(f.name, f.check) for f in rep.failures] == [("output_norm.weight", "bytes")]
