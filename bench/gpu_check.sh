#!/usr/bin/env bash
# The GPU check: every CUDA path of SAE Lab measured in at most 8 minutes on one GPU, most valuable first.
#
#   bench/gpu_check.sh [--dry-run] [--out DIR]
#
# Steps (bench/gpu_check.py, one function each; each under `timeout` so that one failure cannot eat the budget):
#   1. nvml              `python -m sae_core gpus --json` on the real device, then the launcher daemon's GPU
#                        sampler for 30 s into a fresh lab home (a process holding 1 GiB must be listed)
#   2. pytest_gpu        `pytest -m gpu`: NVML vs torch.cuda, bf16 autocast, the pinned feed on a side stream,
#                        the sparse kernels' torch fallbacks vs the CPU reference, DDP over NCCL (2 GPUs where
#                        there are 2), the compiled decoder kernel, the memory estimate on a small run
#   3. train_throughput  every TopK-family architecture of the registry, d_in 2304, d_sae 16384/65536, k 64,
#                        batch 4096/16384, fp32 and bf16 autocast: step ÷ encoder matmul, tokens/s, share of
#                        the measured bf16 matmul rate (target: TopK bf16 at d_sae 16384 <= 2x)
#   4. memory            the memory estimate vs torch.cuda.max_memory_allocated and NVML's process memory for
#                        every architecture, autocast, bf16 weights, micro-batches and a model evaluation
#                        (target +-10 %); writes memory/memory_constants.json (see "Using the result")
#   5. data_feed         rows/s into GPU memory from a warm float16 file at d_in 2304, and data_wait of a TopK
#                        run on it (target < 5 % of the step)
#   6. extraction        extraction vs the model's own forward, with a ~770 M-parameter Llama built here at
#                        random initialisation (tokenizer trained locally: nothing is downloaded)
#   7. streaming, 8. sweep: slots, reported "not yet available" until those job kinds exist
# Everything lands in DIR (default $OUT when set, else gpu_check_out/DATE): DIR/summary.md (one page: each
# step, its figures against its target, what failed; also printed at the end), DIR/environment.json, and per
# step DIR/STEP/{result.json,log.txt,run.json} plus its own files. Exit code 0 when the check ran (read the
# summary for failures), 2 when no usable python was found.
#
# --dry-run: every step on the CPU at tiny sizes with fake NVML GPUs, no targets judged (about 1.5 minutes on
# 2 cores). The test suite runs it (tests/bench/test_gpu_check.py) so the check is known to run before a GPU appears.
#
# Preparing a GPU box
#   Files: this working tree, nothing else (the check builds its activations, model and tokenizer itself).
#   Python: one whose torch has CUDA. The script takes, in order: $GPU_CHECK_PYTHON; ./.venv/bin/python if its
#   torch sees a GPU; python3, python if theirs does; else (no CUDA anywhere) the first with torch, and the
#   CUDA steps report "skipped". sae_core is imported from this tree (PYTHONPATH), never installed: the box's
#   python is left as it was, and no build backend or network is needed.
#   - With network: `PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 make install` (cu126/cu128/
#     cu130 to match the driver) gives .venv the CUDA build of the pinned torch 2.13.0 and every pinned
#     dependency: about 3 minutes for the CPU build on the project's VM, plus the CUDA wheels' few GB of
#     download (not timed: that VM cannot reach download.pytorch.org).
#   - Without network (a lent box, which usually has a CUDA torch already): the other packages the check
#     imports, pinned, are listed by `python -m bench.gpu_check --requirements`. On a machine with network:
#       pip download -d wheels $(python -m bench.gpu_check --requirements | grep -v '^torch==')   # 63 MB, py3.11
#     carry `wheels/` with the tree, and on the box:
#       pip install --no-index --find-links wheels $(python -m bench.gpu_check --requirements | grep -v '^torch==')
#     (39 s on the project's VM). A torch other than 2.13.0 is used and named in the summary; a missing
#     package is named under "What failed" (each step then fails within seconds, naming it).
#   The check builds its own inputs within its budget (a 0.6 GB activation set; the model, initialised on the GPU).
# Rehearsed on the CPU: a tree without .venv (stops at once, exit 2), another project's venv (sae_core taken
# from this tree), a venv with torch only (every step fails fast, naming the module), then with the wheels.
# Using the result: copy DIR/memory/memory_constants.json to $SAE_LAB_HOME/memory_constants.json (or name it
# in SAE_LAB_MEMORY_CONSTANTS) and the memory estimate takes the measured CUDA context, allocator headroom
# and (measured on 2 GPUs) NCCL bytes; record the figures in bench/RESULTS.md with the device named.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY=""
DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run" ;;
    --out) DIR="${2:?--out needs a folder}"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (allowed: --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
DIR="${DIR:-gpu_check_out/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$DIR" && DIR="$(cd "$DIR" && pwd)"
[ -n "$DRY" ] && export CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU box

# --- which python: one whose torch has CUDA (or any torch for a dry run) ------------------------------
torch_answers() {  # PY CHECK: does PY's torch exist (CHECK=any) or see a GPU (CHECK=cuda)?
  [ -x "$(command -v "$1" 2>/dev/null)" ] || return 1
  if [ "$2" = cuda ]; then
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
  else
    "$1" -c 'import torch' >/dev/null 2>&1
  fi
}
pick_python() {
  if [ -n "${GPU_CHECK_PYTHON:-}" ]; then echo "$GPU_CHECK_PYTHON"; return 0; fi
  local candidates=(.venv/bin/python python3 python) py
  if [ -z "$DRY" ]; then
    for py in "${candidates[@]}"; do torch_answers "$py" cuda && { echo "$py"; return 0; }; done
  fi
  for py in "${candidates[@]}"; do torch_answers "$py" any && { echo "$py"; return 0; }; done
  return 1
}
if ! PY="$(pick_python)"; then
  echo "no python with torch found (tried .venv/bin/python, python3, python): see the header of $0" >&2
  exit 2
fi
PY="$(command -v "$PY")"
# sae_core from this tree, whatever the python has installed (asked from / so that the current folder, which
# `python -m` puts first on the path, does not answer for the children that run elsewhere)
installed="$(cd / && "$PY" -c 'import os, sae_core; print(os.path.dirname(os.path.dirname(os.path.abspath(sae_core.__file__))))' 2>/dev/null)"
if [ "$installed" != "$REPO" ]; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")"  # GBs of shared inputs: never under DIR
export GPU_CHECK_WORK="$WORK"
trap 'rm -rf "$WORK"' EXIT
# --- the steps, each in its time box, within the budget (bench/gpu_check.py's plan) ----------------------
PLAN="$("$PY" -m bench.gpu_check --plan $DRY)" || { echo "cannot read the plan: is $PY's torch working?" >&2; exit 2; }
STEPS_BUDGET="$(sed -n 's/^steps_budget //p' <<< "$PLAN")"
deadline=$((STEPS_BUDGET))  # bash's SECONDS counts from this script's start: choosing python is included
echo "python: $PY${PYTHONPATH:+ (PYTHONPATH=$PYTHONPATH)}; out: $DIR; steps end by ${STEPS_BUDGET} s${DRY:+ (dry run)}"
"$PY" -m bench.gpu_check --environment --out "$DIR" $DRY > "$DIR/environment.log" 2>&1
while read -r step box; do
  left=$((deadline - SECONDS))
  if [ "$left" -lt 10 ]; then
    echo "$step: not run, the budget is spent"
    continue
  fi
  [ "$box" -gt "$left" ] && box=$left
  mkdir -p "$DIR/$step"
  started=$SECONDS
  timeout -k 10 "$box" "$PY" -m bench.gpu_check --step "$step" --out "$DIR" $DRY > "$DIR/$step/log.txt" 2>&1
  code=$?
  printf '{"exit_code": %d, "seconds": %d, "time_box": %d}\n' "$code" $((SECONDS - started)) "$box" > "$DIR/$step/run.json"
  echo "$step: exit code $code after $((SECONDS - started)) s (time box $box s)"
done < <(grep -v '^steps_budget ' <<< "$PLAN")

"$PY" -m bench.gpu_check --summary --out "$DIR"
cat "$DIR/summary.md"
