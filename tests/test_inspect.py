"""``inspect``: every figure checked against fp64 computations on the full ΔW, and against
the deltas the peers themselves produce (PEFT ``get_delta_weight``, loralib's merge)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.cli import cli
from lora_tools.inspection.figures import factor_figures, module_group, module_layer
from lora_tools.inspection.report import inspect_path
from lora_tools.io.checkpoint import SafetensorsCheckpoint

TOP = 3


def reference(delta: torch.Tensor) -> dict[str, Any]:
    """Figures straight from the full ΔW in fp64 (conv reshaped to (out, in·k…))."""
    d = delta.double().reshape(delta.shape[0], -1)
    s = torch.linalg.svdvals(d)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    return {"fro": float(torch.linalg.matrix_norm(d)), "sigma": [float(x) for x in s],
            "stable": float((s**2).sum() / s[0] ** 2),
            "r90": int((energy < 0.9 - 1e-12).sum()) + 1,
            "r99": int((energy < 0.99 - 1e-12).sum()) + 1}


def check_figures(m: dict[str, Any], delta: torch.Tensor, scale: float | None, rtol: float) -> None:
    ref = reference(delta)
    k = len(m["singular_values_ba"])
    if scale is None:
        assert m["norm_delta"] is None and m["spectral_norm"] is None
        assert m["singular_values"] is None
    else:
        assert m["norm_delta"] == pytest.approx(ref["fro"], rel=rtol)
        assert m["spectral_norm"] == pytest.approx(ref["sigma"][0], rel=rtol)
        assert m["singular_values"] == pytest.approx(ref["sigma"][:k], rel=rtol)
        ref_ba = [x / abs(scale) for x in ref["sigma"][:k]]
        assert m["singular_values_ba"] == pytest.approx(ref_ba, rel=rtol)
    assert m["stable_rank"] == pytest.approx(ref["stable"], rel=rtol)
    assert (m["eff_rank_90"], m["eff_rank_99"]) == (ref["r90"], ref["r99"])


# ---------------------------------------------------------------- PEFT (the real peer)

@pytest.fixture(scope="module")
def peft_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("peft")
    model = helpers.tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    helpers.state_dict_file(base, tmp / "base.safetensors")
    pm = helpers.peft_adapter(model, tmp / "adapter", alpha_pattern={"v_proj": 16},
                              target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    return {"tmp": tmp, "pm": pm, "base": base, "adapter": tmp / "adapter"}


def peft_layers(pm: Any) -> dict[str, Any]:
    return {n.removeprefix("base_model.model."): mod for n, mod in pm.named_modules()
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "scaling")}


def test_peft_figures_match_peft_delta_and_fp64(peft_case: dict[str, Any]) -> None:
    report = inspect_path(peft_case["adapter"], base=peft_case["tmp"] / "base.safetensors",
                          top=TOP, device="cpu").to_dict()
    layers = peft_layers(peft_case["pm"])
    assert {m["name"] for m in report["modules"]} == set(layers)
    for m in report["modules"]:
        layer = layers[m["name"]]
        scale = layer.scaling["default"]
        assert m["scale"] == pytest.approx(scale, rel=1e-12)
        assert m["alpha_source"] == ("alpha_pattern" if "v_proj" in m["name"] else "config")
        with torch.no_grad():
            peer = layer.get_delta_weight("default")  # fp32, PEFT's own order of operations
            if m["kind"] == "embedding":
                a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
                a, b = a.detach(), b.detach()
                exact = (b.double() @ a.double()).T * scale
            else:
                a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
                exact = (b.double() @ a.double()) * scale
        check_figures(m, peer, scale, rtol=1e-5)
        check_figures(m, exact, scale, rtol=1e-9)
        assert m["norm_a"] == pytest.approx(float(a.double().norm()), rel=1e-12)
        assert m["norm_b"] == pytest.approx(float(b.double().norm()), rel=1e-12)
        w = peft_case["base"][m["name"] + ".weight"].double()
        assert m["rel_update"] == pytest.approx(float(exact.norm() / w.norm()), rel=1e-9)


def test_peft_summary_groups_layers_and_base_fraction(peft_case: dict[str, Any]) -> None:
    r = inspect_path(peft_case["adapter"], base=peft_case["tmp"] / "base.safetensors",
                     top=TOP).to_dict()
    s = r["summary"]
    assert s["groups"] == {"attn.q": 2, "attn.v": 2, "mlp": 2, "embedding": 1}
    assert [row["layer"] for row in s["layers"]] == [None, "layers.0", "layers.1"]
    per_layer = {row["layer"]: row for row in s["layers"]}
    mods = [m for m in r["modules"] if m["layer"] == "layers.1"]
    assert per_layer["layers.1"]["norm_delta"] == pytest.approx(
        math.sqrt(sum(m["norm_delta"] ** 2 for m in mods)), rel=1e-12)
    lora_params = sum(p.numel() for n, p in peft_case["pm"].named_parameters() if "lora_" in n)
    base_params = sum(v.numel() for v in peft_case["base"].values())
    assert r["params"] == lora_params
    assert r["base"]["fraction_added"] == pytest.approx(lora_params / base_params)
    assert {(row["alpha"], row["scale"], row["source"]) for row in s["alphas"]} == {
        (8.0, 2.0, "config"), (16.0, 4.0, "alpha_pattern")}
    ranked = sorted(r["modules"], key=lambda m: -m["norm_delta"])
    assert s["strongest"] == [m["name"] for m in ranked[:TOP]]
    assert s["weakest"] == [m["name"] for m in ranked[::-1][:TOP]]
    assert r["warnings"] == [] and s["health"]["zero_b_modules"] == 0


def test_rslora_scale_matches_peft(tmp_path: Path) -> None:
    pm = helpers.peft_adapter(helpers.tiny_llama(), tmp_path / "a", use_rslora=True,
                              r=4, lora_alpha=8, target_modules=["k_proj"])
    r = inspect_path(tmp_path / "a").to_dict()
    layers = peft_layers(pm)
    assert r["summary"]["rslora_modules"] == 2 and r["summary"]["groups"] == {"attn.k": 2}
    for m in r["modules"]:
        assert m["scale"] == pytest.approx(layers[m["name"]].scaling["default"]) == 4.0
        check_figures(m, layers[m["name"]].get_delta_weight("default").detach(), 4.0, 1e-5)


def test_dora_adapter_is_described_not_refused(tmp_path: Path) -> None:
    helpers.peft_adapter(helpers.tiny_llama(), tmp_path / "d", use_dora=True,
                         target_modules=["q_proj"])
    r = inspect_path(tmp_path / "d").to_dict()
    assert r["dora_magnitudes"] == 2 and len(r["modules"]) == 2
    assert any("DoRA" in n for n in r["notes"])


def test_peft_conv_figures(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

    torch.manual_seed(0)
    pm = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=6, target_modules=["conv"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "c"))
    (m,) = inspect_path(tmp_path / "c").to_dict()["modules"]
    layer = peft_layers(pm)["conv"]
    assert m["kind"] == "conv" and m["group"] == "conv" and m["scale"] == 3.0
    check_figures(m, layer.get_delta_weight("default").detach(), 3.0, 1e-5)


# ------------------------------------------------------------------- loralib (the real peer)

@pytest.fixture(scope="module")
def loralib_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import loralib

    tmp = tmp_path_factory.mktemp("loralib")
    torch.manual_seed(3)
    net = torch.nn.Module()
    net.fc = loralib.Linear(16, 24, r=4, lora_alpha=8)
    net.c_attn = loralib.MergedLinear(16, 48, r=2, lora_alpha=8,
                                      enable_lora=[True, False, True])
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    base = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    helpers.state_dict_file(loralib.lora_state_dict(net), tmp / "lora.pt")
    helpers.state_dict_file(base, tmp / "base.pt")
    net.eval()  # loralib merges: W += ΔW
    deltas = {k.removesuffix(".weight"): net.state_dict()[k] - base[k]
              for k in ("fc.weight", "c_attn.weight")}
    return {"tmp": tmp, "deltas": deltas,
            "scales": {"fc": net.fc.scaling, "c_attn": net.c_attn.scaling}}


def test_loralib_without_alpha_is_inspectable(loralib_case: dict[str, Any]) -> None:
    r = inspect_path(loralib_case["tmp"] / "lora.pt", top=TOP).to_dict()
    assert r["format"] == "loralib" and r["summary"]["ranked_by"] == "norm_ba"
    assert r["summary"]["health"]["unknown_scale_modules"] == 2
    assert any("--alpha" in w for w in r["warnings"])
    for m in r["modules"]:
        assert m["alpha_source"] == "unknown: pass --alpha" and m["scale"] is None
        unscaled = loralib_case["deltas"][m["name"]] / loralib_case["scales"][m["name"]]
        check_figures(m, unscaled, None, rtol=1e-5)
        assert m["norm_ba"] == pytest.approx(reference(unscaled)["fro"], rel=1e-5)
        assert m["singular_values_ba"] == pytest.approx(reference(unscaled)["sigma"][:TOP],
                                                        rel=1e-5)


def test_loralib_with_alpha_and_base(loralib_case: dict[str, Any]) -> None:
    tmp = loralib_case["tmp"]
    r = inspect_path(tmp / "lora.pt", alpha=8, enable_lora=(True, False, True),
                     base=tmp / "base.pt").to_dict()
    by = {m["name"]: m for m in r["modules"]}
    assert by["c_attn"]["kind"] == "merged" and by["c_attn"]["group"] == "attn.qkv"
    for name, m in by.items():
        assert m["alpha_source"] == "--alpha"
        assert m["scale"] == pytest.approx(loralib_case["scales"][name])
        check_figures(m, loralib_case["deltas"][name], m["scale"], rtol=1e-5)
        assert m["rel_update"] is not None and m["rel_update"] > 0


def test_cli_loralib_unknown_alpha_text(loralib_case: dict[str, Any]) -> None:
    res = CliRunner().invoke(cli, ["inspect", str(loralib_case["tmp"] / "lora.pt")])
    assert res.exit_code == 0, res.output
    assert "unknown: pass --alpha" in res.output and "‖B·A‖_F" in res.output
    assert all(len(line) <= 100 for line in res.stdout.splitlines())


# ------------------------------------------------------------------------------ kohya

def test_kohya_alpha_tensor_and_default(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {f"{q}.lora_down.weight": torch.randn(4, 20, generator=g),
               f"{q}.lora_up.weight": torch.randn(12, 4, generator=g),
               f"{q}.alpha": torch.tensor(2.0),
               f"{conv}.lora_down.weight": torch.randn(3, 5, 3, 3, generator=g),
               f"{conv}.lora_up.weight": torch.randn(6, 3, 1, 1, generator=g)}
    save_file(tensors, str(tmp_path / "k.safetensors"))
    by = {m["name"]: m for m in inspect_path(tmp_path / "k.safetensors").to_dict()["modules"]}
    mq, mc = by[q], by[conv]
    assert (mq["alpha_source"], mq["scale"], mq["group"]) == ("alpha tensor", 0.5, "attn.q")
    assert mc["alpha_source"].startswith("kohya default") and mc["scale"] == 1.0
    assert mc["group"] == "conv" and mc["layer"] == "down_blocks_0_resnets_0"
    assert mq["layer"] == "down_blocks_0_attentions_0_transformer_blocks_0"
    a, b = tensors[f"{conv}.lora_down.weight"].double(), tensors[f"{conv}.lora_up.weight"].double()
    full = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)  # the conv ΔW, (out, in, 3, 3)
    check_figures(mc, full, 1.0, rtol=1e-9)
    a, b = tensors[f"{q}.lora_down.weight"].double(), tensors[f"{q}.lora_up.weight"].double()
    check_figures(mq, 0.5 * b @ a, 0.5, rtol=1e-9)
    by = {m["name"]: m for m in inspect_path(tmp_path / "k.safetensors", alpha=6).to_dict()[
        "modules"]}
    assert (by[conv]["alpha_source"], by[conv]["scale"]) == ("--alpha", 2.0)
    assert by[q]["alpha_source"] == "alpha tensor"  # the file's own alpha wins


def test_loralib_alpha_from_file_metadata(tmp_path: Path) -> None:
    mods = [FactorModule("fc", torch.randn(2, 8), torch.randn(6, 2), alpha=5.0)]
    save_adapter(mods, tmp_path / "l.pt", "loralib")
    (m,) = inspect_path(tmp_path / "l.pt").to_dict()["modules"]
    assert (m["alpha_source"], m["scale"]) == ("file metadata", 2.5)


@pytest.mark.cuda
def test_cuda_figures_equal_cpu(peft_case: dict[str, Any]) -> None:
    cpu = inspect_path(peft_case["adapter"], device="cpu").to_dict()["modules"]
    gpu = inspect_path(peft_case["adapter"], device="cuda").to_dict()["modules"]
    for c, g in zip(cpu, gpu, strict=True):
        assert g["singular_values"] == pytest.approx(c["singular_values"], rel=1e-10)
        assert g["eff_rank_90"] == c["eff_rank_90"]


# ------------------------------------------------------------------- health and reading

def test_zero_b_and_nan_are_reported(tmp_path: Path) -> None:
    a = torch.randn(2, 8)
    bad = torch.randn(2, 8)
    bad[0, 0] = float("nan")
    mods = [FactorModule("m.layers.0.q_proj", a, torch.zeros(6, 2), alpha=4.0),
            FactorModule("m.layers.0.v_proj", bad, torch.randn(6, 2), alpha=4.0),
            FactorModule("m.layers.1.q_proj", a, torch.randn(6, 2), alpha=4.0)]
    save_adapter(mods, tmp_path / "p", "peft")
    r = inspect_path(tmp_path / "p").to_dict()
    by = {m["name"]: m for m in r["modules"]}
    zero, nan = by["m.layers.0.q_proj"], by["m.layers.0.v_proj"]
    assert zero["zero_b"] and zero["norm_delta"] == 0.0 and zero["eff_rank_90"] == 0
    assert nan["nan"] == 1 and nan["norm_delta"] is None and nan["stable_rank"] is None
    assert r["summary"]["health"] == {"nan_modules": 1, "inf_modules": 0, "nan_values": 1,
                                      "inf_values": 0, "zero_a_modules": 0,
                                      "zero_b_modules": 1, "unknown_scale_modules": 0}
    assert any("all-zero B" in w and "untrained" in w for w in r["warnings"])
    assert any("NaN/Inf" in w for w in r["warnings"])
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "p")])
    assert res.exit_code == 0 and "warning: " in res.output and "! " in res.output


def test_each_factor_read_once_and_nothing_else(peft_case: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    original = SafetensorsCheckpoint.get

    def counting(self: SafetensorsCheckpoint, name: str) -> torch.Tensor:
        seen.append(name)
        return original(self, name)

    monkeypatch.setattr(SafetensorsCheckpoint, "get", counting)
    r = inspect_path(peft_case["adapter"])
    assert len(seen) == len(set(seen)) == 2 * len(r.modules)


# ------------------------------------------------------------------ identities and names

@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 12), r=st.integers(1, 6),
       seed=st.integers(0, 2**16), rank_deficient=st.booleans())
def test_factor_figures_equal_full_svd(out: int, inp: int, r: int, seed: int,
                                       rank_deficient: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
    if rank_deficient and r > 1:
        a[-1] = a[0]  # a repeated direction: one singular value is zero
    figs = factor_figures(a, b)
    full = b.double() @ a.double()
    s_full = torch.linalg.svdvals(full)
    n = len(figs.sv)
    assert figs.sv == pytest.approx([float(x) for x in s_full[:n]], abs=1e-9 * float(s_full[0]))
    rest = s_full[n:]  # the full ΔW's extra singular values are zero
    assert not rest.numel() or float(rest.max()) <= 1e-9 * float(s_full[0])
    assert figs.norm_product == pytest.approx(float(full.norm()), rel=1e-10)
    ref = reference(full)
    assert figs.stable_rank == pytest.approx(ref["stable"], rel=1e-9)
    assert figs.effective_rank(0.99) == ref["r99"]


@pytest.mark.parametrize(("name", "group", "layer"), [
    ("model.layers.3.self_attn.q_proj", "attn.q", "layers.3"),
    ("model.layers.12.mlp.down_proj", "mlp", "layers.12"),
    ("transformer.h.0.attn.c_attn", "attn.qkv", "h.0"),
    ("transformer.h.0.attn.c_proj", "attn.o", "h.0"),
    ("transformer.h.0.mlp.c_proj", "mlp", "h.0"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_v_proj", "attn.v",
     "text_model_encoder_layers_0"),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0", "attn.o",
     "mid_block_attentions_0_transformer_blocks_0"),
    ("unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", "mlp",
     "unet.up_blocks.1.attentions.2.transformer_blocks.0"),
    ("model.embed_tokens", "embedding", None),
    ("lm_head", "other", None),
])
def test_names_group_and_layer(name: str, group: str, layer: str | None) -> None:
    assert module_group(name, "linear") == group
    assert module_layer(name, underscore=name.startswith("lora_")) == layer
