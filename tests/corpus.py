"""The bad-input corpus, generated into a temporary folder at test time (nothing binary
is committed).

Each :class:`Case` is a ``lora-tools merge`` call that must fail with exit status 1, one
message naming the file (and tensor) and the fix, no output, and inputs untouched. The
damages are built from one good tiny llama base and one good PEFT adapter written with the
real transformers + peft.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from helpers import peft_adapter, state_dict_file, tiny_llama
from safetensors.torch import load_file, save_file

Q0 = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


@dataclass
class Good:
    """The intact inputs every damage starts from."""

    root: Path
    base: Path  # fp32 .safetensors
    adapter: Path  # PEFT folder (q_proj, v_proj, down_proj; r=4)


@dataclass
class Case:
    name: str
    args: list[str]  # the merge arguments before ``-o OUT``
    expect: list[str]  # substrings of the message: file, tensor where it applies, the fix
    inputs: list[Path] = field(default_factory=list)  # hashed before and after
    marker: Path | None = None  # must never exist (a hostile pickle's os.system target)


def make_good(root: Path) -> Good:
    root.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(seed=0)
    base = state_dict_file(model.state_dict(), root / "base.safetensors")
    peft_adapter(tiny_llama(seed=0), root / "adapter", seed=1)
    return Good(root, base, root / "adapter")


def tiny_gpt2():  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1,
                                      n_head=2))


def raw_safetensors(path: Path, header: dict[str, object], data: bytes,
                    length: int | None = None) -> Path:
    """A safetensors file with exactly this header and data, lies included."""
    blob = json.dumps(header).encode()
    n = len(blob) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def header_json(path: Path, blob: bytes) -> Path:
    """A file whose header is the given JSON text (for duplicate names, bad nesting...)."""
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    return path


def two_tensors(path: Path, second: list[int], total: int) -> Path:
    """Tensors ``a`` at [0, 16) and ``b`` at ``second`` in a file of ``total`` data bytes."""
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": second}}
    return raw_safetensors(path, header, bytes(total))


class Evil:
    """Unpickling this runs ``touch MARKER``: the attack a weights-only loader must stop."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def copy_adapter(good: Good, dest: Path) -> Path:
    shutil.copytree(good.adapter, dest)
    return dest


def edit_adapter(good: Good, dest: Path, key_part: str,
                 edit: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Path, str]:
    """A copy of the adapter whose first tensor containing ``key_part`` is edited."""
    folder = copy_adapter(good, dest)
    weights = folder / "adapter_model.safetensors"
    sd = load_file(str(weights))
    key = next(k for k in sd if key_part in k)
    sd[key] = edit(sd[key].clone())
    save_file(sd, str(weights))
    return folder, key


def shard_folder(good: Good, dest: Path, index_text: str | None,
                 extra: dict[str, torch.Tensor] | None = None) -> Path:
    """The base split in two shards (embedding alone in the second), with this index."""
    dest.mkdir()
    sd = load_file(str(good.base))
    second = {EMBED: sd.pop(EMBED), **(extra or {})}
    save_file(sd, str(dest / "model-00001-of-00002.safetensors"))
    save_file(second, str(dest / "model-00002-of-00002.safetensors"))
    if index_text is not None:
        (dest / "model.safetensors.index.json").write_text(index_text)
    return dest


def index_text(good: Good, override: dict[str, str] | None = None) -> str:
    names = list(load_file(str(good.base)))
    wm = {k: "model-00002-of-00002.safetensors" if k == EMBED else
          "model-00001-of-00002.safetensors" for k in names}
    wm.update(override or {})
    return json.dumps({"metadata": {}, "weight_map": wm})


def file_damages(good: Good, d: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, damaged base-like file, expected message parts) for checkpoint files."""
    d.mkdir()
    data = good.base.read_bytes()
    rng = random.Random(9)
    evil_legacy = d / "evil_legacy.pt"
    evil_legacy.write_bytes(pickle.dumps({Q0: Evil(d / "PWNED")}, protocol=2))
    evil_zip = d / "evil_zip.pt"
    torch.save({Q0: Evil(d / "PWNED")}, evil_zip)
    pickled = d / "pickled.safetensors"
    torch.save(load_file(str(good.base)), pickled)
    fake_pt = d / "really_safetensors.pt"
    fake_pt.write_bytes(data)
    garbage_pt = d / "garbage.pt"
    garbage_pt.write_bytes(b"\x80\x02" + rng.randbytes(3000))
    (d / "truncated.safetensors").write_bytes(data[: len(data) * 3 // 5])
    (d / "empty.safetensors").write_bytes(b"")
    (d / "random.safetensors").write_bytes(rng.randbytes(4096))
    return [
        ("truncated", d / "truncated.safetensors", ["truncated", "re-download"]),
        ("overlap", two_tensors(d / "overlap.safetensors", [8, 24], 24),
         ["'b'", "overlaps", "re-download"]),
        ("past_end", two_tensors(d / "past_end.safetensors", [16, 32], 20),
         ["truncated", "re-download"]),
        ("gap", two_tensors(d / "gap.safetensors", [20, 36], 36),
         ["'b'", "gap", "re-download"]),
        ("absurd_header", raw_safetensors(d / "absurd.safetensors", {}, b"", length=2**60),
         ["header length", "re-download"]),
        ("unknown_dtype", raw_safetensors(
            d / "dtype.safetensors", {"w": {"dtype": "F12", "shape": [2],
                                            "data_offsets": [0, 8]}}, bytes(8)),
         ["'w'", "unknown dtype 'F12'", "re-download"]),
        ("name_twice", header_json(
            d / "twice.safetensors",
            b'{"w": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},'
            b' "w": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}'),
         ["'w' twice", "re-download"]),
        ("deep_header", header_json(d / "deep.safetensors",
                                               b'{"a":' + b"[" * 10**5 + b"]" * 10**5 + b"}"),
         ["not valid JSON", "RecursionError", "re-download"]),
        ("empty", d / "empty.safetensors", ["empty", "re-download"]),
        ("random_bytes", d / "random.safetensors", ["not a safetensors or torch checkpoint",
                                                    "check that the download is complete"]),
        ("garbage_pickle", garbage_pt, ["cannot read this torch file", "re-download"]),
        ("safetensors_is_pickle", pickled, ["named .safetensors but holds a torch pickle",
                                            "rename it to .pt"]),
        ("pickle_is_safetensors", fake_pt, ["named .pt but is a safetensors file",
                                            "rename it to really_safetensors.safetensors"]),
        ("evil_pickle", evil_legacy, ["would run code", "posix.system", "trusted source"]),
        ("evil_zip_pickle", evil_zip, ["would run code", "posix.system", "trusted source"]),
    ]


def base_cases(good: Good, d: Path) -> list[Case]:
    """Damaged bases merged with the good adapter."""
    cases = []
    for name, path, expect in file_damages(good, d):
        marker = d / "PWNED" if name.startswith("evil") else None
        cases.append(Case(f"base_{name}", [str(path), str(good.adapter)], [path.name, *expect],
                          [path, good.adapter], marker))
    return cases


def adapter_cases(good: Good, d: Path) -> list[Case]:
    """Damaged adapters merged into the good base."""
    d.mkdir()
    no_cfg = copy_adapter(good, d / "no_config")
    (no_cfg / "adapter_config.json").unlink()
    bad_cfg = copy_adapter(good, d / "bad_config")
    (bad_cfg / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    no_r = copy_adapter(good, d / "no_r")
    cfg = json.loads((no_r / "adapter_config.json").read_text())
    del cfg["r"]
    (no_r / "adapter_config.json").write_text(json.dumps(cfg))
    cut = copy_adapter(good, d / "cut")
    w = cut / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    evil = copy_adapter(good, d / "evil")
    (evil / "adapter_model.safetensors").unlink()
    (evil / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil(d / "PWNED")}, protocol=2))
    nan, nan_key = edit_adapter(good, d / "nan", "lora_B", _poison(float("nan")))
    inf, inf_key = edit_adapter(good, d / "inf", "lora_A", _poison(float("inf")))
    wide, wide_key = edit_adapter(good, d / "misfit", "q_proj.lora_B",
                                  lambda t: torch.cat([t, t]))
    other = d / "gpt2_adapter"
    peft_adapter(tiny_gpt2(), other, target_modules=["c_attn"], fan_in_fan_out=True)
    g = [str(good.base)]
    return [
        Case("peft_missing_config", [*g, str(no_cfg)], ["no_config", "adapter_config.json", "put back"]),
        Case("peft_broken_config", [*g, str(bad_cfg)], ["bad_config/adapter_config.json",
                                                         "restore"]),
        Case("peft_config_without_r", [*g, str(no_r)], ["no_r/adapter_config.json", "'r'",
                                                         "restore"]),
        Case("peft_truncated_weights", [*g, str(cut)], ["cut/adapter_model.safetensors",
                                                         "truncated", "re-download"]),
        Case("peft_evil_pickle", [*g, str(evil)], ["evil/adapter_model.bin", "would run code",
                                                    "trusted source"], marker=d / "PWNED"),
        Case("adapter_nan", [*g, str(nan)], ["nan", nan_key, "NaN/Inf", "re-export"]),
        Case("adapter_inf", [*g, str(inf)], ["inf", inf_key, "NaN/Inf", "re-export"]),
        Case("shape_misfit", [*g, str(wide)], ["misfit", "q_proj", "base shape [32, 32]",
                                               "trained for this base"]),
        Case("other_model", [*g, str(other)],
             ["gpt2_adapter", "c_attn", "match no tensor", "trained for this base"]),
    ]


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[3] = value
        return t
    return edit


def folder_cases(good: Good, d: Path) -> list[Case]:
    """Damaged Hugging Face model folders (sharded) merged with the good adapter."""
    d.mkdir()
    a = str(good.adapter)
    names = list(load_file(str(good.base)))
    first = '"model-00001-of-00002.safetensors"'
    twice = index_text(good).replace('"weight_map": {', f'"weight_map": {{"{names[1]}": {first}, ',
                                     1)
    return [
        Case("index_missing_shard", [str(shard_folder(good, d / "missing", index_text(
            good, {EMBED: "model-00003-of-00003.safetensors"}))), a],
             ["missing/model.safetensors.index.json", "model-00003-of-00003.safetensors",
              "download the missing shard"]),
        Case("index_names_tensor_twice", [str(shard_folder(good, d / "twice", twice)), a],
             ["twice/model.safetensors.index.json", names[1], "more than once",
              "download it again"]),
        Case("duplicate_across_shards", [str(shard_folder(
            good, d / "dupe", index_text(good), {Q0: torch.zeros(32, 32)})), a],
             ["dupe", Q0, "stored twice", "remove the duplicate"]),
        Case("index_escapes_folder", [str(shard_folder(good, d / "escape", index_text(
            good, {EMBED: "../base.safetensors"}))), a],
             ["escape/model.safetensors.index.json", EMBED, "not a file name inside",
              "download it again"]),
        Case("index_broken_json", [str(shard_folder(good, d / "broken", "{\"weight_map\": [")),
                                   a],
             ["broken/model.safetensors.index.json", "not a valid index file"]),
        Case("shards_without_index", [str(shard_folder(good, d / "noindex", None)), a],
             ["noindex", "2 weight files", "add the index file"]),
    ]


def overflow_cases(good: Good, d: Path) -> list[Case]:
    """Results beyond fp16's 65504: refused before anything is written."""
    d.mkdir()
    sd = load_file(str(good.base))
    sd[Q0][0] = 65504.0  # fits fp16 exactly; the adapter's delta pushes part of it past
    edge = state_dict_file({k: v.half() for k, v in sd.items()}, d / "fp16_edge.safetensors")
    big = load_file(str(good.base))
    big[EMBED][0, 0] = 1e6  # an untouched tensor that only a cast to fp16 breaks
    wide = state_dict_file(big, d / "fp32_big.safetensors")
    a = str(good.adapter)
    return [
        Case("fp16_merge_overflow", [str(edge), a],
             ["fp16_edge.safetensors", Q0, "65504", "--dtype bf16", "--dtype fp32"]),
        Case("fp16_cast_overflow", [str(wide), a, "--dtype", "fp16"],
             ["fp32_big.safetensors", EMBED, "1e+06", "--dtype bf16"]),
    ]


def all_cases(root: Path) -> tuple[Good, list[Case]]:
    good = make_good(root / "good")
    cases = (base_cases(good, root / "base") + adapter_cases(good, root / "adapter")
             + folder_cases(good, root / "folder") + overflow_cases(good, root / "overflow"))
    import corpus_more  # round two (issue 17); imports this module, so imported here

    return good, cases + corpus_more.all_cases(good, root)
