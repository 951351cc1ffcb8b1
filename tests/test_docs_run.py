"""Every ``lora-tools ...`` example in README.md, docs/*.md and the commands' --help, RUN
against a small fixture (tests/test_docs_examples.py only parses them): code blocks, help
examples, and `inline` ones in prose that are whole command lines.

The examples' placeholder paths (``base.safetensors``, ``adapter_dir``, ``llama_dir/``…) are
replaced by files of one tiny seeded fixture through :data:`INPUTS`; every output
(``-o``, ``--save-rest``, ``--plot``) goes to a fresh folder per example, under the name the
example gives (its suffix decides the form). An example must exit 0, except the documented
refusals in :data:`REFUSED`; :data:`NOT_RUN` lists, with the reason, the few that cannot
run here.
"""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path

import loralib as lora
import pytest
import torch
from click.testing import CliRunner
from corpus import Evil
from gguf_helpers import tiny_llama_fp32, write_tiny_gguf
from helpers import loralib_files, peft_adapter, randomize_loralib, state_dict_file, tiny_llama
from lycoris_cases import build, build_peft
from test_docs_examples import examples

from lora_tools.cli import cli

# Examples that cannot run on this machine: GPU, or an input a tiny fixture cannot be.
NOT_RUN: dict[str, str] = {
    "--device cuda": "needs a CUDA GPU (tests/test_cuda.py covers --device cuda where one is)",
    "lora-tools inspect PATH [": "a synopsis, not a command line",
    # Not run yet (landed on main at the deadline): they need a tiny SDXL pipeline and
    # diffusers/kohya SDXL LoRAs here; tests/test_diffusion_*.py run these paths.
    "sdxl_pipeline/": "needs a diffusers SDXL pipeline fixture (not built here yet)",
    "pytorch_lora_weights.safetensors --to kohya": "needs a diffusers SDXL LoRA fixture",
    "kohya_sdxl.safetensors": "needs a kohya SDXL LoRA fixture",
}
# Examples that show a refusal: (what the output must say).
REFUSED = {"evil.pt": "Error:"}
# Outputs: the word after these options is written, not read.
OUT_OPTIONS = ("-o", "--out", "--save-rest", "--plot")


class _LoralibNet(torch.nn.Module):
    """GPT-2 NLG style: loralib's fused c_attn (q and v adapted, Conv1D layout) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = lora.MergedLinear(12, 36, r=4, lora_alpha=128,
                                        enable_lora=[True, False, True], fan_in_fan_out=True)
        self.fc = lora.Linear(12, 10, r=4, lora_alpha=128)


def _loralib(d: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    base = loralib_files(_LoralibNet(), d / "gpt2.pt", d / "gpt2_lora.pt")
    glue = randomize_loralib(torch.nn.ModuleDict({
        "query": lora.Linear(12, 12, r=8, lora_alpha=16),
        "value": lora.Linear(12, 12, r=8, lora_alpha=16)}))
    torch.save(lora.lora_state_dict(glue), d / "roberta_lora.pt")
    return {"gpt2.pt": base, "gpt2_lora.pt": d / "gpt2_lora.pt",
            "roberta_lora.pt": d / "roberta_lora.pt", "lora.pt": d / "gpt2_lora.pt"}


def _fp8_folder(d: Path) -> Path:
    """The tiny Llama with its projections in float8_e4m3fn and a per-tensor scale."""
    model = tiny_llama()
    folder = d / "fp8"
    model.save_pretrained(folder)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in [k for k in sd if k.endswith("proj.weight")]:
        scale = (sd[k].abs().max() / 448.0).float()
        sd[k], sd[k.removesuffix("weight") + "weight_scale"] = (sd[k] / scale).to(
            torch.float8_e4m3fn), scale
    for f in folder.glob("*.safetensors"):
        f.unlink()
    state_dict_file(sd, folder / "model.safetensors")
    return folder


def _run(*args: object) -> None:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, f"fixture step {args}: {res.output}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Placeholder -> fixture path. One tiny Llama (fp32) as a folder and as one file, three
    PEFT adapters, their kohya conversions, merges made from them, a loralib pair, GGUF."""
    d = tmp_path_factory.mktemp("docs_fixture")
    model = tiny_llama()
    model.save_pretrained(d / "llama")
    base = state_dict_file(model.state_dict(), d / "base.safetensors")
    state_dict_file({k: v.half() for k, v in model.state_dict().items()}, d / "fp16.safetensors")
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    for i in range(3):
        peft_adapter(tiny_llama(), d / f"peft{i}", seed=i + 1)
        _run("convert", d / f"peft{i}", "--to", "kohya", "-o", d / f"kohya{i}.safetensors")
    peft_adapter(tiny_llama(), d / "dora", seed=4, use_dora=True)
    resized = tiny_llama()
    resized.resize_token_embeddings(72)
    peft_adapter(resized, d / "resized", seed=5, modules_to_save=["embed_tokens", "lm_head"])
    _run("merge", base, d / "peft0", "-o", d / "merged.safetensors")
    _run("merge", d / "llama", d / "peft0", "-o", d / "tuned/")
    _run("merge", d / "llama", d / "kohya0.safetensors", d / "kohya1.safetensors",
         "-w", "0.7", "-w", "0.3", "-o", d / "merged_ab/")
    lib = _loralib(d)
    _run("merge", lib["gpt2.pt"], lib["gpt2_lora.pt"], "--alpha", "128",
         "--enable-lora", "1,0,1", "-o", d / "merged.pt")
    torch.save({"x": Evil(d / "PWNED")}, d / "evil.pt")
    folder, adapter = d / "llama", d / "peft0"
    kohya = d / "kohya0.safetensors"
    return {
        **lib, "merged.pt": d / "merged.pt", "evil.pt": d / "evil.pt",
        **dict.fromkeys(["base.safetensors", "base_orig.safetensors", "real_base.safetensors"],
                        base),
        "base_fp16.safetensors": d / "fp16.safetensors", "pytorch_model.bin": d / "pytorch_model.bin",
        **dict.fromkeys(["llama_dir/", "model_dir/", "model_dir", "model/", "base_dir/",
                         "base/"], folder),
        **dict.fromkeys(["my_peft_adapter/", "adapter_dir", "adapter_dir/", "adapter/", "a/",
                         "style/"], adapter),
        **dict.fromkeys(["b/", "character/"], d / "peft1"), "c/": d / "peft2",
        **dict.fromkeys(["a.safetensors", "style.safetensors", "big.safetensors",
                         "lora.safetensors", "my_lora.safetensors"], kohya),
        **dict.fromkeys(["b.safetensors", "char.safetensors"], d / "kohya1.safetensors"),
        "merged.safetensors": d / "merged.safetensors", "tuned.safetensors": d / "merged.safetensors",
        "tuned_dir/": d / "tuned", **dict.fromkeys(["merged_dir/", "merged_dir"], d / "merged_ab"),
        "dora_adapter/": d / "dora", "resized_adapter/": d / "resized",
        "llama_fp8_dir/": _fp8_folder(d), **_gguf(d), **_loha(d),
    }


def _loha(d: Path) -> dict[str, Path]:
    """LyCORIS LoHa and LoKr files of lycoris_cases' tiny model (with its base), and a
    PEFT LoHa folder."""
    found: dict[str, Path] = {}
    for algo in ("loha", "lokr"):
        (d / algo).mkdir()
        _, _, base, adapter = build(d / algo, algo)
        found.update({f"my_{algo}.safetensors": adapter, f"{algo}:model/": base})
    (d / "peft_loha").mkdir()
    found["peft_loha_dir/"] = build_peft(d / "peft_loha", "loha")[1]
    return found


def _gguf(d: Path) -> dict[str, Path]:
    """A Q8_0-mix GGUF of a tiny Llama (one file and split in three) and an adapter for it."""
    model = tiny_llama_fp32()
    one = write_tiny_gguf(model, d / "model-Q8_0.gguf")
    write_tiny_gguf(tiny_llama_fp32(), d / "split.gguf", split_max_tensors=10)
    first = sorted(d.glob("split-00001-of-*.gguf"))[0]
    peft_adapter(model, d / "gguf_adapter", seed=6)
    _run("merge", one, d / "gguf_adapter", "-o", d / "merged-Q8_0.gguf")
    return {"model-Q8_0.gguf": one, "model-Q4_K_M.gguf": one, "model-00001-of-00003.gguf": first,
            "merged-Q8_0.gguf": d / "merged-Q8_0.gguf", "gguf:adapter_dir": d / "gguf_adapter"}


# Per example: which of two placeholders with the same spelling it means.
def _context(example: str) -> Callable[[str], str]:
    if ".gguf" in example:
        return lambda word: "gguf:adapter_dir" if word.rstrip("/") == "adapter_dir" else word
    for algo in ("loha", "lokr"):  # LyCORIS files of lycoris_cases' tiny model
        if f"my_{algo}.safetensors --to" in example:
            return lambda word, algo=algo: f"{algo}:model/" if word == "model/" else word
    if example.startswith("lora-tools unmerge merged_dir/ adapter/"):  # merged from adapter/
        return lambda word: "tuned_dir/" if word == "merged_dir/" else word
    return lambda word: word


def _argv(example: str, inputs: dict[str, Path], out: Path) -> list[str]:
    words, pick = shlex.split(example, comments=True)[1:], _context(example)
    argv = []
    for i, word in enumerate(words):
        if i and words[i - 1] in OUT_OPTIONS:
            argv.append(str(out / word.rstrip("/")) + ("/" if word.endswith("/") else ""))
        elif pick(word) in inputs:
            argv.append(str(inputs[pick(word)]))
        elif not word.startswith("-") and ("/" in word or "." in word) and i and \
                words[i - 1] not in ("--dynamic", "-w", "--weights", "--alpha", "--strength",
                                     "--density", "--from-alpha", "--max-memory", "--shard-size"):
            pytest.fail(f"`{example}`: no fixture for {word!r}; add it to the mapping table")
        else:
            argv.append(word)
    return argv


def _complete(example: str) -> bool:
    """An inline example that is a command line, not a synopsis or a bare command name."""
    words = example.split()
    return len(words) > 3 and not any(w.isupper() or "[" in w or "..." in w for w in words)


# Each command line once (the README and --help share many), where it first appears.
RUNNABLE = list({" ".join(shlex.split(ex, comments=True)): (where, ex)
                 for where, ex, whole in reversed(examples()) if whole or _complete(ex)}.values())
RUNNABLE.reverse()


def test_every_example_is_runnable_or_listed() -> None:
    skipped = [ex for _, ex in RUNNABLE if any(k in ex for k in NOT_RUN)]
    assert len(skipped) <= 7, skipped  # the list stays short


@pytest.mark.slow
@pytest.mark.parametrize(("where", "example"), RUNNABLE)
def test_example_runs(where: str, example: str, inputs: dict[str, Path], tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    reason = next((why for key, why in NOT_RUN.items() if key in example), None)
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # demo's folder
    argv = _argv(example, inputs, tmp_path)
    res = CliRunner().invoke(cli, argv)
    refusal = next((say for key, say in REFUSED.items() if key in example), None)
    if refusal:
        assert res.exit_code == 1 and refusal in res.output, f"{where}: `{example}`\n{res.output}"
        return
    assert res.exit_code == 0, f"{where}: `{example}`\n{' '.join(argv)}\n{res.output}"
