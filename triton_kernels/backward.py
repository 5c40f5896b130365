"""Backward of the fused unit: pointwise and depthwise gradients, the depthwise output recomputed.

With g_z = grad of z [P, Cout] (positions x output channels), d = dw(pre(x)) [P, C]:
- grad_d  = g_z @ W_pw          `torch.matmul` (cuBLAS) under `exact_matmul`: operands and result in the
                                  input dtype, fp32 accumulation, no TF32. (A tl.dot kernel that also
                                  reduced grad_dw took 1.62 ms on an H200 for the middle-flow unit,
                                  where cuBLAS's dgrad of the same shape takes about 0.2 ms.)
- grad_dw = sum_p grad_d * pre(x)_tap   `_dw_weight_grad_kernel`: a split reduction over positions
                                  ([S, C, KH*KW] partials) that reads x and grad_d once; shared with
                                  the mid variant. With the taps loaded it also recomputes d and stores
                                  it in the input dtype (STORE_D), unless the caller already has d.
- grad_pw = g_z^T @ d           `torch.matmul` (cuBLAS) under `exact_matmul`, as grad_d. (A split-K
                                  tl.dot kernel took 437 us on an H200 for the middle-flow unit, where
                                  cuBLAS's wgrad of the same shape takes 142 us.)
- grad_x  = dw^T(grad_d) * [x > 0 if pre-ReLU]   `_dw_input_grad_kernel`: the transposed depthwise
                                  conv as a gather over the taps (no atomics).
For 3 x 3, unit stride and an output the size of the input (every Xception unit), `_dw_backward_kernel`
computes grad_dw, d and grad_x in one pass over x and grad_d instead, where the calibrated static estimate
says it beats the two kernels (`one_pass_width`).
g_z is materialised once, in the input dtype, and read by both products: in training by
`batchnorm.grad_z` (an elementwise pass over grad_y and z), in inference by the forward's two launches
that recompute d and z (`depthwise_pointwise.recompute_grad_z`; the d it stores is handed on to grad_pw),
unless g_z is grad_y itself.

grad_d and d are the intermediates that go to memory: grad_x needs grad_d under the whole k x k
neighbourhood of each input position, i.e. across program tiles, and cuBLAS reads d as a GEMM operand
(the unfused path stores both too). All reductions of the Triton kernels are deterministic: fixed
splits over positions, then `batchnorm.sum_rows`. Rounding follows the reference: g_z, grad_d and d in
the input dtype, weight grads accumulated in fp32 and stored in the weight dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from xception_fast.spec import UnitSpec

from . import batchnorm
from .autotune import INTERPRET, device_arch, dw_input_grad_configs, persistent_split, position_bucket, sm_count
from .depthwise_pointwise import (Geometry, _add_to, _group_origin, _pre_f32, _prepare, _tap_rows, depthwise_taps,
                                  recompute_grad_z)
from .utils import INLINE_ASM, check_dtype, empty_nhwc, new_empty, nhwc, vector_f32


# --- kernels --------------------------------------------------------------------------------------------

# Fixed blocks (BLOCK_P, BLOCK_C, RW) of the depthwise weight gradient (its split must not depend on an
# autotuned config), by STORE_D, in DW_WARPS-warp CTAs. 3 x 3: BLOCK_P groups of RW outputs along a row
# sharing their loaded input columns, 9 fp32 accumulators of a tile in registers (+ RW of d). A thread
# holds 2 channels of a group: 8 x 32 x 4 compiles to 96 registers on sm_90 and sm_80 with d (five CTAs
# per SM, DW_CTAS_PER_SM), 64-70 without (seven or eight); 8 channels a thread (16 x 32 x 2, as before)
# need 128-130 registers (four CTAs; RW = 4 there: 168). Calibrated static estimates (sm_90 model):
# benchmarks/NOTES.md, "Triton depthwise backward: instructions per element-tap". Other kernel sizes:
# BLOCK_P positions (RW unused).
DW_BLOCKS = {True: (8, 16, 4), False: (8, 16, 4)} if INTERPRET else {True: (8, 32, 4), False: (8, 32, 4)}
DW_WARPS = 4
DW_CTAS_PER_SM = 5  # resident with d stored; the split fills them in one wave
# `_dw_backward_kernel` (grad_dw, d and grad_x in one pass): BLOCK_P groups of RW positions (`one_pass_width`)
# x BLOCK_C channels, DW_WARPS warps, `weight_grad_split`'s one wave of the programs that fit per SM. On sm_90
# capped at the fewest registers that leave no spill (`one_pass_cap`, by input dtype and group width; checked
# by tests/test_triton_static.py): 96 in bf16 (five CTAs per SM; uncapped RW = 3 takes 116, four), where fp16's
# groups of 3 spill 64 B (112 needed) and fp32's 96 B (128). On sm_80 a cap of 96 spills (48 B at RW = 3 with
# d), so it stays off there.
ONE_PASS_BLOCK_P, ONE_PASS_BLOCK_C = 8, 16 if INTERPRET else 32
ONE_PASS_MAXNREG = {torch.bfloat16: (96, 96), torch.float16: (96, 112), torch.float32: (112, 128)}  # RW <= 2, RW 3


def taps_pitch(channels: int) -> int:
    """Row pitch of the depthwise taps the backward passes (`depthwise_taps(dw, geo, taps_pitch(C))`):
    C rounded up to a multiple of every channel block of the two depthwise-gradient kernels (the
    stored-d block here, `dw_input_grad_configs`' BLOCK_C), so that both load the taps unmasked."""
    block = TAPS_ALIGN
    return triton.cdiv(channels, block) * block


# A multiple of DW_BLOCKS[True][1] and of every BLOCK_C of `dw_input_grad_configs` (checked at launch).
TAPS_ALIGN = 16 if INTERPRET else 64


@triton.jit
def _split_channel_block(C, BLOCK_C: tl.constexpr):
    """(s, c0, ci) of a split-reduction program (program id = s * channel blocks + block): its split
    s, the first channel c0 of its block and the block's channels ci."""
    c_tiles = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    s, c0 = pid // c_tiles, (pid % c_tiles) * BLOCK_C
    return s, c0, c0 + tl.arange(0, BLOCK_C)


@triton.jit
def _tap(gd, d, x_tile, ih0, iw0, tile_ok, ci, H, W, C, dil_h, dil_w, dwt_ptr, K_SLOT, i: tl.constexpr,
         j: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr, ASM: tl.constexpr, STORE_D: tl.constexpr):
    """(gd * pre(x) under tap (i, j) of each position, d + that tap's term if STORE_D), [BLOCK_P,
    BLOCK_C] fp32, zero outside the image. d sums the taps from zero in the order of the forward's
    `depthwise_pointwise._depthwise_kernel`. x_tile: pointers to the top-left tap of each element
    (`_grad_tile`), the tap one scalar offset away; one unsigned compare tests both bounds of ih (iw),
    the row's part shared by a row's taps (the compiler keeps it)."""
    ih = ih0 + i * dil_h
    iw = iw0 + j * dil_w
    ok = tile_ok & (ih.to(tl.uint32, bitcast=True) < H)[:, None] & (iw.to(tl.uint32, bitcast=True) < W)[:, None]
    xv = tl.load(x_tile + (i * dil_h * W + j * dil_w) * C, mask=ok, other=0.0)
    xv = _pre_f32(xv, PRE_RELU, ASM)
    if STORE_D:
        d += xv * tl.load(dwt_ptr + (i * KW + j) * K_SLOT + ci)[None, :]  # zero past C: no mask
    return gd * xv, d


@triton.jit
def _grad_tile(x_ptr, gd_ptr, p0, p_end, ci, c_ok, H, W, C, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
               BLOCK_P: tl.constexpr):
    """For positions [p0, p0 + BLOCK_P) (below p_end): pointers to each element's top-left tap [BLOCK_P,
    BLOCK_C], that tap's input row and column, the elements' mask, and their grad_d tile in fp32."""
    x_rows, ih0, iw0, p_mask = _tap_rows(x_ptr, p0, p_end, H, W, C, Ho, Wo, stride_h, stride_w, pad_h, pad_w, BLOCK_P)
    p = p0 + tl.arange(0, BLOCK_P)
    tile_ok = p_mask[:, None] & c_ok[None, :]
    gd = tl.load(gd_ptr + p.to(tl.int64)[:, None] * C + ci[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    return x_rows[:, None] + ci[None, :], ih0, iw0, tile_ok, gd


@triton.jit
def _put(grad_dw, taps, t: tl.constexpr, acc):
    """Row t of grad_dw [KK_PAD, BLOCK_C] = acc [BLOCK_P, BLOCK_C] summed over its rows."""
    return tl.where(taps[:, None] == t, tl.sum(acc, axis=0)[None, :], grad_dw)


@triton.jit
def _put_taps(grad_dw, taps, a00, a01, a02, a10, a11, a12, a20, a21, a22):
    """grad_dw [16, BLOCK_C] with the 3 x 3 taps' column sums in rows 0-8 (row-major)."""
    grad_dw = _put(_put(_put(grad_dw, taps, 0, a00), taps, 1, a01), taps, 2, a02)
    grad_dw = _put(_put(_put(grad_dw, taps, 3, a10), taps, 4, a11), taps, 5, a12)
    return _put(_put(_put(grad_dw, taps, 6, a20), taps, 7, a21), taps, 8, a22)


@triton.jit
def _store_d(d_ptr, d, p0, tile_ok, ci, C, STORE_D: tl.constexpr, BLOCK_P: tl.constexpr):
    if STORE_D:
        p = p0 + tl.arange(0, BLOCK_P)
        tl.store(d_ptr + p.to(tl.int64)[:, None] * C + ci[None, :], d.to(d_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _store_group(rows, v0, v1, v2, v3, ok0, ok1, ok2, ok3, C, RW: tl.constexpr):
    """A group's RW outputs (rows: the first one's pointers; the next C apart), rounded to their dtype."""
    tl.store(rows, v0.to(rows.dtype.element_ty), mask=ok0)
    if RW > 1:
        tl.store(rows + C, v1.to(rows.dtype.element_ty), mask=ok1)
    if RW > 2:
        tl.store(rows + 2 * C, v2.to(rows.dtype.element_ty), mask=ok2)
    if RW > 3:
        tl.store(rows + 3 * C, v3.to(rows.dtype.element_ty), mask=ok3)


@triton.jit
def _walk_start(g_begin, groups, rows, stride_h, pad_h, pad_w, RW: tl.constexpr, STRIDE_W: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """(gcol, oh, n, rem, qr, qn, n_first): each lane's first group of a program's chunk as (its index gcol
    in the row, its row oh, its image n), divided out once here (`_group_origin`, the forward's); then
    stepped BLOCK_P groups per tile by `_next_tile` without a division (two signed divisions cost about
    50 SASS instructions per tile): BLOCK_P = q * groups + rem, q = qn * rows + qr, so each wrap there
    happens at most once. n_first: the program's first image."""
    _, ow0, n, oh, _, _ = _group_origin(g_begin + tl.arange(0, BLOCK_P), groups, rows, stride_h, pad_h, pad_w, RW,
                                        STRIDE_W)
    q = BLOCK_P // groups
    qn = q // rows
    return ow0 // RW, oh, n, BLOCK_P - q * groups, q - qn * rows, qn, g_begin // groups // rows


@triton.jit
def _next_tile(gcol, oh, n, rem, qr, qn, groups, rows):
    """Each lane's group of the next tile, stepped without a division: `rem` groups, `qr` rows and `qn`
    images on (a tile's groups split once per program), carrying into the row and the image."""
    gcol += rem
    wrap = gcol >= groups
    gcol = tl.where(wrap, gcol - groups, gcol)
    oh += qr + wrap.to(tl.int32)
    wrap = oh >= rows
    oh = tl.where(wrap, oh - rows, oh)
    n += qn + wrap.to(tl.int32)
    return gcol, oh, n


@triton.jit
def _pick(g0, g1, g2, g3, r: tl.constexpr):
    """Output r's tile of a group (`_add_to`'s numbering)."""
    if r == 0:
        t = g0
    elif r == 1:
        t = g1
    elif r == 2:
        t = g2
    else:
        t = g3
    return t


@triton.jit
def _add_tap(a00, a01, a02, a10, a11, a12, a20, a21, a22, i: tl.constexpr, j: tl.constexpr, t):
    """The 3 x 3 accumulator of tap (i, j) += t."""
    if i == 0:
        if j == 0:
            a00 += t
        elif j == 1:
            a01 += t
        else:
            a02 += t
    elif i == 1:
        if j == 0:
            a10 += t
        elif j == 1:
            a11 += t
        else:
            a12 += t
    else:
        if j == 0:
            a20 += t
        elif j == 1:
            a21 += t
        else:
            a22 += t
    return a00, a01, a02, a10, a11, a12, a20, a21, a22


@triton.jit
def _dw_weight_grad_kernel(
    # pointers
    x_ptr,  # [N, H, W, C] input (channels_last)
    gd_ptr,  # [P, C] grad of the depthwise output
    part_ptr,  # [S, C, KH * KW] fp32 out: per split, grad of the depthwise weight
    dwt_ptr,  # [KH * KW, K_SLOT] fp32 depthwise taps, zero past C (read only if STORE_D)
    d_ptr,  # [P, C] out (only if STORE_D): the depthwise output d, input dtype, for grad_pw
    # sizes (P and chunk count groups of RW outputs for 3 x 3, positions otherwise; K_SLOT: the taps' row
    # pitch, a multiple of BLOCK_C)
    P, chunk, H, W,
    C: tl.constexpr,  # compile-time: the taps' column offsets become load immediates (one compile per C)
    Ho, Wo, K_SLOT,
    # convolution
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # meta-parameters (3 x 3: BLOCK_P groups of RW outputs, STRIDE_W and DIL_W the column stride and dilation,
    # WIDE: int64 offsets, `_wide_weight_grad`)
    KH: tl.constexpr, KW: tl.constexpr, KK_PAD: tl.constexpr, PRE_RELU: tl.constexpr, ASM: tl.constexpr,
    STORE_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RW: tl.constexpr = 1,
    STRIDE_W: tl.constexpr = 1, DIL_W: tl.constexpr = 1, WIDE: tl.constexpr = False,
):
    # grad_dw[c, tap] = sum_p grad_d[p, c] * pre(x)[tap of p, c]: a split reduction over positions
    # (deterministic: fixed splits, then `batchnorm.sum_rows`). For 3 x 3 (Xception's), one register
    # accumulator per tap and one cross-warp reduction per tap per program; other kernel sizes reduce
    # each tile's products (a reduction per tap per tile: 36 barriers per tile on sm_90).
    s, c0, ci = _split_channel_block(C, BLOCK_C)
    c_ok = ci < C
    p_end = tl.minimum(s * chunk + chunk, P)
    taps = tl.arange(0, KK_PAD)
    grad_dw = tl.zeros((KK_PAD, BLOCK_C), dtype=tl.float32)  # row t: tap t = i * KW + j
    if KH == 3 and KW == 3:
        # Groups of RW horizontally adjacent outputs of a row (as the forward's `_depthwise_kernel`;
        # `chunk` and P count groups here): each input column their windows share is loaded and
        # converted once and feeds every tap that reads it, d sums each output's taps in (i, j) order.
        tl.static_assert(RW <= 4, "a group holds at most 4 outputs (`_add_to`)")
        groups = (Wo + RW - 1) // RW
        g_begin = s * chunk
        gcol, oh, n, rem, qr, qn, n_first = _walk_start(g_begin, groups, Ho, stride_h, pad_h, pad_w, RW, STRIDE_W,
                                                        BLOCK_P)
        # Offsets from the program's first image (x, grad_d and d): int32 unless the host found that a
        # program's span could pass 2^31 elements (WIDE).
        x_base = x_ptr + n_first.to(tl.int64) * H * W * C
        out_first = n_first.to(tl.int64) * Ho * Wo * C
        gd_base = gd_ptr + out_first
        d_base = d_ptr + out_first
        a00 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        a01, a02, a10, a11, a12, a20, a21, a22 = a00, a00, a00, a00, a00, a00, a00, a00
        NCOL: tl.constexpr = (RW - 1) * STRIDE_W + 2 * DIL_W + 1
        for g0 in range(g_begin, p_end, BLOCK_P):
            tile_ok = (g0 + tl.arange(0, BLOCK_P) < p_end)[:, None] & c_ok[None, :]
            ow0 = gcol * RW
            ih0 = oh * stride_h - pad_h
            iw0 = ow0 * STRIDE_W - pad_w
            x_pos = ((n - n_first) * H + ih0) * W + iw0
            p_rel = ((n - n_first) * Ho + oh) * Wo + ow0
            if WIDE:
                x_pos = x_pos.to(tl.int64)
                p_rel = p_rel.to(tl.int64)
            gd_rows = gd_base + (p_rel * C)[:, None] + ci[None, :]
            ok1 = tile_ok & (ow0 + 1 < Wo)[:, None]
            ok2 = tile_ok & (ow0 + 2 < Wo)[:, None]
            ok3 = tile_ok & (ow0 + 3 < Wo)[:, None]
            gd0 = _pre_f32(tl.load(gd_rows, mask=tile_ok, other=0.0), False, ASM)
            gd1, gd2, gd3 = gd0, gd0, gd0
            if RW > 1:
                gd1 = _pre_f32(tl.load(gd_rows + C, mask=ok1, other=0.0), False, ASM)
            if RW > 2:
                gd2 = _pre_f32(tl.load(gd_rows + 2 * C, mask=ok2, other=0.0), False, ASM)
            if RW > 3:
                gd3 = _pre_f32(tl.load(gd_rows + 3 * C, mask=ok3, other=0.0), False, ASM)
            x_tile = x_base + (x_pos * C)[:, None] + ci[None, :]
            d0 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            d1, d2, d3 = d0, d0, d0
            for i in tl.static_range(3):
                row_ok = tile_ok & ((ih0 + i * dil_h).to(tl.uint32, bitcast=True) < H)[:, None]
                x_row = x_tile + i * dil_h * W * C
                for k in tl.static_range(NCOL):
                    col_ok = (iw0 + k).to(tl.uint32, bitcast=True) < W
                    xv = tl.load(x_row + k * C, mask=row_ok & col_ok[:, None], other=0.0)
                    xf = _pre_f32(xv, PRE_RELU, ASM)
                    for r in tl.static_range(RW):
                        if k >= r * STRIDE_W and (k - r * STRIDE_W) % DIL_W == 0 and (k - r * STRIDE_W) // DIL_W < 3:
                            j = (k - r * STRIDE_W) // DIL_W
                            a00, a01, a02, a10, a11, a12, a20, a21, a22 = _add_tap(
                                a00, a01, a02, a10, a11, a12, a20, a21, a22, i, j, _pick(gd0, gd1, gd2, gd3, r) * xf)
                            if STORE_D:
                                wv = tl.load(dwt_ptr + (i * 3 + j) * K_SLOT + ci)  # zero past C: no mask
                                d0, d1, d2, d3 = _add_to(d0, d1, d2, d3, r, xf, wv)
            if STORE_D:
                _store_group(d_base + (p_rel * C)[:, None] + ci[None, :], d0, d1, d2, d3, tile_ok, ok1, ok2, ok3, C,
                             RW)
            gcol, oh, n = _next_tile(gcol, oh, n, rem, qr, qn, groups, Ho)
        grad_dw = _put_taps(grad_dw, taps, a00, a01, a02, a10, a11, a12, a20, a21, a22)
    else:
        for p0 in range(s * chunk, p_end, BLOCK_P):
            x_tile, ih0, iw0, tile_ok, gd = _grad_tile(x_ptr, gd_ptr, p0, p_end, ci, c_ok, H, W, C, Ho, Wo, stride_h,
                                                       stride_w, pad_h, pad_w, BLOCK_P)
            d = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for i in tl.static_range(KH):
                for j in tl.static_range(KW):
                    t, d = _tap(gd, d, x_tile, ih0, iw0, tile_ok, ci, H, W, C, dil_h, dil_w, dwt_ptr, K_SLOT, i, j, KW,
                                PRE_RELU, ASM, STORE_D)
                    grad_dw = tl.where(taps[:, None] == i * KW + j, grad_dw + tl.sum(t, axis=0)[None, :], grad_dw)
            _store_d(d_ptr, d, p0, tile_ok, ci, C, STORE_D, BLOCK_P)
    offs = s.to(tl.int64) * C * (KH * KW) + ci[None, :] * (KH * KW) + taps[:, None]
    tl.store(part_ptr + offs, grad_dw, mask=(taps < KH * KW)[:, None] & c_ok[None, :])


@triton.jit
def _store_grad_x(acc, q, ok, c, x_ptr, gx_ptr, C, PRE_RELU: tl.constexpr):
    """grad_x at input positions q (where ok) = acc [BLOCK, BLOCK_C] through the pre-ReLU's mask."""
    offs = q.to(tl.int64)[:, None] * C + c[None, :]
    xv = acc  # x is read for the mask only
    if PRE_RELU:
        xv = tl.load(x_ptr + offs, mask=ok, other=0.0)
    _store_masked(gx_ptr + offs, acc, xv, ok, PRE_RELU)


@triton.jit
def _udiv(a, b):
    """a // b for non-negative int32 a and positive b, as an unsigned division."""
    return (a.to(tl.uint32, bitcast=True) // b.to(tl.uint32, bitcast=True)).to(tl.int32, bitcast=True)


@triton.jit
def _input_grad_groups(gd_ptr, dwt_ptr, x_ptr, gx_ptr, pid_q, c, c_mask, Q, H, W, C, Ho, Wo, K_SLOT, pad_h, pad_w, dil_h,
                       KH: tl.constexpr, KW: tl.constexpr, DIL_W: tl.constexpr, PRE_RELU: tl.constexpr,
                       ASM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RW: tl.constexpr):
    """Unit strides: BLOCK_P groups of RW horizontally adjacent input positions of one input row (the
    last group of a row cut at W). Input r of a group reads, for tap (i, j), output column
    iw0 + r + pad_w - j * DIL_W: the group's inputs share those columns, each loaded and converted once
    (as in the forward's `_depthwise_kernel`). Column k (from the leftmost, iw0 + pad_w - (KW - 1) *
    DIL_W) feeds input r's tap j where k = r + (KW - 1 - j) * DIL_W; the columns run right to left, so
    that each input sums its taps in the order (i, j) as the per-position path does. (Left to right, as
    `_dw_backward_kernel` must, took 103 registers, 9 CTAs per SM.) The kernel rows run in a loop, not
    unrolled: unrolled, the compiler hoisted every row's loads and taps (130-142
    registers on sm_90, 7 CTAs of 2 warps per SM); rolled, 96 (10)."""
    tl.static_assert(RW <= 4, "a group holds at most 4 inputs (`_add_to`)")
    groups = (W + RW - 1) // RW
    g = pid_q * BLOCK_P + tl.arange(0, BLOCK_P)
    g_ok = g < Q // W * groups
    # Unsigned divisions (every operand is non-negative): half the SASS of signed ones.
    irow = _udiv(g, groups)  # n * H + ih
    iw0 = (g - irow * groups) * RW
    n = _udiv(irow, H)
    ih = irow - n * H
    tile_ok = g_ok[:, None] & c_mask[None, :]
    ow_b = iw0 + pad_w - (KW - 1) * DIL_W
    g_tile = (gd_ptr + ((n.to(tl.int64) * Ho + ih + pad_h) * Wo + ow_b) * C)[:, None] + c[None, :]
    a0 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    a1, a2, a3 = a0, a0, a0
    NCOL: tl.constexpr = RW + (KW - 1) * DIL_W
    for i in range(KH):
        oh = ih + pad_h - i * dil_h
        ok_h = tile_ok & (oh.to(tl.uint32, bitcast=True) < Ho)[:, None]
        for kk in tl.static_range(NCOL):
            k = NCOL - 1 - kk
            ok = ok_h & ((ow_b + k).to(tl.uint32, bitcast=True) < Wo)[:, None]
            gf = _pre_f32(tl.load(g_tile + (k - i * dil_h * Wo) * C, mask=ok, other=0.0), False, ASM)
            for r in tl.static_range(RW):
                if r + (KW - 1) * DIL_W >= k and (r + (KW - 1) * DIL_W - k) % DIL_W == 0 and k >= r:
                    j = KW - 1 - (k - r) // DIL_W
                    wv = tl.load(dwt_ptr + (i * KW + j) * K_SLOT + c)  # zero past C, K_SLOT a multiple of BLOCK_C
                    a0, a1, a2, a3 = _add_to(a0, a1, a2, a3, r, gf, wv)
    q = irow * W + iw0
    _store_grad_x(a0, q, tile_ok, c, x_ptr, gx_ptr, C, PRE_RELU)
    if RW > 1:
        _store_grad_x(a1, q + 1, tile_ok & (iw0 + 1 < W)[:, None], c, x_ptr, gx_ptr, C, PRE_RELU)
    if RW > 2:
        _store_grad_x(a2, q + 2, tile_ok & (iw0 + 2 < W)[:, None], c, x_ptr, gx_ptr, C, PRE_RELU)
    if RW > 3:
        _store_grad_x(a3, q + 3, tile_ok & (iw0 + 3 < W)[:, None], c, x_ptr, gx_ptr, C, PRE_RELU)


@triton.autotune(configs=dw_input_grad_configs(), key=["C", "Q_BUCKET", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_W"])
@triton.jit
def _dw_input_grad_kernel(
    # pointers
    gd_ptr,  # [N, Ho, Wo, C] grad of the depthwise output
    dwt_ptr,  # [KH * KW, K_SLOT] fp32 depthwise taps (tap-major: one contiguous vector load per tap)
    x_ptr,  # [N, H, W, C] input (read only if PRE_RELU, for its mask)
    gx_ptr,  # [N, H, W, C] out: grad of x
    # sizes
    Q, Q_BUCKET, H, W,  # Q_BUCKET: the autotuning key only
    C: tl.constexpr,  # compile-time (a key of the autotuner anyway): column offsets become load immediates
    Ho, Wo, K_SLOT,  # K_SLOT: the taps' row pitch
    # convolution (the strides and the column dilation are compile-time: Xception's strides are 1 and 2)
    pad_h, pad_w, dil_h,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_W: tl.constexpr,
    PRE_RELU: tl.constexpr, ASM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RW: tl.constexpr,
):
    # Each input position gathers from the outputs whose window covers it: oh * stride - pad + i * dil
    # = ih, for each tap (i, j). Written as a gather so that no two programs write one element.
    # A 2-D grid (position tiles, channel blocks): no division for the program's channel block.
    pid_q = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if STRIDE_H == 1 and STRIDE_W == 1:
        _input_grad_groups(gd_ptr, dwt_ptr, x_ptr, gx_ptr, pid_q, c, c_mask, Q, H, W, C, Ho, Wo, K_SLOT, pad_h, pad_w,
                           dil_h, KH, KW, DIL_W, PRE_RELU, ASM, BLOCK_P, BLOCK_C, RW)
    else:
        # Tap (i, j) reads output row (ih + pad_h - i * dil_h) / STRIDE_H, where that divides: one input
        # position per row of the tile (RW unused).
        q = pid_q * BLOCK_P + tl.arange(0, BLOCK_P)
        q_mask = q < Q
        n = q // (H * W)
        r = q - n * (H * W)
        ih = r // W
        iw = r - ih * W
        tile_ok = q_mask[:, None] & c_mask[None, :]
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(KH):
            th = ih + pad_h - i * dil_h
            th_c = tl.maximum(th, 0)  # non-negative before // and %, whose sign rules differ by backend
            oh = th_c // STRIDE_H
            ok_h = q_mask & (th >= 0) & (oh < Ho) & (th_c - oh * STRIDE_H == 0)
            for j in tl.static_range(KW):
                tw = iw + pad_w - j * DIL_W
                tw_c = tl.maximum(tw, 0)
                ow = tw_c // STRIDE_W
                ok = ok_h & (tw >= 0) & (ow < Wo) & (tw_c - ow * STRIDE_W == 0)
                g = tl.load(gd_ptr + ((n.to(tl.int64) * Ho + oh) * Wo + ow)[:, None] * C + c[None, :],
                            mask=ok[:, None] & c_mask[None, :], other=0.0)
                wv = tl.load(dwt_ptr + (i * KW + j) * K_SLOT + c)  # zero past C, K_SLOT a multiple of BLOCK_C
                acc += _pre_f32(g, False, ASM) * wv[None, :]
        _store_grad_x(acc, q, tile_ok, c, x_ptr, gx_ptr, C, PRE_RELU)


@triton.jit
def _put_at(t0, t1, t2, t3, r: tl.constexpr, v):
    """(t0, t1, t2, t3) with t<r> replaced by v (`_pick`'s numbering)."""
    if r == 0:
        t0 = v
    elif r == 1:
        t1 = v
    elif r == 2:
        t2 = v
    else:
        t3 = v
    return t0, t1, t2, t3


@triton.jit
def _store_masked(gx_rows, acc, x, ok, PRE_RELU: tl.constexpr):
    """grad_x = acc through the pre-ReLU's mask (x > 0: not where x is NaN); x is read only with it."""
    if PRE_RELU:
        acc = tl.where(x > 0, acc, 0.0)
    tl.store(gx_rows, acc.to(gx_rows.dtype.element_ty), mask=ok)


@triton.jit
def _dw_backward_kernel(
    # pointers
    x_ptr,  # [N, H, W, C] input (channels_last)
    gd_ptr,  # [N, H, W, C] grad of the depthwise output (3 x 3, unit stride, Ho == H and Wo == W)
    part_ptr,  # [S, C, 9] fp32 out: per split, grad of the depthwise weight
    dwt_ptr,  # [9, K_SLOT] fp32 depthwise taps, zero past C
    d_ptr,  # [P, C] out (only if STORE_D): the depthwise output d, input dtype, for grad_pw
    gx_ptr,  # [N, H, W, C] out: grad of x
    # sizes (P and chunk count groups of RW positions; K_SLOT: the taps' row pitch, a multiple of BLOCK_C)
    P, chunk, H, W,
    C: tl.constexpr,  # compile-time, as in `_dw_weight_grad_kernel`
    K_SLOT, dil_h,
    # meta-parameters (DIL_W the column dilation; the padding is the dilation: "same" output)
    PRE_RELU: tl.constexpr, ASM: tl.constexpr, STORE_D: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, RW: tl.constexpr, DIL_W: tl.constexpr, WIDE: tl.constexpr,
):
    # grad_dw, d and grad_x in one pass over x and grad_d. With a "same" 3 x 3 window, output position p
    # reads x over the rows oh - dil_h .. oh + dil_h and the columns ow - DIL_W .. ow + DIL_W, and input
    # position p gathers grad_d over exactly those rows and columns: one set of offsets and masks serves
    # both loads, and each program writes d and grad_x at its own positions only (no atomics). The
    # split, the groups of RW outputs along a row and the stepping without divisions are
    # `_dw_weight_grad_kernel`'s (d comes out bitwise equal, the grad_dw partials too in its groups of 4);
    # the halo rows of grad_d and x come from L1/L2, each tensor is read from DRAM once.
    # Loaded row ii (0..2, at oh + (ii - 1) * dil_h), column k (at ow0 - DIL_W + k) gives:
    # - output r's tap (ii, j), j = (k - r) / DIL_W: grad_dw[ii, j] += grad_d(r) * pre(x), d(r) += pre(x) * w;
    # - input r's tap (2 - ii, 2 - j): grad_x(r) += grad_d * w[2 - ii, 2 - j]. grad_x so sums its taps in
    #   the order (i, j) reversed (d must keep the forward's order): fp32 sums that can differ from
    #   `_input_grad_groups`' in the last bit before the rounding to the input dtype.
    tl.static_assert(RW <= 4, "a group holds at most 4 positions (`_add_to`)")
    s, c0, ci = _split_channel_block(C, BLOCK_C)
    c_ok = ci < C
    p_end = tl.minimum(s * chunk + chunk, P)
    taps = tl.arange(0, 16)  # the 9 taps' rows of grad_dw, padded to a power of two
    groups = (W + RW - 1) // RW
    g_begin = s * chunk
    gcol, oh, n, rem, qr, qn, n_first = _walk_start(g_begin, groups, H, 1, 0, 0, RW, 1, BLOCK_P)
    # Offsets from the program's first image, int32 unless WIDE (`_wide_weight_grad`): the four tensors
    # share the geometry, so one offset tile addresses all of them.
    first = n_first.to(tl.int64) * H * W * C
    x_base = x_ptr + first
    gd_base = gd_ptr + first
    a00 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    a01, a02, a10, a11, a12, a20, a21, a22 = a00, a00, a00, a00, a00, a00, a00, a00
    NCOL: tl.constexpr = RW + 2 * DIL_W
    for g0 in range(g_begin, p_end, BLOCK_P):
        tile_ok = (g0 + tl.arange(0, BLOCK_P) < p_end)[:, None] & c_ok[None, :]
        ow0 = gcol * RW
        pos = ((n - n_first) * H + oh) * W + ow0  # each group's first position
        if WIDE:
            pos = pos.to(tl.int64)
        offs = (pos * C)[:, None] + ci[None, :]
        ok1 = tile_ok & (ow0 + 1 < W)[:, None]
        ok2 = tile_ok & (ow0 + 2 < W)[:, None]
        ok3 = tile_ok & (ow0 + 3 < W)[:, None]
        # grad_d at the group's own positions first: every loaded row's weight-grad taps need it.
        gd0 = _pre_f32(tl.load(gd_base + offs, mask=tile_ok, other=0.0), False, ASM)
        gd1, gd2, gd3 = gd0, gd0, gd0
        if RW > 1:
            gd1 = _pre_f32(tl.load(gd_base + offs + C, mask=ok1, other=0.0), False, ASM)
        if RW > 2:
            gd2 = _pre_f32(tl.load(gd_base + offs + 2 * C, mask=ok2, other=0.0), False, ASM)
        if RW > 3:
            gd3 = _pre_f32(tl.load(gd_base + offs + 3 * C, mask=ok3, other=0.0), False, ASM)
        d0 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        d1, d2, d3 = d0, d0, d0
        e0, e1, e2, e3 = d0, d0, d0, d0  # grad_x before the pre-ReLU's mask
        xc0 = tl.zeros((BLOCK_P, BLOCK_C), dtype=x_ptr.dtype.element_ty)  # x at the group's positions: the mask
        xc1, xc2, xc3 = xc0, xc0, xc0  # (kept in x's dtype: 16-bit pairs take one register)
        for ii in tl.static_range(3):
            row_ok = tile_ok & ((oh + (ii - 1) * dil_h).to(tl.uint32, bitcast=True) < H)[:, None]
            row = offs + ((ii - 1) * dil_h * W - DIL_W) * C
            for k in tl.static_range(NCOL):
                ok = row_ok & ((ow0 + (k - DIL_W)).to(tl.uint32, bitcast=True) < W)[:, None]
                xv = tl.load(x_base + row + k * C, mask=ok, other=0.0)
                xf = _pre_f32(xv, PRE_RELU, ASM)
                if ii == 1 and k >= DIL_W and k < DIL_W + RW:  # a position of the group: grad_d is loaded
                    gf = _pick(gd0, gd1, gd2, gd3, k - DIL_W)
                    xc0, xc1, xc2, xc3 = _put_at(xc0, xc1, xc2, xc3, k - DIL_W, xv)
                else:
                    gf = _pre_f32(tl.load(gd_base + row + k * C, mask=ok, other=0.0), False, ASM)
                for r in tl.static_range(RW):
                    if k >= r and (k - r) % DIL_W == 0 and (k - r) // DIL_W < 3:
                        j = (k - r) // DIL_W
                        a00, a01, a02, a10, a11, a12, a20, a21, a22 = _add_tap(
                            a00, a01, a02, a10, a11, a12, a20, a21, a22, ii, j, _pick(gd0, gd1, gd2, gd3, r) * xf)
                        if STORE_D:
                            wv = tl.load(dwt_ptr + (ii * 3 + j) * K_SLOT + ci)  # zero past C: no mask
                            d0, d1, d2, d3 = _add_to(d0, d1, d2, d3, r, xf, wv)
                        wt = tl.load(dwt_ptr + ((2 - ii) * 3 + 2 - j) * K_SLOT + ci)
                        e0, e1, e2, e3 = _add_to(e0, e1, e2, e3, r, gf, wt)
        gx_rows = gx_ptr + first + offs
        _store_masked(gx_rows, e0, xc0, tile_ok, PRE_RELU)
        if RW > 1:
            _store_masked(gx_rows + C, e1, xc1, ok1, PRE_RELU)
        if RW > 2:
            _store_masked(gx_rows + 2 * C, e2, xc2, ok2, PRE_RELU)
        if RW > 3:
            _store_masked(gx_rows + 3 * C, e3, xc3, ok3, PRE_RELU)
        if STORE_D:
            _store_group(d_ptr + first + offs, d0, d1, d2, d3, tile_ok, ok1, ok2, ok3, C, RW)
        gcol, oh, n = _next_tile(gcol, oh, n, rem, qr, qn, groups, H)
    grad_dw = _put_taps(tl.zeros((16, BLOCK_C), dtype=tl.float32), taps, a00, a01, a02, a10, a11, a12, a20, a21,
                        a22)
    offs = s.to(tl.int64) * C * 9 + ci[None, :] * 9 + taps[:, None]
    tl.store(part_ptr + offs, grad_dw, mask=(taps < 9)[:, None] & c_ok[None, :])


# --- host side ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def exact_matmul(dtype: torch.dtype):
    """torch.matmul (cuBLAS) with the contract's arithmetic inside the block: fp32 operands multiplied
    in fp32 (no TF32), half operands accumulated in fp32 (no fp16 accumulation, no reduced-precision
    split-K reduction). Global cuBLAS flags are switched only where the caller set them otherwise,
    through the API the caller used (PyTorch refuses to read a TF32 flag set through the other one),
    and restored on the way out."""
    flags = torch.backends.cuda.matmul
    changed = []  # (flag, value to restore)
    if dtype == torch.float32:
        try:
            if flags.allow_tf32:  # set through the legacy API (or torch.set_float32_matmul_precision)
                changed.append(("allow_tf32", True))
        except RuntimeError:  # set through the new API, where reading the legacy flag is refused
            if flags.fp32_precision == "tf32":
                changed.append(("fp32_precision", "tf32"))
    else:
        name = "fp16" if dtype == torch.float16 else "bf16"
        reduced = f"allow_{name}_reduced_precision_reduction"
        if getattr(flags, reduced, False):  # (with split-K: PyTorch allows no other setting beside it)
            changed.append((reduced, True))
        if dtype == torch.float16 and getattr(flags, "allow_fp16_accumulation", False):
            changed.append(("allow_fp16_accumulation", True))
    for flag, _ in changed:
        setattr(flags, flag, "ieee" if flag == "fp32_precision" else False)
    try:
        yield
    finally:
        for flag, value in changed:
            setattr(flags, flag, value)


def _as_matrix(t: Tensor) -> Tensor:
    """A channels_last [N, C, H, W] tensor as its [N * H * W, C] matrix (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _weight_grad_product(gz: Tensor, d: Tensor, dtype: torch.dtype) -> Tensor:
    """grad_pw [Cout, C] = g_z^T @ d (both in the input dtype), accumulated in fp32 and rounded once to
    `dtype`, the weight's, as the reference's 1x1 convolution backward rounds it. Where the weight has
    the input's dtype (the only case the public ops accept) that is torch.matmul's own result; a wider
    weight dtype gets an fp32-output product: cuBLAS's `torch.mm(..., out_dtype=float32)` where this
    torch has it for the device, else the operands widened (their products are exact in fp32)."""
    with exact_matmul(gz.dtype):
        if dtype == gz.dtype:
            return torch.matmul(gz.t(), d)
        if gz.dtype in (torch.float16, torch.bfloat16) and gz.device.type == "cuda" and _HAS_MM_OUT_DTYPE:
            return torch.mm(gz.t(), d, out_dtype=torch.float32).to(dtype)
        return torch.matmul(gz.t().float(), d.float()).to(dtype)


_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # aten::mm.dtype (CUDA only; absent from older torch)


def _backward_convs(geo: Geometry, x: Tensor, dw: Tensor, pw: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                    pre_relu: bool, grad_z: Optional[Tensor],
                    d: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight) from g_z [N, Cout, Ho, Wo] channels_last in x's dtype.
    `d`: the depthwise output dw(pre(x)) rounded to x's dtype, where the caller already has it: [P, C]
    row-major, or a [P_pad, K_pitch] buffer whose first P rows and C columns are d (its pitch is kept:
    a view, no copy). Without it, the depthwise-gradient kernel stores d while it has the taps loaded."""
    device = x.device
    if geo.P == 0 or geo.C == 0 or geo.Cout == 0:
        return (empty_nhwc((geo.N, geo.C, geo.H, geo.W), x.dtype, device).zero_(),
                torch.zeros_like(dw_weight, memory_format=torch.contiguous_format),
                torch.zeros_like(pw_weight, memory_format=torch.contiguous_format))
    # grad_d [P, C] (the memory of an [N, C, Ho, Wo] channels_last tensor): rounded to x's dtype once,
    # as the reference's 1x1 convolution backward returns it.
    gz = _as_matrix(grad_z)
    with exact_matmul(x.dtype):
        grad_d = torch.matmul(gz, pw.view(geo.Cout, geo.C))

    dwt = depthwise_taps(dw, geo, taps_pitch(geo.C))
    store = None  # d, where a depthwise-gradient kernel stores it
    if d is None:
        d = store = new_empty((geo.P, geo.C), x.dtype, device)
    else:
        if d.dim() != 2 or d.shape[0] < geo.P or d.shape[1] < geo.C or d.stride(1) != 1 or d.dtype != x.dtype:
            raise ValueError(f"d must be a row-major [>= {geo.P}, >= {geo.C}] {x.dtype} matrix, got "
                             f"{d.dtype} {list(d.shape)} with strides {d.stride()}")
        d = d[:geo.P, :geo.C]
    if one_pass_width(geo):  # grad_x written beside d (one more [P, C] tensor live while grad_pw runs)
        grad_x = empty_nhwc((geo.N, geo.C, geo.H, geo.W), x.dtype, device)
        grad_dw = dw_backward_one_pass(geo, x, grad_d, dw_weight, pre_relu, dwt, grad_x, store)
        grad_pw = _weight_grad_product(gz, d, pw_weight.dtype).view(pw_weight.shape)
        return grad_x, grad_dw, grad_pw
    grad_dw = dw_weight_grad(geo, x, grad_d, dw_weight, pre_relu, dwt, store)
    grad_pw = _weight_grad_product(gz, d, pw_weight.dtype).view(pw_weight.shape)
    del d, store  # a stored d is freed before grad_x is allocated

    grad_x = empty_nhwc((geo.N, geo.C, geo.H, geo.W), x.dtype, device)
    dw_input_grad(geo, grad_d, dwt, x, grad_x, pre_relu)
    return grad_x, grad_dw, grad_pw


def one_pass_fits(kernel_size, stride, out_hw, in_hw) -> bool:
    """Whether `_dw_backward_kernel` covers the geometry: 3 x 3, unit stride, the output the input's size
    (the static model's plan asks too)."""
    return tuple(kernel_size) == (3, 3) and tuple(stride) == (1, 1) and tuple(out_hw) == tuple(in_hw)


def _one_pass_geometry(geo: Geometry) -> bool:
    return one_pass_fits((geo.KH, geo.KW), geo.stride, (geo.Ho, geo.Wo), (geo.H, geo.W))


def one_pass_width(geo: Geometry) -> int:
    """The group width RW `_dw_backward_kernel` runs for this geometry, 0 where the two kernels
    (`_dw_weight_grad_kernel`, `_dw_input_grad_kernel`) run instead. The kernel needs 3 x 3, unit stride
    and an output the size of the input (the padding equal to the dilation: every Xception unit). RW = 3
    reuses more loaded columns than 2 (7.6 SASS instructions per element-tap against 8.8, sm_90, bf16)
    but idles the lanes past a row's end in its last group. By the calibrated static estimate (sm_90
    model, benchmarks/NOTES.md "Triton depthwise backward in one pass"): RW = 3 beats the two kernels
    where at most 6% of its lanes idle (rows of 147, 74 and 37: 4-12%), RW = 2 where none idle (rows of
    10: 7-11%); rows of 19 (the middle flow: 10% idle at RW = 3, 5% at 2) lose 3-8% either way and
    keep the two kernels (the one pass is 26% faster there by the raw estimate, 33% less DRAM traffic)."""
    return one_pass_row_width(geo.W) if _one_pass_geometry(geo) else 0


def one_pass_row_width(width: int) -> int:
    """`one_pass_width` of a row `width` positions wide (the static model's plan calls it too)."""
    for rw, idle in ((3, 0.06), (2, 0.0)):
        lanes = triton.cdiv(width, rw) * rw
        if lanes - width <= idle * lanes:
            return rw
    return 0


def dw_backward_one_pass(geo: Geometry, x: Tensor, grad_d: Tensor, dw_weight: Tensor, pre_relu: bool, dwt: Tensor,
                         grad_x: Tensor, d: Optional[Tensor] = None, rw: Optional[int] = None) -> Tensor:
    """grad of the depthwise weight (returned, shaped and typed as dw_weight) and grad_x (written into
    grad_x [N, C, H, W] channels_last), d = dw(pre(x)) stored into d [P, C] where given, in one pass over
    x and grad_d [P, C] (`_dw_backward_kernel`) in groups of `rw` positions (default `one_pass_width`;
    any of 1-4 for a geometry it accepts). d comes out bitwise as the two kernels store it, grad_dw too in
    groups of 4 (their groups); grad_x sums its taps in the reverse order. As deterministic: a fixed
    split, then `batchnorm.sum_rows`."""
    rw = rw or one_pass_width(geo)
    assert _one_pass_geometry(geo) and 1 <= rw <= 4, "3 x 3, unit stride, 'same' output; groups of 1-4"
    device, c = x.device, geo.C
    store_d = d is not None
    block_p, block_c = ONE_PASS_BLOCK_P, ONE_PASS_BLOCK_C
    rows = geo.N * geo.H * triton.cdiv(geo.W, rw)
    regs, ctas = one_pass_cap(x.dtype, rw) if device.type == "cuda" and device_arch(device) >= 90 else (0, None)
    splits, chunk = weight_grad_split(rows, triton.cdiv(c, block_c), device, ctas or DW_CTAS_PER_SM)
    part = new_empty((splits, c, 9), torch.float32, device)
    assert dwt.shape[1] % block_c == 0 and dwt.shape[1] >= c, "the taps' pitch must be taps_pitch(C)"
    cap = dict(maxnreg=regs) if regs else {}
    _dw_backward_kernel[(splits * triton.cdiv(c, block_c),)](
        x, grad_d, part, dwt, d if store_d else grad_d, grad_x, rows, chunk, geo.H, geo.W, c, dwt.shape[1],
        geo.dilation[0], PRE_RELU=bool(pre_relu), ASM=INLINE_ASM and device.type == "cuda",
        STORE_D=store_d, BLOCK_P=block_p, BLOCK_C=block_c, RW=rw, DIL_W=geo.dilation[1],
        WIDE=_wide_weight_grad(geo, chunk, rw), num_warps=DW_WARPS, **cap)
    return batchnorm.sum_rows(part.view(splits, -1), dw_weight.dtype).view(dw_weight.shape)


def dw_weight_grad(geo: Geometry, x: Tensor, grad_d: Tensor, dw_weight: Tensor, pre_relu: bool,
                   dwt: Optional[Tensor] = None, d: Optional[Tensor] = None) -> Tensor:
    """grad of the depthwise weight (shaped and typed as dw_weight) from grad_d [P, C] in x's dtype;
    with d [P, C] given, d = dw(pre(x)) is stored there too (dwt: `depthwise_taps(dw, geo, taps_pitch(C))`)."""
    device, c, kk = x.device, geo.C, geo.KH * geo.KW
    store_d = d is not None
    block_p, block_c, rw = DW_BLOCKS[store_d]
    # 3 x 3 splits groups of rw outputs along a row (the kernel's P and chunk count groups), else positions.
    rw = rw if geo.KH == 3 and geo.KW == 3 else 1
    rows = geo.N * geo.Ho * triton.cdiv(geo.Wo, rw) if rw > 1 else geo.P
    splits, chunk = weight_grad_split(rows, triton.cdiv(c, block_c), device)
    part = new_empty((splits, c, kk), torch.float32, device)
    if store_d:
        assert dwt.shape[1] % block_c == 0 and dwt.shape[1] >= c, "the taps' pitch must be taps_pitch(C)"
    _dw_weight_grad_kernel[(splits * triton.cdiv(c, block_c),)](
        x, grad_d, part, dwt if store_d else part, d if store_d else grad_d, rows, chunk, geo.H, geo.W, c, geo.Ho,
        geo.Wo, dwt.shape[1] if store_d else c, *geo.conv_args(), KH=geo.KH, KW=geo.KW,
        KK_PAD=triton.next_power_of_2(kk), PRE_RELU=bool(pre_relu), ASM=INLINE_ASM and device.type == "cuda",
        STORE_D=store_d, BLOCK_P=block_p, BLOCK_C=block_c, RW=rw,
        STRIDE_W=geo.stride[1], DIL_W=geo.dilation[1], WIDE=rw > 1 and _wide_weight_grad(geo, chunk, rw),
        num_warps=DW_WARPS)
    return batchnorm.sum_rows(part.view(splits, -1), dw_weight.dtype).view(dw_weight.shape)


def weight_grad_split(rows: int, channel_blocks: int, device: torch.device,
                      ctas_per_sm: int = DW_CTAS_PER_SM) -> tuple[int, int]:
    """(splits, chunk) of `_dw_weight_grad_kernel` (and `_dw_backward_kernel`): `splits` programs along the
    rows (groups or positions), each owning `chunk` consecutive ones (a multiple of POSITION_ALIGN), times
    `channel_blocks`: one wave of as many programs as fit resident (`ctas_per_sm` per SM). Fixed by the
    shape, so that the partial buffer has a known size and the reduction order a fixed one."""
    return persistent_split(rows, max(1, sm_count(device) * ctas_per_sm // max(channel_blocks, 1)))


def one_pass_cap(dtype: torch.dtype, rw: int) -> tuple[int, int]:
    """(maxnreg, resident programs per SM) of `_dw_backward_kernel` on sm_90 for x's dtype and groups of rw."""
    regs = ONE_PASS_MAXNREG[dtype][rw >= 3]
    return regs, min(DW_CTAS_PER_SM, 65536 // (regs * 32 * DW_WARPS))


def _wide_weight_grad(geo: Geometry, chunk: int, rw: int) -> bool:
    """Whether `_dw_weight_grad_kernel` (3 x 3) needs int64 offsets: a program's offsets run from its first
    image over the images its `chunk` groups of `rw` outputs span (plus one for a last partial tile and
    the halo), in x and in grad_d and d."""
    images = min(geo.N, chunk // max(triton.cdiv(geo.Wo, rw) * geo.Ho, 1) + 3)
    x_span = (images * geo.H + 2 * geo.dilation[0] + geo.padding[0] + 1) * (geo.W + geo.padding[1] + 1) * geo.C
    out_span = images * geo.Ho * geo.Wo * geo.C
    return max(x_span, out_span) >= 2 ** 31


def dw_backward(geo: Geometry, x: Tensor, dw: Tensor, dw_weight: Tensor, grad_d: Tensor,
                pre_relu: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_dw_weight) from grad_d [P, C] in x's dtype; x, dw as `_prepare` returns them."""
    dwt = depthwise_taps(dw, geo, taps_pitch(geo.C))
    grad_x = empty_nhwc((geo.N, geo.C, geo.H, geo.W), x.dtype, x.device)
    if one_pass_width(geo):
        return grad_x, dw_backward_one_pass(geo, x, grad_d, dw_weight, pre_relu, dwt, grad_x)
    grad_dw = dw_weight_grad(geo, x, grad_d, dw_weight, pre_relu)
    dw_input_grad(geo, grad_d, dwt, x, grad_x, pre_relu)
    return grad_x, grad_dw


def dw_input_grad(geo: Geometry, grad_d: Tensor, dwt: Tensor, x: Tensor, grad_x: Tensor, pre_relu: bool) -> None:
    """grad_x [N, C, H, W] channels_last = the transposed depthwise of grad_d [N, Ho, Wo, C] (x's dtype),
    through the pre-ReLU's mask; dwt: `depthwise_taps(dw, geo, taps_pitch(C))`."""
    q = geo.N * geo.H * geo.W
    assert dwt.shape[1] % TAPS_ALIGN == 0 and dwt.shape[1] >= geo.C, "the taps' pitch must be taps_pitch(C)"

    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = geo.stride, geo.padding, geo.dilation
    unit = stride_h == 1 and stride_w == 1  # groups of RW inputs along a row; else one input per row of a tile

    def grid_x(meta):
        rows = triton.cdiv(geo.N * geo.H * triton.cdiv(geo.W, meta["RW"]) if unit else q, meta["BLOCK_P"])
        return (rows, triton.cdiv(geo.C, meta["BLOCK_C"]))

    _dw_input_grad_kernel[grid_x](grad_d, dwt, x, grad_x, q, position_bucket(q), geo.H, geo.W, geo.C, geo.Ho, geo.Wo,
                                  dwt.shape[1], pad_h, pad_w, dil_h, KH=geo.KH, KW=geo.KW, STRIDE_H=stride_h,
                                  STRIDE_W=stride_w, DIL_W=dil_w, PRE_RELU=bool(pre_relu),
                                  ASM=INLINE_ASM and grad_d.device.type == "cuda")


def sepconv_bn_train_backward(grad_y: Tensor, x: Tensor, z: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                              mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                              mean_dy: Tensor, mean_dy_xhat: Tensor, spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight); g_z stored once in the input dtype, then read."""
    geo, xc, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    check_dtype(z)
    c = geo.Cout
    vec = [vector_f32(v, c, fill, x.device) for v, fill in
           ((mean, 0.0), (invstd, 1.0), (bn_weight, 1.0), (bn_bias, 0.0), (mean_dy, 0.0), (mean_dy_xhat, 0.0))]
    grad_z = batchnorm.grad_z(nhwc(grad_y), nhwc(z.to(x.dtype)), *vec, spec.post_relu)
    return _backward_convs(geo, xc, dw, pw, dw_weight, pw_weight, spec.pre_relu, grad_z)


def sepconv_bn_infer_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                              scale: Optional[Tensor], shift: Optional[Tensor],
                              spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight, grad_scale, grad_shift); absent scale/shift give empty
    [0] gradients. Only x is saved by the forward, so z is recomputed when the mask or grad_scale need it."""
    geo, xc, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    pre_relu, post_relu = spec.pre_relu, spec.post_relu
    device, c = x.device, geo.Cout
    gy = nhwc(grad_y)
    scale32, shift32 = vector_f32(scale, c, 1.0, device), vector_f32(shift, c, 0.0, device)
    d = None  # the depthwise output, where the recompute of z already made it
    if geo.P == 0 or c == 0:
        sums = torch.zeros((2, c), dtype=torch.float32, device=device)
        grad_z = None
    elif post_relu or scale is not None:
        grad_z, sums, d = recompute_grad_z(gy, xc, dw, pw, geo, scale32, shift32, pre_relu, post_relu)
    else:  # g_z = grad_y: nothing to recompute; grad_shift (if wanted) is a plain sum of grad_y
        grad_z = nhwc(gy.to(x.dtype))
        if shift is not None:
            ones = torch.ones((c,), dtype=torch.float32, device=device)
            zeros = torch.zeros((c,), dtype=torch.float32, device=device)
            sums = torch.stack(batchnorm.dy_sums(gy, gy, zeros, ones, ones, zeros, False))
        else:
            sums = None
    grad_x, grad_dw, grad_pw = _backward_convs(geo, xc, dw, pw, dw_weight, pw_weight, pre_relu, grad_z, d)
    empty = x.new_empty((0,))
    grad_scale = sums[1].to(scale.dtype, copy=True) if scale is not None else empty
    grad_shift = sums[0].to(shift.dtype, copy=True) if shift is not None else empty
    return grad_x, grad_dw, grad_pw, grad_scale, grad_shift
