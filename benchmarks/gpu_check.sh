#!/usr/bin/env bash
# One GPU check of the fused kernels (SVD linear layer, allocator scores, orthogonal regulariser),
# sized to finish within 8 minutes on one H100:
#   install (no network) -> environment -> GPU tests (ADALORA_FAST_AUTOTUNE=0: one GEMM config, quick
#   compiles) -> svd_linear goal point (--quick, do_bench defaults) -> update_and_allocate (--quick) and
#   orth_reg (shorter do_bench) benchmarks -> inference -> end-to-end training throughput (--quick)
#   -> full svd_linear grid (shorter do_bench, what time is left) -> OUTDIR/summary.txt. The
#   benchmarks autotune as usual.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#   CHECK_STEPS="gpu_tests allocator profile kernel_tests" bash benchmarks/gpu_check.sh OUTDIR  # a subset
#
# Steps (CHECK_STEPS, in this order; default all): gpu_tests kernel_tests quick allocator orth_reg
# inference train_e2e profile grid; opt-in only: train_e2e_full, demo. Tests run on 8 pytest-xdist workers when xdist is installed
# (compiles in parallel).
#
# OUTDIR gets at most 8 files: env.txt (install log, nvidia-smi, versions), gpu_tests.log,
# quick/bench_svd_linear.log (then its CSV rows), bench_more.log (the allocator, regulariser,
# inference and end-to-end training benchmarks' output, then their CSV rows), profile_gpu.log (then
# its CSV rows), bench_svd_linear.log, gpu_svd_linear.csv, summary.txt. A step cut by its timeout
# gets SIGINT first, so pytest and the benchmarks stop like Ctrl-C and still print what they have
# (failures so far, rows so far).
# Every step runs under `timeout` against one deadline (CHECK_BUDGET_S, default 470 s from the start);
# a failed or timed-out step is recorded and the script goes on; it exits 1 if anything failed. The
# full grid comes last and takes what is left: cut by the deadline, it is reported INCOMPLETE (its
# rows so far are kept), not failed.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

export TRITON_INTERPRET=0 # tests/conftest.py defaults it to 1 (the interpreter) otherwise
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
BUDGET=${CHECK_BUDGET_S:-470}
START=$SECONDS
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
FAILED=0
LAST_RC=0

note() { echo "$*" | tee -a "$SUMMARY"; }
STEPS=" ${CHECK_STEPS:-gpu_tests kernel_tests quick allocator orth_reg inference train_e2e profile grid} "
want() { [[ $STEPS == *" $1 "* ]]; }

# Seconds a step may run: its cap, or what is left before the deadline (minus a reserve for the summary).
allow() {
    local cap=$1 left=$((BUDGET - (SECONDS - START) - 10))
    if ((left < cap)); then echo "$left"; else echo "$cap"; fi
}

# step NAME CAP LOG CMD...: run CMD under timeout, output appended to LOG (and shown), rc recorded.
step() {
    local name=$1 cap=$2 log=$3 t0=$SECONDS rc=0 limit
    shift 3
    limit=$(allow "$cap")
    if ((limit < 15)); then
        note "$name: SKIPPED (only ${limit}s left of the ${BUDGET}s budget)"
        FAILED=1
        return 0
    fi
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
    local status="rc=$rc"
    if ((rc == 124 || rc == 137)); then status="rc=$rc TIMEOUT after ${limit}s"; fi
    note "$name: $status ($((SECONDS - t0))s)"
    LAST_RC=$rc
}

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) repo $REPO commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ---- install and environment --------------------------------------------------------------------
ENV_LOG="$OUTDIR/env.txt"
: >"$ENV_LOG"
step install 90 "$ENV_LOG" "$PY" -m pip install --no-deps --no-build-isolation -e .
if ((LAST_RC != 0)); then
    FAILED=1
fi
if ! "$PY" -c "import adalora_fast.kernels" >>"$ENV_LOG" 2>&1; then
    # Fallback without pip: a package folder of links, with kernels/ as adalora_fast.kernels.
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/adalora_fast"
    ln -s "$REPO"/adalora_fast/*.py "$SHIM/adalora_fast/"
    ln -s "$REPO/kernels" "$SHIM/adalora_fast/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    note "install: adalora_fast.kernels not importable after pip; using PYTHONPATH shim $SHIM"
fi
{
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" - <<'EOF'
import torch, triton
import adalora_fast, adalora_fast.kernels
print("python", __import__("sys").version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
print("triton", triton.__version__)
for name in ("peft", "transformers", "pytest", "pytest_benchmark", "hypothesis"):
    try:
        print(name, __import__(name).__version__)
    except Exception as err:  # noqa: BLE001
        print(name, "unavailable:", err)
print("adalora_fast", adalora_fast.__file__, "kernels", adalora_fast.kernels.__file__)
EOF
} 2>&1 | tee -a "$ENV_LOG" || true
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    note "environment: NO CUDA DEVICE visible to torch (the benchmark would run its CPU shape)"
    FAILED=1
fi

# ---- tests (<= 3.75 min) -------------------------------------------------------------------------
TEST_LOG="$OUTDIR/gpu_tests.log"
: >"$TEST_LOG"
# pytest exit code 5 = no tests collected: not a failure, but said so.
test_rc() {
    local name=$1
    if ((LAST_RC == 5)); then
        note "$name: no tests collected"
    elif ((LAST_RC != 0)); then
        FAILED=1
    fi
}
# One GEMM config in the tests (ADALORA_FAST_AUTOTUNE=0): fast compiles; the benchmarks autotune.
TEST_ENV=(env ADALORA_FAST_AUTOTUNE=0)
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
if want gpu_tests; then
    LAST_RC=0
    step "tests -m gpu" 120 "$TEST_LOG" "${TEST_ENV[@]}" "$PY" -m pytest -q -rfEs --tb=short "${XDIST[@]}" -m gpu tests
    test_rc "tests -m gpu"
fi
# Kernel tests: the fused layer's op, every tests/kernels/test_*.py (x_at, xt_s, xw_plus_sb,
# importance_ema, orth_defect, ...) and the Triton allocator scorer; their GPU-marked tests ran above.
shopt -s nullglob
KERNEL_TESTS=()
for f in tests/kernels/test_*.py tests/allocator/test_triton_scorer.py; do
    [[ -e $f ]] && KERNEL_TESTS+=("$f")
done
shopt -u nullglob
kernel_tests() {
    if ((${#KERNEL_TESTS[@]} == 0)); then
        note "kernel tests: MISSING (no tests/kernels/test_*.py yet); skipped"
        return 0
    fi
    LAST_RC=0
    step "kernel tests (${KERNEL_TESTS[*]})" 150 "$TEST_LOG" \
        "${TEST_ENV[@]}" "$PY" -m pytest -q -rfEs --tb=short "${XDIST[@]}" -m "not gpu" "${KERNEL_TESTS[@]}"
    test_rc "kernel tests"
}
# With a subset ending in kernel_tests, they run last (taking what time is left).
if want kernel_tests && [[ -n ${CHECK_STEPS:-} ]]; then KERNEL_TESTS_LAST=1; else KERNEL_TESTS_LAST=0; fi
if want kernel_tests && ((KERNEL_TESTS_LAST == 0)); then kernel_tests; fi

# ---- benchmarks: svd_linear goal point (do_bench defaults), allocator and regulariser (small), then
# the full svd_linear grid (shorter do_bench) with the time that is left ---------------------------
# Allocator (--quick): Llama-7B-shaped adapters (32 x 7, init_r 12), 2 check steps, op counts, then
# fused / torch / peft timed (PEFT: ~31,000 launches per call, timed over >= 3 calls): ~1 minute.
# orth_reg: same adapters, check + op counts + do_bench at warmup 10 / rep 40 ms: well under 1 minute.
# train_e2e (--quick): a Llama with 8 layers, hidden 2048, batch 4 x 2048, bf16, all 7 projections at
# init_r 12: ours / PEFT AdaLoRA / PEFT LoRA / frozen fwd+bwd, one compile + autotune step each, then one
# do_bench round of >= 3 timed steps per provider: about 1-2 minutes, mostly building and compiling.
# Their CSVs go to a temporary folder and are appended to their log (OUTDIR keeps 8 files).
# Full grid: 3 shapes x 3 token counts x (base + 4 ranks x 3 providers) x 3 modes = 351 do_bench
# calls (~0.1 s each at warmup 10 / rep 40 ms), ~27 autotuning keys of the GEMM kernel (7 configs
# each), ~40 kernel compilations: about 2.5-3.5 minutes on an H100.
if want quick; then
    mkdir -p "$OUTDIR/quick"
    LAST_RC=0
    QUICK_CSV=$(mktemp -d)
    step "bench --quick" 150 "$OUTDIR/quick/bench_svd_linear.log" \
        "$PY" benchmarks/bench_svd_linear.py --quick --out "$QUICK_CSV"
    ((LAST_RC == 0)) || FAILED=1
    if [[ -f $QUICK_CSV/gpu_svd_linear.csv ]]; then
        { echo "=== gpu_svd_linear.csv"; cat "$QUICK_CSV/gpu_svd_linear.csv"; } >>"$OUTDIR/quick/bench_svd_linear.log"
    fi
    rm -rf "$QUICK_CSV"
fi
XTRA_LOG="$OUTDIR/bench_more.log"
XTRA_CSV=$(mktemp -d)
: >"$XTRA_LOG"
if want allocator; then
    LAST_RC=0
    step "bench_allocator --quick" 100 "$XTRA_LOG" \
        "$PY" benchmarks/bench_allocator.py --quick --out "$XTRA_CSV"
    ((LAST_RC == 0)) || FAILED=1
fi
if want orth_reg; then
    LAST_RC=0
    step "bench_orth_reg" 60 "$XTRA_LOG" \
        "$PY" benchmarks/bench_orth_reg.py --out "$XTRA_CSV" --warmup 10 --rep 40
    ((LAST_RC == 0)) || FAILED=1
fi
if want inference; then
    LAST_RC=0
    step "bench_inference" 60 "$XTRA_LOG" "$PY" benchmarks/bench_inference.py --out "$XTRA_CSV"
    ((LAST_RC == 0)) || FAILED=1
fi
if want train_e2e; then
    LAST_RC=0
    step "bench_train_e2e --quick" 150 "$XTRA_LOG" \
        "$PY" benchmarks/bench_train_e2e.py --quick --device cuda --out "$XTRA_CSV"
    ((LAST_RC == 0)) || FAILED=1
fi
# train_e2e_full (opt-in, not in the default list): the same benchmark without --quick (3 rounds).
if want train_e2e_full; then
    LAST_RC=0
    step "bench_train_e2e" 200 "$XTRA_LOG" "$PY" benchmarks/bench_train_e2e.py --device cuda --out "$XTRA_CSV"
    ((LAST_RC == 0)) || FAILED=1
fi
# demo (opt-in): the README's main job on CUDA (fused kernels), output into bench_more.log.
if want demo; then
    LAST_RC=0
    DEMO_DIR=$(mktemp -d)
    step "adalora-fast demo --device cuda" 120 "$XTRA_LOG" "$PY" -m adalora_fast demo --device cuda --out "$DEMO_DIR"
    ((LAST_RC == 0)) || FAILED=1
    rm -rf "$DEMO_DIR"
fi
for f in "$XTRA_CSV"/gpu_allocator.csv "$XTRA_CSV"/gpu_orth_reg.csv "$XTRA_CSV"/gpu_inference.csv \
    "$XTRA_CSV"/gpu_train_e2e.csv; do
    if [[ -f $f ]]; then
        { echo "=== $(basename "$f")"; cat "$f"; } >>"$XTRA_LOG"
    else
        echo "=== $(basename "$f"): not written" >>"$XTRA_LOG"
    fi
done
rm -rf "$XTRA_CSV"
# Per-kernel breakdown (benchmarks/profile_gpu.py): its log ends with its CSV rows (OUTDIR keeps 8 files).
if want profile; then
    PROF_DIR=$(mktemp -d)
    LAST_RC=0
    step "profile_gpu" 100 "$OUTDIR/profile_gpu.log" "$PY" benchmarks/profile_gpu.py --out "$PROF_DIR"
    ((LAST_RC == 0)) || FAILED=1
    if [[ -f $PROF_DIR/gpu_profile.csv ]]; then
        { echo "=== gpu_profile.csv"; cat "$PROF_DIR/gpu_profile.csv"; } >>"$OUTDIR/profile_gpu.log"
    fi
    rm -rf "$PROF_DIR"
fi
if want grid; then
    LAST_RC=0
    step "bench full grid" 230 "$OUTDIR/bench_svd_linear.log" \
        "$PY" benchmarks/bench_svd_linear.py --out "$OUTDIR" --warmup 10 --rep 40 \
        --providers base fused torch peft peft_lora
    if ((LAST_RC == 124 || LAST_RC == 137)); then
        note "bench full grid: INCOMPLETE (cut by the deadline; the rows measured so far are in gpu_svd_linear.csv)"
    elif ((LAST_RC != 0)); then
        FAILED=1
    fi
fi
if want kernel_tests && ((KERNEL_TESTS_LAST == 1)); then kernel_tests; fi

# ---- summary ------------------------------------------------------------------------------------
goal() {
    local log=$1
    if [[ -f $log ]] && grep -q '^GOAL' "$log"; then grep '^GOAL' "$log" | tail -n 1; else echo "no GOAL line"; fi
}
nfail() {
    local log=$1
    if [[ -f $log ]]; then grep -c '^FAILED' "$log" || true; else echo 0; fi
}
note "goal (quick, do_bench warmup 25 / rep 100 ms): $(goal "$OUTDIR/quick/bench_svd_linear.log")"
note "goal (full grid, do_bench warmup 10 / rep 40 ms): $(goal "$OUTDIR/bench_svd_linear.log")"
# The opt-in kernels' verdicts at the goal point (they become the default only if faster).
if [[ -f $OUTDIR/quick/bench_svd_linear.log ]]; then
    note "opt-in (quick): $(grep -E '^fused_(fold|tma|cublas|graphed) ' "$OUTDIR/quick/bench_svd_linear.log" | paste -sd ';' - || true)"
fi
note "goals (update_and_allocate --quick, inference, train_e2e --quick): $(grep '^GOAL' "$XTRA_LOG" 2>/dev/null | paste -sd ';' - || true)"
if [[ -f $XTRA_LOG ]] && grep -q '^| fused |' "$XTRA_LOG"; then
    note "update_and_allocate / orth_reg fused rows: $(grep '^| fused |' "$XTRA_LOG" | tr -s ' ' | paste -sd ';' -)"
fi
if [[ -f $XTRA_LOG ]] && grep -qE '^\| (frozen|adalora_fast|peft_adalora|peft_lora) \| fwd' "$XTRA_LOG"; then
    note "train_e2e rows (ms / step, tokens/s, ours / provider): $(grep -E '^\| (frozen|adalora_fast|peft_adalora|peft_lora) \| fwd' "$XTRA_LOG" | tr -s ' ' | paste -sd ';' -)"
fi
if [[ -f $OUTDIR/profile_gpu.log ]]; then
    note "profile (device total / host enqueue / wall, us): $(grep -E '^  [a-z_]+ +.*(device total|enqueue time|wall)' "$OUTDIR/profile_gpu.log" | sed -E 's/^ +//; s/ {2,}/ /g' | paste -sd ';' -)"
fi
note "benchmark measurement failures: quick $(nfail "$OUTDIR/quick/bench_svd_linear.log"), full $(nfail "$OUTDIR/bench_svd_linear.log"), allocator+orth_reg+inference+train_e2e $(nfail "$XTRA_LOG")"
note "total $((SECONDS - START))s of the ${BUDGET}s budget"
if ((FAILED)); then
    note "RESULT: FAILED (see the rc lines above and the logs)"
    exit 1
fi
note "RESULT: OK"
