"""verify: accepts good merges (ours and the peers' own), rejects each kind of tampering."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import loralib as lora
import pytest
import torch
from click.testing import CliRunner
from helpers import loralib_files, peft_adapter, read, state_dict_file, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lora_tools.adapters.options import AdapterOptions
from lora_tools.cli import cli
from lora_tools.io import open_checkpoint
from lora_tools.merging import probe as probe_mod
from lora_tools.merging.merge import merge
from lora_tools.merging.verify import verify


@dataclass
class Case:
    base: Path
    adapters: list[Path]
    kwargs: dict[str, Any] = field(default_factory=dict)  # weights, opts, dtype
    peer: Path | None = None  # the peer library's own merge of the same inputs


def _peft(tmp: Path, dtype: torch.dtype = torch.float32, **cfg: Any) -> Case:
    model = tiny_llama(dtype)
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    pm = peft_adapter(model, tmp / "adapter", **cfg)
    peer = state_dict_file(pm.merge_and_unload().state_dict(), tmp / "peer.safetensors")
    return Case(base, [tmp / "adapter"], peer=peer)


def _gpt2(tmp: Path) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50,
                                       n_positions=32))
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    base = state_dict_file(sd, tmp / "base.safetensors")
    pm = peft_adapter(model, tmp / "adapter", target_modules=["c_attn", "c_proj"],
                      fan_in_fan_out=True)
    merged = {k: v for k, v in pm.merge_and_unload().state_dict().items() if k in sd}
    return Case(base, [tmp / "adapter"], peer=state_dict_file(merged, tmp / "peer.safetensors"))


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)


def _conv(tmp: Path) -> Case:
    torch.manual_seed(0)
    model = _ConvNet()
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    pm = peft_adapter(model, tmp / "adapter", target_modules=["conv_in", "head"], r=2,
                      lora_alpha=4)
    peer = state_dict_file(pm.merge_and_unload().state_dict(), tmp / "peer.safetensors")
    return Case(base, [tmp / "adapter"], peer=peer)


class _LoralibNet(torch.nn.Module):
    """GPT-2 NLG style fused c_attn (q, v adapted, Conv1D layout) and the other layer types."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = lora.Embedding(20, 12, r=4, lora_alpha=128)
        self.c_attn = lora.MergedLinear(12, 36, r=4, lora_alpha=128,
                                        enable_lora=[True, False, True], fan_in_fan_out=True)
        self.fc = lora.Linear(12, 10, r=4, lora_alpha=128)
        self.conv = lora.Conv2d(3, 5, 3, r=4, lora_alpha=128)


def loralib_case(tmp: Path) -> Case:
    """A loralib model trained (random factors), its lora_state_dict, and its eval() merge."""
    torch.manual_seed(0)
    net = _LoralibNet()
    base = loralib_files(net, tmp / "base.pt", tmp / "lora.pt")
    net.eval()  # loralib merges into the weights here
    peer = state_dict_file({k: v for k, v in net.state_dict().items() if "lora_" not in k},
                           tmp / "peer.safetensors")
    opts = AdapterOptions(alpha=128, enable_lora=(True, False, True))
    return Case(base, [tmp / "lora.pt"], {"opts": opts}, peer)


def _kohya(tmp: Path) -> Case:
    g = torch.Generator().manual_seed(0)
    shapes = {"down.attn.to_q.weight": (8, 8), "down.proj_in.weight": (8, 6, 1, 1),
              "down.conv1.weight": (6, 4, 3, 3), "down.norm.weight": (4,)}
    base = {k: torch.randn(s, generator=g).half() for k, s in shapes.items()}
    ad: dict[str, torch.Tensor] = {}
    for key, s in shapes.items():
        if len(s) < 2:
            continue
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        ad[name + ".lora_down.weight"] = torch.randn((2, *s[1:]), generator=g) * 0.1
        ad[name + ".lora_up.weight"] = torch.randn((s[0], 2, *([1] * (len(s) - 2))),
                                                   generator=g) * 0.1
        ad[name + ".alpha"] = torch.tensor(1.0)
    return Case(state_dict_file(base, tmp / "unet.safetensors"),
                [state_dict_file(ad, tmp / "style.safetensors")])


def _weighted(tmp: Path) -> Case:
    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    peft_adapter(tiny_llama(), tmp / "a1", seed=1)
    peft_adapter(tiny_llama(), tmp / "a2", seed=2, r=2, lora_alpha=16, target_modules=["q_proj"])
    return Case(base, [tmp / "a1", tmp / "a2"], {"weights": [0.5, -1.5]})


def _sharded(tmp: Path) -> Case:
    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp / "base", max_shard_size="20KB")
    peft_adapter(model, tmp / "adapter")
    return Case(tmp / "base", [tmp / "adapter"])


def _to_bf16(tmp: Path) -> Case:
    case = _peft(tmp)
    case.kwargs["dtype"] = torch.bfloat16
    case.peer = None
    return case


CASES: dict[str, Callable[[Path], Case]] = {
    "peft-fp32": _peft,
    "peft-bf16": lambda t: _peft(t, torch.bfloat16),
    "peft-fp16": lambda t: _peft(t, torch.float16),
    "peft-rslora-patterns": lambda t: _peft(t, use_rslora=True, lora_alpha=6,
                                            rank_pattern={"down_proj": 2},
                                            alpha_pattern={"layers.1.self_attn.v_proj": 3}),
    "peft-embedding": lambda t: _peft(t, target_modules=["embed_tokens", "q_proj"]),
    "peft-dora": lambda t: _peft(t, use_dora=True),
    "gpt2-fan-in-fan-out": _gpt2,
    "conv": _conv,
    "loralib": loralib_case,
    "kohya-fp16": _kohya,
    "weighted-pair": _weighted,
    "sharded-folder": _sharded,
    "dtype-bf16": _to_bf16,
}


@pytest.mark.parametrize("name", list(CASES))
def test_accepts_good_merges_ours_and_the_peers(tmp_path: Path, name: str) -> None:
    case = CASES[name](tmp_path)
    out = tmp_path / ("out" if case.base.is_dir() else "out.safetensors")
    summary = merge(case.base, case.adapters, out, device="cpu", shard_size=30_000,
                    **case.kwargs)
    rep = verify(out, case.base, case.adapters, device="cpu", **case.kwargs)
    assert rep.ok, [f.detail for f in rep.failures]
    assert len(rep.adapted) == summary.changed
    assert rep.untouched == summary.tensors - summary.changed
    # lora-tools rounds once: correctly rounded in 16-bit. In fp32 the recomputation's own
    # order may differ (a conv's by thread count): within the fp32 default of 8.
    sixteen = open_checkpoint(out).info(rep.adapted[0].name).dtype.itemsize == 2
    assert rep.to_dict()["max_ulp"] <= (0.5 if sixteen else 8.0)
    if name not in ("conv", "kohya-fp16", "peft-dora"):  # conv and DoRA are not probed
        assert rep.to_dict()["probed"] > 0
    if case.peer is not None:
        peer = verify(case.peer, case.base, case.adapters, device="cpu", **case.kwargs)
        assert peer.ok, [f.detail for f in peer.failures]


def test_accepts_peft_double_rounding_in_bf16(tmp_path: Path) -> None:
    """A bf16 adapter makes PEFT round ΔW to bf16 before adding: still within 1 ulp."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(torch.bfloat16)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                        autocast_adapter_dtype=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn_like(p.float()) * 0.5).to(p.dtype))
    pm.save_pretrained(tmp_path / "adapter")
    peer = state_dict_file(pm.merge_and_unload().state_dict(), tmp_path / "peer.safetensors")
    rep = verify(peer, base, [tmp_path / "adapter"], device="cpu")
    assert rep.ok, [f.detail for f in rep.failures]
    assert 0.5 < rep.to_dict()["max_ulp"] <= 1.0  # more than one rounding, yet in tolerance
    strict = verify(peer, base, [tmp_path / "adapter"], device="cpu", tolerance=0.5)
    assert not strict.ok and {f.check for f in strict.failures} == {"values"}


# --- tampering ----------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("good")
    model = tiny_llama(torch.bfloat16)
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    peft_adapter(model, tmp / "adapter")
    merge(base, [tmp / "adapter"], tmp / "merged.safetensors", device="cpu")
    return base, tmp / "adapter", tmp / "merged.safetensors"


def _tampered(good: tuple[Path, Path, Path], tmp: Path,
              edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    sd = read(good[2])
    edit(sd)
    save_file(sd, str(tmp / "bad.safetensors"))
    return tmp / "bad.safetensors"


def _checks(rep: Any) -> set[tuple[str, str]]:
    return {(f.name, f.check) for f in rep.failures}


def _bump(sd: dict[str, torch.Tensor], key: str, steps: int, base: Path) -> None:
    """Move one element ``steps`` representable values up: one whose update is small next
    to its value, so that ulp is the merged value's own."""
    t = sd[key].clone().reshape(-1)
    w = read(base)[key].reshape(-1).double()
    i = int((t.double().abs() - 2 * (t.double() - w).abs()).argmax())
    for _ in range(steps):
        t[i] = torch.nextafter(t[i], torch.tensor(float("inf"), dtype=t.dtype))
    sd[key] = t.reshape(sd[key].shape)


def test_good_fixture_passes(good: tuple[Path, Path, Path]) -> None:
    assert verify(good[2], good[0], [good[1]], device="cpu").ok


def test_rejects_one_element_changed_in_adapted_tensor(good: tuple[Path, Path, Path],
                                                       tmp_path: Path) -> None:
    bad = _tampered(good, tmp_path, lambda sd: _bump(sd, Q, 2, good[0]))
    rep = verify(bad, good[0], [good[1]], device="cpu")
    assert _checks(rep) == {(Q, "values")}
    assert "1 of 1024 elements" in rep.failures[0].detail
    assert rep.failures[0].amount is not None and rep.failures[0].amount >= 1.5


def test_rejects_one_element_changed_in_untouched_tensor(good: tuple[Path, Path, Path],
                                                         tmp_path: Path) -> None:
    bad = _tampered(good, tmp_path, lambda sd: _bump(sd, NORM, 1, good[0]))
    rep = verify(bad, good[0], [good[1]], device="cpu")
    assert _checks(rep) == {(NORM, "bytes")}
    assert "1 of 32 elements" in rep.failures[0].detail


def test_rejects_wrong_alpha(good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The adapter merged with scale 1 (alpha 4, r 4) instead of its scale 2 (alpha 8)."""
    wrong = tmp_path / "alpha4"
    shutil.copytree(good[1], wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 4
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    merge(good[0], [wrong], tmp_path / "m.safetensors", device="cpu")
    rep = verify(tmp_path / "m.safetensors", good[0], [good[1]], device="cpu")
    assert {c for _, c in _checks(rep)} == {"values"}
    assert len(rep.failures) == 6  # every adapted tensor
    assert verify(tmp_path / "m.safetensors", good[0], [wrong], device="cpu").ok


def test_rejects_missing_and_extra_tensors(good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        del sd[NORM], sd[Q]
        sd["model.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)

    rep = verify(_tampered(good, tmp_path, edit), good[0], [good[1]], device="cpu")
    assert _checks(rep) == {(NORM, "missing"), (Q, "missing"), ("model.extra.weight", "extra")}


def test_rejects_dtype_change(good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd[NORM] = sd[NORM].half()  # same values, other dtype
        sd[Q] = sd[Q].float()

    rep = verify(_tampered(good, tmp_path, edit), good[0], [good[1]], device="cpu")
    assert _checks(rep) == {(NORM, "dtype"), (Q, "dtype")}


def test_whole_file_dtype_needs_dtype_option(good: tuple[Path, Path, Path],
                                             tmp_path: Path) -> None:
    merge(good[0], [good[1]], tmp_path / "m16.safetensors", device="cpu", dtype=torch.float16)
    rep = verify(tmp_path / "m16.safetensors", good[0], [good[1]], device="cpu")
    assert {c for _, c in _checks(rep)} == {"dtype"} and len(rep.failures) == rep.tensors
    assert verify(tmp_path / "m16.safetensors", good[0], [good[1]], device="cpu",
                  dtype=torch.float16).ok


def test_rejects_nan_and_shape_change(good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    v, v0 = "model.layers.1.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj.weight"

    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd[NORM] = sd[NORM].clone()
        sd[NORM][3] = float("nan")
        sd[v] = sd[v].clone()
        sd[v][1, 2] = float("inf")
        sd[v0] = sd[v0].clone()
        sd[v0][0, 0] = float("nan")
        sd[Q] = sd[Q][:, :-1].contiguous()

    rep = verify(_tampered(good, tmp_path, edit), good[0], [good[1]], device="cpu")
    assert _checks(rep) == {(NORM, "nonfinite"), (NORM, "bytes"), (v, "nonfinite"),
                            (v, "values"), (v0, "nonfinite"), (Q, "shape")}


def test_cli_exit_status_and_json(good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, merged = map(str, good)
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", merged, "--base", base, "--adapter", adapter])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("OK: ")
    bad = str(_tampered(good, tmp_path, lambda sd: _bump(sd, Q, 2, good[0])))
    res = runner.invoke(cli, ["verify", bad, "--base", base, "-a", adapter, "--json"])
    assert res.exit_code == 1
    data = json.loads(res.output)
    assert data["ok"] is False and data["failures"][0]["name"] == Q
    text = runner.invoke(cli, ["verify", bad, "--base", base, "-a", adapter])
    assert text.exit_code == 1 and text.stdout.startswith(f"FAIL {Q}: values: 1 of 1024")
    for usage in (["verify", merged, "--base", base],  # no adapter
                  ["verify", merged, "--base", base, "-a", adapter, "--tolerance", "-1"],
                  ["verify", merged, "--base", str(tmp_path / "nope"), "-a", adapter]):
        assert runner.invoke(cli, usage).exit_code == 2, usage


def test_cli_loralib_without_alpha_is_usage_error(tmp_path: Path) -> None:
    case = loralib_case(tmp_path)
    res = CliRunner().invoke(cli, ["verify", str(case.peer), "--base", str(case.base),
                                   "-a", str(case.adapters[0])])
    assert res.exit_code == 2 and "--alpha" in res.output
    res = CliRunner().invoke(cli, ["verify", str(case.peer), "--base", str(case.base),
                                   "-a", str(case.adapters[0]), "--alpha", "128",
                                   "--enable-lora", "1,0,1"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["verify", str(case.peer), "--base", str(case.base),
                                   "-a", str(case.adapters[0]), "--alpha", "64",
                                   "--enable-lora", "1,0,1"])
    assert res.exit_code == 1 and "FAIL c_attn.weight: values" in res.output


def test_fp32_tolerance_follows_the_dtype(tmp_path: Path) -> None:
    """fp32 allows 8 ulps of recomputation order; a change of 12 or more is caught."""
    case = _peft(tmp_path)
    merge(case.base, case.adapters, tmp_path / "m.safetensors", device="cpu")
    sd = read(tmp_path / "m.safetensors")
    _bump(sd, Q, 4, case.base)
    save_file(sd, str(tmp_path / "four.safetensors"))
    assert verify(tmp_path / "four.safetensors", case.base, case.adapters, device="cpu").ok
    strict = verify(tmp_path / "four.safetensors", case.base, case.adapters, device="cpu",
                    tolerance=1)
    assert _checks(strict) == {(Q, "values")}
    _bump(sd, Q, 12, case.base)
    save_file(sd, str(tmp_path / "sixteen.safetensors"))
    rep = verify(tmp_path / "sixteen.safetensors", case.base, case.adapters, device="cpu")
    assert _checks(rep) == {(Q, "values")} and "tolerance 8" in rep.failures[0].detail


# --- the functional probe on its own ------------------------------------------------------

_LAYOUTS = ["linear", "fan-in-fan-out", "embedding", "fused", "fused-fan-in-fan-out"]


def _module(layout: str, g: torch.Generator) -> tuple[Any, torch.Tensor, torch.Tensor,
                                                      tuple[int, int]]:
    from lora_tools.adapters.model import EMBEDDING, LINEAR, MERGED, LoraModule

    r, n_in, n_out = 3, 10, 6
    fifo = layout.endswith("fan-in-fan-out")
    if layout.startswith("fused"):
        enable = (True, False, True)
        a, b = torch.randn(2 * r, n_in, generator=g), torch.randn(2 * n_out, r, generator=g)
        m = LoraModule("f", "a", "b", MERGED, r, 8.0, "", fan_in_fan_out=fifo,
                       enable_lora=enable, a_shape=tuple(a.shape), b_shape=tuple(b.shape))
        shape = (3 * n_out, n_in)
    else:
        kind = EMBEDDING if layout == "embedding" else LINEAR
        a, b = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)
        m = LoraModule("f", "a", "b", kind, r, 8.0, "", fan_in_fan_out=fifo,
                       a_shape=tuple(a.shape), b_shape=tuple(b.shape))
        shape = (n_out, n_in) if kind == LINEAR else (n_in, n_out)
    return m, a, b, (shape[::-1] if fifo else shape)


@settings(max_examples=10, deadline=None)
@given(layout=st.sampled_from(_LAYOUTS), seed=st.integers(0, 2**31 - 1))
def test_probe_factor_form_matches_the_dense_formulas(layout: str, seed: int) -> None:
    """The probe's B(Ax) and ops' dense ΔW are written independently; they must agree."""
    from lora_tools.modules.lora import module_delta

    m, a, b, shape = _module(layout, torch.Generator().manual_seed(seed))
    dense = module_delta(m, a, b, 0.7, shape).double()
    x = probe_mod.inputs("t", shape[1], seed).double()
    got = probe_mod.factor_apply(probe_mod.ProbeTerm(m, a, b, 0.7), x)
    assert torch.allclose(got, dense @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_probe_catches_a_wrong_layout_the_elements_would_miss(layout: str) -> None:
    from lora_tools.modules.lora import module_delta

    g = torch.Generator().manual_seed(0)
    m, a, b, shape = _module(layout, g)
    w = (torch.randn(shape, generator=g) * 0.1).bfloat16()
    dense = module_delta(m, a, b, 0.05, shape)
    good_e = w.float() + dense
    rel, bound = probe_mod.probe("t", good_e.bfloat16(), w, good_e,
                                 [probe_mod.ProbeTerm(m, a, b, 0.05)], 0)
    assert 0 < rel <= bound
    # a dense formula with its rows in the wrong order (a layout bug): merge and
    # recomputation would agree with each other, the factors do not
    bad_e = w.float() + dense.flip(0)
    rel, bound = probe_mod.probe("t", bad_e.bfloat16(), w, bad_e,
                                 [probe_mod.ProbeTerm(m, a, b, 0.05)], 0)
    assert rel > 10 * bound


@pytest.mark.cuda
def test_verify_and_unmerge_on_cuda(good: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, merged = good
    rep = verify(merged, base, [adapter], device="cuda")
    assert rep.ok and rep.device.startswith("cuda")
    from lora_tools.merging.unmerge import unmerge

    s = unmerge(merged, [adapter], tmp_path / "u.safetensors", device="cuda", check_base=base)
    assert s.total["max_ulp"] <= 1.0 and s.total["elements"] > 0


def test_probe_rows_are_a_seeded_sample() -> None:
    rows = probe_mod.sample_rows("layer", 5000, 0)
    assert len(rows) == probe_mod.ROWS == len(set(rows.tolist()))
    assert bool((rows[1:] > rows[:-1]).all()) and 0 <= int(rows[0]) and int(rows[-1]) < 5000
    assert torch.equal(rows, probe_mod.sample_rows("layer", 5000, 0))
    assert not torch.equal(rows, probe_mod.sample_rows("layer", 5000, 1))
    assert torch.equal(probe_mod.sample_rows("small", 300, 0), torch.arange(300))


def test_checks_side_by_side_report_as_one_thread_does(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """One check per core: the report (failures, figures, their order) is the one thread's."""
    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    peft_adapter(model, tmp_path / "lora")
    merge(tmp_path / "base", [tmp_path / "lora"], tmp_path / "merged.safetensors")
    bad = read(tmp_path / "merged.safetensors")
    for key in ("model.layers.0.self_attn.q_proj.weight",
                "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        bad[key] = (bad[key].float() * 1.01).to(bad[key].dtype)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    reports = []
    for cores in (1, 4):
        monkeypatch.setattr("lora_tools.merging.verify.os.cpu_count", lambda c=cores: c)
        for merged in ("merged", "bad"):
            d = verify(tmp_path / f"{merged}.safetensors", tmp_path / "base",
                       [tmp_path / "lora"]).to_dict()
            d.pop("seconds")
            reports.append(d)
    assert reports[0]["ok"] and not reports[1]["ok"]
    assert {f["name"] for f in reports[1]["failures"]} == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight"}
    assert reports[0] == reports[2] and reports[1] == reports[3]
