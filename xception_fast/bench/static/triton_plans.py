"""Launch plans of the Triton provider: which kernels run for a unit, their grids, loops and bytes.

This is the only module that knows the Triton kernels' structure. For each mode it lists, in launch
order, the kernels the host code (`triton_kernels/*.py`) launches for one unit; for an autotuned
kernel, one `Launch` per autotune config (the model keeps the one it estimates fastest, standing in
for the autotuner). Each `Launch` declares:
- `grid`: the CTAs the host launches (as the host's grid lambda computes it);
- `loops`: every run-time loop of the kernel, in the order the SASS shows them (outer before inner;
  `tl.static_range` loops are unrolled and are not loops), each with its trip count per entry;
  the loop holding the `tl.dot` is `pipelined` (num_stages > 1 may peel iterations);
- `dram_bytes`: what the kernel must move to or from DRAM (each tensor it reads or writes once;
  re-reads are assumed to hit L2);
- `useful_ffma`: the thread-FMAs of the depthwise per CTA, where the kernel computes one (for the
  duplication flag).
If a kernel is rewritten so that its SASS loops differ from its plan, `model.estimate` fails with an
error naming the kernel: update the plan here.
"""

from __future__ import annotations

from typing import Callable

import torch

from xception_fast.bench.common import DTYPES
from xception_fast.bench.static.geometry import Unit, cdiv
from xception_fast.bench.static.model import Compiled, Launch, LoopPlan

PROVIDER = "triton"
POSITION_ALIGN = 128  # triton_kernels.autotune.POSITION_ALIGN on a GPU
SUM_BLOCK_S, SUM_BLOCK_M = 32, 128  # triton_kernels.autotune.SUM_BLOCK_S/M on a GPU
MERGE_BLOCK_S, MERGE_BLOCK_C = 32, 32  # triton_kernels.batchnorm.MERGE_BLOCK_S/C on a GPU
Z_STATS_BLOCK_P, Z_STATS_BLOCK_C = 32, 64  # triton_kernels.batchnorm.STATS_BLOCK_P/C on a GPU (4 warps)


def position_split(positions: int, other_programs: int, sms: int) -> tuple[int, int]:
    """`triton_kernels.autotune.position_split` on a GPU with `sms` SMs (4 programs per SM)."""
    want = max(1, 4 * sms // max(other_programs, 1))
    chunk = max(cdiv(cdiv(positions, want), POSITION_ALIGN) * POSITION_ALIGN, POSITION_ALIGN)
    return cdiv(positions, chunk), chunk


def persistent_split(positions: int, sms: int, per_sm: int) -> tuple[int, int]:
    """`triton_kernels.autotune.persistent_split` on a GPU: (programs, chunk) of the forward's GEMM kernels."""
    chunk = max(cdiv(cdiv(positions, sms * per_sm), POSITION_ALIGN) * POSITION_ALIGN, POSITION_ALIGN)
    return cdiv(positions, chunk), chunk


def _slot_width(unit: Unit) -> int:
    return cdiv(unit.C, 64) * 64  # depthwise_pointwise.slot_width: d's row pitch K_SLOT


def _d_bytes(unit: Unit) -> int:
    """d [P_pad, K_SLOT] of the forward (`depthwise_pointwise.depthwise`), padding included."""
    return cdiv(unit.P, POSITION_ALIGN) * POSITION_ALIGN * _slot_width(unit) * unit.e


def _depthwise(unit: Unit, arch: int, training: bool) -> list[Launch]:
    """`depthwise_pointwise._depthwise_kernel`: one CTA per (tile of BLOCK_G groups of RW outputs, CHUNKS
    channel chunks) of d, the tiles running on through d's padding rows; a run-time loop over the
    chunks (when more than one) around one over the kernel rows (the columns and taps are unrolled);
    reads x once, writes d once."""
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    k_slot = _slot_width(unit)
    s = unit.conv_ints()
    flags = dict(KH=unit.K, KW=unit.K, STRIDE_W=s["stride_w"], DIL_W=s["dil_w"], PRE_RELU=unit.shape.pre_relu,
                 C_ALIGN=_channel_align(unit.C), WIDE=False, P_ALIGN=POSITION_ALIGN, **_mid_flags(unit, training))
    ints = _sizes(unit, K_SLOT=k_slot)

    def plan(m):
        p_pad = cdiv(unit.P, POSITION_ALIGN) * POSITION_ALIGN  # the grid covers d's padding rows too
        groups = cdiv(cdiv(p_pad, unit.Wo) * cdiv(unit.Wo, m["RW"]), m["BLOCK_G"])
        chunks = k_slot // m["BLOCK_D"]
        programs = cdiv(chunks, m["CHUNKS"])
        # one chunk per program compiles to straight-line code (the loop runs at most once)
        loops = [LoopPlan("channel chunks of the program", chunks / programs)] if m["CHUNKS"] > 1 else []
        loops.append(LoopPlan("kernel rows", unit.K))
        return (groups * programs, loops, unit.x_bytes() + _d_bytes(unit),
                _dw_ffma(unit, m["BLOCK_G"] * m["RW"], m["BLOCK_D"], chunks / programs))

    return _launches(dp._depthwise_kernel, unit, arch, flags, ints, plan)


def _channel_align(channels: int) -> int:
    from xception_fast.triton_kernels.utils import channel_align
    return channel_align(channels)


def _compiler(kernel, config, arch: int, dtype: str, constexprs: dict, ints: dict) -> Callable[[], Compiled]:
    from xception_fast.bench.static.triton_compile import compiler
    return compiler(kernel, config, arch, dtype, constexprs, ints)


def _label(config) -> str:
    blocks = "x".join(str(v) for v in config.kwargs.values())
    cap = f" r{config.maxnreg}" if getattr(config, "maxnreg", None) else ""  # two configs may differ only there
    return f"{blocks} w{config.num_warps} s{config.num_stages}{cap}"


def _launches(kernel, unit: Unit, arch: int, constexprs: dict, ints: dict, plan, plain=None) -> list[Launch]:
    """One Launch per autotune config (or one for a plain kernel, launched with `plain`'s warps and
    register cap where given); `plan(meta)` -> (grid, loops, bytes, ffma)."""
    tuned = getattr(kernel, "configs", None)
    configs = tuned or [plain]
    if getattr(kernel, "early_config_prune", None) is not None:  # as the autotuner prunes on the device
        from xception_fast.triton_kernels.autotune import prune_gemm
        configs = prune_gemm(configs, 4 if unit.dtype == "fp32" else 2, arch, constexprs.get("AFFINE", True))
    out = []
    for config in configs:
        meta = dict(config.kwargs) if tuned else dict(constexprs)
        grid, loops, nbytes, ffma = plan(meta)
        name = (kernel.fn if tuned else kernel).__name__
        label = _label(config) if tuned else "fixed" + (_label(config) if config is not None else "")
        out.append(Launch(kernel=name, config=label, compile=_compiler(kernel, config, arch, unit.dtype, constexprs, ints),
                          grid=grid, loops=loops, dram_bytes=nbytes, useful_ffma=ffma))
    return out


def _flags(unit: Unit, **extra) -> dict:
    s = unit.shape
    return dict(KH=unit.K, KW=unit.K, PRE_RELU=s.pre_relu, POST_RELU=s.post_relu, HAS_RESIDUAL=s.residual,
                C_ALIGN=_channel_align(unit.C), COUT_ALIGN=_channel_align(unit.Cout), **extra)


def _gemm_ints(unit: Unit, chunk: int, **extra) -> dict:
    return _sizes(unit, chunk=chunk, K_SLOT=_slot_width(unit), **extra)


def _sizes(unit: Unit, **extra) -> dict:
    return dict(P=unit.P, H=unit.H, W=unit.W, C=unit.C, Ho=unit.Ho, Wo=unit.Wo, Cout=unit.Cout,
                **unit.conv_ints(), **extra)


def _dw_ffma(unit: Unit, block_p: int, block_ci: int, steps: float) -> float:
    return block_p * block_ci * unit.K * unit.K * steps


def _gemm(unit: Unit, arch: int, sms: int, affine: bool) -> list[Launch]:
    """`_sepconv_infer_kernel`: with the affine epilogue (`sepconv_bn_infer`), or storing z alone
    (`depthwise_pointwise.train_gemm`: no post-ReLU, no residual)."""
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    flags = _flags(unit, AFFINE=affine)
    if not affine:
        flags.update(POST_RELU=False, HAS_RESIDUAL=False)

    def plan(m):
        tiles = cdiv(unit.P, m["BLOCK_P"]) * cdiv(unit.Cout, m["BLOCK_N"])
        programs = min(m["PER_SM"] * sms, tiles)  # as `depthwise_pointwise.Pointwise.tile_grid` splits
        loops = [LoopPlan("output tiles of the program (equal runs)", tiles / programs),
                 LoopPlan("K steps over d (tl.dot)", cdiv(unit.C, m["BLOCK_K"]), pipelined=True)]
        if arch >= 90:
            loops.append(LoopPlan("TMA barrier wait retries (out of line)", 0))
        nbytes = _d_bytes(unit) + unit.weight_bytes() + unit.y_bytes() * (2 if flags["HAS_RESIDUAL"] else 1)
        return programs, loops, nbytes, 0.0

    return _launches(dp._sepconv_infer_kernel, unit, arch, flags, _sizes(unit, K_SLOT=_slot_width(unit)), plan)


def infer(unit: Unit, arch: int, sms: int) -> list[list[Launch]]:
    """The depthwise kernel, then the GEMM kernel with the affine epilogue (`sepconv_bn_infer`)."""
    return [_depthwise(unit, arch, training=False), _gemm(unit, arch, sms, affine=True)]


def _mid(unit: Unit):
    from xception_fast.spec import UnitSpec
    return UnitSpec((unit.K, unit.K), mid=unit.shape.mid or None)


def _mid_flags(unit: Unit, training: bool) -> dict:
    """The depthwise kernel's mid-variant constexprs (`triton_kernels/mid_act.py`)."""
    spec = _mid(unit)
    bn = (2 if training else 1) if spec.mid_norm else 0
    return dict(MID_BN=bn, MID_ACT=spec.mid_act or "")


def _sum_rows(unit: Unit, arch: int, rows: int, cols: int, out_bytes: int) -> list[Launch]:
    from xception_fast.triton_kernels import batchnorm as bn

    fixed = dict(BLOCK_S=SUM_BLOCK_S, BLOCK_M=SUM_BLOCK_M)

    # One partial row is a JIT constant (an int argument equal to 1): the loop over rows compiles away.
    loops = [LoopPlan("partial rows", cdiv(rows, SUM_BLOCK_S))] if rows != 1 else []

    def plan(m):
        return cdiv(cols, SUM_BLOCK_M), loops, 4 * rows * cols + out_bytes * cols, 0.0

    return _launches(bn._sum_rows_kernel, unit, arch, fixed, dict(S=rows, M=cols), plan)


def train(unit: Unit, arch: int, sms: int) -> list[list[Launch]]:
    """Training forward (main loop + statistics, merge, normalise) and backward (dy sums, g_z,
    grad_d in cuBLAS, grad_dw (+ d), grad_pw in cuBLAS, grad_x), as `ops.py` runs them through the Triton
    provider."""
    from xception_fast.triton_kernels import batchnorm as bn
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    e, C, Cout, P = unit.e, unit.C, unit.Cout, unit.P
    kk = unit.K * unit.K
    kernels: list[list[Launch]] = []

    # Forward: the depthwise kernel, the GEMM kernel storing z, its statistics in a pass of their own
    # (`batchnorm.statistics`: partial rows per position split, then their merge).
    if _mid(unit).mid_norm:
        kernels += _mid_statistics(unit, arch, sms)
    kernels.append(_depthwise(unit, arch, training=True))
    kernels.append(_gemm(unit, arch, sms, affine=False))
    splits, chunk = position_split(P, cdiv(Cout, Z_STATS_BLOCK_C), sms)
    kernels.append(_launches(
        bn._stats_partial_kernel, unit, arch,
        dict(C_ALIGN=_channel_align(Cout), BLOCK_P=Z_STATS_BLOCK_P, BLOCK_C=Z_STATS_BLOCK_C),  # 4 warps: the default
        dict(P=P, C=Cout, chunk=chunk),
        lambda m: (splits * cdiv(Cout, Z_STATS_BLOCK_C),
                   [LoopPlan("position tiles of the split", unit.split_trips(splits, chunk, Z_STATS_BLOCK_P) - 1)],
                   unit.y_bytes() + 12 * splits * Cout, 0.0)))
    kernels.append(_merge_statistics(unit, arch, splits, Cout, chunk))
    kernels.append(_launches(
        bn._bn_apply_kernel, unit, arch, dict(POST_RELU=unit.shape.post_relu, HAS_RESIDUAL=unit.shape.residual,
                                              C_ALIGN=_channel_align(Cout)), dict(P=P, C=Cout),
        lambda m: (cdiv(P, m["BLOCK_P"]) * cdiv(Cout, m["BLOCK_C"]), [],
                   unit.y_bytes() * (3 if unit.shape.residual else 2), 0.0)))

    # Backward: sum_dy and sum_dy_xhat per channel.
    splits, chunk = position_split(P, cdiv(Cout, 64), sms)
    kernels.append(_launches(
        bn._bn_backward_reduce_kernel, unit, arch, dict(POST_RELU=unit.shape.post_relu, C_ALIGN=_channel_align(Cout)),
        dict(P=P, C=Cout, chunk=chunk),
        lambda m: (splits * cdiv(Cout, m["BLOCK_C"]), [LoopPlan("position tiles of the split",
                                                                  unit.split_trips(splits, chunk, m["BLOCK_P"]))],
                   2 * unit.y_bytes() + 8 * splits * Cout, 0.0)))
    kernels.append(_sum_rows(unit, arch, splits, 2 * Cout, 4))

    # g_z stored once, in the input dtype.
    kernels.append(_launches(
        bn._bn_grad_z_kernel, unit, arch, dict(POST_RELU=unit.shape.post_relu, C_ALIGN=_channel_align(Cout)),
        dict(P=P, C=Cout), lambda m: (cdiv(P, m["BLOCK_P"]) * cdiv(Cout, m["BLOCK_C"]), [], 3 * unit.y_bytes(), 0.0)))

    if unit.shape.mid:
        return kernels + _mid_backward(unit, arch, sms)

    from xception_fast.bench.static.machine import machine
    from xception_fast.bench.static.model import library_gemm

    # The two pointwise products in cuBLAS (`backward.exact_matmul`), at their roofline. fp32 runs IEEE
    # products there (no TF32); the library model has no FFMA GEMM rate, so its fp32 figure is TF32's:
    # optimistic (the static records are bf16).
    gpu, operand = machine(arch), "tf32" if unit.dtype == "fp32" else unit.dtype
    kernels.append([library_gemm("cublas_grad_d", gpu, P, C, Cout, operand,
                                 unit.y_bytes() + e * C * Cout + unit.d_bytes())])

    # "Same" 3 x 3 geometries: grad_dw, d (for grad_pw) and grad_x in one pass over x and grad_d.
    # Others: grad_dw reading x and grad_d once and storing d, then grad_x, the transposed depthwise as a
    # gather, after grad_pw (`backward._backward_convs`).
    one_pass = _one_pass(unit)
    splits, dw_grad = (_dw_backward if one_pass else _dw_weight_grad)(unit, arch, sms, store_d=True)
    kernels.append(dw_grad)
    kernels.append(_sum_rows(unit, arch, splits, C * kk, e))
    kernels.append([library_gemm("cublas_grad_pw", gpu, Cout, C, P, operand,
                                 unit.y_bytes() + unit.d_bytes() + e * Cout * C)])
    if not one_pass:
        kernels.append(_dw_input_grad(unit, arch, _taps_pitch(C)))
    return kernels


# backward.DW_BLOCKS (BLOCK_P, BLOCK_C, RW by STORE_D), DW_WARPS, DW_CTAS_PER_SM and backward.TAPS_ALIGN
# on a GPU
DW_BLOCKS = {True: (8, 32, 4), False: (8, 32, 4)}
DW_WARPS, DW_CTAS_PER_SM = 4, 5
ONE_PASS_BLOCK_P, ONE_PASS_BLOCK_C = 8, 32  # backward.ONE_PASS_* on a GPU (the cap: `backward.one_pass_cap`)
TAPS_ALIGN = 64


def _taps_pitch(channels: int) -> int:
    """`backward.taps_pitch`: the taps' row pitch both depthwise-gradient kernels read."""
    return cdiv(channels, TAPS_ALIGN) * TAPS_ALIGN


def _dw_weight_grad(unit: Unit, arch: int, sms: int, store_d: bool) -> tuple[int, list[Launch]]:
    """(splits, launches) of `backward._dw_weight_grad_kernel`, shared by both backwards: x and grad_d
    read once, d stored (and its depthwise FMAs counted) where `store_d`, fp32 partial rows out."""
    from xception_fast.triton_kernels import backward as bw

    P, C, kk = unit.P, unit.C, unit.K * unit.K
    block_p, block_c, rw = DW_BLOCKS[store_d]
    rw = rw if unit.K == 3 else 1  # 3 x 3: groups of rw outputs along a row (`backward.dw_weight_grad`)
    rows = unit.batch * unit.Ho * cdiv(unit.Wo, rw) if rw > 1 else P
    # `backward.weight_grad_split`: one wave of DW_CTAS_PER_SM programs per SM
    splits, chunk = persistent_split(rows, max(1, sms * DW_CTAS_PER_SM // cdiv(C, block_c)), 1)
    s = unit.conv_ints()
    fixed = dict(KH=unit.K, KW=unit.K, KK_PAD=1 << (kk - 1).bit_length(), PRE_RELU=unit.shape.pre_relu,
                 C=C, STORE_D=store_d, BLOCK_P=block_p, BLOCK_C=block_c, RW=rw,
                 STRIDE_W=s["stride_w"], DIL_W=s["dil_w"])
    trips = sum(cdiv(min(chunk, rows - k * chunk), block_p) for k in range(splits)) / splits  # over groups
    ints = _sizes(unit, chunk=chunk, K_SLOT=_taps_pitch(C) if store_d else C)
    ints["P"] = rows
    # A plain kernel launched with its warps: compiled as a config of them.
    import triton
    config = triton.Config({}, num_warps=DW_WARPS, num_stages=1)
    return splits, [Launch(kernel=bw._dw_weight_grad_kernel.__name__, config=f"fixed{_label(config)}",
                           compile=_compiler(bw._dw_weight_grad_kernel, config, arch, unit.dtype, fixed, ints),
                           grid=splits * cdiv(C, block_c), loops=[LoopPlan("position tiles of the split", trips)],
                           dram_bytes=unit.d_bytes() * (2 if store_d else 1) + unit.x_bytes() + 4 * splits * C * kk,
                           useful_ffma=_dw_ffma(unit, block_p * rw, block_c, trips) if store_d else 0.0)]


def _one_pass(unit: Unit) -> int:
    """`backward.one_pass_width`: the group width of `_dw_backward_kernel`, 0 where the two kernels run."""
    from xception_fast.triton_kernels import backward as bw

    s = unit.conv_ints()
    fits = bw.one_pass_fits((unit.K, unit.K), (s["stride_h"], s["stride_w"]), (unit.Ho, unit.Wo), (unit.H, unit.W))
    return bw.one_pass_row_width(unit.W) if fits else 0


def _dw_backward(unit: Unit, arch: int, sms: int, store_d: bool) -> tuple[int, list[Launch]]:
    """(splits, launches) of `backward._dw_backward_kernel` (where `_one_pass`): `_dw_weight_grad_kernel`'s
    split and loop over groups of RW positions, x and grad_d read once (their halo rows from L2), grad_x
    written, d too where `store_d`, fp32 partial rows out."""
    from xception_fast.triton_kernels import backward as bw

    C, rw = unit.C, _one_pass(unit)
    block_p, block_c = ONE_PASS_BLOCK_P, ONE_PASS_BLOCK_C
    rows = unit.batch * unit.H * cdiv(unit.W, rw)
    regs, ctas = bw.one_pass_cap(DTYPES[unit.dtype], rw) if arch >= 90 else (None, DW_CTAS_PER_SM)
    splits, chunk = persistent_split(rows, max(1, sms * ctas // cdiv(C, block_c)), 1)
    fixed = dict(PRE_RELU=unit.shape.pre_relu, C=C, STORE_D=store_d, BLOCK_P=block_p, BLOCK_C=block_c,
                 RW=rw, DIL_W=unit.conv_ints()["dil_w"])
    trips = sum(cdiv(min(chunk, rows - k * chunk), block_p) for k in range(splits)) / splits  # over groups
    ints = dict(P=rows, chunk=chunk, H=unit.H, W=unit.W, K_SLOT=_taps_pitch(C), dil_h=unit.conv_ints()["dil_h"])
    import triton
    config = triton.Config({}, num_warps=DW_WARPS, num_stages=1, maxnreg=regs)
    return splits, [Launch(kernel=bw._dw_backward_kernel.__name__, config=f"fixed{_label(config)}",
                           compile=_compiler(bw._dw_backward_kernel, config, arch, unit.dtype, fixed, ints),
                           grid=splits * cdiv(C, block_c), loops=[LoopPlan("position tiles of the split", trips)],
                           dram_bytes=unit.d_bytes() * (2 if store_d else 1) + 2 * unit.x_bytes() + 4 * splits * C * 9,
                           useful_ffma=_dw_ffma(unit, block_p * rw, block_c, trips) if store_d else 0.0)]


def _dw_input_grad(unit: Unit, arch: int, taps_pitch: int) -> list[Launch]:
    """grad of the input: the transposed depthwise as a gather (`backward._dw_input_grad_kernel`), the
    taps' rows `taps_pitch` apart."""
    from xception_fast.triton_kernels import backward as bw

    C = unit.C

    s = unit.conv_ints()
    unit_stride = s["stride_h"] == 1 and s["stride_w"] == 1

    def dwi(m):  # unit strides: rows of RW inputs along a row of x (`backward.dw_input_grad`)
        rows = unit.batch * unit.H * cdiv(unit.W, m["RW"]) if unit_stride else unit.Q
        loops = [LoopPlan("kernel rows", unit.K)] if unit_stride else []  # unit strides: rows not unrolled
        return (cdiv(rows, m["BLOCK_P"]) * cdiv(C, m["BLOCK_C"]), loops, unit.d_bytes() + 2 * unit.x_bytes(), 0.0)

    return _launches(bw._dw_input_grad_kernel, unit, arch,
                     dict(KH=unit.K, KW=unit.K, STRIDE_H=s["stride_h"], STRIDE_W=s["stride_w"], DIL_W=s["dil_w"],
                          PRE_RELU=unit.shape.pre_relu, C=C),
                     dict(Q=unit.Q, H=unit.H, W=unit.W, C=C, Ho=unit.Ho, Wo=unit.Wo, K_SLOT=taps_pitch,
                          **unit.conv_ints()), dwi)


def _merge_statistics(unit: Unit, arch: int, splits: int, channels: int, chunk: int) -> list[Launch]:
    from xception_fast.triton_kernels import batchnorm as bn

    fixed = dict(BLOCK_S=MERGE_BLOCK_S, BLOCK_C=MERGE_BLOCK_C)
    return _launches(bn._merge_stats_kernel, unit, arch, fixed, dict(S=splits, C=channels, P=unit.P, chunk=chunk),
                     lambda m: (cdiv(channels, MERGE_BLOCK_C),
                                [LoopPlan("splits", cdiv(splits, MERGE_BLOCK_S))] if splits != 1 else [],
                                12 * splits * channels + 8 * channels, 0.0))


# --- the mid variant (`triton_kernels/mid_unit.py`) -------------------------------------------------------
# mid_unit.STATS_BLOCK_P / STATS_BLOCK_C on a GPU
STATS_BLOCK_P, MID_BLOCK = 64, 32


def _mid_width(unit: Unit) -> int:
    return cdiv(unit.C, 256) * 256  # mid_unit._pad


def _mid_statistics(unit: Unit, arch: int, sms: int) -> list[list[Launch]]:
    """The statistics pass over x (depthwise recomputed, nothing stored) and its merge: the reference
    tile's run-time loop over the kernel rows, then the loop over the split's position tiles around
    one over the kernel rows (the columns unrolled)."""
    from xception_fast.triton_kernels import mid_unit as mu

    C = unit.C
    splits, chunk = position_split(unit.P, cdiv(C, MID_BLOCK), sms)
    trips = unit.split_trips(splits, chunk, STATS_BLOCK_P)
    fixed = dict(KH=unit.K, KW=unit.K, PRE_RELU=unit.shape.pre_relu, ASM=True, C_ALIGN=_channel_align(C),
                 BLOCK_P=STATS_BLOCK_P, BLOCK_C=MID_BLOCK)
    import triton
    cap = triton.Config({}, num_warps=4, num_stages=3, maxnreg=mu.STATS_MAXNREG) if arch >= 90 else None  # the launch's defaults
    stats = _launches(mu._depthwise_stats_kernel, unit, arch, fixed,
                      _sizes(unit, chunk=chunk, K_PAD=_mid_width(unit), S=splits),
                      lambda m: (splits * cdiv(C, MID_BLOCK), [LoopPlan("kernel rows of the reference tile", unit.K),
                                                               LoopPlan("position tiles of the split", trips),
                                                               LoopPlan("kernel rows", unit.K)],
                                 unit.x_bytes() + 12 * splits * C,
                                 _dw_ffma(unit, STATS_BLOCK_P, MID_BLOCK, trips + 1)), cap)  # + the reference tile
    return [stats, _merge_statistics(unit, arch, splits, C, chunk)]


def _mid_backward(unit: Unit, arch: int, sms: int) -> list[list]:
    """After g_z: the depthwise side recomputed (t and a stored), the two pointwise products in cuBLAS
    (`model.library_gemm`), the activation's derivative, the mid BatchNorm's backward, grad_dw, grad_x. The
    recompute runs a loop over the kernel rows (the columns unrolled)."""
    from xception_fast.bench.static.machine import machine
    from xception_fast.bench.static.model import library_gemm
    from xception_fast.triton_kernels import backward as bw
    from xception_fast.triton_kernels import batchnorm as bn
    from xception_fast.triton_kernels import mid_unit as mu

    C, Cout, P, e, kk = unit.C, unit.Cout, unit.P, unit.e, unit.K * unit.K
    d, y, w = unit.d_bytes(), unit.y_bytes(), e * C * Cout
    flags = _flags(unit, **_mid_flags(unit, training=True))
    width = _mid_width(unit)

    def tiles(m):
        return cdiv(P, m["BLOCK_P"]) * cdiv(C, m["BLOCK_C"])

    kernels = [_launches(mu._mid_recompute_kernel, unit, arch, flags, _sizes(unit, K_PAD=width),
                         lambda m: (tiles(m), [LoopPlan("kernel rows", unit.K)], unit.x_bytes() + 2 * d,
                                    _dw_ffma(unit, m["BLOCK_P"], m["BLOCK_C"], 1)))]
    gpu, operand = machine(arch), "tf32" if unit.dtype == "fp32" else unit.dtype
    kernels.append([library_gemm("cublas_grad_pw", gpu, Cout, C, P, operand, y + d + 4 * Cout * C)])
    kernels.append([library_gemm("cublas_grad_a", gpu, P, C, Cout, operand, y + w + d)])
    if _mid(unit).mid_act:  # without an activation grad_u is grad_a: no launch
        kernels.append(_launches(mu._mid_act_grad_kernel, unit, arch, flags, dict(P=P, C=C, K_PAD=width),
                                 lambda m: (tiles(m), [], 3 * d, 0.0)))
    if _mid(unit).mid_norm:
        splits, chunk = position_split(P, cdiv(C, 64), sms)
        plain = dict(POST_RELU=False, C_ALIGN=_channel_align(C))
        kernels.append(_launches(
            bn._bn_backward_reduce_kernel, unit, arch, plain, dict(P=P, C=C, chunk=chunk),
            lambda m: (splits * cdiv(C, m["BLOCK_C"]), [LoopPlan("position tiles of the split",
                                                               unit.split_trips(splits, chunk, m["BLOCK_P"]))],
                       2 * d + 8 * splits * C, 0.0)))
        kernels.append(_sum_rows(unit, arch, splits, 2 * C, 4))
        kernels.append(_launches(bn._bn_grad_z_kernel, unit, arch, plain, dict(P=P, C=C),
                                 lambda m: (tiles(m), [], 3 * d, 0.0)))
    # `backward.dw_backward`: one pass where `_one_pass`, else the two kernels
    one_pass = _one_pass(unit)
    splits, dw_grad = (_dw_backward if one_pass else _dw_weight_grad)(unit, arch, sms, store_d=False)
    kernels.append(dw_grad)
    kernels.append(_sum_rows(unit, arch, splits, C * kk, e))
    if not one_pass:
        kernels.append(_dw_input_grad(unit, arch, _taps_pitch(C)))
    return kernels


MODES = {"infer": infer, "train": train}
