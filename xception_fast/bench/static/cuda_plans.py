"""Launch plans of the CUDA provider (csrc/), and the nvcc build of its cubins.

This is the only module that knows the CUDA kernels' loop structure. nvcc unrolls some loops
partially; a plan gives the trip count of the loop as compiled and pins the unroll factor it assumed
with `expect` (instructions per iteration, inner loops excluded), so a compiler or source change
that alters it fails loudly instead of skewing the estimate.

Modelled so far: the inference kernel (`sepconv_infer_kernel`). The training forward and the
backward kernels have no plan yet (`MODES` lacks "train"): the CUDA provider's training figures are
missing, not zero.

Cubins: `nvcc -cubin -gencode arch=compute_90a,code=sm_90a` (sm_80 for arch 80) of each csrc/*.cu,
with csrc/ as include directory, cached under `cache_dir()` by a hash of the sources, flags and nvcc
version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from xception_fast.bench.static.geometry import Unit, cdiv
from xception_fast.bench.static.model import Compiled, Launch, LoopPlan
from xception_fast.bench.static.sass import SassError, disassemble, resources

PROVIDER = "cuda"
ROOT = Path(__file__).resolve().parents[3]  # the source checkout, in an editable install
# csrc/sepconv_device.cuh
THREADS, BM, BN, BK = 128, 64, 64, 32
TYPE_TAG = {"bf16": "I13__nv_bfloat16E", "fp16": "I6__halfE", "fp32": "IfE"}


class CudaUnavailable(SassError):
    """No nvcc or no csrc/ here: the CUDA provider cannot be modelled."""


def cache_dir() -> Path:
    base = os.environ.get("XCEPTION_FAST_STATIC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "xception_fast", "static")
    return Path(base)


def _nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        raise CudaUnavailable("no nvcc on PATH (and CUDA_HOME unset): the CUDA provider's cubins cannot be built")
    return found


def csrc_dir() -> Path | None:
    """The CUDA sources: $XCEPTION_FAST_CSRC, the checkout of an editable install, or ./csrc (a
    regular install has no csrc/; run from the source checkout)."""
    for candidate in (os.environ.get("XCEPTION_FAST_CSRC"), ROOT / "csrc", Path.cwd() / "csrc"):
        if candidate and (Path(candidate) / "sepconv_device.cuh").is_file():
            return Path(candidate)
    return None


def _include_dirs() -> list[str]:
    """csrc/ only: the kernel files include nothing of torch, and nvcc adds its own toolkit headers
    (setup.py's extra nvidia-* wheel directories are for torch's headers, and could shadow them)."""
    return [str(csrc_dir())]


@functools.lru_cache(maxsize=8)
def cubin(source: str, arch: int) -> bytes:
    """The cubin of csrc/`source` for sm_`arch` (90 -> sm_90a), built once per source hash."""
    csrc = csrc_dir()
    if csrc is None or not (csrc / source).is_file():
        raise CudaUnavailable(f"no csrc/{source}: the CUDA sources are not in this install; run from the source "
                              "checkout or set XCEPTION_FAST_CSRC")
    path = csrc / source
    nvcc = _nvcc()
    target = f"{arch}a" if arch >= 90 else str(arch)
    flags = ["-cubin", "-O3", "-std=c++17", f"-gencode=arch=compute_{target},code=sm_{target}"]
    digest = hashlib.sha256()
    for f in sorted(csrc.glob("*")):
        if f.suffix in (".cu", ".cuh", ".h"):
            digest.update(f.name.encode() + f.read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest.update(" ".join(flags).encode() + version.encode())
    out = cache_dir() / f"{path.stem}-sm_{target}-{digest.hexdigest()[:16]}.cubin"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [nvcc, *flags, *[f"-I{d}" for d in _include_dirs()], "-o", str(tmp), str(path)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SassError(f"nvcc failed on {source}:\n{run.stderr[-2000:]}")
        os.replace(tmp, out)
    return out.read_bytes()


def _compiler(source: str, kernel: str, arch: int, dtype: str, dynamic_smem: int = 0):
    def build() -> Compiled:
        data = cubin(source, arch)
        names = [n for n in disassemble(data) if kernel in n and TYPE_TAG[dtype] in n]
        if len(names) != 1:
            raise SassError(f"{kernel}<{dtype}>: {len(names)} matching functions in {source}'s cubin")
        res = resources(data)[names[0]]
        return Compiled(cubin=data, function=names[0], regs=res["regs"], spill_bytes=res["stack"],
                        smem_bytes=res["shared"] + dynamic_smem, num_warps=THREADS // 32, num_stages=1,
                        operand="tf32" if dtype == "fp32" else dtype)
    return build


def infer(unit: Unit, arch: int, sms: int) -> list[list[Launch]]:
    """sepconv_infer_kernel: 64 positions x 64 output channels per 128-thread block, 32-channel chunks."""
    per_thread = BM // (THREADS // BK)  # depthwise rows per thread (depthwise_tile's kPerThread)
    fp32 = unit.dtype == "fp32"
    loops = [
        # fill_rows: rows r = tid, tid + 128, ... < 64: warps 0-1 one iteration, warps 2-3 none.
        LoopPlan("fill_rows (row table)", 0.5, expect={"STS": 6}),
        # 16-bit types: 2 x 2 wmma 16x16x16 fragments per warp and 16-wide k step (HMMA.16816 x 16).
        LoopPlan("input-channel chunks of 32", cdiv(unit.C, BK), expect=None if fp32 else {"HMMA": 16}),
        LoopPlan("depthwise taps i (run-time kh)", unit.K),
        LoopPlan("depthwise taps j (run-time kw)", unit.K, expect={"FFMA": per_thread}),
        # pw tile staging: 64 x 32 elements / 128 threads = 16 per thread, unrolled x4 by nvcc.
        LoopPlan("pointwise weight tile staging (x4 unrolled)", BN * BK // THREADS / 4, expect={"LDG": 4}),
    ]
    if fp32:  # BlockMma<float>: k = 0..31, `#pragma unroll 4`, an 8 x 4 FMA micro-tile per k
        loops.append(LoopPlan("fp32 block product over k (x4 unrolled)", BK / 4, expect={"FFMA": 128}))
    # epilogue: 64 x 64 / 128 = 32 per thread, unrolled x2.
    loops.append(LoopPlan("epilogue (x2 unrolled)", BM * BN // THREADS / 2, expect={"STG": 2}))
    grid = cdiv(unit.P, BM) * cdiv(unit.Cout, BN)
    nbytes = unit.x_bytes() + unit.weight_bytes() + unit.y_bytes() * (2 if unit.shape.residual else 1)
    return [[Launch(kernel="sepconv_infer_kernel", config=f"{BM}x{BN}x{BK} t{THREADS}",
                    compile=_compiler("sepconv_forward.cu", "sepconv_infer_kernel", arch, unit.dtype),
                    grid=grid, loops=loops, dram_bytes=nbytes, threads=THREADS,
                    useful_ffma=BM * cdiv(unit.C, BK) * BK * unit.K * unit.K)]]


MODES = {"infer": infer}
