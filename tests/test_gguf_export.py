"""``convert --to gguf``: a PEFT adapter as llama.cpp's convert_lora_to_gguf.py lays it out.

Truth: PEFT's own per-module ΔW (``get_delta_weight``), carried to GGUF space with the
converter's permutation, equals llama.cpp's reading of the file, ``alpha/r · b @ a``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from gguf_helpers import gguf_name, tiny_llama_fp32, to_gguf_space, write_tiny_gguf  # noqa: E402
from helpers import peft_adapter  # noqa: E402

from lora_tools.cli import cli  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _read(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ts = {t.name: torch.from_numpy(t.data.copy()).float() for t in r.tensors}
    return kv, ts


def _check_deltas(pm, ts: dict[str, torch.Tensor], alpha: float) -> None:  # type: ignore[no-untyped-def]
    for name, mod in pm.base_model.model.named_modules():
        if not hasattr(mod, "get_delta_weight") or "default" not in getattr(mod, "lora_A", {}):
            continue
        hf = name + ".weight"
        want = to_gguf_space(hf, mod.get_delta_weight("default").detach())
        a, b = ts[gguf_name(hf) + ".lora_a"], ts[gguf_name(hf) + ".lora_b"]
        got = alpha / b.shape[1] * (b @ a)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base_kind", ["gguf", "hf"])
def test_layout_and_deltas_match_peft(tmp_path: Path, base_kind: str) -> None:
    model = tiny_llama_fp32()
    if base_kind == "gguf":
        base = write_tiny_gguf(model, tmp_path / "base.gguf")
    else:
        model.config.architectures = ["LlamaForCausalLM"]
        model.config.save_pretrained(tmp_path / "hf")
        base = tmp_path / "hf"
    pm = peft_adapter(model, tmp_path / "ad", target_modules=TARGETS)
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "ad"), "--to", "gguf", "--base",
                                   str(base), "-o", str(tmp_path / "ad.gguf")])
    assert res.exit_code == 0, res.output
    kv, ts = _read(tmp_path / "ad.gguf")
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama" and kv["adapter.lora.alpha"] == 8.0
    assert len(ts) == 2 * len(TARGETS) * 2
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(ts["blk.0.attn_q.weight.lora_a"], q.lora_A["default"].weight)
    assert torch.equal(ts["blk.0.attn_q.weight.lora_b"],
                       to_gguf_space("q_proj.weight", q.lora_B["default"].weight.detach()))
    _check_deltas(pm, ts, 8.0)


def test_rslora_folded_and_embedding_transposed(tmp_path: Path) -> None:
    model = tiny_llama_fp32()
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path / "hf")
    pm = peft_adapter(model, tmp_path / "tmp", target_modules=["q_proj", "embed_tokens"],
                      use_rslora=True)
    pm.save_pretrained(str(tmp_path / "ad"), save_embedding_layers=False)
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "ad"), "--to", "gguf", "--base",
                                   str(tmp_path / "hf"), "-o", str(tmp_path / "ad.gguf"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert "folded into lora_b" in json.loads(res.output)["notes"][0]
    kv, ts = _read(tmp_path / "ad.gguf")
    emb = pm.base_model.model.model.embed_tokens
    assert torch.equal(ts["token_embd.weight.lora_a"], emb.lora_embedding_A["default"].T)
    q = pm.base_model.model.model.layers[1].self_attn.q_proj
    want = to_gguf_space("q_proj.weight", q.get_delta_weight("default").detach())
    a, b = ts["blk.1.attn_q.weight.lora_a"], ts["blk.1.attn_q.weight.lora_b"]
    torch.testing.assert_close(8.0 / 4 * (b @ a), want, rtol=1e-5, atol=1e-6)


def test_needs_base_and_refuses_unknown_arch(tmp_path: Path) -> None:
    model = tiny_llama_fp32()
    peft_adapter(model, tmp_path / "ad", target_modules=["q_proj"])
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "ad"), "--to", "gguf",
                                   "-o", str(tmp_path / "ad.gguf")])
    assert res.exit_code != 0 and "needs --base" in res.output
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"architectures": ["BloomForCausalLM"]}')
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "ad"), "--to", "gguf", "--base",
                                   str(tmp_path / "cfg"), "-o", str(tmp_path / "ad.gguf")])
    assert res.exit_code != 0 and "BloomForCausalLM is not supported" in res.output
    assert not (tmp_path / "ad.gguf").exists()
