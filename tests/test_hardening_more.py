"""Round two of hardening (issue 17), through the CLI: every hostile case of corpus_more.py
fed to every command that reads it, numbers refused at parse time with the option's name,
unexpected errors as one line, and the output rules (-o ., long names, staging folders,
foreign weight files, broken config.json, a full disk while a .pt starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import Case, Good
from test_hardening import ADAPTER_USES, CHECKPOINT_USES, run_refused

from lora_tools.cli import cli

ADAPTER_CASES = ["peft_r_inf", "peft_alpha_nan", "peft_rank_regex", "peft_rank_pattern_text",
                 "peft_alpha_pattern_list", "peft_token_indices", "lora_B_3d",
                 "kohya_conv_up_3x3", "kohya_alpha_nan"]
BASE_CASES = ["base_complex", "base_qint8", "base_sparse", "base_stride0",
              "base_uncountable_shape", "base_lone_surrogate"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Good, dict[str, Case]]:
    from corpus import all_cases

    good, cases = all_cases(tmp_path_factory.mktemp("corpus2"))
    return good, {c.name: c for c in cases}


def invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in res.output
    return res.exit_code, res.output


@pytest.mark.parametrize(("use", "damage"), [
    *[(ADAPTER_USES[c], d) for c in ADAPTER_USES for d in ADAPTER_CASES],
    *[(CHECKPOINT_USES[c], d) for c in CHECKPOINT_USES for d in BASE_CASES],
])
def test_every_command_refuses_round_two(use: str, damage: str,
                                         corpus: tuple[Good, dict[str, Case]],
                                         tmp_path: Path) -> None:
    good, cases = corpus
    case = cases[damage]
    bad = Path(case.args[0] if damage.startswith("base_") else case.args[1])
    if use.startswith("rescale") and bad.suffix:  # kohya: one file in, one file out
        use = use.replace("-o {out}", "-o {out}.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = use.format(bad=bad, base=good.base, adapter=good.adapter,
                      out=out_dir / "result").split()
    text = run_refused(args, out_dir, [bad, good.base, good.adapter])
    assert bad.name in text and "internal error" not in text


@pytest.mark.parametrize(("args", "option"), [
    ("merge {b} {a} -o {o} -w nan", "--weight"),
    ("merge {b} {a} -o {o} -w inf", "--weight"),
    ("merge {b} {a} -o {o} --alpha nan", "--alpha"),
    ("merge {b} {a} -o {o} --max-memory 0MB", "0MB"),
    ("unmerge {b} {a} -o {o} -w -inf", "--weight"),
    ("verify {b} --base {b} -a {a} --tolerance inf", "--tolerance"),
    ("verify {b} --base {b} -a {a} -w nan", "--weight"),
    ("extract {b} {b} -o {o} -r 2 --alpha nan", "--alpha"),
    ("extract {b} {b} -o {o} -r 2 --alpha inf", "--alpha"),
    ("rescale {a} -o {o} --alpha nan", "--alpha"),
    ("rescale {a} -o {o} --strength inf", "--strength"),
    ("resize {a} -o {o} -r 0", "--rank"),
    ("resize {a} -o {o} -r 2 --alpha inf", "--alpha"),
    ("resize {a} -o {o} --dynamic sv_fro:nan -r 4", "--dynamic"),
    ("combine {a} {a} -o {o} --weights 1,nan", "--weights"),
    ("combine {a} {a} -o {o} -m ties --density nan -r 4", "--density"),
    ("combine {a} {a} -o {o} -m ties --density 1.5 -r 4", "--density"),
])
def test_numbers_refused_at_parse_time(args: str, option: str, corpus: tuple[Good, dict[str, Case]],
                                       tmp_path: Path) -> None:
    good = corpus[0]
    code, text = invoke(*args.format(b=good.base, a=good.adapter, o=tmp_path / "o").split())
    assert code == 2 and option in text, text
    if option not in ("0MB", "--dynamic"):  # refused by the option's type, before the command
        assert "Invalid value for" in text, text
        assert "finite" in text or "range" in text, text
    assert not (tmp_path / "o").exists()


def test_unexpected_error_is_one_line_and_debug_shows_it(
        corpus: tuple[Good, dict[str, Case]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_tools.merging.merge as merge_mod

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(merge_mod, "apply_adapters", boom)
    good = corpus[0]
    args = ["merge", str(good.base), str(good.adapter), "-o", str(tmp_path / "o.safetensors")]
    code, text = invoke(*args)
    assert code == 1 and text.startswith("Error: internal error (RuntimeError: boom)")
    assert "report" in text and "--debug" in text and len(text.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["--debug", *args])
    assert isinstance(res.exception, RuntimeError)  # re-raised: python prints the traceback


def test_os_errors_name_the_file_and_the_fix(corpus: tuple[Good, dict[str, Case]],
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import lora_tools.merging.merge as merge_mod

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/x/shard.safetensors")

    monkeypatch.setattr(merge_mod, "apply_adapters", full)
    good = corpus[0]
    code, text = invoke("merge", good.base, good.adapter, "-o", tmp_path / "o.safetensors")
    assert code == 1
    assert text.strip() == ("Error: /x/shard.safetensors: No space left on device; the disk "
                            "is full: free space or write elsewhere")


def test_fp8_factors_merge_like_their_exact_fp32_values(corpus: tuple[Good, dict[str, Case]],
                                                        tmp_path: Path) -> None:
    import torch
    from corpus import edit_adapter

    from lora_tools.io import open_checkpoint

    good = corpus[0]
    fp8, _ = edit_adapter(good, tmp_path / "fp8", "lora_B",
                          lambda t: t.to(torch.float8_e4m3fn))
    wide, _ = edit_adapter(good, tmp_path / "wide", "lora_B",
                           lambda t: t.to(torch.float8_e4m3fn).float())
    for src in (fp8, wide):
        code, text = invoke("merge", good.base, src, "-o", tmp_path / f"{src.name}.safetensors")
        assert code == 0, text
    a, b = (open_checkpoint(tmp_path / f"{n}.safetensors") for n in ("fp8", "wide"))
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def test_verify_json_never_prints_infinity(corpus: tuple[Good, dict[str, Case]],
                                           tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    good = corpus[0]
    merged = tmp_path / "m.safetensors"
    assert invoke("merge", good.base, good.adapter, "-o", merged)[0] == 0
    sd = load_file(str(merged))
    key = "model.layers.0.self_attn.q_proj.weight"
    sd[key][0, 0] = float("inf")
    save_file(sd, str(merged))
    code, text = invoke("verify", merged, "--base", good.base, "-a", good.adapter, "--json")

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    data = json.loads(text, parse_constant=refuse)
    assert code == 1 and data["ok"] is False and data["max_ulp"] == "inf"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_library_refuses_non_finite_numbers_too(value: float, corpus: tuple[Good, dict[str, Case]],
                                                tmp_path: Path) -> None:
    """The API checks what the CLI's option types check: no NaN alpha, no infinite tolerance."""
    from lora_tools.editing.extract import ExtractOptions, extract
    from lora_tools.errors import UsageError
    from lora_tools.merging.verify import verify

    good = corpus[0]
    with pytest.raises(UsageError, match="--alpha"):
        extract(good.base, good.base, tmp_path / "x", ExtractOptions(rank=2, alpha=value))
    with pytest.raises(UsageError, match="--tolerance"):
        verify(good.base, good.base, [good.adapter], tolerance=value)
    assert list(tmp_path.iterdir()) == []
