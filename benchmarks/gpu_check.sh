#!/usr/bin/env bash
# One script for a GPU machine: build, GPU tests, compute-sanitizer, benchmarks, report.
#
#   bash benchmarks/gpu_check.sh OUTDIR [STAGE ...]
#
# Stages (default: all, in this order):
#   env            nvidia-smi, versions, which providers are available          -> OUTDIR/env.log
#   install        pip install --no-build-isolation --no-deps . (MAX_JOBS=16)   -> OUTDIR/install.log
#   verify         python -m xception_fast verify --full: the providers' self-check on this GPU
#                  (table, timings, stamp, Markdown block), the first check run  -> OUTDIR/verify.log
#   gpu-tests      the provider conformance suite, extension and trust tests on the GPU:
#                  the stage to run first when device time is short              -> OUTDIR/gpu-tests.log
#   tests          pytest -m gpu, then the whole test suite                      -> OUTDIR/tests.log
#   sanitize       compute-sanitizer memcheck, racecheck, initcheck over a small forward/backward
#                  (xception_fast.bench.sanitize) for each available fused provider
#                  with PYTORCH_NO_CUDA_MEMORY_CACHING=1                         -> OUTDIR/sanitize.log
#   bench-pytest   pytest benchmarks --benchmark-only, quick settings (no compile rows, batch 256):
#                  checks the suite itself on a GPU                              -> OUTDIR/bench-pytest.log
#   bench-layers   python -m xception_fast.bench.cli bench --models none: every unit shape x
#                  (cuda, triton, reference, eager, compile) x (infer, train), bf16, batch 256
#   bench-models   ... bench --no-layers --providers cuda triton reference eager: models at 1/32/256
#   bench-compile  ... bench --no-layers --providers compile: timm and torchvision under max-autotune
#   report         Markdown + PNG from OUTDIR/results                           -> OUTDIR/RESULTS.md, benchmark.png
#
# Every stage logs into OUTDIR/<stage>.log and appends "stage rc seconds" to OUTDIR/summary.txt;
# a failing stage does not stop the next. Results JSON files go to OUTDIR/results/ (copy them into
# benchmarks/results/ to keep them). Each stage runs under `timeout` (STAGE_TIMEOUT, default 540 s,
# so one stage fits a 10-minute limit) and benchmark stages stop starting rows after BENCH_BUDGET
# seconds (default 420) so their results files are complete. Knobs: PYTHON, MAX_JOBS, DTYPE (bf16),
# BENCH_ARGS (extra CLI arguments), SANITIZE_BACKENDS ("cuda triton"), SANITIZE_TOOLS
# ("memcheck racecheck"), SANITIZE_DTYPES ("fp32 bf16"), SANITIZER_TIMEOUT (per run, 250 s),
# USE_SOURCE=1 (import the source tree: after an editable install, `pip install --no-build-isolation
# --no-deps -e .`, which also maps triton_kernels/ to xception_fast.triton_kernels).
# The self-check's cache goes to OUTDIR/cache (XCEPTION_FAST_CACHE_DIR), so later stages reuse it.
set -u

if [ $# -lt 1 ]; then
    sed -n '2,/^set -u/p' "$0" | sed '$d'
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
STAGES=${*:-env install verify tests sanitize bench-pytest bench-layers bench-models bench-compile report}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
BENCH_BUDGET=${BENCH_BUDGET:-420}
DTYPE=${DTYPE:-bf16}
BENCH_ARGS=${BENCH_ARGS:-}
SANITIZE_BACKENDS=${SANITIZE_BACKENDS:-cuda triton}
SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck racecheck initcheck}
SANITIZE_DTYPES=${SANITIZE_DTYPES:-fp32 bf16}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-250}
export MAX_JOBS=${MAX_JOBS:-16}
if [ "${USE_SOURCE:-0}" = 1 ]; then
    # An editable install: import the source tree.
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    # Tests and benchmarks import the installed package, not the source tree (python -m would put
    # the current directory first on sys.path otherwise).
    export PYTHONSAFEPATH=1
fi
export OUT PY DTYPE BENCH_ARGS BENCH_BUDGET SANITIZE_BACKENDS SANITIZE_TOOLS SANITIZE_DTYPES SANITIZER_TIMEOUT
mkdir -p "$OUT/results"
export XCEPTION_FAST_CACHE_DIR=${XCEPTION_FAST_CACHE_DIR:-$OUT/cache}
failed=0

run_stage() {  # run_stage NAME COMMAND...: log, time and record one stage
    local name=$1
    shift
    local log="$OUT/$name.log" start rc
    start=$(date +%s)
    echo "=== $name: $*" | tee -a "$OUT/progress.log"
    {
        echo "# $(date -u +%FT%TZ) $name"
        timeout --kill-after=30 "$STAGE_TIMEOUT" bash -c '"$@"' "$name" "$@"
    } >>"$log" 2>&1
    rc=$?
    echo "$name $rc $(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt" "$OUT/progress.log"
    [ "$rc" -eq 0 ] || failed=1
    return 0
}

provider_available() {  # provider_available NAME: exit 0 if the fused provider runs on cuda
    "$PY" -c "import sys; from xception_fast.bench.common import fused_provider_status as s; \
ok, why = s('$1', 'cuda'); print('$1:', ok, why); sys.exit(0 if ok else 1)"
}

stage_env() {
    nvidia-smi || true
    command -v nvcc && nvcc --version || true
    command -v compute-sanitizer && compute-sanitizer --version || true
    "$PY" - <<'EOF'
import json, platform, sys
import torch
print("python", sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), torch.cuda.device_count())
if torch.cuda.is_available():
    print(torch.cuda.get_device_properties(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing", exc)
import xception_fast
print("xception_fast from", xception_fast.__file__)
from xception_fast.bench import results
print(json.dumps(results.environment("cuda" if torch.cuda.is_available() else "cpu"), indent=1))
EOF
    "$PY" -m pip list 2>/dev/null | grep -i -E "torch|triton|timm|pytest|numpy|xception" || true
}

stage_install() {
    "$PY" -m pip install --no-build-isolation --no-deps -v . || return $?
    (cd /tmp && "$PY" -c "import xception_fast, torch; print('installed at', xception_fast.__file__); \
print(xception_fast.backend_report('cuda' if torch.cuda.is_available() else 'cpu'))")
}

stage_tests() {
    local rc=0 r
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider
    r=$?
    [ "$r" -eq 0 ] || [ "$r" -eq 5 ] || rc=$r  # 5: no test is marked gpu
    "$PY" -m pytest -q -rs -p no:cacheprovider || rc=$?
    return $rc
}

stage_gpu_tests() {
    "$PY" -m pytest -q -rs -p no:cacheprovider --durations=15 tests/test_providers.py \
        tests/test_extension.py tests/test_trust.py
}

stage_sanitize() {
    local rc=0 backend tool any=0
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer not found"
        return 1
    fi
    for backend in $SANITIZE_BACKENDS; do
        if ! provider_available "$backend"; then
            echo "skipping $backend: not available"
            continue
        fi
        any=1
        for tool in $SANITIZE_TOOLS; do
            echo "--- $tool $backend"
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=30 "$SANITIZER_TIMEOUT" \
                compute-sanitizer --tool "$tool" --error-exitcode 86 --print-limit 100 \
                "$PY" -m xception_fast.bench.sanitize --backend "$backend" --dtypes $SANITIZE_DTYPES
            local r=$?
            echo "--- $tool $backend rc=$r"
            [ "$r" -eq 0 ] || rc=$r
        done
    done
    [ "$any" -eq 1 ] || echo "no fused GPU provider is available: nothing to sanitize"
    return $rc
}

stage_bench_pytest() {
    XCEPTION_FAST_BENCH_RESULTS_DIR="$OUT/results" XCEPTION_FAST_BENCH_COMPILE_MODE=none \
        XCEPTION_FAST_BENCH_BATCHES=256 XCEPTION_FAST_BENCH_TIMING=quick XCEPTION_FAST_BENCH_DTYPES="$DTYPE" \
        "$PY" -m pytest benchmarks --benchmark-only -q -rs -p no:cacheprovider \
        --benchmark-json "$OUT/pytest-benchmark.json"
}

bench_cli() {
    # shellcheck disable=SC2086
    "$PY" -m xception_fast.bench.cli bench --dtype "$DTYPE" --out "$OUT/results" --budget-s "$BENCH_BUDGET" \
        "$@" $BENCH_ARGS
}

export -f provider_available stage_env stage_install stage_gpu_tests stage_tests stage_sanitize stage_bench_pytest bench_cli

for stage in $STAGES; do
    case $stage in
        env) run_stage env stage_env ;;
        install) run_stage install stage_install ;;
        verify) run_stage verify "$PY" -m xception_fast verify --full ;;
        gpu-tests) run_stage gpu-tests stage_gpu_tests ;;
        tests) run_stage tests stage_tests ;;
        sanitize) run_stage sanitize stage_sanitize ;;
        bench-pytest) run_stage bench-pytest stage_bench_pytest ;;
        bench-layers) run_stage bench-layers bench_cli --models none ;;
        bench-models) run_stage bench-models bench_cli --no-layers --providers cuda triton reference eager ;;
        bench-compile) run_stage bench-compile bench_cli --no-layers --providers compile ;;
        report) run_stage report "$PY" -m xception_fast.bench.cli report "$OUT/results" \
            --markdown "$OUT/RESULTS.md" --plot "$OUT/benchmark.png" ;;
        *) echo "unknown stage $stage" | tee -a "$OUT/summary.txt"; failed=1 ;;
    esac
done
echo "done; summary in $OUT/summary.txt"
exit $failed
