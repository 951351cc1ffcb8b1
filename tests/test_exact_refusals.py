"""What cannot be merged exactly is refused before any output: integer (quantized) targets,
non-float factors, and results past the output dtype's range, for every float dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file, tiny_llama
from safetensors.torch import load_file, save_file

from lora_tools.adapters import load_adapter
from lora_tools.cli import cli
from lora_tools.errors import FormatError, NumericError
from lora_tools.merging.kernel import DeltaSum
from lora_tools.merging.merge import merge

Q = "model.layers.0.self_attn.q_proj.weight"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _case(tmp: Path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], Path]:
    model = tiny_llama(dtype)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    peft_adapter(model, tmp / "a")
    return sd, tmp / "a"


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_compressed_tensors_int8_base_is_refused(tmp_path: Path) -> None:
    sd, adapter = _case(tmp_path)
    scale = sd[Q].abs().amax(1, keepdim=True) / 127
    sd[Q] = torch.round(sd[Q] / scale).clamp(-128, 127).to(torch.int8)
    sd[Q.replace(".weight", ".weight_scale")] = scale
    base = state_dict_file(sd, tmp_path / "w8a8.safetensors")
    code, out = _cli("merge", base, adapter, "-o", tmp_path / "out.safetensors")
    assert code == 1 and out.startswith("Error:") and out.count("\n") == 1, out
    assert "compressed-tensors int8" in out and Q in out and "full-precision" in out
    assert "Traceback" not in out and not (tmp_path / "out.safetensors").exists()


def test_any_integer_target_is_refused_naming_it(tmp_path: Path) -> None:
    sd, adapter = _case(tmp_path)
    sd[Q] = (sd[Q] * 1000).to(torch.int32)  # integer codes, no scale beside them
    base = state_dict_file(sd, tmp_path / "ints.safetensors")
    with pytest.raises(FormatError, match=rf"{Q} is int32.*truncated"):
        merge(base, [adapter], tmp_path / "out.safetensors", device="cpu")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.int64])
def test_non_float_factors_refused_at_read(tmp_path: Path, dtype: torch.dtype) -> None:
    _, adapter = _case(tmp_path)
    f = adapter / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd[B_KEY] = (sd[B_KEY] > 0).to(dtype)
    save_file(sd, str(f))
    with pytest.raises(FormatError, match=rf"{B_KEY} is {str(dtype)[6:]}, not a floating"):
        load_adapter(adapter)


def test_loralib_int_factor_refused(tmp_path: Path) -> None:
    f = state_dict_file({"fc.lora_A": torch.ones(2, 4, dtype=torch.int8),
                         "fc.lora_B": torch.zeros(3, 2)}, tmp_path / "l.pt")
    with pytest.raises(FormatError, match="fc.lora_A is int8"):
        load_adapter(f, alpha=2)


def _overflowing(tmp: Path, dtype: torch.dtype, top: float, push: float
                 ) -> tuple[Path, Path, float]:
    """A base whose q_proj[0, 0] sits near ``top`` and a weight that pushes it by ``push``."""
    sd, adapter = _case(tmp, dtype)
    a, b = (load_file(str(adapter / "adapter_model.safetensors"))[k] for k in (A_KEY, B_KEY))
    d = float((b.float() @ a.float())[0, 0]) * 2.0  # alpha/r = 8/4
    sd[Q][0, 0] = top if d > 0 else -top
    return state_dict_file(sd, tmp / "base.safetensors"), adapter, push / abs(d)


@pytest.mark.parametrize(("dtype", "top", "push"), [
    (torch.bfloat16, 3.3895e38, 1e36),  # bf16's max + 1e36: finite in fp32, inf in bf16
    (torch.float32, 3.3e38, 2e37),  # past fp32 itself
])
def test_overflow_refused_for_wide_dtypes(tmp_path: Path, dtype: torch.dtype, top: float,
                                          push: float) -> None:
    base, adapter, weight = _overflowing(tmp_path, dtype, top, push)
    out = tmp_path / "out.safetensors"
    with pytest.raises(NumericError, match=rf"{Q}: 1 values beyond {str(dtype)[6:]}'s largest"):
        merge(base, [adapter], out, device="cpu", weights=[weight])
    assert not out.exists() and [p.name for p in tmp_path.iterdir()
                                 if p.name.startswith("out")] == []


def test_overflow_edge_still_merges_when_it_fits(tmp_path: Path) -> None:
    base, adapter, weight = _overflowing(tmp_path, torch.bfloat16, 3.3e38, 1e36)
    merge(base, [adapter], tmp_path / "out.safetensors", device="cpu", weights=[weight])
    assert torch.isfinite(read(tmp_path / "out.safetensors")[Q].float()).all()


class _SyncFree(DeltaSum):
    def _sync_free(self) -> bool:  # the GPU's path (no host syncs), run on the CPU
        return True


def test_bf16_overflow_caught_on_the_device_path(tmp_path: Path) -> None:
    from lora_tools.adapters.mapping import resolve
    from lora_tools.io import open_checkpoint

    base_path, adapter_path, weight = _overflowing(tmp_path, torch.bfloat16, 3.3895e38, 1e36)
    base, adapter = open_checkpoint(base_path), load_adapter(adapter_path)
    (report,), _ = resolve([adapter], base)
    match = next(m for m in report.matches if m.base_key == Q)
    fn, w = _SyncFree([(adapter, match, weight)], torch.device("cpu")), base.get(Q)
    with pytest.raises(NumericError, match=f"merged tensor {Q}"):
        fn.rows(Q, w, 0, w.shape[0], torch.bfloat16, last=True)
