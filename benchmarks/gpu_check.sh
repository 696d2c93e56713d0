#!/usr/bin/env bash
# One-shot check of insid3_fast on a GPU machine, sized for a lent device (one call of at most
# 10 minutes; `GPU_CHECK_BUDGET_S`, default 480 s, leaves time to rerun). Steps, most important
# first; a step that would start after its share of the budget is skipped and reported as such:
#   1. build the extension with its CUDA kernels for this card only (pip install --no-build-isolation -e .)
#   2. the CUDA op tests and the real CUDA-graph capture test (the emulated cases run in CI, not here)
#   3. the published-vs-ours table: end to end with a ViT-L backbone, fp32 and bf16, batch 1/8/32,
#      and the captured call; then the post-backbone stages
#   4. compute-sanitizer memcheck / racecheck / synccheck on subsets of the CUDA op tests
#   5. the rest of the test suite (not emulated, not slow)
#   6. print a results table and write it to benchmarks/results/gpu_<card-name>.md
# Every step runs even if an earlier one failed; each failure is reported loudly. Exit status: 0
# only when every step ran and passed, 1 when one failed, 3 when none failed but some were skipped
# (out of time, no compute-sanitizer): an incomplete check is not called a pass.
# Logs: benchmarks/results/logs/<step>.log. Where $OUT is set (the device tool's output folder),
# this run's results go there after every step, so what finished comes back even if the call is
# cut off: the table, the two bench JSONs and the logs as one archive (the tool brings back at
# most 8 files of at most 16 MiB each, so each log goes in as its last 1 MiB at most: ten of
# them stay under 16 MiB even if nothing compresses).
#
# Environment: CUDA_HOME (autodetected if unset), MAX_JOBS (default: nproc),
# INSID3_PIP_DEPS=1 to let pip resolve dependencies (default --no-deps: GPU boxes are often
# offline and the dependencies are expected to be installed already), PYTHON (default python3),
# TORCH_CUDA_ARCH_LIST (default: this card's compute capability), GPU_CHECK_BUDGET_S,
# INSID3_PUBLISHED (a checkout of visinf/INSID3: the bench also times the published code itself),
# GPU_CHECK_WHEELS (default .wheels: wheels installed with --no-deps before the build).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
OUT_OF_TIME=""
T_START=$(date +%s)
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
# One architecture, this card's: half the compile time of CI's 8.0;9.0+PTX.
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${CAP:-8.0;9.0+PTX}}"

CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
CARD="${CARD:-unknown-gpu}"
CARD_SLUG="$(echo "$CARD" | tr -c 'A-Za-z0-9._-' '-' | sed -e 's/--*/-/g' -e 's/^-//' -e 's/-$//')"
OUT_MD="$RESULTS/gpu_${CARD_SLUG}.md"
# This run's files only: logs/ is git-ignored and a warm machine keeps it, so an earlier run's
# logs, table and JSONs would otherwise come back (and be pasted into the table) as this run's.
rm -f "$LOGS"/*.log "$OUT_MD" "$RESULTS/gpu_${CARD_SLUG}_e2e.json" "$RESULTS/gpu_${CARD_SLUG}_bench.json"

SAN=""
if command -v compute-sanitizer >/dev/null 2>&1; then SAN="$(command -v compute-sanitizer)";
elif [[ -n "$CUDA_HOME" && -x "$CUDA_HOME/bin/compute-sanitizer" ]]; then SAN="$CUDA_HOME/bin/compute-sanitizer"; fi

declare -a NAMES STATUS SECS NOTES
FAILED=0
SKIPPED=0

LOG_TAIL_BYTES=$(( 1024 * 1024 ))
save_results() {
  [[ -n "${OUT:-}" && -d "${OUT:-}" ]] || return 0
  local f stage
  stage="$(mktemp -d)" || return 0
  for f in "$OUT_MD" "$RESULTS/gpu_${CARD_SLUG}_e2e.json" "$RESULTS/gpu_${CARD_SLUG}_bench.json"; do
    [[ -f "$f" ]] && cp "$f" "$OUT/"
  done
  mkdir -p "$stage/logs"
  for f in "$LOGS"/*.log; do
    [[ -f "$f" ]] && tail -c "$LOG_TAIL_BYTES" "$f" >"$stage/logs/$(basename "$f")"
  done
  tar -czf "$OUT/gpu_${CARD_SLUG}_logs.tar.gz.part" -C "$stage" logs \
    && mv -f "$OUT/gpu_${CARD_SLUG}_logs.tar.gz.part" "$OUT/gpu_${CARD_SLUG}_logs.tar.gz"
  rm -rf "$stage" "$OUT/gpu_${CARD_SLUG}_logs.tar.gz.part"
  return 0
}

# run_step <name> <share> <command...>: runs it if the elapsed time is under <share> % of the
# budget (else records SKIP), with a timeout of what is left of the budget; logs it, records
# PASS/FAIL, its time and a summary, and saves the results folder.
run_step() {
  local name="$1" share="$2"; shift 2
  local log="$LOGS/${name}.log"
  local elapsed=$(( $(date +%s) - T_START ))
  if [[ -n "$OUT_OF_TIME" ]] || (( elapsed * 100 >= BUDGET * share )); then
    # Once one step is skipped for time, so are all after it (they matter less).
    OUT_OF_TIME=1
    skip_step "$name" "out of time: ${elapsed} s of the ${BUDGET} s budget used (starts only before ${share} %)"
    return
  fi
  local left=$(( BUDGET - elapsed ))
  echo
  echo "==== [$name] $*"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$left" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 25 "$log"
  # the pytest summary line ("== 12 passed, 3 skipped in 4.2s ==") or the last line
  local note
  # pytest's result line ("12 passed, 3 skipped in 4.2s", with or without === borders), also
  # under compute-sanitizer (whose own "ERROR SUMMARY" line comes after it); else the last line.
  note="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$log" | tail -n1 | sed -e 's/^=* //' -e 's/ =*$//')"
  local san_note
  san_note="$(grep -E 'ERROR SUMMARY' "$log" | tail -n1 | sed -e 's/^=* *//')"
  [[ -n "$san_note" ]] && note="${note:+$note; }$san_note"
  [[ -z "$note" ]] && note="$(grep -v '^\s*$' "$log" | tail -n1 | cut -c1-120)"
  if [[ $rc -eq 0 ]]; then
    STATUS+=("PASS")
  else
    STATUS+=("FAIL (rc=$rc)")
    FAILED=1
    echo "!!!!!!!! STEP FAILED: $name (rc=$rc) — see $log" >&2
  fi
  [[ $rc -eq 124 || $rc -eq 137 ]] && note="timed out at the end of the budget; ${note}"
  NAMES+=("$name"); SECS+=("$dt"); NOTES+=("${note//|//}")
  save_results
}

skip_step() {
  NAMES+=("$1"); STATUS+=("SKIP"); SECS+=("0"); NOTES+=("$2"); SKIPPED=$(( SKIPPED + 1 ))
  echo; echo "==== [$1] skipped: $2"
}

# ---- 1. build -----------------------------------------------------------------------------------
# Wheels carried to an offline device (e.g. `pip download --no-deps -d .wheels 'timm==1.0.31'`
# here, then the device call with carry [".wheels"]): installed first, without dependencies.
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.wheels}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  run_step wheels 100 "$PY" -m pip install --no-deps --no-index "$WHEELS"/*.whl
fi
PIP_ARGS=(--no-build-isolation -e .)
[[ "${INSID3_PIP_DEPS:-0}" == "1" ]] || PIP_ARGS=(--no-deps "${PIP_ARGS[@]}")
run_step build 100 "$PY" -m pip install -v "${PIP_ARGS[@]}"
run_step cuda_ops_loaded 100 "$PY" -c "
import setuptools, torch
from insid3_fast import ops
# setuptools: the build runs with the image's own (--no-build-isolation); >= 64 builds
print('setuptools', setuptools.__version__)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))
assert torch.cuda.is_available(), 'no CUDA device visible to torch'
assert ops.load_error() is None, ops.load_error()
assert ops.native_available('cuda'), 'extension built without CUDA kernels (CUDA_HOME=$CUDA_HOME)'
print('insid3_fast._C loaded with CUDA kernels')
"

# ---- 2. the CUDA tests (the emulated cases run in CI on the CPU) --------------------------------
run_step test_ops_cuda 60 "$PY" -m pytest -q -rs -m "not slow" -k "not emu" tests/test_ops_cuda.py \
  tests/test_capture.py tests/test_model.py tests/test_crf_devices.py

# ---- 3. the published-vs-ours table, then the post-backbone stages ------------------------------
# Optional arguments as arrays, expanded as ${A[@]+"${A[@]}"}: bash < 4.4 calls an empty
# array unbound under set -u.
PUB=()
[[ -n "${INSID3_PUBLISHED:-}" && -d "${INSID3_PUBLISHED:-}" ]] && PUB=(--published "$INSID3_PUBLISHED")
# End to end with a ViT-L backbone (random weights, 1024 px, N = 4096): our backbone in fp32 and
# bf16 at batch sizes 1/8/32 against one fp32 published episode per target (the published code
# restated, scikit-learn clustering), and the captured call (one CUDA-graph replay per batch)
# against our eager path.
run_step bench_e2e 65 "$PY" -m insid3_fast.cli bench --device cuda --backbone large --sizes 1024 --shots 1 \
  --batches 1 8 32 --precision fp32 bf16 --stages episode --repeats 3 \
  --json "$RESULTS/gpu_${CARD_SLUG}_e2e.json"
# The post-backbone stages on the same features, ours against the published restatement (and
# the published code itself with $INSID3_PUBLISHED).
run_step bench_stages 75 "$PY" -m insid3_fast.cli bench --device cuda --sizes 1024 --shots 1 5 --repeats 3 \
  ${PUB[@]+"${PUB[@]}"} --json "$RESULTS/gpu_${CARD_SLUG}_bench.json"

# ---- 4. compute-sanitizer on subsets --------------------------------------------------------------
SUBSET='not emu and (random-Q300 or random-Q257 or n300 or n37 or 8x8-c8 or 16x12-c4 or aggregate)'
if [[ -n "$SAN" ]]; then
  # No caching allocator, so out-of-bounds accesses land outside any allocation and are caught.
  run_step memcheck 80 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 99 \
    --leak-check no "$PY" -m pytest -q -x -m "not slow" tests/test_ops_cuda.py -k "$SUBSET"
  # racecheck (shared-memory hazards of the block reductions) and synccheck are slower still.
  run_step racecheck 85 "$SAN" --tool racecheck --error-exitcode 99 \
    "$PY" -m pytest -q -x -m "not slow" tests/test_ops_cuda.py -k "not emu and matches_cpu and (random-Q300 or n300 or 8x8-c8)"
  run_step synccheck 88 "$SAN" --tool synccheck --error-exitcode 99 \
    "$PY" -m pytest -q -x -m "not slow" tests/test_ops_cuda.py -k "not emu and (random-Q257 or n37 or 16x12-c4)"
else
  skip_step memcheck "compute-sanitizer not found"
  skip_step racecheck "compute-sanitizer not found"
  skip_step synccheck "compute-sanitizer not found"
fi

# ---- 5. the rest of the suite ------------------------------------------------------------------
XDIST=()
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n 8)
run_step test_all 90 "$PY" -m pytest -q -rs -m "not slow" -k "not emu" ${XDIST[@]+"${XDIST[@]}"} tests

# ---- 6. table -----------------------------------------------------------------------------------
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
  if [[ -f "$LOGS/bench_e2e.log" ]]; then
    echo; echo '## published vs ours, end to end, ViT-L, 1024 px (ms per target)'; echo; echo '```'
    grep -E '^(stage|-{5,}|end_to_end|captured|backbone|episode)' "$LOGS/bench_e2e.log"; echo '```'
  fi
  if [[ -f "$LOGS/bench_stages.log" ]]; then
    echo; echo '## post-backbone stages (ms per target)'; echo; echo '```'; grep -E '^(stage|-{5,}|[a-z_]+ +[0-9])' "$LOGS/bench_stages.log" | tail -n 40; echo '```'
  fi
} >"$OUT_MD"
save_results

echo
echo "================================ RESULTS ($CARD) ================================"
cat "$OUT_MD"
echo "written to $OUT_MD"
# The steps once more, last: the device tool returns only the output's last 12,000 characters,
# which long bench sections above could fill.
echo "---- steps ----"
for i in "${!NAMES[@]}"; do
  printf '%-16s %-14s %5s s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
done
if [[ $FAILED -ne 0 ]]; then
  echo "!!!!!!!! AT LEAST ONE STEP FAILED (see the table above and $LOGS)" >&2
  exit 1
fi
if [[ $SKIPPED -ne 0 ]]; then
  echo "!!!!!!!! INCOMPLETE: no step failed, but ${SKIPPED} step(s) did not run (SKIP in the table above)" >&2
  exit 3
fi
echo "all steps passed"
