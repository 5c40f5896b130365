"""Launch plans of the CUDA provider (csrc/), and the nvcc build of its cubins.

This is the only module that knows the CUDA kernels' loop structure. nvcc unrolls some loops
partially; a plan gives the trip count of the loop as compiled and pins the unroll factor it assumed
with `expect` (instructions per iteration, inner loops excluded), so a compiler or source change
that alters it fails loudly instead of skewing the estimate.

Modelled: inference as the host runs it (`run_sepconv_bn_infer`): `pack_weights_kernel`, then the
tiled kernel of sepconv_infer.cu (`sepconv_infer_tiled_kernel<T, bm, 3, 3>`, the tiling the
launcher picks, see `cuda_tiling`), in every dtype; the int64 kernel `sepconv_infer_kernel` only
where the launcher declines (no tile fits shared memory: fp32 C = 1536 on an H100; fp32 C >= 1024 on
an A100). The tiled kernel's loop bodies hold code that runs once per Cout tile (the epilogue) and
copies of it for run-time flags (unmasked / masked stores, residual, post-ReLU; 16-byte /
element-wise staging): its plan names the path each iteration takes (`model.Path`, found by its
instructions), and its two phases (depthwise into shared memory, then the pointwise over every Cout
tile) run in sequence: one CTA per SM and a barrier between them, nothing in the SASS overlaps them.
Training (forward: main loop with the statistics epilogue, merge, normalisation; backward: the dy
reduction, grad_d, grad_pw, grad_x, grad_dw and their column sums) in bf16/fp16. fp32 training has
no plan (its FMA block products add loops): `train` returns None and the unit is reported as not
modelled. Where nvcc versioned a loop on a run-time flag (post_relu, pre_relu), the plan gives the
version the layer runs its trips and the others 0; which SASS copy is which version is read from
the instruction counts (`expect`).

Cubins: `nvcc -cubin -gencode arch=compute_90a,code=sm_90a` (sm_80 for arch 80) of each csrc/*.cu,
with csrc/ as include directory, cached under `cache_dir()` by a hash of the sources, flags and nvcc
version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path as FilePath
from typing import Optional

from xception_fast.bench.static import cuda_tiling
from xception_fast.bench.static.geometry import Unit, cdiv
from xception_fast.bench.static.model import Compiled, Launch, LoopPlan, Path
from xception_fast.bench.static.sass import SassError, disassemble, resources

PROVIDER = "cuda"
ROOT = FilePath(__file__).resolve().parents[3]  # the source checkout, in an editable install
# csrc/sepconv_device.cuh
THREADS, BM, BN, BK = 128, 64, 64, 32
TYPE_TAG = {"bf16": "I13__nv_bfloat16E", "fp16": "I6__halfE", "fp32": "IfE"}


class CudaUnavailable(SassError):
    """No nvcc or no csrc/ here: the CUDA provider cannot be modelled."""


def cache_dir() -> FilePath:
    base = os.environ.get("XCEPTION_FAST_STATIC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "xception_fast", "static")
    return FilePath(base)


def _nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        raise CudaUnavailable("no nvcc on PATH (and CUDA_HOME unset): the CUDA provider's cubins cannot be built")
    return found


def csrc_dir() -> FilePath | None:
    """The CUDA sources: $XCEPTION_FAST_CSRC, the checkout of an editable install, or ./csrc (a
    regular install has no csrc/; run from the source checkout)."""
    for candidate in (os.environ.get("XCEPTION_FAST_CSRC"), ROOT / "csrc", FilePath.cwd() / "csrc"):
        if candidate and (FilePath(candidate) / "sepconv_device.cuh").is_file():
            return FilePath(candidate)
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


def _instance(mangled: str, kernel: str, tag: str) -> bool:
    """Whether a mangled name is `kernel` (a plain function: its name then "E") or its template
    instance `tag` (e.g. "I13__nv_bfloat16Lb1E")."""
    found = re.search(rf"\d{kernel}([IE])", mangled)
    return bool(found) and (found.group(1) == "E" or mangled[found.start(1):].startswith(tag))


def _compiler(source: str, kernel: str, arch: int, dtype: str, dynamic_smem: int = 0, train: bool = False,
              tag: Optional[str] = None, threads: int = THREADS):
    """Builds `kernel`'s Compiled from `source`'s cubin: the instance for `dtype` (templates), the
    training one (`kTrain` = true) where `train`, or the one whose mangled template arguments start
    with `tag`."""
    if tag is None:
        tag = TYPE_TAG[dtype]
        tag = tag[:-1] + "Lb1E" if train else tag

    def build() -> Compiled:
        data = cubin(source, arch)
        names = [n for n in disassemble(data) if _instance(n, kernel, tag)]
        if len(names) != 1:
            raise SassError(f"{kernel}<{dtype}>: {len(names)} matching functions in {source}'s cubin")
        res = resources(data)[names[0]]
        return Compiled(cubin=data, function=names[0], regs=res["regs"], spill_bytes=res["stack"],
                        smem_bytes=res["shared"] + dynamic_smem, num_warps=threads // 32, num_stages=1,
                        operand="tf32" if dtype == "fp32" else dtype)
    return build


def _fallback(unit: Unit, arch: int) -> list[Launch]:
    """sepconv_infer_kernel (sepconv_forward.cu): 64 positions x 64 output channels per 128-thread
    block, 32-channel chunks; the int64 kernel the host runs where the tiled one declines."""
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
    return [Launch(kernel="sepconv_infer_kernel", config=f"{BM}x{BN}x{BK} t{THREADS} (int64 fallback)",
                   compile=_compiler("sepconv_forward.cu", "sepconv_infer_kernel", arch, unit.dtype),
                   grid=grid, loops=loops, dram_bytes=nbytes, threads=THREADS,
                   useful_ffma=BM * cdiv(unit.C, BK) * BK * unit.K * unit.K)]


def infer(unit: Unit, arch: int, sms: int) -> list[list[Launch]]:
    """What run_sepconv_bn_infer (sepconv_forward.cu) launches: the weight pack and the tiled kernel
    of sepconv_infer.cu, or the int64 kernel where the tiled one declines (see `tiled_plan`)."""
    from xception_fast.bench.static.machine import machine

    plan = tiled_plan(unit, machine(arch).smem_per_block)
    if plan is None:
        return [_fallback(unit, arch)]
    return [[_pack_launch(unit, arch, plan)], [_tiled_launch(unit, arch, plan)]]


# --- the tiled inference kernel (sepconv_infer.cu) -------------------------------------------------------


def tiled_plan(unit: Unit, max_smem: int) -> Optional[cuda_tiling.TiledPlan]:
    """The tiling the launcher picks for this unit on a GPU with `max_smem` bytes of shared memory per
    block, or None where it runs the int64 kernel instead."""
    s = unit.shape
    return cuda_tiling.choose(unit.batch, unit.C, unit.H, unit.W, unit.Cout, unit.K, s.stride, s.padding, s.dilation,
                              unit.e, max_smem)


def _pack_launch(unit: Unit, arch: int, p: cuda_tiling.TiledPlan) -> Launch:
    """pack_weights_kernel: one grid-stride pass over the packed pw, dw and scale/shift elements. nvcc
    made two copies of the loop, on `scale != nullptr`: the provider passes the folded BatchNorm scale."""
    total = p.cout_pad * p.kp + p.kh * p.kw * p.kp + p.cout_pad
    blocks = min(cdiv(total, 256), 1 << 20)  # elementwise_blocks
    trips = total / (blocks * 256)
    # Each element takes one branch of the body: a pw element (stored in T), a dw one (fp32), or the
    # scale and shift of one channel (two fp32 stores).
    pw, dw = p.cout_pad * p.kp, p.kh * p.kw * p.kp
    store = "STG.E.U16" if unit.e == 2 else "STG.E"
    kinds = [("pw element", pw, {store: 1}), ("dw element", dw, {"STG.E": 1, "STG.E.U16": 0}),
             ("scale and shift", p.cout_pad, {"STG.E": 2, "STG.E.U16": 0})]
    paths = [Path.make(what, n / total, {"STG.E.U16": 0, "STG.E": 0, **sig}) for what, n, sig in kinds]
    loops = [LoopPlan("packed elements, with scale", trips, expect={"LDG": 8, "STG": 4}, paths=paths),
             LoopPlan("packed elements, no scale", 0, expect={"LDG": 5, "STG": 4})]
    nbytes = unit.weight_bytes() + unit.e * p.cout_pad * p.kp + 4 * (p.kh * p.kw * p.kp + 2 * p.cout_pad)
    return Launch(kernel="pack_weights_kernel", config="256", threads=256, grid=blocks, loops=loops,
                  dram_bytes=nbytes, compile=_compiler("sepconv_infer.cu", "pack_weights_kernel", arch, unit.dtype))


def _per_warp(f) -> float:
    """Average over the CTA's 8 warps of f(warp)."""
    warps = cuda_tiling.THREADS // 32
    return sum(f(w) for w in range(warps)) / warps


def _pointwise_paths(unit: Unit, p: cuda_tiling.TiledPlan) -> list[Path]:
    """The ways through one iteration (one 32-channel stage of one Cout tile) of the pointwise loop,
    per warp, with their shares over the tiles of an image: the products (16-bit: skipped by a warp
    whose 32 columns all lie past Cout), and after the last stage of each Cout tile the epilogue:
    the unmasked copy for the flags the layer runs (residual, post-ReLU) where the position tile is
    full and the Cout tile lies inside Cout, else the masked element-by-element copy with the stores
    of the rows and columns that exist (a warp issues an instruction when any of its lanes runs it)."""
    res, relu = bool(unit.shape.residual), bool(unit.shape.post_relu)
    warps = cuda_tiling.THREADS // 32
    shares: dict = {}

    def add(what, signature, n):
        key = (what, tuple(sorted(signature.items())))
        shares[key] = shares.get(key, 0) + n

    # Opcodes of the epilogue copies: the unmasked one stores (and adds the residual) a pair at a time,
    # the masked one element by element; the post-ReLU is 4 instructions per row in both types (4
    # pairs x 1 packed max in 16-bit, 2 pairs x 2 selects in fp32).
    if p.elem == 2:
        pair_st, pair_ld, elem_st, elem_ld, relu_op, pairs_per_row = "STG.E", "LDG.E", "STG.E.U16", "LDG.E.U16", \
            "HMNMX2", 4
    else:
        pair_st, pair_ld, elem_st, elem_ld, relu_op, pairs_per_row = "STG.E.64", "LDG.E.64", "STG.E", "LDG.E", \
            "FSEL", 2
    relu_per_row = 4
    mf = p.bm // 32  # 16-bit: m16 fragments per warp
    for rem in range(p.tiles_per_image):
        _, count = p.tile(rem)
        for nt in range(p.cout_tiles):
            full = count == p.bm and (nt + 1) * cuda_tiling.BN <= p.c_out
            for w in range(warps):
                if p.elem == 2:  # a warp owns (bm / 2) x 32 of the tile: rows 8 lanes deep, pairs 8 apart
                    live = nt * cuda_tiling.BN + (w % 4) * 32 < p.c_out
                    work = {"HMMA": 8 * mf if live else 0}
                    rows = [(w // 4) * (p.bm // 2) + 16 * i + 8 * h for i in range(mf) for h in range(2)]
                    cols = [nt * cuda_tiling.BN + (w % 4) * 32 + 8 * j for j in range(4)]
                else:  # a thread owns rows warp + 8 i (warp-uniform) and 4 columns: pairs 2 apart
                    work = {"FFMA": 512}
                    rows = [w + 8 * i for i in range(p.bm // 8)]
                    cols = [nt * cuda_tiling.BN + k for k in (0, 2)]
                # The stores fix the copy (none, unmasked or masked); a flag that is on adds its
                # instructions. One that is off adds no key: nvcc may keep a copy's instructions
                # predicated off rather than branch around them (the unmasked post-ReLU copy issues the
                # residual loads either way), and the shortest path takes the cheapest copy that fits.
                none = {pair_st: 0, elem_st: 0}
                add("products", {**work, **none}, p.k_chunks - 1)
                if full:
                    n = len(rows) * pairs_per_row
                    sig = {**none, pair_st: n, **({pair_ld: n} if res else {}),
                           **({relu_op: len(rows) * relu_per_row} if relu else {})}
                    add("products + epilogue, unmasked", {**work, **sig}, 1)
                else:
                    valid = [r for r in rows if r < count]
                    stored = len(valid) * sum((c < p.c_out) + (c + 1 < p.c_out) for c in cols)
                    sig = {**none, elem_st: stored, **({elem_ld: stored} if res else {}),
                           **({relu_op: len(valid) * relu_per_row} if relu else {})}
                    add("products + epilogue, masked", {**work, **sig}, 1)
    total = sum(shares.values())
    return [Path(what, n / total, signature) for (what, signature), n in shares.items()]


def _tiled_launch(unit: Unit, arch: int, p: cuda_tiling.TiledPlan) -> Launch:
    """sepconv_infer_tiled_kernel<T, bm, 3, 3>: one 256-thread CTA per position tile; phase 1 stages
    the halo box chunk by chunk (32 channels, 16-byte cp.async, the pre-ReLU in place) and computes the
    depthwise into the resident d tile; phase 2 runs every Cout tile over it (16-bit: ldmatrix +
    mma.sync, fp32: FFMA) through a 3-stage cp.async weight ring, the epilogue once per Cout tile.
    One CTA per SM (shared memory) and a barrier between the phases: they run in sequence."""
    s = unit.shape
    if unit.K != 3:
        raise NotImplementedError("the plan covers the 3x3 instance (every Xception unit)")
    if unit.C % (16 // unit.e):
        raise NotImplementedError("C not a multiple of a 16-byte vector: the element-wise halo staging runs "
                                  "(not in Xception; no plan for its loop copies)")
    vp = cuda_tiling.BK // (16 // unit.e)  # 16-byte vectors per staged pixel
    slots = cuda_tiling.THREADS // vp
    taps = unit.K * unit.K
    wts_vectors = taps * (cuda_tiling.BK // 4)
    pixels = [p.box_pixels(*p.tile(rem)) for rem in range(p.tiles_per_image)]

    def mean_over_tiles(f):
        return sum(_per_warp(lambda w: f(px, w)) for px in pixels) / len(pixels)

    def strided(total, first, step):  # trips of `for (i = first; i < total; i += step)`
        return cdiv(total - first, step) if total > first else 0

    # A warp runs a loop over its lanes' items as long as any lane has one.
    table = mean_over_tiles(lambda px, w: strided(px, 32 * w, cuda_tiling.THREADS))
    halo = mean_over_tiles(lambda px, w: max(strided(px, sl, slots) for sl in range(w * 32 // vp, (w + 1) * 32 // vp)))
    weights = _per_warp(lambda w: strided(wts_vectors, 32 * w, cuda_tiling.THREADS))
    chunks = p.k_chunks
    later = (chunks - 1) / chunks  # the chunk loop stages the next chunk in all but its last iteration
    relu = halo if s.pre_relu else 0
    k_pos = p.bm // slots if p.bm >= slots else 1
    # Warps whose first depthwise row lies past the tile skip the depthwise (dw_active; bm < slots only).
    active = _per_warp(lambda w: float(w * 32 // vp < p.bm))
    dw = "depthwise"
    loops = [
        LoopPlan("pixel table of the halo box", table, expect={"STS": 1}, phase=dw),
        LoopPlan("halo staging of chunk 0, 16-byte cp.async", halo, expect={"LDGSTS": 1, "LDS": 4}, phase=dw),
        # The element-wise staging (x not 16-byte aligned or C not a multiple of a vector), a copy per
        # pre_relu, each as a remainder and a x4-unrolled loop: not run by Xception's layers.
        *[LoopPlan(f"element-wise halo staging of chunk 0 ({n})", 0, expect={"LDG": k}, phase=dw)
          for n, k in (("remainder", 1), ("x4 unrolled", 4)) * 2],
        LoopPlan("depthwise weights of chunk 0", weights, expect={"LDGSTS": 1, "LDS": 3}, phase=dw),
        # The chunk loop's own code: the depthwise of the chunk (the thread's rows, all taps), with the
        # 16-byte staging of the next chunk in all but the last iteration; not the element-wise copy.
        LoopPlan("channel chunks of 32", chunks, expect={"FFMA": k_pos * (16 // unit.e) * taps}, phase=dw,
                 paths=[Path.make("depthwise of the chunk, 16-byte staging", active,
                                  {"FFMA": k_pos * (16 // unit.e) * taps, "LDG": 0}),
                        Path.make("no rows of the tile (bm < slots), 16-byte staging", 1 - active,
                                  {"FFMA": 0, "LDG": 0})]),
        LoopPlan("halo staging of the next chunk", halo * later, expect={"LDGSTS": 1, "LDS": 4}, phase=dw),
        *[LoopPlan("element-wise halo staging of the next chunk", 0, expect={"LDG": 4}, phase=dw)] * 2,
        LoopPlan("depthwise weights of the next chunk", weights * later, expect={"LDGSTS": 1, "LDS": 3}, phase=dw),
        LoopPlan("pre-ReLU of the staged chunk", relu, expect={"LDS": 1, "STS": 1}, phase=dw),
        LoopPlan("pointwise stages (Cout tiles x 32-channel chunks)", p.stages, paths=_pointwise_paths(unit, p),
                 phase="pointwise"),
    ]
    tag = f"{TYPE_TAG[unit.dtype][:-1]}Li{p.bm}ELi3ELi3EE"
    nbytes = (unit.x_bytes() + unit.y_bytes() * (2 if s.residual else 1) + unit.e * p.cout_pad * p.kp
              + 4 * (taps * p.kp + 2 * p.cout_pad))
    tiles = "row segments" if p.row_segments else "image ranges"
    return Launch(kernel="sepconv_infer_tiled_kernel", config=f"bm {p.bm} ({tiles}) x {cuda_tiling.BN} x "
                  f"{cuda_tiling.BK}, t{cuda_tiling.THREADS}, {cuda_tiling.STAGES}-stage ring",
                  compile=_compiler("sepconv_infer.cu", "sepconv_infer_tiled_kernel", arch, unit.dtype,
                                    dynamic_smem=p.smem_bytes(), tag=tag, threads=cuda_tiling.THREADS),
                  grid=p.tiles, loops=loops, dram_bytes=nbytes, threads=cuda_tiling.THREADS,
                  useful_ffma=p.bm * p.kp * taps if unit.e == 2 else 0.0)


# --- training -------------------------------------------------------------------------------------------

RED_COLS, RED_LANES = 32, 8  # kRedCols x kRedLanes blocks of the reductions
TARGET_BLOCKS, MIN_ROWS, MAX_ROW_CHUNKS, MAX_PARTIAL = 1024, 256, 1024, 256 << 20  # sepconv_backward.cu


def unrolled(n: int, factors: tuple) -> list:
    """Trips of the SASS loops nvcc made of one n-iteration loop unrolled by `factors` (in SASS
    order, e.g. (16, 4, 1) or (1, 4) for a remainder loop placed first): the largest factor takes
    n // f, the next what remains, and so on."""
    trips, left = {}, n
    for f in sorted(factors, reverse=True):
        trips[f], left = left // f, left % f
    return [trips[f] for f in factors]


def _per_lane_group(total: int, lanes: int, factors: tuple) -> list:
    """Average, over `lanes` warps w, of `unrolled(ceil((total - w) / lanes))`: a loop `for (r = w;
    r < total; r += lanes)` with one warp per w (the 32 x 8 reduction blocks)."""
    rows = [unrolled(max(0, cdiv(total - w, lanes)), factors) for w in range(lanes)]
    return [sum(r[i] for r in rows) / lanes for i in range(len(factors))]


def _rows_per_chunk(rows: int, cols: int) -> int:
    per = max(cdiv(rows, MAX_ROW_CHUNKS), MIN_ROWS)
    max_chunks = MAX_PARTIAL // (cols * 4) if cols > 0 else MAX_ROW_CHUNKS
    if max_chunks >= 1 and cdiv(rows, per) > max_chunks:
        per = cdiv(rows, max_chunks)
    return per


def _column_sum(unit: Unit, arch: int, rows: int, cols: int, out_bytes: int) -> list[Launch]:
    # for (r = ty; r < rows; r += 8): a remainder loop first, then x16.
    trips = _per_lane_group(rows, RED_LANES, (1, 16))
    loops = [LoopPlan("partial rows (remainder)", trips[0], expect={"LDG": 1}),
             LoopPlan("partial rows (x16 unrolled)", trips[1], expect={"LDG": 16})]
    return [Launch(kernel="column_sum_kernel", config="32x8", threads=RED_COLS * RED_LANES,
                   compile=_compiler("sepconv_backward.cu", "column_sum_kernel", arch, unit.dtype),
                   grid=cdiv(cols, RED_COLS), loops=loops, dram_bytes=4 * rows * cols + out_bytes * cols)]


def _stats_warps(c_out: int) -> float:
    """Average warps (of 4) that run the statistics epilogue (threads n < 64 with a channel)."""
    tiles = cdiv(c_out, BN)
    return sum(min(2, cdiv(min(BN, c_out - t * BN), 32)) for t in range(tiles)) / tiles / (THREADS // 32)


def train(unit: Unit, arch: int, sms: int):
    """Forward + backward of a training step, as ops.py runs them through the CUDA provider. fp32: the
    block products are FFMA (BlockMma<float>: a loop over k, x4 unrolled, after the tile staging)
    where 16-bit types issue HMMA in the chunk loop's own body."""
    e, C, Cout, P, K = unit.e, unit.C, unit.Cout, unit.P, unit.K
    fp32 = unit.dtype == "fp32"
    hmma = None if fp32 else {"HMMA": 16}
    ffma_product = [LoopPlan("fp32 block product over k (x4 unrolled)", BK / 4, expect={"FFMA": 128})] if fp32 else []
    taps = K * K
    s = unit.shape
    per_thread = BM // (THREADS // BK)
    m_tiles, n_tiles = cdiv(P, BM), cdiv(Cout, BN)
    kernels: list[list[Launch]] = []

    # Forward main loop + statistics epilogue (two passes over the tile's rows, x16/x4/x1 unrolled).
    rows = [BM] * (m_tiles - 1) + [P - BM * (m_tiles - 1)]
    stat = [sum(unrolled(r, (16, 4, 1))[i] for r in rows) / m_tiles * _stats_warps(Cout) for i in range(3)]
    loops = [
        LoopPlan("fill_rows (row table)", 0.5, expect={"STS": 6}),
        LoopPlan("input-channel chunks of 32", cdiv(C, BK), expect=hmma),
        LoopPlan("depthwise taps i (run-time kh)", K),
        LoopPlan("depthwise taps j (run-time kw)", K, expect={"FFMA": per_thread}),
        LoopPlan("pointwise weight tile staging (x4 unrolled)", BN * BK // THREADS / 4, expect={"LDG": 4}),
        *ffma_product,
        *[LoopPlan(f"z store ({w})", t, expect={"STG": n}) for w, t, n in
          zip(("remainder", "x4 unrolled"), unrolled(BM * BN // THREADS, (1, 4)), (1, 4))],
        *[LoopPlan(f"statistics sum ({w})", t, expect={"LDS": n}) for w, t, n in
          zip(("x16", "x4", "x1"), stat, (16, 4, 1))],
        *[LoopPlan(f"statistics M2 ({w})", t, expect={"FFMA": n}) for w, t, n in
          zip(("x16", "x4", "x1"), stat, (16, 4, 1))],
    ]
    kernels.append([Launch(kernel="sepconv_train_kernel", config=f"{BM}x{BN}x{BK} t{THREADS}", threads=THREADS,
                           compile=_compiler("sepconv_forward.cu", "sepconv_train_kernel", arch, unit.dtype),
                           grid=m_tiles * n_tiles, loops=loops,
                           dram_bytes=unit.x_bytes() + unit.weight_bytes() + unit.y_bytes() + 12 * m_tiles * Cout,
                           useful_ffma=BM * cdiv(C, BK) * BK * taps)])
    merge = _per_lane_group(m_tiles, RED_LANES, (4, 1))
    kernels.append([Launch(kernel="bn_stats_merge_kernel", config="32x8", threads=RED_COLS * RED_LANES,
                           compile=_compiler("sepconv_forward.cu", "bn_stats_merge_kernel", arch, unit.dtype),
                           grid=cdiv(Cout, RED_COLS), dram_bytes=12 * m_tiles * Cout + 12 * Cout,
                           loops=[LoopPlan("row tiles (x4 unrolled)", merge[0], expect={"LDG": 12}),
                                  LoopPlan("row tiles (remainder)", merge[1], expect={"LDG": 3})])])
    total = P * Cout
    blocks = min(cdiv(total, 256), 1 << 20)  # elementwise_blocks
    kernels.append([Launch(kernel="bn_apply_kernel", config="256", threads=256,
                           compile=_compiler("sepconv_forward.cu", "bn_apply_kernel", arch, unit.dtype),
                           grid=blocks, loops=[LoopPlan("grid-stride elements", total / (blocks * 256),
                                                        expect={"STG": 1})],
                           dram_bytes=unit.y_bytes() * (3 if s.residual else 2))])

    # Backward: per-channel dy sums (a loop version per (post_relu, weight, bias); affine BN here).
    per = _rows_per_chunk(P, 2 * Cout)
    blocks = cdiv(P, per)
    rows = [per] * (blocks - 1) + [P - per * (blocks - 1)]
    u = 16 if fp32 else 4  # nvcc unrolls the post-ReLU versions x4 in 16-bit types, x16 in fp32
    group = [sum(x) / blocks for x in zip(*[_per_lane_group(r, RED_LANES, (1, u)) for r in rows])]
    group16 = [sum(x) / blocks for x in zip(*[_per_lane_group(r, RED_LANES, (1, 16)) for r in rows])]
    versions = []
    for ffma in ((1, u), (1, u), (1, u), (2, 2 * u)):  # post_relu with weight and/or bias, then with both
        versions.append((ffma, group if s.post_relu and ffma == (2, 2 * u) else [0, 0]))
    loops = []
    for (f1, fu), (t1, tu) in versions:
        loops += [LoopPlan("rows (remainder)", t1, expect={"LDG": 2, "FFMA": f1}),
                  LoopPlan(f"rows (x{u} unrolled)", tu, expect={"LDG": 2 * u, "FFMA": fu})]
    t1, t16 = group16 if not s.post_relu else (0, 0)
    loops += [LoopPlan("rows, no post-ReLU (remainder)", t1, expect={"LDG": 2, "FFMA": 1}),
              LoopPlan("rows, no post-ReLU (x16 unrolled)", t16, expect={"LDG": 32, "FFMA": 16})]
    kernels.append([Launch(kernel="bn_backward_partial_kernel", config="32x8", threads=RED_COLS * RED_LANES,
                           compile=_compiler("sepconv_backward.cu", "bn_backward_partial_kernel", arch, unit.dtype),
                           grid=blocks * cdiv(Cout, RED_COLS), loops=loops,
                           dram_bytes=2 * unit.y_bytes() + 8 * blocks * Cout)])
    kernels.append(_column_sum(unit, arch, blocks, Cout, 4))
    kernels.append(_column_sum(unit, arch, blocks, Cout, 4))

    # grad_d = grad_z @ pw (grad_z formed on the fly, a staging loop version per post_relu), fp32 out.
    c_tiles, co_tiles = cdiv(C, BN), cdiv(Cout, BM)
    staging = BM * BK // THREADS / 2
    loops = [LoopPlan("output-channel chunks of 32", cdiv(Cout, BK), expect=hmma),
             LoopPlan("grad_z tile, post-ReLU (x2 unrolled)", staging if s.post_relu else 0, expect={"STS": 2}),
             LoopPlan("grad_z tile (x2 unrolled)", 0 if s.post_relu else staging, expect={"STS": 2}),
             LoopPlan("pointwise weight tile staging (x4 unrolled)", BK * BN // THREADS / 4, expect={"LDG": 4}),
             *ffma_product,
             *[LoopPlan(f"grad_d store ({w})", t, expect={"STG": n}) for w, t, n in
               zip(("remainder", "x4 unrolled"), unrolled(BM * BN // THREADS, (1, 4)), (1, 4))]]
    kernels.append([Launch(kernel="grad_d_kernel", config=f"{BM}x{BN}x{BK} t{THREADS}", threads=THREADS,
                           compile=_compiler("sepconv_backward.cu", "grad_d_kernel", arch, unit.dtype, train=True),
                           grid=m_tiles * c_tiles, loops=loops,
                           dram_bytes=2 * unit.y_bytes() + unit.weight_bytes() + 4 * P * C)])

    # grad_pw = grad_z^T @ d, d recomputed, split over positions (a depthwise version per pre_relu).
    k_chunks = cdiv(P, BK)
    splits = min(cdiv(TARGET_BLOCKS, co_tiles * c_tiles), k_chunks)
    max_splits = MAX_PARTIAL // (Cout * C * 4)
    if splits > max_splits:
        splits = max(max_splits, 1)
    per_split = cdiv(k_chunks, splits)
    splits = cdiv(k_chunks, per_split)
    chunks = k_chunks / splits  # average chunks per split
    loops = [LoopPlan("position chunks of 32 in the split", chunks, expect=hmma),
             LoopPlan("fill_rows (32-row table)", 0.25, expect={"STS": 6}),
             LoopPlan("grad_z tile, post-ReLU (x2 unrolled)", staging if s.post_relu else 0, expect={"STS": 2}),
             LoopPlan("grad_z tile (x2 unrolled)", 0 if s.post_relu else staging, expect={"STS": 2}),
             LoopPlan("depthwise taps i (run-time kh)", K),
             LoopPlan("depthwise taps j, pre-ReLU", K if s.pre_relu else 0, expect={"FFMA": 16}),
             LoopPlan("depthwise taps j", 0 if s.pre_relu else K, expect={"FFMA": 16}),
             *ffma_product,
             *[LoopPlan(f"partial store ({w})", t, expect={"STG": n}) for w, t, n in
               zip(("remainder", "x4 unrolled"), unrolled(BM * BN // THREADS, (1, 4)), (1, 4))]]
    kernels.append([Launch(kernel="grad_pw_kernel", config=f"{BM}x{BN}x{BK} t{THREADS}", threads=THREADS,
                           compile=_compiler("sepconv_backward.cu", "grad_pw_kernel", arch, unit.dtype, train=True),
                           grid=splits * co_tiles * c_tiles, loops=loops,
                           dram_bytes=unit.x_bytes() + 2 * unit.y_bytes() + 4 * splits * Cout * C,
                           useful_ffma=BK * chunks * BN * taps)])
    kernels.append(_column_sum(unit, arch, splits, Cout * C, e))

    # grad_x: grid-stride over x's elements; the tap loop j unrolled x4 with its remainder before it.
    x_total = unit.Q * C
    blocks = min(cdiv(x_total, 256), 1 << 20)
    kernels.append([Launch(kernel="grad_x_kernel", config="256", threads=256,
                           compile=_compiler("sepconv_backward.cu", "grad_x_kernel", arch, unit.dtype),
                           grid=blocks, dram_bytes=4 * P * C + 2 * unit.x_bytes(),
                           loops=[LoopPlan("grid-stride elements", x_total / (blocks * 256), expect={"STG": 1}),
                                  LoopPlan("taps i (remainder of j inside)", K, expect={"FFMA": 3}),
                                  LoopPlan("taps j (x4 unrolled)", K // 4, expect={"FFMA": 4})])])

    # grad_dw partials: one block per (position chunk, 32 channels, tap); a version per pre_relu.
    per = _rows_per_chunk(P, C * taps)
    chunks_dw = cdiv(P, per)
    rows = [per] * (chunks_dw - 1) + [P - per * (chunks_dw - 1)]
    group = [sum(x) / chunks_dw for x in zip(*[_per_lane_group(r, RED_LANES, (1, 4)) for r in rows])]
    on, off = (group, [0, 0]) if s.pre_relu else ([0, 0], group)
    loops = [LoopPlan("positions, pre-ReLU (remainder)", on[0], expect={"FFMA": 1}),
             LoopPlan("positions, pre-ReLU (x4 unrolled)", on[1], expect={"FFMA": 4}),
             LoopPlan("positions (remainder)", off[0], expect={"FFMA": 1}),
             LoopPlan("positions (x4 unrolled)", off[1], expect={"FFMA": 4})]
    kernels.append([Launch(kernel="grad_dw_partial_kernel", config="32x8", threads=RED_COLS * RED_LANES,
                           compile=_compiler("sepconv_backward.cu", "grad_dw_partial_kernel", arch, unit.dtype),
                           grid=chunks_dw * cdiv(C, RED_COLS) * taps, loops=loops,
                           dram_bytes=4 * P * C + unit.x_bytes() + 4 * chunks_dw * C * taps)])
    kernels.append(_column_sum(unit, arch, chunks_dw, C * taps, e))
    return kernels


MODES = {"infer": infer, "train": train}
