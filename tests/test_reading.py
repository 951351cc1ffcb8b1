"""How each file is read: the interpretation stated, every key accounted for, several
PEFT adapters in one folder, unknown and known-but-unsupported files (issue 14: 1, 2, 8, 9).

Cases are built with the peers' own code (transformers + peft save_pretrained), then keys
are edited where the case needs a damaged or ambiguous file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file, tiny_llama
from safetensors.torch import load_file, save_file

from lora_tools.adapters import load_adapter
from lora_tools.adapters.interpretation import fold_names, interpret
from lora_tools.adapters.unsupported import UNSUPPORTED
from lora_tools.cli import cli

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def peft_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base file, PEFT folder, PEFT's own merge) of a tiny Llama."""
    tmp = tmp_path_factory.mktemp("peft")
    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    pm = peft_adapter(model, tmp / "adapter", alpha_pattern={"v_proj": 16})
    peer = state_dict_file(pm.merge_and_unload().state_dict(), tmp / "peer.safetensors")
    return base, tmp / "adapter", peer


def _edited(folder: Path, tmp: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """A copy of a PEFT folder whose weights went through ``edit(state_dict)``."""
    out = tmp / "edited"
    shutil.copytree(folder, out)
    sd = load_file(str(out / "adapter_model.safetensors"))
    edit(sd)
    save_file(sd, str(out / "adapter_model.safetensors"))
    return out


def _kohya(folder: Path, path: Path, prefixes: tuple[str, ...] = ("lora_unet_",),
           alphas: bool = True) -> Path:
    """PEFT's saved factors renamed the kohya way (lora_down = A, lora_up = B, alpha)."""
    sd: dict[str, torch.Tensor] = {}
    for key, t in load_file(str(folder / "adapter_model.safetensors")).items():
        stem, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        for prefix in prefixes:
            name = prefix + stem.replace(".", "_")
            sd[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = t.clone()
            if alphas:
                sd[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(sd, str(path))
    return path


# -- 1. the interpretation ------------------------------------------------------------------

def test_merge_states_its_reading_on_stderr_and_in_json(peft_case: tuple[Path, Path, Path],
                                                        tmp_path: Path) -> None:
    base, adapter, peer = peft_case
    runner = CliRunner()
    res = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m.safetensors")])
    assert res.exit_code == 0, res.output
    said = res.stderr
    assert said.startswith(f"reading {adapter}: peft LoRA (linear), 6 modules, matched against")
    # q_proj is square: the config says the orientation; v_proj/down_proj: the shapes do
    assert "2 modules: linear, r=4, alpha=8 (config), scale 2, (out, in) (config)" in said
    assert "2 modules: linear, r=4, alpha=16 (alpha_pattern), scale 4, (out, in) (shapes)" in said
    assert "model.layers.*.self_attn.v_proj" in said and "reading " not in res.stdout
    assert len(said.splitlines()) <= 5  # grouped, not one line per module
    torch.testing.assert_close(read(tmp_path / "m.safetensors"), read(peer), rtol=0, atol=0)

    res = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "j.safetensors"),
                              "--json"])
    data = json.loads(res.stdout)
    [interp] = data["interpretation"]
    assert interp["format"] == "peft" and len(interp["modules"]) == 6
    by_name = {m["name"]: m for m in interp["modules"]}
    v = by_name["model.layers.1.self_attn.v_proj"]
    assert (v["alpha"], v["alpha_source"], v["orientation_source"], v["target"]) == (
        16.0, "alpha_pattern", "shapes", "model.layers.1.self_attn.v_proj.weight")
    assert res.stderr == ""
    quiet = runner.invoke(cli, ["merge", str(base), str(adapter), "-q",
                                "-o", str(tmp_path / "q.safetensors")])
    assert quiet.exit_code == 0 and quiet.output == ""


def test_reading_is_stated_before_anything_is_written(peft_case: tuple[Path, Path, Path],
                                                      tmp_path: Path) -> None:
    base, adapter, _ = peft_case
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    res = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(out)])
    assert res.exit_code == 1 and out.read_bytes() == b"keep me"
    assert res.stderr.index("reading ") < res.stderr.index("Error:")


@pytest.mark.parametrize("command", ["rescale", "resize", "convert", "inspect", "combine"])
def test_every_command_that_reads_an_adapter_states_it(peft_case: tuple[Path, Path, Path],
                                                       tmp_path: Path, command: str) -> None:
    _, adapter, _ = peft_case

    def args(out: str) -> list[str]:
        o = ["-o", str(tmp_path / out)]
        return {"rescale": ["rescale", str(adapter), "--strength", "0.5", *o],
                "resize": ["resize", str(adapter), "--rank", "2", *o],
                "convert": ["convert", str(adapter), "--to", "peft", *o],
                "inspect": ["inspect", str(adapter)],
                "combine": ["combine", str(adapter), str(adapter), *o]}[command]

    res = CliRunner().invoke(cli, [*args("j"), "--json"])
    assert res.exit_code == 0, res.output
    interp = json.loads(res.stdout)["interpretation"]
    assert interp and interp[0]["modules"][0]["alpha_source"] == "config"
    text = CliRunner().invoke(cli, args("t"))
    assert text.exit_code == 0 and f"reading {adapter}: peft LoRA" in text.stderr


def test_kohya_alpha_sources_and_keys(peft_case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, adapter, _ = peft_case
    path = _kohya(adapter, tmp_path / "k.safetensors")
    sd = load_file(str(path))
    gone = "lora_unet_model_layers_0_self_attn_q_proj.alpha"
    del sd[gone]
    save_file(sd, str(path))
    interp = interpret(load_adapter(path))
    sources = {m.name: m.alpha_source for m in interp.modules}
    assert sources["lora_unet_model_layers_0_self_attn_q_proj"] == "default=rank"
    assert sources["lora_unet_model_layers_1_self_attn_q_proj"] == "kohya tensor"
    assert interp.components == {"lora_unet_": "UNet"}
    assert {o.kind for o in interp.other_keys} == {"alpha"} and len(interp.other_keys) == 5
    assert all(m.orientation_source == "format" for m in interp.modules)
    assert "5 alpha keys: the module's alpha" in interp.text()


def test_fold_names_groups_layers() -> None:
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(30) for p in ("q_proj", "v_proj")]
    assert fold_names(names) == "model.layers.*.self_attn.q_proj, model.layers.*.self_attn.v_proj"
    assert fold_names(["lora_unet_down_blocks_0_attn_1_to_q"]) == "lora_unet_down_blocks_*_attn_*_to_q"


# -- 2. every key accounted for ---------------------------------------------------------------

def test_peft_module_under_two_names_is_refused(peft_case: tuple[Path, Path, Path],
                                                tmp_path: Path) -> None:
    base, adapter, _ = peft_case
    q = "model.layers.0.self_attn.q_proj"

    def twice(sd: dict[str, torch.Tensor]) -> None:
        for part in ("lora_A", "lora_B"):
            sd[f"{q}.{part}.weight"] = sd[f"{PREFIX}{q}.{part}.weight"].clone()

    edited = _edited(adapter, tmp_path, twice)
    for args in (["merge", str(base), str(edited), "-o", str(tmp_path / "m.safetensors")],
                 ["rescale", str(edited), "--strength", "2", "-o", str(tmp_path / "r")]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1
        assert f"{PREFIX}{q}.lora_A.weight" in res.output and f"{q}.lora_A.weight and" not in \
            res.output.replace(f"{PREFIX}{q}.lora_A.weight and", "")
        assert "applied twice" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "r").exists()


def test_kohya_unet_and_te_on_one_tensor_is_refused(peft_case: tuple[Path, Path, Path],
                                                    tmp_path: Path) -> None:
    base, adapter, _ = peft_case
    path = _kohya(adapter, tmp_path / "k.safetensors", ("lora_unet_", "lora_te_"))
    res = CliRunner().invoke(cli, ["merge", str(base), str(path), "-o", str(tmp_path / "m.safetensors")])
    assert res.exit_code == 1 and not (tmp_path / "m.safetensors").exists()
    # The kohya prefixes select different models (adapters/components.py), so the two
    # modules never reach one tensor: the base not saying which model it is is refused first.
    assert "holds modules for text_encoder, unet" in res.output
    assert "pass --component" in res.output


def test_a_key_no_reader_claims_is_named(peft_case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, adapter, _ = peft_case
    path = _kohya(adapter, tmp_path / "k.safetensors")
    sd = load_file(str(path))
    sd["lora_unet_model_layers_0_self_attn_q_proj.mystery"] = torch.zeros(3)
    save_file(sd, str(path))
    res = CliRunner().invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 1 and "lora_unet_model_layers_0_self_attn_q_proj.mystery" in res.output


# -- 8. several PEFT adapters in one folder ---------------------------------------------------

def test_multi_adapter_folder_lists_them_and_takes_folder_slash_name(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    cfg = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}
    pm = get_peft_model(model, LoraConfig(target_modules=["q_proj"], **cfg), adapter_name="style")
    pm.add_adapter("character", LoraConfig(target_modules=["v_proj"], **cfg))
    pm.save_pretrained(str(tmp_path / "both"))
    assert not (tmp_path / "both" / "adapter_config.json").exists()
    runner = CliRunner()
    res = runner.invoke(cli, ["merge", str(base), str(tmp_path / "both"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 2
    assert "holds 2 PEFT adapters (character, style)" in res.output
    assert str(tmp_path / "both" / "character") in res.output
    out = tmp_path / "style.safetensors"
    res = runner.invoke(cli, ["merge", str(base), str(tmp_path / "both" / "style"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    pm.set_adapter("style")
    pm.delete_adapter("character")
    want = {k: v for k, v in pm.merge_and_unload().state_dict().items()}
    got = read(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           read(base)["model.layers.0.self_attn.q_proj.weight"])


def test_root_adapter_beside_named_ones_is_said(peft_case: tuple[Path, Path, Path],
                                                tmp_path: Path) -> None:
    _, adapter, _ = peft_case
    folder = tmp_path / "a"
    shutil.copytree(adapter, folder)
    shutil.copytree(adapter, folder / "other")
    notes = interpret(load_adapter(folder)).notes
    assert any("also holds the adapters other" in n for n in notes)


# -- 9. unknown files, known but unsupported types ---------------------------------------------

def test_unknown_file_names_its_first_keys_and_the_known_formats(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({f"encoder.block.{i}.weight": torch.zeros(2) for i in range(7)}, str(path))
    res = CliRunner().invoke(cli, ["rescale", str(path), "--strength", "2",
                                   "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1
    assert "not a LoRA adapter format this tool knows (first keys: encoder.block.0.weight" in res.output
    assert "PEFT folder" in res.output and "kohya" in res.output and "loralib" in res.output


@pytest.mark.parametrize("kind", ["IA3", "OFT"])
def test_peft_types_other_than_lora_are_named(tmp_path: Path, kind: str) -> None:
    import peft

    config = {"LoHa": peft.LoHaConfig, "LoKr": peft.LoKrConfig, "IA3": peft.IA3Config,
              "OFT": peft.OFTConfig}[kind]
    extra = {"IA3": {"feedforward_modules": []}, "OFT": {"r": 0, "oft_block_size": 4}}.get(
        kind, {"r": 2})
    pm = peft.get_peft_model(tiny_llama(), config(target_modules=["q_proj"], **extra))
    pm.save_pretrained(str(tmp_path / "a"))
    bare = tmp_path / "bare.safetensors"  # the weights alone, away from their config
    shutil.copy(tmp_path / "a" / "adapter_model.safetensors", bare)
    res = CliRunner().invoke(cli, ["inspect", str(bare)])
    assert res.exit_code == 1 and f"{kind} (" in res.output
    assert "known adapter type that lora-tools does not merge" in res.output


@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_bare_peft_loha_lokr_weights_need_their_config(tmp_path: Path, kind: str) -> None:
    """LoHa/LoKr are read (issue 16), but PEFT keeps their r and alpha in the config."""
    import peft

    config = {"LoHa": peft.LoHaConfig, "LoKr": peft.LoKrConfig}[kind]
    pm = peft.get_peft_model(tiny_llama(), config(target_modules=["q_proj"], r=2))
    pm.save_pretrained(str(tmp_path / "a"))
    bare = tmp_path / "bare.safetensors"
    shutil.copy(tmp_path / "a" / "adapter_model.safetensors", bare)
    res = CliRunner().invoke(cli, ["inspect", str(bare)])
    assert res.exit_code == 1 and "no adapter_config.json beside the file" in res.output
    assert CliRunner().invoke(cli, ["inspect", str(tmp_path / "a")]).exit_code == 0


def test_the_table_uses_peft_own_parameter_names() -> None:
    from peft.tuners import boft, hra, ia3, oft, vera

    for layer in (ia3.IA3Layer, oft.OFTLayer,
                  boft.BOFTLayer, vera.VeraLayer, hra.HRALayer):
        assert any(n in UNSUPPORTED for n in layer.adapter_layer_names), layer


def test_loralib_full_state_dict_says_what_it_left_out(tmp_path: Path) -> None:
    import loralib as lora

    torch.manual_seed(0)
    net = torch.nn.Sequential(lora.Linear(12, 10, r=4, lora_alpha=8))
    torch.nn.init.normal_(net[0].lora_B)
    whole = tmp_path / "whole.pt"
    torch.save(net.state_dict(), whole)  # factors and the model's own weight and bias
    interp = interpret(load_adapter(whole, alpha=8))
    [m] = interp.modules
    assert (m.alpha_source, m.orientation) == ("--alpha", "undecided")  # no base yet
    assert {o.key: o.kind for o in interp.other_keys} == {"0.weight": "ignored", "0.bias": "ignored"}
    base = state_dict_file({k: v for k, v in net.state_dict().items() if "lora_" not in k},
                           tmp_path / "base.pt")
    res = CliRunner().invoke(cli, ["merge", str(base), str(whole), "--alpha", "8",
                                   "-o", str(tmp_path / "m.pt")])
    assert res.exit_code == 0, res.output
    assert "(out, in) (shapes)" in res.stderr and "2 ignored keys" in res.stderr
    net.eval()  # loralib merges on eval: the peer's own merge
    torch.testing.assert_close(read(tmp_path / "m.pt")["0.weight"], net[0].weight,
                               rtol=0, atol=0)


def test_a_staged_copy_is_not_stated_again(peft_case: tuple[Path, Path, Path],
                                           tmp_path: Path) -> None:
    _, adapter, _ = peft_case
    res = CliRunner().invoke(cli, ["rescale", str(adapter), "--strength", "2", "--to", "kohya",
                                   "-o", str(tmp_path / "k.safetensors")])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("reading ") == 1 and f"reading {adapter}:" in res.stderr
