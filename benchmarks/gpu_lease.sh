#!/usr/bin/env bash
# One short device lease (15 minutes of GPU time per session, start-up included), its work run in
# parallel tracks so that a plan fits in about 6 minutes. benchmarks/gpu_check.sh is the full,
# sequential run for a longer lease; this script reuses its stage functions' commands.
#
#   bash benchmarks/gpu_lease.sh OUTDIR check   build | Triton self-check per dtype (from a source
#                                               copy, while the build runs) | then CUDA self-check,
#                                               conformance suite, compute-sanitizer per provider
#   bash benchmarks/gpu_lease.sh OUTDIR bench   build | Triton compile warm-up per layer shape, in
#                                               parallel | then timed rows one at a time on a quiet GPU
#
# Everything goes to /tmp/xf_lease and is packed into OUTDIR/lease.tgz every 15 s (and at the end),
# so a run cut off by the device's time limit still returns its logs. DEADLINE (s, default 330)
# bounds every track; tracks still running then are stopped. ARCHS (default 90a): the extension's
# targets (the device's own only, to halve the build). SHAPES: the bench plan's layer slugs.
set -u

OUT=$(mkdir -p "$1" && cd "$1" && pwd)
PLAN=${2:-check}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$(command -v python3 || command -v python)}
DEADLINE=${DEADLINE:-330}
SHAPES=${SHAPES:-middle-728x728-19-res entry-64x128-147-nopre exit-1536x2048-10}
W=/tmp/xf_lease
rm -rf "$W"
mkdir -p "$W/logs" "$W/results" "$W/cache"
export XCEPTION_FAST_CACHE_DIR=$W/cache TRITON_CACHE_DIR=$W/triton PYTHONUNBUFFERED=1 PY W
START=$(date +%s)

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$W/logs/progress.log"; }
left() { echo $((DEADLINE - ($(date +%s) - START))); }

track() {  # track NAME SECONDS COMMAND...: own log, bounded by SECONDS and the deadline; rc recorded
    local name=$1 limit=$2 t0 rc
    shift 2
    [ "$limit" -le "$(left)" ] || limit=$(left)
    if [ "$limit" -le 5 ]; then
        echo "$name skipped: deadline" >>"$W/logs/summary.txt"
        return 124
    fi
    t0=$(date +%s)
    log "start $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >"$W/logs/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - t0))s" >>"$W/logs/summary.txt"
    log "end $name rc=$rc"
    return $rc
}

pack() {
    tar czf "$OUT/lease.tgz.tmp" -C "$W" logs results cache 2>/dev/null
    mv -f "$OUT/lease.tgz.tmp" "$OUT/lease.tgz"
}
(while sleep 15; do pack; done) &
PACKER=$!

# The Triton provider needs no build: a copy of the package with triton_kernels/ inside it (where
# the install puts it) runs while the extension compiles.
TSRC=$W/tsrc
mkdir -p "$TSRC"
cp -r xception_fast "$TSRC/"
rm -f "$TSRC"/xception_fast/*.so
cp -r triton_kernels "$TSRC/xception_fast/triton_kernels"
in_source() { (cd /tmp && PYTHONPATH=$TSRC "$@"); }
installed() { (cd /tmp && "$@"); }
conformance_env() {  # the suite from the checkout against the installed package (or the copy, unbuilt)
    if [ -e "$W/built" ]; then PYTHONSAFEPATH=1 "$@"; else PYTHONSAFEPATH=1 PYTHONPATH=$TSRC "$@"; fi
}

env_info() {
    nvidia-smi
    nvcc --version
    compute-sanitizer --version
    "$PY" -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, \
torch.backends.cudnn.version()); print('triton', triton.__version__); print(torch.cuda.get_device_properties(0))"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|timm|torchvision|pytest|numpy)"
    git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || echo "commit: not a git checkout"
}

build() {
    XCEPTION_FAST_BUILD_CUDA=1 XCEPTION_FAST_CUDA_ARCHS=${ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-10} \
        "$PY" -m pip install --no-build-isolation --no-deps -v . || return $?
    (cd /tmp && "$PY" -c "import xception_fast, torch; print(xception_fast.__file__); \
print(xception_fast.backend_report('cuda'))") || return $?
    touch "$W/built"
    cp "$("$PY" -c 'import xception_fast._C as c; print(c.__file__)' 2>/dev/null)" "$OUT/" 2>/dev/null || true
}

sanitize() {  # sanitize BACKEND TOOL DTYPES...: compute-sanitizer over bench/sanitize.py's small cases
    local backend=$1 tool=$2 runner=installed
    shift 2
    [ "$backend" = triton ] && [ ! -e "$W/built" ] && runner=in_source
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 XCEPTION_FAST_TRITON_ONE_CONFIG=1 $runner compute-sanitizer --tool "$tool" \
        --error-exitcode 86 --print-limit 50 "$PY" -m xception_fast.bench.sanitize --backend "$backend" --dtypes "$@"
}

bench() {  # bench ARGS...: the benchmark CLI, bf16, results autosaved into $W/results
    installed "$PY" -m xception_fast.bench.cli bench --dtype bf16 --out "$W/results" --budget-s "$(($(left) - 20))" "$@"
}

check_plan() {
    track build 240 build &
    local b=$!
    for d in bf16 fp16 fp32; do
        track "verify-triton-$d" 300 in_source "$PY" -m xception_fast verify --full --providers triton \
            --dtypes "$d" --no-time &
    done
    wait "$b"
    if [ -e "$W/built" ]; then
        track verify-cuda 150 installed "$PY" -m xception_fast verify --full --providers cuda --no-time &
        (track sanitize-cuda-memcheck 120 sanitize cuda memcheck fp32 bf16
         track sanitize-cuda-racecheck 120 sanitize cuda racecheck bf16) &
    fi
    track conformance 240 conformance_env "$PY" -m pytest -q -rs -p no:cacheprovider -n 6 --durations=10 \
        tests/test_providers.py tests/test_mid_providers.py tests/test_extension.py tests/test_trust.py &
    (track sanitize-triton-memcheck 150 sanitize triton memcheck bf16
     track sanitize-triton-racecheck 150 sanitize triton racecheck bf16) &
    wait
}

bench_plan() {
    track build 240 build &
    local s
    # Compile every Triton kernel of every layer shape (the model rows need all of them), one process
    # per shape; these timings are discarded: the rows below re-tune on a quiet GPU.
    for s in $(in_source "$PY" -c "from xception_fast.bench.shapes import unit_shapes as u; print(*[s.slug for s in u(299)])"); do
        track "warm-$s" 240 in_source "$PY" -m xception_fast.bench.cli bench --dtype bf16 --models none \
            --shapes "$s" --providers triton --mode infer train --quick --no-save --quiet &
    done
    wait
    # shellcheck disable=SC2086
    track bench-layers 300 bench --models none --shapes $SHAPES --providers cuda triton reference eager
    # shellcheck disable=SC2086
    track kernel-times 120 installed "$PY" -m xception_fast.bench.kernel_times --shapes $SHAPES \
        --providers triton cuda eager --out "$W/results/kernel_times.json"
    track bench-models-cudnn 300 bench --no-layers --models xception_fast legacy_xception inception_v3 \
        --batch 256 --providers reference eager
    track bench-models-triton 300 bench --no-layers --models xception_fast --batch 256 --providers triton
}

export OUT ROOT TSRC START DEADLINE
export -f log left track in_source installed conformance_env env_info build sanitize bench
track env 60 env_info
case $PLAN in
    check) check_plan ;;
    bench) bench_plan ;;
    *) echo "unknown plan $PLAN" ; exit 2 ;;
esac
kill "$PACKER" 2>/dev/null
pack
log "done"
cat "$W/logs/summary.txt"
grep -h -E "^\| |passed|failed|MISMATCH|ERROR|FAIL" "$W"/logs/verify-*.log "$W/logs/conformance.log" 2>/dev/null | tail -60
