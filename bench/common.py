"""Shared pieces of the benchmarks: the cached 1B Llama checkpoint, its adapter, timing.

Everything built is cached under ``bench/_work/`` (git-ignored), so a second run only
times. Each timed command runs in a fresh child process whose own peak RSS is read with
``getrusage(RUSAGE_CHILDREN)`` by a small wrapper process, so one run's peak never leaks
into another's.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORK = Path(__file__).resolve().parent / "_work"
BASE = WORK / "llama-1b-bf16"
ADAPTER = WORK / "lora-r16-all-linear"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Runs the command given as argv in a child and prints {"wall": s, "rss": bytes} for it
# alone: the wrapper is fresh, so RUSAGE_CHILDREN holds exactly that one child.
_WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
out = proc.stdout.decode(errors="replace")[-100000:]
print(json.dumps({"rc": proc.returncode, "wall": wall, "rss": rss, "stdout": out}))
"""


# Llama-shaped sizes for the scaling bench: (hidden, intermediate, layers); "1b" is BASE.
SHAPES = {"0.25b": (1024, 2816, 16), "1b": (2048, 5632, 16), "3b": (3072, 8192, 24)}


def llama_config(layers: int = 16, hidden: int = 2048,  # type: ignore[no-untyped-def]
                 intermediate: int = 5632):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                       intermediate_size=intermediate, vocab_size=32000,
                       num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def shaped(size: str) -> tuple[Path, Path]:
    """(base, adapter) of a ``SHAPES`` size, built once and cached under ``WORK``."""
    hidden, inter, layers = SHAPES[size]
    if size == "1b":
        base = build_base()
        return base, build_adapter(base)
    shape = {"hidden": hidden, "intermediate": inter, "layers": layers}
    base = build_base(WORK / f"llama-{size}-bf16", **shape)
    return base, build_adapter(base, WORK / f"lora-r16-all-linear-{size}", **shape)


def build_base(folder: Path = BASE, seed: int = 0, layers: int = 16, hidden: int = 2048,
               intermediate: int = 5632) -> Path:
    """A ~1.09B-parameter bf16 Llama in two safetensors shards, via ``save_pretrained``
    (``layers``: fewer blocks for a smaller model, ~100 MB each).

    Built on the meta device and filled in bf16 in place, so it never holds an fp32 copy
    of the model (2.2 GB of RAM instead of 4.4 GB plus the default initializers' time).
    """
    if (folder / "config.json").is_file():  # renamed into place only once complete
        return folder
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(layers, hidden, intermediate)).to(torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="2GB" if hidden > 2048 else "1200MB")
    tmp.rename(folder)
    return folder


def build_adapter(base: Path = BASE, folder: Path = ADAPTER, rank: int = 16,
                  seed: int = 1, dora: bool = False, layers: int = 16, hidden: int = 2048,
                  intermediate: int = 5632) -> Path:
    """A rank-16 PEFT LoRA on every linear layer of the blocks, with random non-zero B
    (with ``dora``: use_dora, magnitudes random in [0.5, 1.5))."""
    if (folder / "adapter_config.json").is_file():
        return folder
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(layers, hidden, intermediate)).to(torch.bfloat16)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0,
                     use_dora=dora)
    pm = get_peft_model(model, cfg)
    pm.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pm.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


@dataclass
class Timing:
    label: str
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)  # seconds the command reports itself

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def peak(self) -> int:
        return max(self.rss)


def run_once(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of ``argv`` run in a fresh process."""
    res = run_full(argv, env)
    return float(res["wall"]), int(res["rss"])


def run_full(argv: list[str], env: dict[str, str] | None = None,
             whole: bool = False) -> dict[str, Any]:
    """``run_once`` plus the command's standard output (``stdout``: its last 100,000
    characters, or all of it with ``whole``)."""
    wrapper = _WRAPPER.replace("[-100000:]", "") if whole else _WRAPPER
    done = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True,
                          text=True, check=True, env=env)
    res: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with exit status {res['rc']}")
    return res


def use_compiled(*trees: Path) -> None:
    """Time lora-tools as installed, its modules byte-compiled once: pip compiles them at
    install, but a checkout run where PYTHONDONTWRITEBYTECODE is set (this machine sets it)
    recompiled every module on every run, 0.25-0.4 s of each merge. The .pyc files go
    under bench/_work/pycache (PYTHONPYCACHEPREFIX), never into the checkouts; every
    command run after this call, ours and the peers', reads them."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(WORK / "pycache")
    for tree in trees:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "lora_tools")],
                       check=True, stdout=subprocess.DEVNULL)


def settle(*paths: Path) -> None:
    """Remove earlier outputs and flush dirty pages so each run starts from the same state."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    os.sync()
    time.sleep(0.5)


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (their pages are clean once synced), so
    the next command reads them from the disk; no root needed, unlike drop_caches."""
    for f in folder.resolve().rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (on {os.cpu_count()} cores)"
