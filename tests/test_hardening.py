"""Every bad input of the corpus, through the CLI: one clear message naming the file (and
tensor) and the fix, exit status 1, no output, inputs untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from corpus import EMBED, Q0, Case, Evil, Good, all_cases, file_damages
from helpers import without_reading

from lora_tools.cli import cli
from lora_tools.errors import FormatError
from lora_tools.io import open_checkpoint

CASES = [
    "base_truncated", "base_overlap", "base_past_end", "base_gap", "base_absurd_header",
    "base_unknown_dtype", "base_name_twice", "base_deep_header", "base_empty",
    "base_random_bytes", "base_garbage_pickle", "base_safetensors_is_pickle",
    "base_pickle_is_safetensors", "base_evil_pickle", "base_evil_zip_pickle",
    "peft_missing_config", "peft_broken_config", "peft_config_without_r",
    "peft_truncated_weights", "peft_evil_pickle", "adapter_nan", "adapter_inf", "shape_misfit",
    "other_model", "index_missing_shard", "index_names_tensor_twice",
    "duplicate_across_shards", "index_escapes_folder", "index_broken_json",
    "shards_without_index", "fp16_merge_overflow", "fp16_cast_overflow",
    # round two (corpus_more.py)
    "peft_r_inf", "peft_r_nan", "peft_alpha_nan", "peft_alpha_inf", "peft_rank_regex",
    "peft_alpha_regex", "peft_rank_pattern_text", "peft_alpha_pattern_list",
    "peft_token_indices", "lora_B_3d", "kohya_conv_up_3x3", "kohya_alpha_nan", "base_complex",
    "base_qint8", "base_sparse", "base_stride0", "base_uncountable_shape",
    "base_lone_surrogate",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Good, dict[str, Case]]:
    good, cases = all_cases(tmp_path_factory.mktemp("corpus"))
    return good, {c.name: c for c in cases}


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def run_refused(args: list[str], out_dir: Path, inputs: list[Path]) -> str:
    """Run the CLI, check the refusal contract, return the message."""
    before = {p: digest(p) for p in inputs}
    result = CliRunner().invoke(cli, args)
    text = without_reading(result.output)
    assert result.exit_code == 1, (result.exit_code, text, result.exception)
    assert not isinstance(result.exception, (AssertionError, TypeError, KeyError, IndexError))
    assert "Traceback" not in text
    assert [ln for ln in text.splitlines() if ln.startswith("Error:")] == [
        text.splitlines()[0]], "not exactly one error message"
    assert list(out_dir.iterdir()) == [], "an output or temporary file was left behind"
    assert {p: digest(p) for p in inputs} == before, "an input was modified"
    return text


def test_corpus_is_complete(corpus: tuple[Good, dict[str, Case]]) -> None:
    assert sorted(corpus[1]) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_clearly(name: str, corpus: tuple[Good, dict[str, Case]],
                                      tmp_path: Path) -> None:
    good, cases = corpus
    case = cases[name]
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    inputs = [Path(a) for a in case.args if Path(a).exists()]
    text = run_refused(["merge", *case.args, "-o", str(out)], out.parent, inputs)
    flat = " ".join(text.split())  # click wraps nothing, but keep matching robust
    for part in case.expect:
        assert part in flat, f"{part!r} missing from: {text}"
    if case.marker is not None:
        assert not case.marker.exists(), "os.system ran: the hostile pickle executed code"


def test_the_evil_pickle_would_really_run_code(tmp_path: Path) -> None:
    """The corpus' hostile payload is live: a full unpickler does run its command, so the
    refusals above prove something."""
    import pickle

    pickle.loads(pickle.dumps({Q0: Evil(tmp_path / "RAN")}, protocol=2))  # on purpose
    assert (tmp_path / "RAN").exists()


def test_every_damaged_file_is_a_format_error_for_any_reader(tmp_path: Path) -> None:
    """Commands all read checkpoints through open_checkpoint: each damage is a FormatError."""
    from corpus import make_good

    good = make_good(tmp_path / "good")
    for name, path, _ in file_damages(good, tmp_path / "files"):
        with pytest.raises(FormatError, match=path.name):
            open_checkpoint(path)
        assert not (tmp_path / "files" / "PWNED").exists(), name


@pytest.mark.parametrize(("name", "named"), [("fp16_merge_overflow", Q0),
                                             ("adapter_nan", "lora_B.weight"),
                                             ("adapter_inf", "lora_A.weight")])
def test_refused_before_the_writer_starts(
        name: str, named: str, corpus: tuple[Good, dict[str, Case]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_tools.merging.merge as merge_mod

    started: list[Path] = []
    real = merge_mod.CheckpointWriter

    def spy(out: Path, *args: object, **kwargs: object) -> object:
        started.append(out)
        return real(out, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(merge_mod, "CheckpointWriter", spy)
    case = corpus[1][name]
    result = CliRunner().invoke(cli, ["merge", *case.args, "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 1 and named in result.output
    assert started == [], "the output was opened before the refusal"


def test_fp16_within_range_still_merges(corpus: tuple[Good, dict[str, Case]],
                                        tmp_path: Path) -> None:
    """The range check refuses only real overflow: an ordinary fp16 merge goes through and
    agrees with the fp32 merge rounded once."""
    good = corpus[0]
    out16, out32 = tmp_path / "m16.safetensors", tmp_path / "m32.safetensors"
    runner = CliRunner()
    r16 = runner.invoke(cli, ["merge", str(good.base), str(good.adapter), "-o", str(out16),
                              "--dtype", "fp16"])
    r32 = runner.invoke(cli, ["merge", str(good.base), str(good.adapter), "-o", str(out32)])
    assert r16.exit_code == 0 and r32.exit_code == 0, r16.output + r32.output
    a, b = open_checkpoint(out16), open_checkpoint(out32)
    for key in (Q0, EMBED):
        assert a.get(key).dtype == torch.float16
        assert torch.equal(a.get(key), b.get(key).half())


# Every command over a sample of the corpus: the damages below reach each command's readers.
CHECKPOINT_USES = {
    "merge": "merge {bad} {adapter} -o {out}.safetensors",
    "unmerge": "unmerge {bad} {adapter} -o {out}.safetensors",
    "verify": "verify {bad} --base {base} -a {adapter}",
    "extract": "extract {bad} {base} -o {out} -r 2",
    "convert": "convert {bad} -o {out}.safetensors --to safetensors",
    "inspect": "inspect {bad}",
}
ADAPTER_USES = {
    "merge": "merge {base} {bad} -o {out}.safetensors",
    "unmerge": "unmerge {base} {bad} -o {out}.safetensors",
    "verify": "verify {base} --base {base} -a {bad}",
    "rescale": "rescale {bad} -o {out} --alpha 4",
    "resize": "resize {bad} -o {out} -r 2",
    "combine": "combine {bad} {adapter} -o {out}",
    "convert": "convert {bad} -o {out}.safetensors --to kohya",
    "inspect": "inspect {bad}",
}
CHECKPOINT_DAMAGES = ["base_truncated", "base_evil_pickle", "base_safetensors_is_pickle",
                      "base_random_bytes"]
ADAPTER_DAMAGES = ["base_evil_zip_pickle", "peft_broken_config", "peft_evil_pickle",
                   "peft_truncated_weights"]


def _available(command: str) -> bool:
    from lora_tools.cli import _available as available

    return available(command)


@pytest.mark.parametrize(("use", "damage"), [
    *[(CHECKPOINT_USES[c], d) for c in CHECKPOINT_USES for d in CHECKPOINT_DAMAGES],
    *[(ADAPTER_USES[c], d) for c in ADAPTER_USES for d in ADAPTER_DAMAGES],
])
def test_every_command_refuses_bad_files(use: str, damage: str,
                                         corpus: tuple[Good, dict[str, Case]],
                                         tmp_path: Path) -> None:
    if not _available(use.split()[0]):
        pytest.skip(f"command {use.split()[0]} is not in this checkout")
    good, cases = corpus
    case = cases[damage]
    bad = Path(case.args[0] if damage.startswith("base_") else case.args[1])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = use.format(bad=bad, base=good.base, adapter=good.adapter,
                      out=out_dir / "result").split()
    text = run_refused(args, out_dir, [bad, good.base, good.adapter])
    assert bad.name in text
    if case.marker is not None:
        assert not case.marker.exists()
