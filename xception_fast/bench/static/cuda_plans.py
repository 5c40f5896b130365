"""Launch plans of the CUDA provider (csrc/), and the nvcc build of its cubins.

This is the only module that knows the CUDA kernels' loop structure. nvcc unrolls some loops
partially; a plan gives the trip count of the loop as compiled and pins the unroll factor it assumed
with `expect` (instructions per iteration, inner loops excluded), so a compiler or source change
that alters it fails loudly instead of skewing the estimate.

Modelled: both forwards as the host runs them (xception_fast_ops.cpp, three steps): the d store
(`pack_weights_kernel`, `d_store_kernel<T, 3, 3, true>` on the tiled depthwise phase, the tiling its
launcher picks, see `cuda_tiling.ds_choose`), z = d pw^T on cuBLAS (a library call at its roofline,
`model.library_gemm`, as the backward's products and the Triton plan's torch.matmul), then inference:
the scale and shift in fp32 and `infer_epilogue_kernel` (in place over z); training: the statistics'
partials (`z_stats_partial_kernel`), the moments merge's passes, the BatchNorm affine in fp32 and
`bn_apply_kernel`. Inference in every dtype; training, bf16/fp16, with the backward as
`run_sepconv_bn_train_backward` launches it on Xception's units (3x3, stride 1, C and Cout multiples
of 8): the dy sums, the grad_z materialisation, the d store, grad_d and grad_pw on cuBLAS, grad_x and
grad_dw (`dw_backward_tiled_kernel`), their weight packs and column sums. The fallbacks (the int64
d store, grad_x and grad_dw kernels for shapes the tiled ones decline, the element-wise staging for C
not a multiple of a vector) and fp32 training have no plan: `train` returns None (fp32) or raises
NotImplementedError, and the unit is reported as not modelled. Where nvcc versioned a loop on a
run-time flag (post_relu, pre_relu), the plan gives the version the layer runs its trips and the
others 0; which SASS copy is which version is read from the instruction counts (`expect`).

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


def _d_store_plan(unit: Unit, max_smem: int) -> cuda_tiling.TiledPlan:
    """The d store's tiling on a GPU with `max_smem` bytes of shared memory per block; raises
    NotImplementedError where its plan does not apply (the int64 fallback, the element-wise staging)."""
    s = unit.shape
    if unit.K != 3:
        raise NotImplementedError("the d store's plan covers the 3x3 instance (every Xception unit)")
    if unit.C % (16 // unit.e):
        raise NotImplementedError("C not a multiple of a 16-byte vector: the element-wise staging runs "
                                  "(not in Xception; no plan for its loop copies)")
    ds = cuda_tiling.ds_choose(unit.batch, unit.C, unit.H, unit.W, 3, s.stride, s.padding, s.dilation, unit.e,
                               max_smem)
    if ds is None:
        raise NotImplementedError("the tiled d store declines this unit (its int64 fallback has no plan)")
    return ds


def _pointwise_forward(unit: Unit, arch: int) -> list[list[Launch]]:
    """The forwards' first two steps: the d store (weight pack, d_store_kernel) and z = d pw^T on
    cuBLAS (xception_fast_ops.cpp, pointwise_forward): d read, the weights, z written."""
    from xception_fast.bench.static.machine import machine
    from xception_fast.bench.static.model import library_gemm

    gpu = machine(arch)
    ds = _d_store_plan(unit, gpu.smem_per_block)
    gemm = library_gemm("cublas_z", gpu, unit.P, unit.Cout, unit.C, unit.dtype,
                        unit.d_bytes() + unit.e * unit.C * unit.Cout + unit.y_bytes())
    return [[_pack_launch(unit, arch, ds, scale=False)], [_d_store_launch(unit, arch, ds)], [gemm]]


def _vector(unit: Unit) -> int:
    """Elements per step of the forward's element-wise passes: 16 bytes where Cout allows (the aligned
    buffers of the provider), else one."""
    v = 16 // unit.e
    return v if unit.Cout % v == 0 else 1


def infer(unit: Unit, arch: int, sms: int) -> list[list[Launch]]:
    """What sepconv_bn_infer launches (xception_fast_ops.cpp): the d store, z on cuBLAS into y's buffer,
    the scale and shift in fp32, infer_epilogue_kernel over z in place (z read, y written, the residual
    read)."""
    s = unit.shape
    v = _vector(unit)
    # The instance for the layer's residual and post-ReLU (template flags).
    flags = f"Lb{int(bool(s.residual))}ELb{int(bool(s.post_relu))}E"
    steps = unit.P * unit.Cout // v
    blocks = min(cdiv(steps, 256), 1 << 20)  # elementwise_blocks
    epilogue = Launch(kernel="infer_epilogue_kernel", config=f"256, {v} per step", threads=256, grid=blocks,
                      loops=[LoopPlan("grid-stride vectors", steps / (blocks * 256), expect={"STG": 1})],
                      dram_bytes=unit.y_bytes() * (3 if s.residual else 2) + 8 * unit.Cout,
                      compile=_compiler("sepconv_forward.cu", "infer_epilogue_kernel", arch, unit.dtype,
                                        tag=f"{TYPE_TAG[unit.dtype][:-1]}Li{v}E{flags}E", threads=256))
    return [*_pointwise_forward(unit, arch), [_vec_to_float(unit, arch, "sepconv_forward.cu")],
            [_vec_to_float(unit, arch, "sepconv_forward.cu")], [epilogue]]


def _pack_launch(unit: Unit, arch: int, p: cuda_tiling.TiledPlan, scale: bool = True) -> Launch:
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
    # Without a scale (the training forward, the backward's packs) the other copy runs, all of its
    # body counted each iteration (no paths: a small over-count on a small kernel).
    loops = [LoopPlan("packed elements, with scale", trips if scale else 0, expect={"LDG": 8, "STG": 4},
                      paths=paths if scale else None),
             LoopPlan("packed elements, no scale", 0 if scale else trips, expect={"LDG": 5, "STG": 4})]
    nbytes = unit.weight_bytes() + unit.e * p.cout_pad * p.kp + 4 * (p.kh * p.kw * p.kp + 2 * p.cout_pad)
    return Launch(kernel="pack_weights_kernel", config="256", threads=256, grid=blocks, loops=loops,
                  dram_bytes=nbytes, compile=_compiler("sepconv_infer.cu", "pack_weights_kernel", arch, unit.dtype))


def _per_warp(f) -> float:
    """Average over the CTA's 8 warps of f(warp)."""
    warps = cuda_tiling.THREADS // 32
    return sum(f(w) for w in range(warps)) / warps


def _mean_over_tiles(p: cuda_tiling.TiledPlan, f) -> float:
    """Average over the tiles of an image and the CTA's warps of f(halo box pixels, warp)."""
    pixels = [p.box_pixels(*p.tile(rem)) for rem in range(p.tiles_per_image)]
    return sum(_per_warp(lambda w: f(px, w)) for px in pixels) / len(pixels)


def _strided(total, first, step) -> int:
    """Trips of `for (i = first; i < total; i += step)`."""
    return cdiv(total - first, step) if total > first else 0


def _staging_trips(p: cuda_tiling.TiledPlan) -> tuple[float, float, float]:
    """Per warp and tile: (pixel-table trips, 16-byte halo staging trips, depthwise-weight trips) of the
    depthwise phase (a warp runs a loop over its lanes' items as long as any lane has one)."""
    vp = cuda_tiling.BK // (16 // p.elem)  # 16-byte vectors per staged pixel
    slots = cuda_tiling.THREADS // vp
    table = _mean_over_tiles(p, lambda px, w: _strided(px, 32 * w, cuda_tiling.THREADS))
    halo = _mean_over_tiles(p, lambda px, w: max(_strided(px, sl, slots) for sl in range(w * 32 // vp, (w + 1) * 32 // vp)))
    weights = _per_warp(lambda w: _strided(p.kh * p.kw * (cuda_tiling.BK // 4), 32 * w, cuda_tiling.THREADS))
    return table, halo, weights


def _depthwise_loops(p: cuda_tiling.TiledPlan, chunks: int, pre_relu: bool, phase: str = "",
                     copies: tuple = (1, 4, 1, 4)) -> list[LoopPlan]:
    """The depthwise phase's loops (depthwise_phase, sepconv_infer.cu) for `chunks` chunks per tile, the
    16-byte staging path: the pixel table, the first chunk's staging, the chunk loop (its own code:
    the chunk's math), the next chunk's staging in all but the last iteration, the pre-ReLU. `copies`:
    the LDG per iteration of the loops nvcc made of the first chunk's element-wise staging (the forward
    kernel: a remainder and a x4-unrolled loop per pre_relu; the backward's: a x4 loop per pre_relu)."""
    table, halo, weights = _staging_trips(p)
    later = (chunks - 1) / chunks
    vp = cuda_tiling.BK // (16 // p.elem)  # 16-byte vectors per staged pixel
    k_pos = max(1, p.bm // (cuda_tiling.THREADS // vp))
    ffma = k_pos * (16 // p.elem) * p.kh * p.kw
    # Warps whose first depthwise row lies past the tile skip the chunk's math (dw_active; bm < slots only).
    active = _per_warp(lambda w: float(w * 32 // vp < p.bm))
    return [
        LoopPlan("pixel table of the halo box", table, expect={"STS": 1}, phase=phase),
        LoopPlan("halo staging of chunk 0, 16-byte cp.async", halo, expect={"LDGSTS": 1, "LDS": 4}, phase=phase),
        # The element-wise staging (x not 16-byte aligned or C not a multiple of a vector), a copy per
        # pre_relu, each as a remainder and a x4-unrolled loop: not run by Xception's layers.
        *[LoopPlan(f"element-wise halo staging of chunk 0 (x{k})", 0, expect={"LDG": k}, phase=phase)
          for k in copies],
        LoopPlan("depthwise weights of chunk 0", weights, expect={"LDGSTS": 1, "LDS": 3}, phase=phase),
        LoopPlan(f"channel chunks of 32 ({chunks} per tile)", chunks, phase=phase,
                 paths=[Path.make("the chunk's depthwise, 16-byte staging", active, {"FFMA": ffma, "LDG": 0}),
                        Path.make("no rows of the tile (bm < slots), 16-byte staging", 1 - active,
                                  {"FFMA": 0, "LDG": 0})]),
        LoopPlan("halo staging of the next chunk", halo * later, expect={"LDGSTS": 1, "LDS": 4}, phase=phase),
        *[LoopPlan("element-wise halo staging of the next chunk", 0, expect={"LDG": 4}, phase=phase)] * 2,
        LoopPlan("depthwise weights of the next chunk", weights * later, expect={"LDGSTS": 1, "LDS": 3}, phase=phase),
        LoopPlan("pre-ReLU of the staged chunk", halo if pre_relu else 0, expect={"LDS": 1, "STS": 1}, phase=phase),
    ]


# --- training -------------------------------------------------------------------------------------------

RED_COLS, RED_LANES = 32, 8  # kRedCols x kRedLanes blocks of the reductions
MIN_ROWS, MAX_ROW_CHUNKS, MAX_PARTIAL = 256, 1024, 256 << 20  # sepconv_backward.cu


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


def _elementwise(unit: Unit, arch: int, source: str, kernel: str, vector: int, loops_of, dram_bytes: float,
                 flag: Optional[bool] = None) -> Launch:
    """A grid-stride kernel over the P x Cout activations, `vector` elements per step (16 bytes):
    loops_of(trips) gives its loop plans; `flag`: the instance of a trailing bool template argument."""
    steps = unit.P * unit.Cout // vector
    blocks = min(cdiv(steps, 256), 1 << 20)  # elementwise_blocks
    tag = f"{TYPE_TAG[unit.dtype][:-1]}Li{vector}E{'' if flag is None else f'Lb{int(flag)}E'}E"
    return Launch(kernel=kernel, config=f"256, {vector} per step", threads=256, grid=blocks,
                  loops=loops_of(steps / (blocks * 256)), dram_bytes=dram_bytes,
                  compile=_compiler(source, kernel, arch, unit.dtype, tag=tag))


def _vec_to_float(unit: Unit, arch: int, source: str) -> Launch:
    """vec_to_float_kernel: Cout elements, at most one per thread; nvcc made a loop copy per dtype and
    presence of the vector (7), of which one runs, a trip or none per thread: the copies are given 0
    trips and the kernel counts its straight-line code (under a microsecond either way)."""
    loops = [LoopPlan(f"elements (copy {i})", 0) for i in range(7)]
    return Launch(kernel="vec_to_float_kernel", config="256", threads=256, grid=cdiv(unit.Cout, 256), loops=loops,
                  dram_bytes=8 * unit.Cout, compile=_compiler(source, "vec_to_float_kernel", arch, unit.dtype))


MERGE_LEAVES, MERGE_GROUP = 8, 64  # csrc/sepconv_stats_merge.h: kMergeLeaves, kMergeGroup


def merge_passes(tiles: int) -> list[int]:
    """The partial counts the launches of launch_bn_stats_merge read, in order: a pass turns n partials
    into ceil(n / 64) while n > 64, then the final pass reads the rest (sepconv_stats_merge.h)."""
    counts = [tiles]
    while counts[-1] > MERGE_GROUP:
        counts.append(cdiv(counts[-1], MERGE_GROUP))
    return counts


def _merge_paths(n: int, final: bool) -> list[Path]:
    """The ways through one group of a merge pass over n partials, per warp (a warp is one lane: 32
    channels), with their shares over the pass's groups (all full but the last). Lane l of a group with
    `left` partials merges k = min(8, left - 8 l) leaves: k - 1 merges of two non-empty sides, each an
    fp64 division (MUFU.RCP64H); warp 0 then merges the non-empty lanes and stores (a pass: the three
    moments and, predicated, the count; the final pass: mean, var, invstd, their fp32 division and
    square root). The first pass computes the row blocks' counts (StatsCounts: a subtraction and a
    minimum, no division). Merges with an empty side branch around the division: a lower bound."""
    groups = 1 if final else cdiv(n, MERGE_GROUP)
    shares: dict = {}
    for count, left in ((groups - 1, MERGE_GROUP), (1, n - (groups - 1) * MERGE_GROUP)):
        lanes = [min(max(left - MERGE_LEAVES * l, 0), MERGE_LEAVES) for l in range(RED_LANES)]
        for l, k in enumerate(lanes):
            divs = max(k - 1, 0)
            rcp = stores = 0
            if l == 0:
                divs += max(sum(1 for x in lanes if x) - 1, 0)
                stores = 3 if final else 4
                rcp = 2 if final else 0
            sig = {"MUFU.RCP64H": divs, "MUFU.RCP": rcp, "STG": stores, **({"MUFU.RSQ": int(l == 0)} if final else {})}
            key = tuple(sorted(sig.items()))
            shares[key] = shares.get(key, 0) + count / groups / RED_LANES
    return [Path(f"{dict(key)['MUFU.RCP64H']} merges, {dict(key)['STG']} stores", share, key)
            for key, share in shares.items() if share > 0]


def _merge_launches(unit: Unit, arch: int, partials: int) -> list[Launch]:
    """bn_stats_merge_kernel<final, Counts>, one launch per pass (`merge_passes`): a 32 x 8 block per
    (group of 64 partials, 32 channels), one trip of its loop over the groups; the paths through it in
    `_merge_paths`. Bytes: the partials read (and their int64 counts after the first pass), the next
    pass's written."""
    cols = cdiv(unit.Cout, RED_COLS)
    passes = merge_passes(partials)
    launches = []
    for i, n in enumerate(passes):
        final = i == len(passes) - 1
        groups = 1 if final else cdiv(n, MERGE_GROUP)
        what = "final pass" if final else f"pass {i + 1}"
        counts = "StatsCounts" if i == 0 else "ArrayCounts"
        tag = f"ILb{int(final)}ENS0_11{counts}E"
        written = 12 * unit.Cout if final else 12 * groups * unit.Cout + 8 * groups
        nbytes = 12 * n * unit.Cout + (8 * n if i else 0) + written
        launches.append(Launch(
            kernel="bn_stats_merge_kernel", config=f"32x8, {what}: {n} -> {1 if final else groups} ({counts})",
            threads=RED_COLS * RED_LANES, grid=groups * cols, dram_bytes=nbytes,
            loops=[LoopPlan("groups of the CTA (one)", 1, paths=_merge_paths(n, final))],
            compile=_compiler("sepconv_forward.cu", "bn_stats_merge_kernel", arch, unit.dtype, tag=tag)))
    return launches


STATS_THREADS, STATS_LANE_ROWS = 256, 32  # csrc/sepconv_elementwise.h


def stats_shape(unit: Unit) -> tuple[int, int, int]:
    """z_stats_partial_kernel's block shape and grid rows for this unit (sepconv_elementwise.h:
    stats_cols): (channel vectors per block, row lanes, row blocks)."""
    vectors = cdiv(unit.Cout, _vector(unit))
    cols = 32 if vectors > 16 else 16 if vectors > 8 else 8
    lanes = STATS_THREADS // cols
    return cols, lanes, cdiv(unit.P, lanes * STATS_LANE_ROWS)


def _lane_count(rows: int, block: int, lane: int, lanes: int) -> int:
    """stats_lane_count: the real rows of a lane of a row block."""
    left = rows - (block * lanes * STATS_LANE_ROWS + lane)
    return 0 if left <= 0 else min(cdiv(left, lanes), STATS_LANE_ROWS)


def _z_stats_launch(unit: Unit, arch: int) -> Launch:
    """z_stats_partial_kernel<T, kV, kCols>: a block of kCols channel vectors by 256 / kCols lanes per
    (row block, column block); each thread streams its lane's rows after the first (one 16-byte vector
    each) into shifted sums, as nvcc compiled the loop: x4 (4 loads in flight), then a remainder; the
    lanes' moments through shared memory, one barrier, one channel's lanes merged per thread. A warp
    holds 32 / kCols lanes and runs as many trips as its longest. Bytes: z read once, the partials
    [row blocks][3][Cout] written."""
    v = _vector(unit)
    cols, lanes, blocks = stats_shape(unit)
    per_warp = 32 // cols

    def trips(block: int) -> list:  # x4 and remainder trips of the block's warps, averaged
        warps = [max(_lane_count(unit.P, block, w * per_warp + l, lanes) for l in range(per_warp))
                 for w in range(lanes // per_warp)]
        rows = [unrolled(max(n - 1, 0), (4, 1)) for n in warps]
        return [sum(r[i] for r in rows) / len(rows) for i in range(2)]

    full, last = trips(0), trips(blocks - 1)
    avg = [(full[i] * (blocks - 1) + last[i]) / blocks for i in range(2)]
    loops = [LoopPlan("rows of a lane after its first, x4", avg[0], expect={"LDG": 4}),
             LoopPlan("rows of a lane, remainder", avg[1], expect={"LDG": 1})]
    return Launch(kernel="z_stats_partial_kernel",
                  config=f"{cols}x{lanes}, {v} per thread, {blocks} row blocks of {lanes * STATS_LANE_ROWS}",
                  threads=STATS_THREADS, grid=blocks * cdiv(cdiv(unit.Cout, v), cols), loops=loops,
                  dram_bytes=unit.y_bytes() + 12 * blocks * unit.Cout,
                  compile=_compiler("sepconv_forward.cu", "z_stats_partial_kernel", arch, unit.dtype,
                                    tag=f"{TYPE_TAG[unit.dtype][:-1]}Li{v}ELi{cols}EE", threads=STATS_THREADS))


def _d_store_launch(unit: Unit, arch: int, p: cuda_tiling.TiledPlan) -> Launch:
    """d_store_kernel<T, 3, 3, true>: one CTA per position tile (whole output rows or a row segment), the
    forward's depthwise phase over every 32-channel chunk, each slot's threads computing a run of
    DS_RUN adjacent outputs from one pass over the staged columns and storing the valid ones (16-byte
    stores): d [P, C] in T. Warps past the tile's runs skip the math. x read once, d written once."""
    loops = _depthwise_loops(p, p.k_chunks, unit.shape.pre_relu)  # nvcc's staging copies as the forward's
    vp = cuda_tiling.BK // (16 // p.elem)  # threads per slot (16-byte vectors per staged pixel)
    runs = [p.ds_runs(*p.tile(rem)) for rem in range(p.tiles_per_image)]
    active = sum(_per_warp(lambda w: float(w * 32 // vp < r)) for r in runs) / len(runs)
    # The chunk loop's paths: the run's FFMA and its 16-byte stores (not the element-wise copy), or none.
    loops[7] = LoopPlan(f"channel chunks of 32 ({p.k_chunks} per tile)", p.k_chunks, paths=[
        Path.make("the run's depthwise and its 16-byte d stores", active,
                  {"FFMA": cuda_tiling.DS_RUN * (16 // p.elem) * 9, "STG.E.128": cuda_tiling.DS_RUN, "LDG": 0}),
        Path.make("no run (warps past the tile's runs)", 1 - active, {"FFMA": 0, "LDG": 0})])
    tag = f"{TYPE_TAG[unit.dtype][:-1]}Li3ELi3ELb1EE"
    tiles = "row segments" if p.row_segments else "image rows"
    return Launch(kernel="d_store_kernel", config=f"bm {p.bm} ({tiles}), runs of {cuda_tiling.DS_RUN}, t256, "
                                                  f"{p.k_chunks} chunks per tile",
                  threads=cuda_tiling.THREADS, grid=p.tiles, loops=loops,
                  dram_bytes=unit.x_bytes() + unit.d_bytes() + 4 * 9 * p.kp,
                  useful_ffma=p.bm * p.kp * 9,
                  compile=_compiler("sepconv_infer.cu", "d_store_kernel", arch, unit.dtype,
                                    dynamic_smem=p.ds_smem_bytes(), tag=tag, threads=cuda_tiling.THREADS))


def _dx_launch(unit: Unit, arch: int, p: cuda_tiling.TiledPlan, splits: int) -> Launch:
    """dw_backward_tiled_kernel<T, vectors, unit dilation>: a CTA per (32-channel chunk, split of pixel
    tiles), the chunk's flipped weights staged once; per tile grad_d's box (dx_box) staged with 16-byte
    cp.async, a thread's pixels kSlots apart (a grid walk, no division), then its rows one after the
    other (a row walk): x read, the 9 taps gathered once for grad_x and grad_dw (two FFMA per
    element-tap), grad_x stored (16-byte loads and stores); then grad_dw over the lanes and warps. A warp
    runs a loop while any of its lanes has an item: per tile, the most pixels / rows of its slots."""
    chunks = p.kp // cuda_tiling.BK
    vp = cuda_tiling.BK // (16 // p.elem)  # 16-byte vectors per staged pixel
    slots = cuda_tiling.THREADS // vp
    tiles = [p.tile(rem) for rem in range(p.tiles_per_image)]

    def per_tile(items) -> float:  # mean over tiles and warps of a warp's trips over `items(q0, count)`
        return sum(_per_warp(lambda w: max(_strided(items(q0, count), sl, slots)
                                           for sl in range(w * 32 // vp, (w + 1) * 32 // vp)))
                   for q0, count in tiles) / len(tiles)

    vec = 16 // p.elem
    loops = [LoopPlan("the chunk's weights, once", _per_warp(lambda w: _strided(9 * (cuda_tiling.BK // 4), 32 * w,
                                                                                  cuda_tiling.THREADS)),
                      expect={"LDGSTS": 1}),
             LoopPlan("pixel tiles of the split", p.tiles / splits),
             LoopPlan("box staging, 16-byte cp.async", per_tile(p.dx_box_pixels), expect={"LDGSTS": 1}),
             LoopPlan("rows of the tile, one after the other", per_tile(lambda q0, count: count),
                      expect={"FFMA": 2 * 9 * vec, "STG": 1}),
             LoopPlan("grad_dw partial, 9 x 32 per CTA", _per_warp(lambda w: _strided(9 * 32, 32 * w, 256)),
                      expect={"STG": 2})]
    nbytes = unit.d_bytes() + 2 * unit.x_bytes() + 4 * splits * p.c * 9
    kind = "row segments" if p.row_segments else "image ranges"
    return Launch(kernel="dw_backward_tiled_kernel",
                  config=f"bm {p.bm} ({kind}), t256, {chunks} chunks x {splits} splits",
                  threads=cuda_tiling.THREADS, grid=chunks * splits, loops=loops, dram_bytes=nbytes,
                  useful_ffma=(p.tiles / splits) * p.bm * cuda_tiling.BK * 9 * 2,
                  compile=_compiler("sepconv_infer.cu", "dw_backward_tiled_kernel", arch, unit.dtype,
                                    dynamic_smem=p.dx_smem_bytes(),
                                    tag=f"{TYPE_TAG[unit.dtype][:-1]}Lb1ELb{int(p.dil == 1)}E",
                                    threads=cuda_tiling.THREADS))


def train(unit: Unit, arch: int, sms: int):
    """Forward + backward of a training step, as ops.py runs them through the CUDA provider, 16-bit
    types on the tiled kernels (Xception's units: 3x3, stride 1, C and Cout multiples of 8):
    forward: the d store and z on cuBLAS (`_pointwise_forward`), the statistics' partials, the moments
    merge (its passes), the BatchNorm weight and bias in fp32, bn_apply; backward: the dy sums, grad_z, d
    (d_store_kernel), grad_d and grad_pw on cuBLAS (library calls at their roofline), grad_x and grad_dw
    (dw_backward_tiled_kernel), their column sums. fp32 (its FFMA products) and the fallbacks have no
    plan: None, the unit is reported as not modelled."""
    if unit.dtype == "fp32":
        return None
    s = unit.shape
    if unit.K != 3 or s.stride != 1 or unit.C % 8 or unit.Cout % 8:
        raise NotImplementedError("the training plan covers 3x3, stride 1, C and Cout multiples of 8")
    e, C, Cout, P = unit.e, unit.C, unit.Cout, unit.P
    from xception_fast.bench.static.machine import machine

    max_smem = machine(arch).smem_per_block
    ds = cuda_tiling.ds_choose(unit.batch, C, unit.H, unit.W, 3, s.stride, s.padding, s.dilation, e, max_smem)
    dx = cuda_tiling.dx_choose(unit.batch, C, unit.Ho, unit.Wo, 3, s.stride, s.padding, s.dilation, e, max_smem)
    if ds is None or dx is None:
        raise NotImplementedError("a tiled training kernel declines this unit (the fallbacks have no plan)")
    v = 16 // e
    kernels: list[list[Launch]] = []

    # Forward.
    kernels += _pointwise_forward(unit, arch)
    kernels.append([_z_stats_launch(unit, arch)])
    kernels += [[launch] for launch in _merge_launches(unit, arch, stats_shape(unit)[2])]
    kernels.append([_vec_to_float(unit, arch, "sepconv_forward.cu")])
    kernels.append([_vec_to_float(unit, arch, "sepconv_forward.cu")])
    kernels.append([_elementwise(unit, arch, "sepconv_forward.cu", "bn_apply_kernel", v,
                                 lambda t: [LoopPlan("grid-stride vectors", t, expect={"STG": 1})],
                                 unit.y_bytes() * (3 if s.residual else 2))])

    # Backward: per-channel dy sums (a loop version per (post_relu, weight, bias); affine BN here).
    per = _rows_per_chunk(P, 2 * Cout)
    blocks = cdiv(P, per)
    rows = [per] * (blocks - 1) + [P - per * (blocks - 1)]
    group = [sum(x) / blocks for x in zip(*[_per_lane_group(r, RED_LANES, (1, 4)) for r in rows])]
    group16 = [sum(x) / blocks for x in zip(*[_per_lane_group(r, RED_LANES, (1, 16)) for r in rows])]
    loops = []
    for ffma in ((1, 4), (1, 4), (1, 4), (2, 8)):  # post_relu with weight and/or bias, then with both
        t1, tu = group if s.post_relu and ffma == (2, 8) else (0, 0)
        loops += [LoopPlan("rows (remainder)", t1, expect={"LDG": 2, "FFMA": ffma[0]}),
                  LoopPlan("rows (x4 unrolled)", tu, expect={"LDG": 8, "FFMA": ffma[1]})]
    t1, t16 = group16 if not s.post_relu else (0, 0)
    loops += [LoopPlan("rows, no post-ReLU (remainder)", t1, expect={"LDG": 2, "FFMA": 1}),
              LoopPlan("rows, no post-ReLU (x16 unrolled)", t16, expect={"LDG": 32, "FFMA": 16})]
    kernels.append([Launch(kernel="bn_backward_partial_kernel", config="32x8", threads=RED_COLS * RED_LANES,
                           compile=_compiler("sepconv_backward.cu", "bn_backward_partial_kernel", arch, unit.dtype),
                           grid=blocks * cdiv(Cout, RED_COLS), loops=loops,
                           dram_bytes=2 * unit.y_bytes() + 8 * blocks * Cout)])
    kernels.append(_column_sum(unit, arch, blocks, Cout, 4))
    kernels.append(_column_sum(unit, arch, blocks, Cout, 4))
    kernels.append([_vec_to_float(unit, arch, "sepconv_backward.cu")])
    kernels.append([_vec_to_float(unit, arch, "sepconv_backward.cu")])
    # The instance for the layer's post-ReLU (a template flag); grad_y, z and the per-channel vectors as
    # 16-byte loads (the BatchNorm bias only for the post-ReLU's test).
    loads = 2 + 2 * (6 if s.post_relu else 5)
    kernels.append([_elementwise(unit, arch, "sepconv_backward.cu", "train_grad_z_kernel", v,
                                 lambda t: [LoopPlan("grid-stride vectors", t, expect={"STG": 1, "LDG": loads})],
                                 3 * unit.y_bytes(), flag=bool(s.post_relu))])
    # d stored once for cuBLAS, then the two pointwise products on cuBLAS (xception_fast_ops.cpp,
    # pointwise_grads): library calls, modelled at their roofline (`model.library_gemm`), as the Triton
    # plan models its torch.matmul.
    from xception_fast.bench.static.model import library_gemm

    kernels.append([_pack_launch(unit, arch, ds, scale=False)])
    kernels.append([_d_store_launch(unit, arch, ds)])
    gpu = machine(arch)
    kernels.append([library_gemm("cublas_grad_d", gpu, P, C, Cout, unit.dtype,
                                 unit.y_bytes() + e * C * Cout + unit.d_bytes())])
    kernels.append([library_gemm("cublas_grad_pw", gpu, Cout, C, P, unit.dtype,
                                 unit.y_bytes() + unit.d_bytes() + e * C * Cout)])
    # grad_x and grad_dw from one staging of grad_d; the splits fill the resident CTA slots (the launcher
    # asks cudaOccupancyMaxActiveBlocksPerMultiprocessor: __launch_bounds__(256, 2) caps the registers at 128).
    from xception_fast.bench.static.model import ctas_per_sm

    slots = sms * max(1, ctas_per_sm(gpu, 128, cuda_tiling.THREADS, dx.dx_smem_bytes()))
    dx_splits = cuda_tiling.gp_choose_splits(dx.kp // cuda_tiling.BK, dx.tiles, slots)
    kernels.append([_pack_launch(unit, arch, dx, scale=False)])
    kernels.append([_dx_launch(unit, arch, dx, dx_splits)])
    kernels.append(_column_sum(unit, arch, dx_splits, C * 9, e))
    return kernels


MODES = {"infer": infer, "train": train}
