"""Tucker LoKr (lokr_t2) and norm diffs (w_norm/b_norm), built by lycoris-lora itself:
our merge must give its own weights bit for bit (fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lora_tools import merge
from tests.helpers import read
from tests.lycoris_cases import build, lycoris_weights, reloaded

pytest.importorskip("lycoris")


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    {"use_tucker": True, "factor": 2, "dim": 1},  # lokr_t2 on the 3x3 conv, w1 whole
    {"use_tucker": True, "factor": 2, "dim": 2, "decompose_both": True},
])
def test_tucker_lokr_against_lycoris_forward(tmp_path: Path, kw: dict[str, Any]) -> None:
    _, net, base, adapter = build(tmp_path, "lokr", **kw)
    merge(base, [adapter], tmp_path / "out.safetensors")
    got = read(tmp_path / "out.safetensors")
    want = lycoris_weights(net, read(base))
    assert set(want) == {"fc1.weight", "conv.weight", "pw.weight"}
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    # (lycoris-lora 4.1.3's own loader cannot rebuild a Tucker LoKr with w1 whole: it takes
    # the rank from lokr_w2_a.size(1), which is out_k under Tucker; the trained network is
    # the oracle here.)


@pytest.mark.slow
def test_norm_diffs_from_train_norm(tmp_path: Path) -> None:
    _, net, base, adapter = build(tmp_path, "loha", train_norm=True,
                                  modules=("Linear", "Conv2d", "LayerNorm"))
    keys = set(read(adapter))
    assert {"lycoris_norm.w_norm", "lycoris_norm.b_norm"} <= keys
    merge(base, [adapter], tmp_path / "out.safetensors")
    got, b = read(tmp_path / "out.safetensors"), read(base)
    assert not torch.equal(got["norm.weight"], b["norm.weight"])
    for oracle in (net, reloaded(base, adapter)):
        norm = next(m for m in oracle.loras if type(m).__name__ == "NormModule")
        weight, bias = norm.make_weight(1.0)  # LyCORIS NormModule: W + w_norm, b + b_norm
        assert torch.equal(got["norm.weight"], weight) and torch.equal(got["norm.bias"], bias)
        for key, value in lycoris_weights(
                type("N", (), {"loras": [m for m in oracle.loras if m is not norm]})(),
                b).items():
            assert torch.equal(got[key], value), key
