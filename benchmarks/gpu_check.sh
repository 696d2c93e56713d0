#!/usr/bin/env bash
# One-shot check of insid3_fast on a GPU machine:
#   1. build the extension with its CUDA kernels (pip install --no-build-isolation -e .)
#   2. run the CUDA op tests, then the whole test suite
#   3. compute-sanitizer memcheck + racecheck on the CUDA op tests (when compute-sanitizer exists)
#   4. pytest benchmarks/ --benchmark-only (when benchmarks exist), `insid3-fast bench` (when it exists)
#   5. print a results table and write it to benchmarks/results/gpu_<card-name>.md
# Every step runs even if an earlier one failed; each failure is reported loudly and the
# script exits non-zero at the end. Logs: benchmarks/results/logs/<step>.log.
#
# Environment: CUDA_HOME (autodetected if unset), MAX_JOBS (default: nproc),
# INSID3_PIP_DEPS=1 to let pip resolve dependencies (default --no-deps: GPU boxes are often
# offline and the dependencies are expected to be installed already), PYTHON (default python).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
RESULTS="$ROOT/benchmarks/results"
LOGS="$RESULTS/logs"
mkdir -p "$LOGS"

# ---- environment ------------------------------------------------------------------------------
if [[ -z "${CUDA_HOME:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    # resolve wrappers/symlinks: CUDA_HOME is the folder holding bin/nvcc and include/cuda_runtime.h
    for cand in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda /usr/local/cuda-*; do
      if [[ -x "$cand/bin/nvcc" && -f "$cand/include/cuda_runtime.h" ]]; then CUDA_HOME="$cand"; break; fi
    done
  else
    for cand in /usr/local/cuda /usr/local/cuda-*; do
      if [[ -x "$cand/bin/nvcc" ]]; then CUDA_HOME="$cand"; break; fi
    done
  fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"

CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
CARD="${CARD:-unknown-gpu}"
CARD_SLUG="$(echo "$CARD" | tr -c 'A-Za-z0-9._-' '-' | sed -e 's/--*/-/g' -e 's/^-//' -e 's/-$//')"
OUT_MD="$RESULTS/gpu_${CARD_SLUG}.md"

SAN=""
if command -v compute-sanitizer >/dev/null 2>&1; then SAN="$(command -v compute-sanitizer)";
elif [[ -n "$CUDA_HOME" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then SAN="$CUDA_HOME/bin/compute-sanitizer"; fi

declare -a NAMES STATUS SECS NOTES
FAILED=0

# run_step <name> <command...>: runs it, logs it, records PASS/FAIL, its time and a summary.
run_step() {
  local name="$1"; shift
  local log="$LOGS/${name}.log"
  echo
  echo "==== [$name] $*"
  local t0=$(date +%s)
  "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 25 "$log"
  # the pytest summary line ("== 12 passed, 3 skipped in 4.2s ==") or the last line
  local note
  note="$(grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* =+$' "$log" | tail -n1 | sed -e 's/^=* //' -e 's/ =*$//')"
  [[ -z "$note" ]] && note="$(grep -v '^\s*$' "$log" | tail -n1 | cut -c1-120)"
  if [[ $rc -eq 0 ]]; then
    STATUS+=("PASS")
  else
    STATUS+=("FAIL (rc=$rc)")
    FAILED=1
    echo "!!!!!!!! STEP FAILED: $name (rc=$rc) — see $log" >&2
  fi
  NAMES+=("$name"); SECS+=("$dt"); NOTES+=("${note//|//}")
}

skip_step() {
  NAMES+=("$1"); STATUS+=("SKIP"); SECS+=("0"); NOTES+=("$2")
  echo; echo "==== [$1] skipped: $2"
}

# ---- 1. build -----------------------------------------------------------------------------------
PIP_ARGS=(--no-build-isolation -e .)
[[ "${INSID3_PIP_DEPS:-0}" == "1" ]] || PIP_ARGS=(--no-deps "${PIP_ARGS[@]}")
run_step build "$PY" -m pip install -v "${PIP_ARGS[@]}"
run_step cuda_ops_loaded "$PY" -c "
import torch
from insid3_fast import ops
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))
assert torch.cuda.is_available(), 'no CUDA device visible to torch'
assert ops.load_error() is None, ops.load_error()
assert ops.native_available('cuda'), 'extension built without CUDA kernels (CUDA_HOME=$CUDA_HOME)'
print('insid3_fast._C loaded with CUDA kernels')
"

# ---- 2. tests -----------------------------------------------------------------------------------
run_step test_ops_cuda "$PY" -m pytest -q -rs tests/test_ops_cuda.py
run_step test_all "$PY" -m pytest -q -rs tests

# ---- 3. compute-sanitizer -----------------------------------------------------------------------
if [[ -n "$SAN" ]]; then
  # No caching allocator, so out-of-bounds accesses land outside any allocation and are caught.
  run_step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 99 \
    --leak-check no "$PY" -m pytest -q -x -m "not slow" tests/test_ops_cuda.py
  # racecheck (shared-memory hazards of the block reductions) is slow: a representative subset.
  run_step racecheck "$SAN" --tool racecheck --error-exitcode 99 \
    "$PY" -m pytest -q -x -m "not slow" tests/test_ops_cuda.py \
    -k "matches_cpu and (random-Q300 or n300 or 8x8-c8)"
  run_step synccheck "$SAN" --tool synccheck --error-exitcode 99 \
    "$PY" -m pytest -q -x -m "not slow" tests/test_ops_cuda.py -k "random-Q257 or n37 or 16x12-c4"
else
  skip_step memcheck "compute-sanitizer not found"
  skip_step racecheck "compute-sanitizer not found"
  skip_step synccheck "compute-sanitizer not found"
fi

# ---- 4. benchmarks ------------------------------------------------------------------------------
if compgen -G "benchmarks/test_*.py" >/dev/null || compgen -G "benchmarks/*_test.py" >/dev/null \
   || compgen -G "benchmarks/bench_*.py" >/dev/null; then
  if "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then
    run_step pytest_benchmark "$PY" -m pytest benchmarks/ --benchmark-only -q \
      --benchmark-json="$RESULTS/gpu_${CARD_SLUG}_benchmark.json"
  else
    skip_step pytest_benchmark "pytest-benchmark not installed"
  fi
else
  skip_step pytest_benchmark "no benchmark files under benchmarks/"
fi
if command -v insid3-fast >/dev/null 2>&1 && insid3-fast --help 2>/dev/null | grep -qw bench; then
  PUB=()
  [[ -n "${INSID3_PUBLISHED:-}" && -d "${INSID3_PUBLISHED:-}" ]] && PUB=(--published "$INSID3_PUBLISHED")
  # Post-backbone stages, ours against the published restatement (scikit-learn clustering) on
  # the same features (and the published code itself with $INSID3_PUBLISHED).
  run_step cli_bench insid3-fast bench --device cuda --sizes 512 1024 --shots 1 5 "${PUB[@]}" \
    --json "$RESULTS/gpu_${CARD_SLUG}_bench.json"
  # The published-vs-ours table: end to end with a ViT-L backbone (random weights), our
  # backbone in fp32 and bf16 at batch sizes 1/8/32 against one fp32 published episode per
  # target, and the captured call (one CUDA-graph replay per batch) against our eager path.
  run_step cli_bench_e2e insid3-fast bench --device cuda --backbone large --sizes 1024 --shots 1 5 \
    --batches 1 8 32 --precision fp32 bf16 --stages episode --repeats 3 \
    --json "$RESULTS/gpu_${CARD_SLUG}_e2e.json"
else
  skip_step cli_bench "no \`insid3-fast bench\` command"
fi

# ---- 5. table -----------------------------------------------------------------------------------
{
  echo "# insid3_fast GPU check — $CARD"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- nvidia-smi --query-gpu=name: $CARD"
  echo "- driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)"
  echo "- torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null)"
  echo "- CUDA_HOME: ${CUDA_HOME:-none}; compute-sanitizer: ${SAN:-none}"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo
  echo "| step | status | seconds | summary |"
  echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]} |"
  done
  if [[ -f "$LOGS/cli_bench.log" ]]; then
    echo; echo '## insid3-fast bench (post-backbone stages)'; echo; echo '```'; tail -n 60 "$LOGS/cli_bench.log"; echo '```'
  fi
  if [[ -f "$LOGS/cli_bench_e2e.log" ]]; then
    echo; echo '## published vs ours, end to end, ViT-L (per target)'; echo; echo '```'
    grep -E '^(stage|-{5,}|end_to_end|captured|backbone|episode)' "$LOGS/cli_bench_e2e.log"; echo '```'
  fi
  if [[ -f "$LOGS/pytest_benchmark.log" ]]; then
    echo; echo '## pytest-benchmark'; echo; echo '```'
    grep -E '^(Name|test_|-{5,})' "$LOGS/pytest_benchmark.log" | head -n 80; echo '```'
  fi
} >"$OUT_MD"

echo
echo "================================ RESULTS ($CARD) ================================"
cat "$OUT_MD"
echo "written to $OUT_MD"
if [[ $FAILED -ne 0 ]]; then
  echo "!!!!!!!! AT LEAST ONE STEP FAILED (see the table above and $LOGS)" >&2
  exit 1
fi
echo "all steps passed"
