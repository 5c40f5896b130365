#!/usr/bin/env bash
# One short device lease (15 minutes of GPU time per session, start-up included), its work run in
# parallel tracks so that a plan fits in about 6 minutes. benchmarks/gpu_check.sh is the full,
# sequential run for a longer lease; this script reuses its stage functions' commands.
#
#   bash benchmarks/gpu_lease.sh OUTDIR [check] [bench]   (default: both)
#
# check: the extension built twice into separate folders (the machine's default compilers, and the
#        system g++: the first GPU machine's CC/CXX wrappers linked libstdc++ statically, which
#        setup.py now counters), each loaded in a child process (a crash there is recorded, with a
#        cuda-gdb backtrace); the Triton self-check per dtype and the conformance suite, one config per kernel,
#        from a source copy; with a library that loads: the CUDA self-check, conformance, memcheck.
# bench: Triton compile warm-up per layer shape in parallel, then (after check) timed rows one at a
#        time on a quiet GPU: layers, per-kernel times and autotuner picks, then models.
#
# Nothing is installed into the machine's site-packages: every Python command runs with PYTHONPATH
# set to one build folder or the source copy, so a library that crashes on load stays out of the
# tracks that do not use it.
#
# Everything goes to /tmp/xf_lease and is packed into OUTDIR/lease.tgz every 15 s (and at the end),
# so a run cut off by the device's time limit still returns its logs. DEADLINE (s, default 330)
# bounds every track; tracks still running then are stopped. CHECK_UNTIL (s, default 170): when the
# check tracks are stopped so the timed rows get a quiet GPU. ARCHS (default 90a): the extension's
# targets (the device's own only, to halve the build). SHAPES: the timed layers' slugs.
# XCEPTION_FAST_COMMIT: the commit of the tree sent, recorded in the results files (set it from the
# sending machine: the device's copy of .git may be stale, and the rows run outside the checkout).
set -u

OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
PLANS=${*:-check bench}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$(command -v python3 || command -v python)}
DEADLINE=${DEADLINE:-330}
CHECK_UNTIL=${CHECK_UNTIL:-170}
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

# The package without the extension: triton_kernels/ inside it, where the install puts it.
TSRC=$W/tsrc
mkdir -p "$TSRC"
cp -r xception_fast "$TSRC/"
rm -f "$TSRC"/xception_fast/*.so "$TSRC"/xception_fast/_build_info.json
cp -r triton_kernels "$TSRC/xception_fast/triton_kernels"
with_path() { local path=$1; shift; (cd /tmp && PYTHONPATH=$path "$@"); }
in_source() { with_path "$TSRC" "$@"; }
with_cuda() { with_path "$(cat "$W/cuda_path")" "$@"; }  # the build that loaded
conformance() {  # conformance PATH PYTEST_ARGS...: the suite from the checkout against PATH's package
    local path=$1; shift
    PYTHONSAFEPATH=1 PYTHONPATH=$path "$PY" -m pytest -q -rs -p no:cacheprovider --durations=10 "$@"
}

env_info() {
    nvidia-smi
    nvcc --version
    compute-sanitizer --version
    "$PY" -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, \
torch.backends.cudnn.version(), 'cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI); print('triton', triton.__version__); \
print(torch.cuda.get_device_properties(0))"
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|timm|torchvision|pytest|numpy)"
    echo "CC=${CC:-} CXX=${CXX:-}"
    for c in "${CC:-cc}" "${CXX:-c++}" /usr/bin/gcc /usr/bin/g++; do echo "== $c"; "$c" --version 2>&1 | head -1; done
    "$PY" -c "import torch" && grep -E "libstdc|libgcc" /proc/self/maps | awk '{print $6}' | sort -u
    echo "commit of the tree sent: ${XCEPTION_FAST_COMMIT:-not given}"
}

build_into() {  # build_into NAME [ENV=VALUE...]: pip install --target $W/NAME from a copy of the tree
    local name=$1 src=$W/src-$1
    shift
    rm -rf "$src" && mkdir -p "$src" && cp -r "$ROOT"/. "$src"/ && rm -rf "$src/build"
    env "$@" XCEPTION_FAST_BUILD_CUDA=1 XCEPTION_FAST_CUDA_ARCHS=${ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-6} \
        "$PY" -m pip install --no-build-isolation --no-deps --target "$W/$name" -v "$src" || return $?
    load_probe "$name"
}

load_probe() {  # load_probe NAME: load $W/NAME's library in a child; on a crash, a cuda-gdb backtrace
    local probe="from xception_fast import _extension as e; s = e.status(); print(s.loaded, s.reason); \
import sys; sys.exit(0 if s.loaded else 3)"
    ldd "$W/$1"/xception_fast/_C*.so | grep -E "stdc|gcc_s|cudart|torch"
    with_path "$W/$1" "$PY" -c "$probe"
    local rc=$?
    echo "load probe rc=$rc"
    if [ "$rc" -ge 128 ]; then
        with_path "$W/$1" timeout 90 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args "$PY" -c "$probe" 2>&1 \
            | grep -v "^\[New Thread\|^\[Thread" | head -150
    fi
    return $rc
}

sanitize() {  # sanitize PATH BACKEND TOOL DTYPES...: compute-sanitizer over bench/sanitize.py's small cases
    local path=$1 backend=$2 tool=$3
    shift 3
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 XCEPTION_FAST_TRITON_ONE_CONFIG=1 with_path "$path" compute-sanitizer \
        --tool "$tool" --error-exitcode 86 --print-limit 50 "$PY" -m xception_fast.bench.sanitize \
        --backend "$backend" --dtypes "$@"
}

bench() {  # bench ARGS...: the benchmark CLI, bf16, results autosaved into $W/results
    with_path "$(cat "$W/bench_path")" "$PY" -m xception_fast.bench.cli bench --dtype bf16 --out "$W/results" \
        --budget-s "$(($(left) - 20))" "$@"
}

cuda_tracks() {  # after the builds: pick a library that loads, then check it
    local name
    for name in default sysgcc; do
        if grep -q "^build-$name rc=0 " "$W/logs/summary.txt"; then
            echo "$W/$name" >"$W/cuda_path"
            break
        fi
    done
    [ -e "$W/cuda_path" ] || { log "no CUDA build loads: CUDA tracks skipped"; return 0; }
    log "CUDA tracks use $(cat "$W/cuda_path")"
    track verify-cuda 150 with_cuda "$PY" -m xception_fast verify --full --providers cuda --no-time &
    local v=$!
    track conformance-cuda 150 conformance "$(cat "$W/cuda_path")" -n 4 -k cuda tests/test_providers.py \
        tests/test_extension.py tests/test_trust.py &
    local c=$!
    track sanitize-cuda-memcheck 150 sanitize "$(cat "$W/cuda_path")" cuda memcheck fp32 bf16
    wait $v $c
}

check_plan() {
    local pids=()
    track build-default 200 build_into default &
    local b1=$! b2=$!
    if [ -x /usr/bin/g++ ]; then
        track build-sysgcc 200 build_into sysgcc CC=/usr/bin/gcc CXX=/usr/bin/g++ &
        b2=$!
    fi
    for d in bf16 fp16 fp32; do
        XCEPTION_FAST_TRITON_ONE_CONFIG=1 track "verify-triton-$d" 160 in_source "$PY" -m xception_fast verify \
            --full --providers triton --dtypes "$d" --no-time &
        pids+=($!)
    done
    XCEPTION_FAST_TRITON_ONE_CONFIG=1 track conformance-triton 160 conformance "$TSRC" -n 4 -k "triton" \
        tests/test_providers.py tests/test_mid_providers.py &
    pids+=($!)
    track reference-aten 120 conformance "$TSRC" tests/test_reference_aten.py &
    pids+=($!)
    wait "$b1" "$b2"
    cuda_tracks &
    pids+=($!)
    wait "${pids[@]}"
}

warm_start() {  # compile every Triton kernel of the timed shapes, one process per shape (timings discarded)
    local s
    for s in $SHAPES; do
        track "warm-$s" 200 in_source "$PY" -m xception_fast.bench.cli bench --dtype bf16 --models none \
            --shapes "$s" --providers triton --mode infer train --quick --no-save --quiet &
        WARM_PIDS+=($!)
    done
}

bench_plan() {
    if [ -e "$W/cuda_path" ]; then cp "$W/cuda_path" "$W/bench_path"; else echo "$TSRC" >"$W/bench_path"; fi
    local providers="triton reference eager"
    [ -e "$W/cuda_path" ] && providers="cuda $providers"
    # shellcheck disable=SC2086
    track bench-layers 240 bench --models none --shapes $SHAPES --providers $providers
    # shellcheck disable=SC2086
    track kernel-times 90 with_path "$(cat "$W/bench_path")" "$PY" -m xception_fast.bench.kernel_times \
        --shapes $SHAPES --providers $providers --out "$W/results/kernel_times.json"
    track bench-models-cudnn 200 bench --no-layers --models xception_fast legacy_xception inception_v3 \
        --batch 256 --providers reference eager
    track bench-models-triton 200 bench --no-layers --models xception_fast --batch 256 --providers triton
}

export OUT ROOT TSRC START DEADLINE
export -f log left track with_path in_source with_cuda conformance env_info build_into load_probe sanitize bench
track env 60 env_info
WARM_PIDS=()
case " $PLANS " in *" bench "*) warm_start ;; esac
case " $PLANS " in
    *" check "*)
        check_plan &
        CHECK=$!
        # The timed rows need a quiet GPU: stop the checks still running at CHECK_UNTIL.
        while kill -0 "$CHECK" 2>/dev/null && [ $(($(date +%s) - START)) -lt "$CHECK_UNTIL" ]; do sleep 2; done
        if kill -0 "$CHECK" 2>/dev/null; then
            log "stopping the checks still running at ${CHECK_UNTIL}s"
            pkill -TERM -P "$CHECK"; pkill -TERM -f "xception_fast verify|pytest|compute-sanitizer"
        fi
        wait "$CHECK"
        ;;
esac
[ ${#WARM_PIDS[@]} -eq 0 ] || wait "${WARM_PIDS[@]}"
case " $PLANS " in *" bench "*) bench_plan ;; esac
kill "$PACKER" 2>/dev/null
pack
log "done"
cat "$W/logs/summary.txt"
grep -h -E "^\| |passed|failed|MISMATCH|FAIL|load probe" "$W"/logs/verify-*.log "$W"/logs/conformance-*.log \
    "$W"/logs/build-*.log 2>/dev/null | tail -50
