"""The compiled add-and-round of a bf16 merge (merging/add_round.py): the bits of torch's
path (scale, add, round) for every bf16 base value, ties and overflow included, and a
whole merge that is PEFT's bit for bit with the kernel on and off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import mid_llama, peft_adapter, read, state_dict_file

from lora_tools.merging import add_round
from lora_tools.merging.merge import merge

pytest.importorskip("numba")


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.delenv("LORA_TOOLS_NO_NUMBA", raising=False)
    add_round.reset()
    k = add_round.kernel()
    assert k is not None
    yield k
    add_round.reset()  # later tests take torch's path unless they load it themselves


def _torch(d: torch.Tensor, factor: float, w: torch.Tensor) -> torch.Tensor:
    """What kernel.py's torch path does with one term: scale, add W, round."""
    acc = d.clone() if factor == 1.0 else d.clone().mul_(factor)
    return acc.add_(w).to(torch.bfloat16)


def _kernel(k: object, d: torch.Tensor, factor: float, w: torch.Tensor
            ) -> tuple[torch.Tensor, bool]:
    out = torch.empty_like(w)
    bad = add_round.add_round(k, d.contiguous(), factor, w.contiguous(), out)
    return out, bad


def _all_bf16() -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(
        torch.bfloat16)


@pytest.mark.parametrize("factor", [1.0, 2.0, 0.5, 1 / 3, -1.7, 1e-3])
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3])
def test_every_bf16_base_value_as_torch_rounds_it(kernel: object, factor: float,
                                                  scale: float) -> None:
    w = _all_bf16()
    finite = torch.isfinite(w.float())
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) * scale
    mine, bad = _kernel(kernel, d, factor, w)
    ref = _torch(d, factor, w)
    assert bad  # the Inf and NaN base values are found
    same = mine.view(torch.int16) == ref.view(torch.int16)
    ok = torch.isfinite(ref.float())
    assert bool(same[finite & ok].all()), int((~same[finite & ok]).sum())
    # every non-finite result (a NaN/Inf base, or an overflow) is an Inf in ours: refused
    assert bool(torch.isinf(mine.float())[~(finite & ok)].all())
    mine_ok, bad_ok = _kernel(kernel, d[finite & ok], factor, w[finite & ok])
    assert not bad_ok and torch.equal(mine_ok.view(torch.int16),
                                      ref[finite & ok].view(torch.int16))


def test_ties_round_to_even(kernel: object) -> None:
    # bf16 keeps 8 significant bits: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7
    w = torch.tensor([1.0, 1.0 + 2**-7, -1.0, -(1.0 + 2**-7), 0.0], dtype=torch.bfloat16)
    d = torch.tensor([2**-8, 2**-8, -(2**-8), -(2**-8), 2**-130])  # a bf16 subnormal
    mine, bad = _kernel(kernel, d, 1.0, w)
    assert not bad
    assert mine.tolist() == [1.0, 1.0 + 2**-6, -1.0, -(1.0 + 2**-6), 2**-130]
    assert torch.equal(mine.view(torch.int16), _torch(d, 1.0, w).view(torch.int16))


def test_an_overflow_past_bf16_is_found(kernel: object) -> None:
    top = torch.finfo(torch.bfloat16).max
    w = torch.tensor([top, -top, 1.0], dtype=torch.bfloat16)
    d = torch.tensor([top * 2**-8, -top * 2**-8, 0.0])  # finite in fp32, Inf in bf16
    mine, bad = _kernel(kernel, d, 1.0, w)
    assert bad and mine[:2].float().isinf().all() and mine[2] == 1.0
    assert torch.equal(mine.view(torch.int16), _torch(d, 1.0, w).view(torch.int16))


def test_a_merge_is_peft_s_with_the_kernel_and_without(tmp_path: Path, kernel: object,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    model = mid_llama(torch.bfloat16)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft_adapter(model, tmp_path / "adapter", r=16, lora_alpha=24, target_modules=targets)
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    used: list[int] = []
    real = add_round.add_round

    def counting(*args: object) -> bool:
        used.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(add_round, "add_round", counting)
    merge(base, [tmp_path / "adapter"], tmp_path / "fast.safetensors", device="cpu")
    assert used  # the kernel ran
    add_round.reset()
    monkeypatch.setenv("LORA_TOOLS_NO_NUMBA", "1")
    n = len(used)
    merge(base, [tmp_path / "adapter"], tmp_path / "torch.safetensors", device="cpu")
    assert len(used) == n  # and here it did not
    fast, slow = read(tmp_path / "fast.safetensors"), read(tmp_path / "torch.safetensors")
    for key, value in ref.items():
        assert torch.equal(fast[key], slow[key]), key
        if key != "model.embed_tokens.weight":  # not adapted here; PEFT's own copy
            assert torch.equal(fast[key], value), key


def test_an_unmerge_is_the_same_with_the_kernel_and_without(
        tmp_path: Path, kernel: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """unmerge's blocks, observed by its proof, rounded by the kernel or by torch: the same
    bytes and the same report (PEFT's own merge unmerged)."""
    from lora_tools.merging import preimage_fused
    from lora_tools.merging.unmerge import unmerge

    model = mid_llama(torch.bfloat16)
    targets = ["q_proj", "v_proj", "down_proj"]
    pm = peft_adapter(model, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=targets)
    merged = state_dict_file(pm.merge_and_unload().state_dict(), tmp_path / "m.safetensors")
    used: list[int] = []
    real = add_round.add_round
    monkeypatch.setattr(add_round, "add_round",
                        lambda *a: used.append(1) or real(*a))  # type: ignore[func-returns-value]
    fast = unmerge(merged, [tmp_path / "adapter"], tmp_path / "fast.safetensors").to_dict()
    assert used and preimage_fused.available()  # the same compiled proof both times
    monkeypatch.setattr(add_round, "ready", lambda: None)  # torch rounds each block
    n = len(used)
    slow = unmerge(merged, [tmp_path / "adapter"], tmp_path / "slow.safetensors").to_dict()
    assert len(used) == n
    a, b = read(tmp_path / "fast.safetensors"), read(tmp_path / "slow.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for d in (fast, slow):
        d.pop("seconds", None)
        d.pop("out")
    assert fast == slow
