#!/usr/bin/env bash
# The one prepared device check (issue: the CUDA path). On a bare GPU machine that has torch,
# peft, transformers, safetensors, click, tqdm, pytest and hypothesis but no network:
# installs this project without dependencies, runs every test marked `cuda`, then the GPU
# benchmarks, and writes report.md (and cuda_tests.txt) to $OUT (or the folder given).
# Budget: <= 8 minutes on one H200 with 16 cores, fixtures included.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench/_work/gpu-report}}"
mkdir -p "$OUT"
export OUT
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
} > "$OUT/setup.txt" 2>&1
timeout 470 python3 bench/gpu_check.py --out "$OUT" "${@:2}"
rc=$?
cat "$OUT/report.md" 2>/dev/null
exit $rc
