"""Property-based fuzzing of header parsing, format detection and adapter key mapping.

Bounded for the normal run (``FUZZ_EXAMPLES`` examples per property, a few seconds in all);
``LORA_TOOLS_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py`` runs the long
campaign described in docs/security.md.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lora_tools.adapters import load_adapter
from lora_tools.adapters.mapping import resolve
from lora_tools.errors import LoraToolsError, MatchError
from lora_tools.io.checkpoint import Checkpoint, open_file
from lora_tools.io.detect import SAFETENSORS, TORCH_LEGACY, TORCH_ZIP, sniff
from lora_tools.io.dtypes import ST_TO_TORCH, itemsize
from lora_tools.io.safetensors_file import TensorInfo, read_header

FUZZ_EXAMPLES = int(os.environ.get("LORA_TOOLS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_EXAMPLES <= 100,
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCRATCH = Path(tempfile.mkdtemp(prefix="lora-tools-fuzz-"))

json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8)
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=12)
dtype_names = st.sampled_from([*ST_TO_TORCH, "F12", "", "f32"])
entry = st.fixed_dictionaries({
    "dtype": dtype_names | json_value,
    "shape": st.lists(st.integers(-1, 5), max_size=3) | json_value,
    "data_offsets": st.lists(st.integers(-4, 64), min_size=2, max_size=2) | json_value,
})
headers = st.dictionaries(st.text(max_size=8), entry | json_value, max_size=4)


def write(data: bytes, suffix: str = "") -> Path:
    path = SCRATCH / f"f{os.getpid()}{suffix}"
    path.write_bytes(data)
    return path


def check_parsed(path: Path, infos: dict[str, TensorInfo]) -> None:
    """What a successful parse promises: sizes agree and tensors tile the data exactly."""
    size = path.stat().st_size
    spans = sorted((i.offset, i.nbytes) for i in infos.values())
    for info in infos.values():
        assert info.nbytes == math.prod(info.shape) * itemsize(info.dtype)
    ends = [o + n for o, n in spans]
    assert all(a == b for a, b in zip(ends, [o for o, _ in spans][1:], strict=False))
    assert not spans or ends[-1] == size


@FUZZ
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_format_error(data: bytes) -> None:
    path = write(data, ".safetensors")
    try:
        infos, _ = read_header(path)
    except LoraToolsError as err:
        assert str(path) in str(err)
        return
    check_parsed(path, infos)


@FUZZ
@given(headers, st.integers(0, 80), st.booleans())
def test_structured_headers_parse_or_raise_format_error(header: dict[str, object], pad: int,
                                                        lie: bool) -> None:
    blob = json.dumps(header).encode()
    length = len(blob) + (pad if lie else 0)
    path = write(struct.pack("<Q", length) + blob + bytes(pad), ".safetensors")
    try:
        infos, _ = read_header(path)
    except LoraToolsError as err:
        assert str(path) in str(err)
        return
    check_parsed(path, infos)


tensors = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
            max_size=12).filter(lambda k: k != "__metadata__"),
    st.tuples(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8]),
              st.lists(st.integers(0, 4), max_size=3)),
    max_size=5)


@FUZZ
@given(tensors, st.data())
def test_real_files_round_trip_and_survive_byte_damage(spec: dict[str, tuple[torch.dtype,
                                                       list[int]]], data: st.DataObject) -> None:
    """Files from the real safetensors library parse to exactly their tensors; any single
    damaged or cut byte gives a FormatError or a file that still reads consistently."""
    gen = torch.Generator().manual_seed(len(spec))
    sd = {k: (torch.randn(s, generator=gen) * 4).to(dt) for k, (dt, s) in spec.items()}
    path = SCRATCH / f"rt{os.getpid()}.safetensors"
    save_file(sd, str(path))
    assert sniff(path) == SAFETENSORS
    ck = open_file(path)
    assert sorted(ck.keys()) == sorted(sd)
    for k, t in sd.items():
        assert ck.info(k).shape == tuple(t.shape) and torch.equal(ck.get(k), t)
    raw = bytearray(path.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        raw[pos] = data.draw(st.integers(0, 255))
    else:
        raw = raw[:pos]
    hurt = write(bytes(raw), ".safetensors")
    try:
        damaged = open_file(hurt)
        for k in damaged.keys():
            damaged.get(k)
    except LoraToolsError as err:
        assert str(hurt) in str(err)


prefixes = st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05", b"{",
                            struct.pack("<Q", 16) + b"{"])


@FUZZ
@given(prefixes, st.binary(max_size=300), st.sampled_from(["", ".pt", ".bin", ".safetensors"]))
def test_format_detection_never_crashes(prefix: bytes, rest: bytes, suffix: str) -> None:
    path = write(prefix + rest, suffix)
    try:
        kind = sniff(path)
    except LoraToolsError as err:
        assert str(path) in str(err)
        return
    assert kind in (SAFETENSORS, TORCH_ZIP, TORCH_LEGACY)
    try:
        open_file(path)
    except LoraToolsError as err:
        assert str(path) in str(err)


class FakeCheckpoint(Checkpoint):
    """Names and shapes only: key mapping never reads tensor data."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__(Path(path))
        self._infos = {k: TensorInfo(k, torch.float32, s, 4 * math.prod(s), self.path, -1)
                       for k, s in shapes.items()}

    def get(self, name: str) -> torch.Tensor:
        return torch.zeros(self._infos[name].shape)


segment = st.from_regex(r"[a-z][a-z0-9]{0,3}|[0-9]", fullmatch=True)
module_paths = st.lists(st.lists(segment, min_size=1, max_size=4).map(".".join),
                        min_size=1, max_size=6, unique=True)


def write_peft(folder: Path, factors: dict[str, tuple[int, ...]], cfg: dict[str, object]) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: torch.zeros(s) for k, s in factors.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


@FUZZ
@given(module_paths, st.data())
def test_peft_keys_map_to_their_own_base_tensor(paths: list[str], data: st.DataObject) -> None:
    """A PEFT adapter on some modules of a base maps each module to its own weight, through
    a differing ``model.`` prefix, or the refusal names a real ambiguity."""
    dims = {p: (data.draw(st.integers(2, 6)), data.draw(st.integers(2, 6))) for p in paths}
    prefix = data.draw(st.sampled_from(["", "model."]))
    base = FakeCheckpoint("base.safetensors", {f"{prefix}{p}.weight": dims[p] for p in paths})
    chosen = data.draw(st.lists(st.sampled_from(paths), min_size=1, unique=True))
    factors: dict[str, tuple[int, ...]] = {}
    for p in chosen:
        out, inp = dims[p]
        factors[f"base_model.model.{p}.lora_A.weight"] = (2, inp)
        factors[f"base_model.model.{p}.lora_B.weight"] = (out, 2)
    folder = write_peft(SCRATCH / f"peft{os.getpid()}", factors,
                        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "fan_in_fan_out": False})
    adapter = load_adapter(folder)
    try:
        reports, _ = resolve([adapter], base)
    except MatchError as err:
        tails = any(a != b and (a.endswith("." + b) or b.endswith("." + a))
                    for a in paths for b in chosen)
        assert tails and str(folder) in str(err), str(err)
        return
    got = {m.module.name: m.base_key for m in reports[0].matches}
    assert got == {p: f"{prefix}{p}.weight" for p in chosen}


key_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=24) | \
    st.sampled_from(["m.lora_A.weight", "m.lora_B.weight", "e.lora_embedding_A",
                     "e.lora_embedding_B", "l.lora_A", "l.lora_B", "k.alpha",
                     "k.lora_down.weight", "k.lora_up.weight", "m.base_layer.weight"])
key_sets = st.dictionaries(key_names, st.lists(st.integers(0, 3), max_size=3).map(tuple),
                           max_size=6)


@FUZZ
@given(key_sets, st.sampled_from(["peft", "file"]))
# Found by the fuzzer: 0-d or 1-D factors, rank 0 and a vector alpha crashed the readers.
@example({"m.lora_A.weight": (), "m.lora_B.weight": ()}, "peft")
@example({"e.lora_embedding_A": (2, 3), "e.lora_embedding_B": (3,)}, "peft")
@example({"k.lora_down.weight": (0, 3), "k.lora_up.weight": (3, 0)}, "file")
@example({"k.lora_down.weight": (2, 3), "k.lora_up.weight": (3, 2), "k.alpha": (2,)}, "file")
def test_arbitrary_adapter_keys_load_or_refuse(keys: dict[str, tuple[int, ...]],
                                               form: str) -> None:
    """Whatever keys and shapes an adapter file holds, reading it (PEFT folder, or a plain
    file sniffed as kohya / loralib) gives modules or a library error naming the file."""
    if form == "peft":
        target = write_peft(SCRATCH / f"keys{os.getpid()}", keys,
                            {"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    else:
        target = SCRATCH / f"keys{os.getpid()}.safetensors"
        save_file({k: torch.zeros(s) for k, s in keys.items()}, str(target))
    try:
        adapter = load_adapter(target, alpha=None if form == "peft" else 2.0)
    except LoraToolsError as err:
        assert target.name in str(err)
        return
    for m in adapter.modules:
        assert m.a_key in keys and m.b_key in keys and m.rank >= 0


def test_header_length_that_looks_like_a_pickle_opcode() -> None:
    """Found by the fuzzer: a header of 0x380 bytes starts the file with b"\\x80\\x03", a
    pickle's first two bytes; the file must still be read as safetensors."""
    blob = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    blob += b" " * (0x380 - len(blob))
    path = write(struct.pack("<Q", len(blob)) + blob + struct.pack("<2f", 1.5, -2.0),
                 ".safetensors")
    assert path.read_bytes()[:2] == b"\x80\x03" and sniff(path) == SAFETENSORS
    assert torch.equal(open_file(path).get("w"), torch.tensor([1.5, -2.0]))
