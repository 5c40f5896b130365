"""Fused depthwise k x k + pointwise 1x1 convolution: the forward in two launches, two GEMM kernels.

Layout: every activation is channels_last, addressed as a row-major [positions, channels] matrix
(position p = (n * Ho + oh) * Wo + ow); weights as contiguous matrices.

Design: two kernels per forward, each at the occupancy its own work wants.
1. `_depthwise_kernel`: d = dw(pre(x)) (the mid variant: act(midBN(dw(pre(x)))), `mid_act`) in fp32
   FMAs, rounded to the input dtype (where the unfused path stores it), into a buffer d [P_pad,
   K_SLOT] (P rounded up to POSITION_ALIGN, C up to SLOT_ALIGN) with zeros in the padding. A 2-D grid
   of small programs (a tile of groups of RW adjacent outputs of a row x a chunk of channels), several
   CTAs per SM: it reads x once and writes d once, and is meant to run at the DRAM bandwidth.
2. a GEMM kernel per epilogue, about two programs per SM, each owning a set of output tiles: in the
   grad_z kernel program s owns the positions [s * chunk, (s + 1) * chunk) and every Cout tile
   (`autotune.persistent_split`: its sums' rows over whole position chunks), and the inference
   kernel, which reduces nothing, deals the output tiles out in equal runs (`Pointwise.tile_grid`).
   For each tile a K loop over the tile's rows of d, software-pipelined (the config's num_stages),
   d and the weight through TMA tensor descriptors where TMA applies (A_TMA, W_TMA: Hopper, rows
   16-byte aligned), then the epilogue on the accumulator's four column quarters. d is read
   unmasked (its padding is zero).
Why not one kernel: the previous design ran both phases in one persistent program per SM,
the depthwise into a per-program scratch slot in L2, a barrier, then the GEMM over the slot. On an
H200 (bf16, batch 256) it measured 535 us for a middle-flow unit's inference (0.75 TB/s, 183
TFLOP/s: latency-bound at 2 warps per scheduler, the depthwise's loads and FMAs and the MMA in
sequence), 2,164 us on the entry unit against a DRAM floor of about 500 us. The split pays one
write and one read of d (65 us of DRAM on the middle unit, 332 us on the entry unit, at the
measured 4.27 TB/s) for kernels that each fill the SMs (benchmarks/NOTES.md, "Triton forward in
two launches").

GEMM kernels (`_pointwise_tile` each):
- `_sepconv_infer_kernel`: y = post(z * scale + shift) + residual, stored once; in the training
  forward (AFFINE off) z alone, whose statistics `batchnorm.statistics` computes in a pass of its
  own over the stored z, then `batchnorm.normalize` normalises. The statistics in this kernel's
  epilogue (one cross-warp reduction per tile and column) cost more than reading z back
  (benchmarks/NOTES.md, "Triton training statistics in their own pass").
- `_sepconv_grad_z_kernel`: inference backward, which saves nothing but x: recomputes d and z,
  applies the post-ReLU mask to grad_y, stores grad_z = g * scale and per-program sums of g and g * z.
  The sums are read back by the program's next tile from addresses other threads stored: a barrier
  (`tl.debug_barrier`, bar.sync) ends each tile.

Triton versions: everything here exists in Triton 3.6 (the GPU machines') and 3.8: host-side
`TensorDescriptor` (3.4+), `tl.range(num_stages=)`, `tl.inline_asm_elementwise`.

Design limit: positions are int32 (N*H*W and N*Ho*Wo at most 2^30, checked on the host); element
offsets of the activations and of d are int64, or in `_depthwise_kernel` int32 from a 64-bit base per
program where the host finds a tile's span below 2^31 elements (`_wide_offsets`)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from xception_fast.spec import UnitSpec

from . import batchnorm
from .autotune import (DEPTHWISE_MAX_GROUPS, MAX_BLOCK_N, POSITION_ALIGN, SLOT_ALIGN, depthwise_configs, gemm_configs,
                       persistent_split, position_bucket, program_slots, sm_count)
from .mid_act import mid_transform
from .utils import (INLINE_ASM, channel_align, check_dtype, check_positions, empty_nhwc, matrix, new_empty, nhwc,
                    vector_f32, weight_operand)

SLOT_COLS = tl.constexpr(SLOT_ALIGN)  # K_SLOT (d's row pitch) is a multiple of it
KEY = ["C", "Cout", "P_BUCKET", "A_TMA", "W_TMA"]
# `_sepconv_infer_kernel` runs both the inference epilogue and the training z store, whose configs differ
# (`autotune.prune_gemm`): tuned apart.
INFER_KEY = KEY + ["AFFINE", "POST_RELU", "HAS_RESIDUAL"]


# --- device helpers -------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc):
    """acc += a @ b in fp32. fp32 operands use IEEE fp32 products: the default TF32 on a GPU would
    miss the fp32 tolerance (10 mantissa bits); the 16-bit ones run on the tensor cores as they are."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _pre_f32(xv, PRE_RELU: tl.constexpr, ASM: tl.constexpr):
    """pre(x) in fp32: the optional ReLU in the input dtype (exact), NaN passing as in torch.relu.

    ASM (GPU only, 16-bit inputs): PTX on pairs of elements, a packed max.NaN then two moves to fp32,
    1.5 instructions per element; written in triton.language the compiler splits and re-packs the
    pairs (2.6 per element on sm_90). The interpreter runs the plain path; the two must agree bit
    for bit (a GPU check)."""
    # A bf16 is the top half of the fp32 of the same value: one shift or mask per element.
    if ASM and xv.dtype == tl.bfloat16 and PRE_RELU:
        xf = tl.inline_asm_elementwise(
            "{ .reg .b32 t, z; mov.b32 z, 0; max.NaN.bf16x2 t, $2, z; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
            "=r,=r,r", [xv], dtype=tl.float32, is_pure=True, pack=2)
    elif ASM and xv.dtype == tl.bfloat16:
        xf = tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }",
                                       "=r,=r,r", [xv], dtype=tl.float32, is_pure=True, pack=2)
    elif ASM and xv.dtype == tl.float16 and PRE_RELU:
        xf = tl.inline_asm_elementwise(
            "{ .reg .b32 t, z; .reg .b16 lo, hi; mov.b32 z, 0; max.NaN.f16x2 t, $2, z; mov.b32 {lo, hi}, t; "
            "cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
            "=r,=r,r", [xv], dtype=tl.float32, is_pure=True, pack=2)
    else:  # the plain path (the interpreter's; fp32; fp16 without the pre-ReLU)
        if PRE_RELU:
            xv = tl.maximum(xv, 0.0, propagate_nan=tl.PropagateNan.ALL)
        xf = xv.to(tl.float32)
    return xf


@triton.jit
def _tap_rows(x_ptr, p0, p_end, H, W, C, Ho, Wo, stride_h, stride_w, pad_h, pad_w, BLOCK_P: tl.constexpr):
    """For positions p0 + [0, BLOCK_P) below p_end: pointers to channel 0 of each one's top-left tap
    (int64 offsets), that tap's input row and column, and the position mask (`mid_unit._depthwise_tile`)."""
    p = p0 + tl.arange(0, BLOCK_P)
    p_mask = p < p_end
    n = p // (Ho * Wo)
    r = p - n * (Ho * Wo)
    oh = r // Wo
    ow = r - oh * Wo
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    return x_ptr + ((n.to(tl.int64) * H + ih0) * W + iw0) * C, ih0, iw0, p_mask


@triton.jit
def _program(P, chunk, C, Cout, K_SLOT, C_ALIGN: tl.constexpr, COUT_ALIGN: tl.constexpr):
    """The GEMM kernels' common start: (C, Cout, K_SLOT, program id, its first position, its end).
    C, Cout and K_SLOT come back rounded down to their alignment: no-ops (the host checked them) that
    tell the compiler the rows are 16-byte aligned, so that loads vectorise (and d's rows qualify for
    cp.async)."""
    C = C // C_ALIGN * C_ALIGN
    Cout = Cout // COUT_ALIGN * COUT_ALIGN
    K_SLOT = K_SLOT // SLOT_COLS * SLOT_COLS
    pid = tl.program_id(0)
    p_begin = pid * chunk
    p_end = tl.minimum(p_begin + chunk, P)
    return C, Cout, K_SLOT, pid, p_begin, p_end


@triton.jit
def _tile(p0, p_end, BLOCK_P: tl.constexpr):
    """The positions of the tile at p0 and their mask, for the epilogues."""
    p = p0 + tl.arange(0, BLOCK_P)
    return p, p < p_end


@triton.jit
def _pointwise_tile(d_op, p0, pw_op, n0, C, K_SLOT, Cout, A_TMA: tl.constexpr, W_TMA: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_P, BLOCK_N] fp32 = d[p0 : p0 + BLOCK_P] @ pw[n0 : n0 + BLOCK_N]^T. d_op is d [P_pad,
    K_SLOT] (zero past C and past P: read unmasked): a TMA descriptor (A_TMA) or a pointer (int64
    row offsets: P_pad x K_SLOT may pass 2^31). pw_op is the [Cout, C] weight: a TMA descriptor
    (W_TMA; out-of-bounds rows and columns read as zero) or a pointer (masked loads)."""
    kk = tl.arange(0, BLOCK_K)
    co = n0 + tl.arange(0, BLOCK_N)
    if not A_TMA:
        a_ptrs = d_op + tl.cast(p0, tl.int64) * K_SLOT + tl.arange(0, BLOCK_P)[:, None] * K_SLOT + kk[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(C, BLOCK_K) * BLOCK_K, BLOCK_K):
        if A_TMA:
            a = d_op.load([p0, k0])
        else:
            a = tl.load(a_ptrs + k0)
        if W_TMA:
            b = pw_op.load([n0, k0]).T
        else:
            b = tl.load(pw_op + co[None, :] * C + (k0 + kk)[:, None],
                        mask=(co < Cout)[None, :] & (k0 + kk < C)[:, None], other=0.0)
        acc = _mma(a, b, acc)
    return acc


@triton.jit
def _halves(acc, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BLOCK_P, BLOCK_N] as its two column halves."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_P, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _quarters(acc, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BLOCK_P, BLOCK_N] as its four column quarters, in order. Epilogues run on one quarter at a
    time: a 128 x 256 accumulator is 128 registers a thread, and each per-column vector (scale, shift,
    statistics) or residual tile over all of it in the MMA layout would add 64 more (spills)."""
    lo, hi = _halves(acc, BLOCK_P, BLOCK_N)
    q0, q1 = _halves(lo, BLOCK_P, BLOCK_N // 2)
    q2, q3 = _halves(hi, BLOCK_P, BLOCK_N // 2)
    return q0, q1, q2, q3


@triton.jit
def _infer_epilogue(z16, y_tile, r_tile, rows, p_mask, col0, cols_left, scale_tile, shift_tile, AFFINE: tl.constexpr,
                    POST_RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = post(z * scale + shift) + residual for the tile's columns col0 + [0, BLOCK_N), rounding where the
    reference does: z16 is z already rounded to the output dtype (where the reference stores it), the
    affine map in fp32 and stored, the residual added to the stored value. y_tile, r_tile, scale_tile
    and shift_tile point at the tile's first element (a 64-bit base per tile); `rows` (each row's int32
    offset within the tile) and col0 + column are int32: a 64-bit add per address, the rest uniform
    per tile, where 64-bit index math per quarter cost about 34 instructions a tile
    (benchmarks/NOTES.md, "Triton GEMM: instructions per tile"). cols_left: Cout - n0 (the column
    mask). scale and shift are zero-padded to a whole number of the widest Cout tile (`padded_f32`):
    read unmasked, without the zeroing a masked load costs (a register pair each)."""
    cols = col0 + tl.arange(0, BLOCK_N)
    z = z16.to(tl.float32)
    if AFFINE:
        scale = tl.load(scale_tile + cols)
        shift = tl.load(shift_tile + cols)
        y = z * scale[None, :] + shift[None, :]
    else:  # the training forward: z itself (its statistics in a pass of their own)
        y = z
    if POST_RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not tl.maximum: NaN must pass and -0 stay -0, as in torch.relu
    offs = rows[:, None] + cols[None, :]
    mask = p_mask[:, None] & (cols < cols_left)[None, :]
    if HAS_RESIDUAL:
        r = tl.load(r_tile + offs, mask=mask, other=0.0).to(tl.float32)
        y = y.to(y_tile.dtype.element_ty).to(tl.float32) + r
    tl.store(y_tile + offs, y.to(y_tile.dtype.element_ty), mask=mask)


@triton.jit
def _grad_z_epilogue(acc, p, p_mask, n0, scale_ptr, shift_ptr, gy_ptr, gz_ptr, sums_ptr, s, Cout, first,
                     POST_RELU: tl.constexpr, BLOCK_N: tl.constexpr):
    """grad_z = mask(grad_y) * scale for columns n0 + [0, BLOCK_N), z recomputed; the sums of g and
    g * z added to program s's row (its own; the barrier ending each tile orders the updates)."""
    co = n0 + tl.arange(0, BLOCK_N)
    co_mask = co < Cout
    scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0)
    shift = tl.load(shift_ptr + co, mask=co_mask, other=0.0)
    z = acc.to(gz_ptr.dtype.element_ty).to(tl.float32)
    offs = p.to(tl.int64)[:, None] * Cout + co[None, :]
    mask = p_mask[:, None] & co_mask[None, :]
    g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if POST_RELU:
        g = tl.where(z * scale[None, :] + shift[None, :] > 0, g, 0.0)
    tl.store(gz_ptr + offs, (g * scale[None, :]).to(gz_ptr.dtype.element_ty), mask=mask)
    out = sums_ptr + s * 2 * Cout + co
    sum_g = tl.sum(g, axis=0) + tl.where(first, 0.0, tl.load(out, mask=co_mask, other=0.0))
    sum_gz = tl.sum(g * z, axis=0) + tl.where(first, 0.0, tl.load(out + Cout, mask=co_mask, other=0.0))
    tl.store(out, sum_g, mask=co_mask)
    tl.store(out + Cout, sum_gz, mask=co_mask)


# --- kernels ---------------------------------------------------------------------------------------------

@triton.jit
def _add_to(a0, a1, a2, a3, r: tl.constexpr, xf, wv):
    """Output r of a group (accumulator a<r>) += xf * wv: the tap's FMA, in the form of the backward's
    `_tap`, so that both compile to the same fp32 operations (d bitwise equal)."""
    if r == 0:
        a0 += xf * wv[None, :]
    elif r == 1:
        a1 += xf * wv[None, :]
    elif r == 2:
        a2 += xf * wv[None, :]
    else:
        a3 += xf * wv[None, :]
    return a0, a1, a2, a3


@triton.jit
def _group_origin(g, groups, Ho, stride_h, pad_h, pad_w, RW: tl.constexpr, STRIDE_W: tl.constexpr):
    """For group indices g (each RW adjacent outputs of one output row; `groups` per row): the output
    row n * Ho + oh, the group's first output column, n, oh, and the top-left tap's input row and column."""
    orow = g // groups
    ow0 = (g - orow * groups) * RW
    n = orow // Ho
    oh = orow - n * Ho
    return orow, ow0, n, oh, oh * stride_h - pad_h, ow0 * STRIDE_W - pad_w


@triton.jit
def _store_output(d_rows, d, r: tl.constexpr, ok, g_ok, ci, mid_ptr, K_SLOT, MID_BN: tl.constexpr,
                  MID_ACT: tl.constexpr):
    """Store output r of each group: d [BLOCK_G, BLOCK_D] fp32 (the mid variant: act(midBN(d)), zero in
    the padding rows, past g_ok) at d_rows (each group's first output row of d) + r rows, where `ok`."""
    if MID_BN != 0 or MID_ACT != "":
        d = tl.where(g_ok[:, None], mid_transform(d, mid_ptr, ci, K_SLOT, d_rows, MID_BN, MID_ACT), 0.0)
    tl.store(d_rows[:, None] + (r * K_SLOT + ci)[None, :], d.to(d_rows.dtype.element_ty), mask=ok[:, None])


@triton.autotune(configs=depthwise_configs(), key=["C", "P_BUCKET", "KH", "KW", "STRIDE_W", "DIL_W"])
@triton.jit
def _depthwise_kernel(
    x_ptr,  # [N, H, W, C] input (channels_last)
    dwt_ptr,  # [KH * KW, K_SLOT] fp32 depthwise taps (tap-major, zero past C)
    d_ptr,  # [P_pad, K_SLOT] out, input dtype: every element written, zeros past P and past C
    P, P_BUCKET, H, W, C, Ho, Wo, K_SLOT,
    stride_h, pad_h, pad_w, dil_h,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_W: tl.constexpr, DIL_W: tl.constexpr, PRE_RELU: tl.constexpr,
    ASM: tl.constexpr, C_ALIGN: tl.constexpr, WIDE: tl.constexpr, P_ALIGN: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, RW: tl.constexpr, CHUNKS: tl.constexpr,
    # the mid variant (`mid_act`): [3, K_SLOT] fp32 vectors, never read when both are off
    mid_ptr=None, MID_BN: tl.constexpr = 0, MID_ACT: tl.constexpr = "",
):
    # Program (tile of BLOCK_G groups, CHUNKS channel chunks): a group is RW horizontally adjacent outputs
    # of one output row (the last group of a row is cut at Wo), so the input columns their windows share
    # are loaded, pre-ReLU'd and converted once and feed every tap that reads them (3x3, stride 1, RW = 3:
    # 5 loads per kernel row for 9 taps instead of 9). Each output still sums its taps from zero in the
    # order (i, j) in fp32 FMAs, rounded to the input dtype (where the unfused path stores it).
    # Offsets are int32 from a per-program 64-bit base (x: the first image of the tile; d: its first
    # output row) unless the host found a tile's span could pass 2^31 elements (WIDE). The mid variant
    # stores act(midBN(d)) instead (`mid_transform`; its vectors are zero past C, so those columns
    # stay 0). The chunks cover K_SLOT exactly (BLOCK_D divides SLOT_ALIGN): the columns past C come out
    # 0 (masked loads, zero taps). Both loops below are run-time loops on purpose: unrolled, the compiler
    # hoists every load of a chunk (128-233 registers, `autotune.depthwise_configs`).
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    K_SLOT = K_SLOT // SLOT_COLS * SLOT_COLS
    tl.static_assert(RW <= 4, "a group holds at most 4 outputs (`_add_to`)")
    groups = (Wo + RW - 1) // RW  # per output row
    g0 = tl.program_id(0) * BLOCK_G
    g = g0 + tl.arange(0, BLOCK_G)
    orow, ow0, n, oh, ih0, iw0 = _group_origin(g, groups, Ho, stride_h, pad_h, pad_w, RW, STRIDE_W)
    g_ok = orow * Wo < P  # orow < N * Ho without a division (P = N * Ho * Wo)
    row0 = g0 // groups  # the tile's first output row, and its image
    n0 = row0 // Ho
    x_base = x_ptr + n0.to(tl.int64) * H * W * C
    pos = ((n - n0) * H + ih0) * W + iw0  # of the top-left tap, from x_base
    rel = (orow - row0) * Wo + ow0  # of the group's first output, in rows of d from d_base
    if WIDE:
        pos = pos.to(tl.int64)
        rel = rel.to(tl.int64)
    x_off = pos * C
    d_rows = d_ptr + (row0 * Wo).to(tl.int64) * K_SLOT + rel * K_SLOT
    # The grid also covers d's padding rows [P, P_pad) (which the GEMM reads unmasked) as rows of groups
    # past the last image: their loads are masked off (g_ok), so they store zeros.
    p_pad = (P + P_ALIGN - 1) // P_ALIGN * P_ALIGN
    in_d = orow * Wo + ow0  # d's row of the group's first output
    ok0 = in_d < p_pad
    ok1 = (in_d + 1 < p_pad) & (ow0 + 1 < Wo)
    ok2 = (in_d + 2 < p_pad) & (ow0 + 2 < Wo)
    ok3 = (in_d + 3 < p_pad) & (ow0 + 3 < Wo)
    # The columns the group's windows read: k = r * STRIDE_W + j * DIL_W for output r, tap j. Loads of a
    # column no output reads (stride and dilation both > 1) have no use and compile away.
    NCOL: tl.constexpr = (RW - 1) * STRIDE_W + (KW - 1) * DIL_W + 1
    # The program's channel chunks in turn (CHUNKS of them, the last program's cut at K_SLOT): all of the
    # above (the divisions of `_group_origin`, the bases, the masks) is computed once for them all.
    c_first = tl.program_id(1) * (CHUNKS * BLOCK_D)
    for c0 in tl.range(c_first, tl.minimum(c_first + CHUNKS * BLOCK_D, K_SLOT), BLOCK_D):
        ci = c0 + tl.arange(0, BLOCK_D)
        c_ok = ci < C
        a0 = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        a1, a2, a3 = a0, a0, a0
        # Masks: an input row's (with the group's and the channels') once per kernel row, a column's once
        # per column; one unsigned compare each tests both bounds (a negative index wraps above H or W).
        for i in tl.range(KH):  # rolled: one kernel row's loads live at a time
            ih = ih0 + i * dil_h
            row_ok = (g_ok & (ih.to(tl.uint32, bitcast=True) < H))[:, None] & c_ok[None, :]
            row_ptrs = x_base + (x_off + i * dil_h * W * C)[:, None] + ci[None, :]
            for k in tl.static_range(NCOL):
                col_ok = (iw0 + k).to(tl.uint32, bitcast=True) < W
                xv = tl.load(row_ptrs + k * C, mask=row_ok & col_ok[:, None], other=0.0)
                xf = _pre_f32(xv, PRE_RELU, ASM)
                for r in tl.static_range(RW):
                    if k >= r * STRIDE_W and (k - r * STRIDE_W) % DIL_W == 0 and (k - r * STRIDE_W) // DIL_W < KW:
                        # fp32 taps, zero-padded to K_SLOT: no mask
                        wv = tl.load(dwt_ptr + (i * KW + (k - r * STRIDE_W) // DIL_W) * K_SLOT + ci)
                        a0, a1, a2, a3 = _add_to(a0, a1, a2, a3, r, xf, wv)
        _store_output(d_rows, a0, 0, ok0, g_ok, ci, mid_ptr, K_SLOT, MID_BN, MID_ACT)
        if RW > 1:
            _store_output(d_rows, a1, 1, ok1, g_ok, ci, mid_ptr, K_SLOT, MID_BN, MID_ACT)
        if RW > 2:
            _store_output(d_rows, a2, 2, ok2, g_ok, ci, mid_ptr, K_SLOT, MID_BN, MID_ACT)
        if RW > 3:
            _store_output(d_rows, a3, 3, ok3, g_ok, ci, mid_ptr, K_SLOT, MID_BN, MID_ACT)


# The GEMM kernels: the same persistent loop, two epilogues. Shared arguments: d_op [P_pad, K_SLOT]
# the depthwise kernel's output in the input dtype and pw_op [Cout, C] the pointwise weight, each a
# pointer or a TMA descriptor (A_TMA, W_TMA). P_BUCKET: the autotuning key only.

@triton.autotune(**gemm_configs(infer=True), key=INFER_KEY)
@triton.jit
def _sepconv_infer_kernel(
    # pointers
    d_op, pw_op,
    scale_ptr,  # [Cout] fp32 (1 where absent)
    shift_ptr,  # [Cout] fp32 (0 where absent)
    res_ptr,  # [N, Ho, Wo, Cout] residual (read only if HAS_RESIDUAL)
    y_ptr,  # [N, Ho, Wo, Cout] output
    # sizes
    P, P_BUCKET, C, Cout, K_SLOT,
    # meta-parameters (AFFINE off: y = z, the training forward's store; scale and shift never read)
    AFFINE: tl.constexpr, POST_RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, C_ALIGN: tl.constexpr,
    COUT_ALIGN: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_SM: tl.constexpr,  # programs per SM of the config: read by the grid (`Pointwise.tile_grid`) only
):
    # No reduction here, so no position chunks: the output tiles (position tile, Cout tile), numbered
    # position-major, are dealt out in equal contiguous runs, one per program (`Pointwise.tile_grid`).
    # A program's run starts and ends anywhere in a row of Cout tiles; consecutive tiles share their d
    # rows (read from L2 after the first). The busiest SM then runs at most one tile more than the
    # average, where whole position chunks left some SMs a third of a chunk's tiles idle (the exit
    # flow's 200 position tiles on 132 SMs: 2 against 1.5 per SM).
    C, Cout, K_SLOT, pid, _, _ = _program(P, 0, C, Cout, K_SLOT, C_ALIGN, COUT_ALIGN)
    n_tiles = tl.cdiv(Cout, BLOCK_N)
    tiles = tl.cdiv(P, BLOCK_P).to(tl.int64) * n_tiles  # int64: pid * tiles may pass 2^31
    t_begin = (pid * tiles // tl.num_programs(0)).to(tl.int32)
    t_end = ((pid + 1) * tiles // tl.num_programs(0)).to(tl.int32)
    pt = t_begin // n_tiles
    p0 = pt * BLOCK_P  # the current tile, stepped along (no division per tile)
    n0 = (t_begin - pt * n_tiles) * BLOCK_N
    rows = tl.arange(0, BLOCK_P) * Cout  # int32 offsets within a tile (BLOCK_P x Cout < 2^31)
    Q: tl.constexpr = BLOCK_N // 4
    for _ in range(t_begin, t_end):
        acc = _pointwise_tile(d_op, p0, pw_op, n0, C, K_SLOT, Cout, A_TMA, W_TMA, BLOCK_P, BLOCK_N, BLOCK_K)
        # z rounded to the output dtype, the whole tile at once (the reference's first rounding): the
        # quarters hold 16-bit values, which lets the 4-warp z-store row fit 168 registers unspilled
        q0, q1, q2, q3 = _quarters(acc.to(y_ptr.dtype.element_ty), BLOCK_P, BLOCK_N)
        base = p0.to(tl.int64) * Cout + n0  # the tile's first element: the one 64-bit offset per tile
        y_tile, r_tile = y_ptr + base, res_ptr + base
        p_mask = tl.arange(0, BLOCK_P) < P - p0
        cols_left = Cout - n0
        _infer_epilogue(q0, y_tile, r_tile, rows, p_mask, 0, cols_left, scale_ptr + n0, shift_ptr + n0, AFFINE,
                        POST_RELU, HAS_RESIDUAL, Q)
        _infer_epilogue(q1, y_tile, r_tile, rows, p_mask, Q, cols_left, scale_ptr + n0, shift_ptr + n0, AFFINE,
                        POST_RELU, HAS_RESIDUAL, Q)
        _infer_epilogue(q2, y_tile, r_tile, rows, p_mask, 2 * Q, cols_left, scale_ptr + n0, shift_ptr + n0, AFFINE,
                        POST_RELU, HAS_RESIDUAL, Q)
        _infer_epilogue(q3, y_tile, r_tile, rows, p_mask, 3 * Q, cols_left, scale_ptr + n0, shift_ptr + n0, AFFINE,
                        POST_RELU, HAS_RESIDUAL, Q)
        n0 += BLOCK_N
        wrap = n0 >= Cout
        p0 = tl.where(wrap, p0 + BLOCK_P, p0)
        n0 = tl.where(wrap, 0, n0)


@triton.autotune(**gemm_configs(), key=KEY)
@triton.jit
def _sepconv_grad_z_kernel(
    # pointers
    d_op, pw_op,
    scale_ptr,  # [Cout] fp32 (1 where absent)
    shift_ptr,  # [Cout] fp32 (0 where absent)
    gy_ptr,  # [N, Ho, Wo, Cout] grad of y (channels_last, any float dtype)
    gz_ptr,  # [N, Ho, Wo, Cout] out: grad of z, input dtype
    sums_ptr,  # [S, 2, Cout] fp32 out: per program, sum of g (grad shift) and of g * z (grad scale)
    # sizes
    P, P_BUCKET, chunk, C, Cout, K_SLOT,
    # meta-parameters
    POST_RELU: tl.constexpr, C_ALIGN: tl.constexpr, COUT_ALIGN: tl.constexpr, A_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    C, Cout, K_SLOT, pid, p_begin, p_end = _program(P, chunk, C, Cout, K_SLOT, C_ALIGN, COUT_ALIGN)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p, p_mask = _tile(p0, p_end, BLOCK_P)
        for n0 in range(0, Cout, BLOCK_N):
            acc = _pointwise_tile(d_op, p0, pw_op, n0, C, K_SLOT, Cout, A_TMA, W_TMA, BLOCK_P, BLOCK_N, BLOCK_K)
            q0, q1, q2, q3 = _quarters(acc, BLOCK_P, BLOCK_N)
            Q: tl.constexpr = BLOCK_N // 4
            first = p0 == p_begin
            _grad_z_epilogue(q0, p, p_mask, n0, scale_ptr, shift_ptr, gy_ptr, gz_ptr, sums_ptr, pid, Cout, first,
                             POST_RELU, Q)
            _grad_z_epilogue(q1, p, p_mask, n0 + Q, scale_ptr, shift_ptr, gy_ptr, gz_ptr, sums_ptr, pid, Cout, first,
                             POST_RELU, Q)
            _grad_z_epilogue(q2, p, p_mask, n0 + 2 * Q, scale_ptr, shift_ptr, gy_ptr, gz_ptr, sums_ptr, pid, Cout,
                             first, POST_RELU, Q)
            _grad_z_epilogue(q3, p, p_mask, n0 + 3 * Q, scale_ptr, shift_ptr, gy_ptr, gz_ptr, sums_ptr, pid, Cout,
                             first, POST_RELU, Q)
        tl.debug_barrier()  # the next tile reads back this one's sums, stored by other threads


# --- host side ------------------------------------------------------------------------------------------

class Geometry:
    """Sizes of one fused unit, from x [N, C, H, W], dw_weight [C, 1, KH, KW], pw_weight [Cout, C, 1, 1]."""

    def __init__(self, x: Tensor, dw_weight: Tensor, pw_weight: Tensor, spec: UnitSpec):
        self.N, self.C, self.H, self.W = x.shape
        self.KH, self.KW = spec.kernel_size
        self.Cout = pw_weight.shape[0]
        self.stride, self.padding, self.dilation = spec.stride, spec.padding, spec.dilation
        self.Ho, self.Wo = spec.output_hw(self.H, self.W)
        self.P = self.N * self.Ho * self.Wo
        check_positions(self.P, self.N * self.H * self.W)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.Cout, self.Ho, self.Wo)

    def align(self) -> dict[str, int]:
        return dict(C_ALIGN=channel_align(self.C), COUT_ALIGN=channel_align(self.Cout))

    def conv_args(self) -> tuple[int, ...]:
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        return sh, sw, ph, pw, dh, dw


def _prepare(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, spec: UnitSpec):
    check_dtype(x)
    geo = Geometry(x, dw_weight, pw_weight, spec)
    return geo, nhwc(x), matrix(dw_weight, x.dtype), matrix(pw_weight, x.dtype)


def depthwise_taps(dw: Tensor, geo: Geometry, width: int) -> Tensor:
    """The depthwise weight [C, 1, KH, KW] as the kernels read it: [KH * KW, width] fp32, tap-major,
    zero past C (dw is already rounded to the input dtype: fp32 holds it exactly)."""
    taps = torch.zeros((geo.KH * geo.KW, width), dtype=torch.float32, device=dw.device)
    taps[:, :geo.C] = dw.view(geo.C, -1).t()
    return taps


def slot_width(channels: int) -> int:
    """K_SLOT, the row pitch of d: C rounded up to SLOT_ALIGN (every BLOCK_K and BLOCK_D divides it)."""
    return triton.cdiv(channels, SLOT_ALIGN) * SLOT_ALIGN


def _wide_offsets(geo: Geometry, k_slot: int) -> bool:
    """Whether `_depthwise_kernel` needs int64 offsets: a tile's x offsets run from its first image over
    at most the images its groups span (plus the top-left halo below), its d offsets over its rows."""
    images = min(geo.N, DEPTHWISE_MAX_GROUPS // max(geo.Ho, 1) + 2)
    x_span = (images * geo.H + geo.KH * geo.dilation[0] + geo.padding[0]) * (geo.W + geo.padding[1] + 1) * geo.C
    d_span = (DEPTHWISE_MAX_GROUPS + 2) * geo.Wo * k_slot
    return max(x_span, d_span) >= 2 ** 31


def depthwise(x: Tensor, dw: Tensor, geo: Geometry, pre_relu: bool, mid: Optional[Tensor] = None, mid_bn: int = 0,
              mid_act: str = "", out: Optional[Tensor] = None) -> Tensor:
    """d [P_pad, K_SLOT] in x's dtype (P_pad: P rounded up to POSITION_ALIGN): dw(pre(x)), or for the
    mid variant act(midBN(.)) with `mid` [3, K_SLOT] fp32 (`mid_act`); zeros past P and past C, which
    the GEMM kernels read unmasked. x, dw as `_prepare` returns them; `out`: a buffer to fill instead
    of a new one (its previous contents never show)."""
    k_slot = slot_width(geo.C)
    rows = triton.cdiv(geo.P, POSITION_ALIGN) * POSITION_ALIGN
    d = out if out is not None else new_empty((rows, k_slot), x.dtype, x.device)
    assert d.shape == (rows, k_slot) and d.is_contiguous() and d.dtype == x.dtype
    if d.numel() == 0:
        return d

    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = geo.stride, geo.padding, geo.dilation

    def grid(meta):
        # output rows through d's padding rows (`_depthwise_kernel` zeroes them), in groups
        groups = triton.cdiv(rows, geo.Wo) * triton.cdiv(geo.Wo, meta["RW"])
        return (triton.cdiv(groups, meta["BLOCK_G"]),
                triton.cdiv(k_slot // meta["BLOCK_D"], meta["CHUNKS"]))

    _depthwise_kernel[grid](x, depthwise_taps(dw, geo, k_slot), d, geo.P, position_bucket(geo.P), geo.H, geo.W, geo.C,
                            geo.Ho, geo.Wo, k_slot, stride_h, pad_h, pad_w, dil_h, KH=geo.KH, KW=geo.KW,
                            STRIDE_W=stride_w, DIL_W=dil_w, PRE_RELU=bool(pre_relu),
                            ASM=INLINE_ASM and x.device.type == "cuda",  # PTX: never in the interpreter
                            C_ALIGN=channel_align(geo.C), WIDE=_wide_offsets(geo, k_slot), P_ALIGN=POSITION_ALIGN,
                            mid_ptr=mid, MID_BN=mid_bn, MID_ACT=mid_act)
    return d


class Pointwise:
    """The launch arguments the two GEMM kernels share: d, the persistent program split (two
    programs per SM: the 128 x 128 configs fit two where they compile to 128 registers; a wider
    tile runs them in two waves), the operands (TMA descriptors where they apply)."""

    def __init__(self, geo: Geometry, d: Tensor, pw: Tensor):
        self.programs, self.chunk = persistent_split(geo.P, sm_count(d.device), 2)
        self.sms = sm_count(d.device)
        self.pw_op, self.w_tma = weight_operand(pw.view(geo.Cout, geo.C))
        self.d_op, self.a_tma = weight_operand(d)  # the same TMA rules; d's rows are always 16-byte aligned
        self.d, self.geo = d, geo

    def grid(self, meta) -> tuple[int]:
        return (self.programs,)

    def args(self, *tensors: Tensor, chunk: Optional[int] = None) -> tuple:
        """(pointers..., sizes) up to K_SLOT; the kernels' own tensors go between pw_op and the sizes;
        `chunk`: another split's position chunk than `persistent_split`'s."""
        geo = self.geo
        return (self.d_op, self.pw_op, *tensors, geo.P, position_bucket(geo.P), chunk or self.chunk, geo.C, geo.Cout,
                self.d.shape[1])

    def meta(self) -> dict:
        return dict(A_TMA=self.a_tma, W_TMA=self.w_tma, **self.geo.align())

    def tile_grid(self, meta) -> tuple[int]:
        """`_sepconv_infer_kernel`'s grid: the config's PER_SM programs per SM, or one per output tile
        where there are fewer tiles; each takes an equal run of the config's tiles."""
        tiles = triton.cdiv(self.geo.P, meta["BLOCK_P"]) * triton.cdiv(self.geo.Cout, meta["BLOCK_N"])
        return (min(program_slots(self.sms, meta["PER_SM"]), tiles),)

    def tile_args(self, *tensors: Tensor) -> tuple:
        """`args` without the position chunk (`_sepconv_infer_kernel` splits by tiles)."""
        geo = self.geo
        return (self.d_op, self.pw_op, *tensors, geo.P, position_bucket(geo.P), geo.C, geo.Cout, self.d.shape[1])


def padded_f32(v: Tensor) -> Tensor:
    """A per-channel fp32 vector zero-padded to a multiple of MAX_BLOCK_N, the widest Cout tile: the
    inference epilogue reads it unmasked."""
    out = torch.zeros(triton.cdiv(v.numel(), MAX_BLOCK_N) * MAX_BLOCK_N, dtype=torch.float32, device=v.device)
    out[:v.numel()] = v
    return out


def sepconv_bn_infer(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, scale: Optional[Tensor],
                     shift: Optional[Tensor], residual: Optional[Tensor], spec: UnitSpec,
                     mid: Optional[Tensor] = None, mid_bn: int = 0) -> Tensor:
    """y = post(z * scale + shift) + residual, z = pw(dw(pre(x))): the depthwise kernel, then the GEMM
    kernel with the affine epilogue. The mid variant (`mid_unit`): `mid` [3, slot_width(C)] fp32 and
    mid_bn, spec.mid_act, applied by the depthwise kernel."""
    geo, x, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    y = empty_nhwc(geo.out_shape, x.dtype, x.device)
    if y.numel() == 0:
        return y
    scale = padded_f32(vector_f32(scale, geo.Cout, 1.0, x.device))
    shift = padded_f32(vector_f32(shift, geo.Cout, 0.0, x.device))
    res = nhwc(residual.to(x.dtype)) if residual is not None else y  # y: never read without HAS_RESIDUAL
    run = Pointwise(geo, depthwise(x, dw, geo, spec.pre_relu, mid, mid_bn, spec.mid_act or ""), pw)
    _sepconv_infer_kernel[run.tile_grid](*run.tile_args(scale, shift, res, y), AFFINE=True,
                                         POST_RELU=spec.post_relu, HAS_RESIDUAL=residual is not None, **run.meta())
    return y


def sepconv_bn_train(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], residual: Optional[Tensor], spec: UnitSpec,
                     eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mean, biased var): depthwise, GEMM storing z, its statistics, normalisation."""
    geo, x, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    if geo.P == 0 or geo.Cout == 0:  # as the reference: mean 0, var 1 for an empty batch
        return empty_forward(geo, x)
    z, mean, var = train_gemm(geo, depthwise(x, dw, geo, spec.pre_relu), pw)
    invstd = torch.rsqrt(var + eps)  # as the reference (and ops.py's backward) compute it
    y = batchnorm.normalize(z, mean, invstd, bn_weight, bn_bias, residual, spec.post_relu)
    return y, z, mean, var


def empty_forward(geo: Geometry, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mean 0, var 1) of a training forward with no positions or no output channels."""
    mean = torch.zeros(geo.Cout, dtype=torch.float32, device=x.device)
    var = torch.ones(geo.Cout, dtype=torch.float32, device=x.device)
    return empty_nhwc(geo.out_shape, x.dtype, x.device), empty_nhwc(geo.out_shape, x.dtype, x.device), mean, var


def train_gemm(geo: Geometry, d: Tensor, pw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(z, mean, biased var): the GEMM kernel storing z (the inference kernel without its affine map),
    then the statistics of the stored z in a pass of their own (`batchnorm.statistics`): a reduction
    in the GEMM's epilogue cost it more than reading z back (benchmarks/NOTES.md, "Triton training
    statistics in their own pass")."""
    z = empty_nhwc(geo.out_shape, d.dtype, d.device)
    run = Pointwise(geo, d, pw)
    _sepconv_infer_kernel[run.tile_grid](*run.tile_args(z, z, z, z), AFFINE=False, POST_RELU=False,
                                         HAS_RESIDUAL=False, **run.meta())  # z: never read as scale/shift/residual
    mean, var = batchnorm.statistics(z.permute(0, 2, 3, 1).reshape(geo.P, geo.Cout))
    return z, mean, var


def recompute_grad_z(grad_y: Tensor, x: Tensor, dw: Tensor, pw: Tensor, geo: Geometry, scale: Tensor,
                     shift: Tensor, pre_relu: bool, post_relu: bool, mid: Optional[Tensor] = None,
                     mid_bn: int = 0, mid_act: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """Inference backward's first pass: (grad_z, sums [2, Cout] fp32 of g and g * z, d): d the depthwise
    kernel's output as a [P, C] view (row pitch K_SLOT), the pointwise operand, which the weight
    gradient can read instead of recomputing it. x, dw, pw as
    `_prepare` returns them; scale/shift fp32 vectors; mid, mid_bn, mid_act as `depthwise`."""
    grad_z = empty_nhwc(geo.out_shape, x.dtype, x.device)
    run = Pointwise(geo, depthwise(x, dw, geo, pre_relu, mid, mid_bn, mid_act), pw)
    sums = new_empty((run.programs, 2, geo.Cout), torch.float32, x.device)
    _sepconv_grad_z_kernel[run.grid](*run.args(scale, shift, grad_y, grad_z, sums), POST_RELU=bool(post_relu),
                                     **run.meta())
    return grad_z, batchnorm.sum_rows(sums.view(run.programs, 2 * geo.Cout)).view(2, geo.Cout), run.d[:geo.P, :geo.C]
