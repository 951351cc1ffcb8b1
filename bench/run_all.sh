#!/usr/bin/env bash
# Every bench row of issue 19 in one command, markdown on stdout (progress on stderr).
#
#   bench/run_all.sh            # full: 1B fixture, medians of 3, PEFT rows (~50 min on 2 quiet cores, ~25 of them the extract peers)
#   bench/run_all.sh --quick    # smoke run: small models, one run each (~5 min)
#
# Run from the repository root, on a quiet machine if the figures are to be published:
# every ratio is taken between rows of one script run, so it holds under load, but the
# load average is printed with each table. Inputs are built once under bench/_work/.
# Other developers' rows (bench/combine.py, bench/extract.py, bench/resize.py,
# bench/inspect_stats.py) are called by name when present, else skipped with a note.
set -u
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
PY=${PYTHON:-python3}
# The scripts import lora_tools in-process too: this checkout's, whatever is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

section() { printf '\n## %s\n\n' "$1"; }
run() {  # run a bench script; a failure is reported and the next row still runs
  local t0=$SECONDS
  echo "+ $*" >&2
  if ! "$PY" "$@"; then echo "(failed: $*)"; fi
  echo "_(${*}: $((SECONDS - t0)) s)_"
}
has_opt() { "$PY" "$1" --help 2>/dev/null | grep -q -- "$2"; }
optional() {  # optional SCRIPT QUICK_ARGS... -- FULL_ARGS...
  local script=$1; shift
  local quick=() full=() seen=0
  for a in "$@"; do
    if [ "$a" = "--" ]; then seen=1; continue; fi
    if [ $seen = 0 ]; then quick+=("$a"); else full+=("$a"); fi
  done
  if [ ! -f "$script" ]; then echo "skipped: $script is not in this checkout"; return; fi
  if [ $QUICK = 1 ]; then
    if has_opt "$script" --quick; then run "$script" --quick; else run "$script" "${quick[@]}"; fi
  else
    run "$script" "${full[@]}"
  fi
}

echo "# lora-tools benchmarks ($([ $QUICK = 1 ] && echo quick smoke run || echo full run))"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null)"
echo "- machine: $(nproc) cores ($(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)),"\
     "$(free -g | awk '/Mem:/ {print $2}') GiB RAM, $(df -T . | awk 'NR==2 {print $2}')"
echo "- load at start: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ $QUICK = 1 ]; then
  section "merge against cp and PEFT (4-layer Llama, 1 run)"
  run bench/merge.py --layers 4 --runs 1
  section "verify and unmerge against merge (277 MB synthetic, 1 run)"
  run bench/unmerge_verify.py speed --small --runs 1
  section "scaling (0.25B, 1 run)"
  run bench/scaling.py --sizes 0.25b --runs 1
  section "threads (0.25B, 1 run)"
  run bench/threads.py --size 0.25b --runs 1
  section "phases of one merge (4 layers)"
  run bench/phases.py --layers 4 --runs 1
else
  section "merge against cp and PEFT (1B Llama, median of 3)"
  run bench/merge.py --runs 3 --cold
  section "verify and unmerge against merge (1B Llama, median of 3)"
  run bench/unmerge_verify.py speed --runs 3
  section "scaling: 0.25B, 1B, 3B (median of 3; PEFT at 3B)"
  run bench/scaling.py --runs 3 --peft 3b
  section "scaling with the outputs on tmpfs: the pipeline without the disk (one run)"
  run bench/scaling.py --runs 1 --out /dev/shm
  section "threads: --threads 1 against the default (1B, median of 3)"
  run bench/threads.py --runs 3
  section "phases of one merge (1B, median of 3)"
  run bench/phases.py --runs 3
fi

section "combine against PEFT add_weighted_adapter (issue 18/19, bench/combine.py)"
optional bench/combine.py --layers 1 -- --pair --runs 3 --dense-runs 1
section "extract against a full-SVD loop and mergekit (bench/extract.py; 2 blocks of the 1B, 14 weights)"
optional bench/extract.py --runs 1 -- --layers 2 --runs 1
section "resize in factor space (bench/resize.py)"
optional bench/resize.py --runs 1 --full-runs 1 -- --runs 3 --full-runs 1
section "inspect (bench/inspect_stats.py)"
optional bench/inspect_stats.py --runs 1 -- --runs 3

echo
echo "- load at end: $(cut -d' ' -f1-3 /proc/loadavg); total $(( $(date +%s) - START )) s"
