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
from .autotune import INTERPRET, dw_input_grad_configs, position_bucket, position_split
from .depthwise_pointwise import Geometry, _pre_f32, _prepare, _tap_rows, depthwise_taps, recompute_grad_z
from .utils import INLINE_ASM, channel_align, check_dtype, empty_nhwc, new_empty, nhwc, vector_f32


# --- kernels --------------------------------------------------------------------------------------------

# Fixed blocks (BLOCK_P, BLOCK_C) of the depthwise weight gradient (its position split must not depend on
# an autotuned config), by STORE_D: 3 x 3 keeps 9 fp32 accumulators of a tile in registers, 10 with d.
# With d stored, 16 x 32 compiles to 128 registers on sm_90 (four 4-warp CTAs per SM) where 16 x 64 needs
# 172 (two); without d, 16 x 64 fits 128 (calibrated static estimate (sm_90 model): benchmarks/NOTES.md).
DW_BLOCKS = {True: (32, 16), False: (32, 16)} if INTERPRET else {True: (16, 32), False: (16, 64)}


def taps_pitch(channels: int) -> int:
    """Row pitch of the depthwise taps the backward passes (`depthwise_taps(dw, geo, taps_pitch(C))`):
    C rounded up to the stored-d channel block, so `_dw_weight_grad_kernel` loads them unmasked."""
    block = DW_BLOCKS[True][1]
    return triton.cdiv(channels, block) * block


@triton.jit
def _split_channel_block(C, BLOCK_C: tl.constexpr):
    """(s, c0, ci) of a split-reduction program (program id = s * channel blocks + block): its split
    s, the first channel c0 of its block and the block's channels ci."""
    c_tiles = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    s, c0 = pid // c_tiles, (pid % c_tiles) * BLOCK_C
    return s, c0, c0 + tl.arange(0, BLOCK_C)


@triton.jit
def _tap(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr, K_SLOT, i: tl.constexpr,
         j: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr, ASM: tl.constexpr, STORE_D: tl.constexpr):
    """(gd * pre(x) under tap (i, j) of each position, d + that tap's term if STORE_D), [BLOCK_P,
    BLOCK_C] fp32, zero outside the image. d sums the taps from zero in the order of the forward's
    `depthwise_pointwise._depthwise_kernel`."""
    ih = ih0 + i * dil_h
    iw = iw0 + j * dil_w
    ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    xv = tl.load(x_rows[:, None] + ((i * dil_h * W + j * dil_w) * C + ci)[None, :], mask=ok[:, None] & c_ok[None, :],
                 other=0.0)
    xv = _pre_f32(xv, PRE_RELU, ASM)
    if STORE_D:
        d += xv * tl.load(dwt_ptr + (i * KW + j) * K_SLOT + ci)[None, :]  # zero past C: no mask
    return gd * xv, d


@triton.jit
def _grad_tile(x_ptr, gd_ptr, p0, p_end, ci, c_ok, H, W, C, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
               BLOCK_P: tl.constexpr):
    """`_tap_rows` of positions [p0, p0 + BLOCK_P) (below p_end), then their grad_d tile [BLOCK_P, BLOCK_C] fp32."""
    x_rows, ih0, iw0, p_mask = _tap_rows(x_ptr, p0, p_end, H, W, C, Ho, Wo, stride_h, stride_w, pad_h, pad_w, BLOCK_P)
    p = p0 + tl.arange(0, BLOCK_P)
    gd = tl.load(gd_ptr + p.to(tl.int64)[:, None] * C + ci[None, :], mask=p_mask[:, None] & c_ok[None, :],
                 other=0.0).to(tl.float32)
    return x_rows, ih0, iw0, p_mask, gd


@triton.jit
def _put(grad_dw, taps, t: tl.constexpr, acc):
    """Row t of grad_dw [KK_PAD, BLOCK_C] = acc [BLOCK_P, BLOCK_C] summed over its rows."""
    return tl.where(taps[:, None] == t, tl.sum(acc, axis=0)[None, :], grad_dw)


@triton.jit
def _tap_row(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr, K_SLOT, i: tl.constexpr,
             PRE_RELU: tl.constexpr, ASM: tl.constexpr, STORE_D: tl.constexpr, a0, a1, a2):
    """Row i of a 3 x 3 kernel: its three taps' products added to their register accumulators (and
    to d where it is stored)."""
    t, d = _tap(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr, K_SLOT, i, 0, 3,
                PRE_RELU, ASM,
                STORE_D)
    a0 += t
    t, d = _tap(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr, K_SLOT, i, 1, 3,
                PRE_RELU, ASM,
                STORE_D)
    a1 += t
    t, d = _tap(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr, K_SLOT, i, 2, 3,
                PRE_RELU, ASM,
                STORE_D)
    a2 += t
    return d, a0, a1, a2


@triton.jit
def _store_d(d_ptr, d, p0, p_mask, ci, c_ok, C, STORE_D: tl.constexpr, BLOCK_P: tl.constexpr):
    if STORE_D:
        p = p0 + tl.arange(0, BLOCK_P)
        tl.store(d_ptr + p.to(tl.int64)[:, None] * C + ci[None, :], d.to(d_ptr.dtype.element_ty),
                 mask=p_mask[:, None] & c_ok[None, :])


@triton.jit
def _dw_weight_grad_kernel(
    # pointers
    x_ptr,  # [N, H, W, C] input (channels_last)
    gd_ptr,  # [P, C] grad of the depthwise output
    part_ptr,  # [S, C, KH * KW] fp32 out: per split, grad of the depthwise weight
    dwt_ptr,  # [KH * KW, K_SLOT] fp32 depthwise taps, zero past C (read only if STORE_D)
    d_ptr,  # [P, C] out (only if STORE_D): the depthwise output d, input dtype, for grad_pw
    # sizes (K_SLOT: the taps' row pitch, a multiple of BLOCK_C)
    P, chunk, H, W, C, Ho, Wo, K_SLOT,
    # convolution
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, KK_PAD: tl.constexpr, PRE_RELU: tl.constexpr, ASM: tl.constexpr,
    C_ALIGN: tl.constexpr, STORE_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grad_dw[c, tap] = sum_p grad_d[p, c] * pre(x)[tap of p, c]: a split reduction over positions
    # (deterministic: fixed splits, then `batchnorm.sum_rows`). For 3 x 3 (Xception's), one register
    # accumulator per tap and one cross-warp reduction per tap per program; other kernel sizes reduce
    # each tile's products (a reduction per tap per tile: 36 barriers per tile on sm_90).
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    s, c0, ci = _split_channel_block(C, BLOCK_C)
    c_ok = ci < C
    p_end = tl.minimum(s * chunk + chunk, P)
    taps = tl.arange(0, KK_PAD)
    grad_dw = tl.zeros((KK_PAD, BLOCK_C), dtype=tl.float32)  # row t: tap t = i * KW + j
    if KH == 3 and KW == 3:
        a00 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        a01, a02, a10, a11, a12, a20, a21, a22 = a00, a00, a00, a00, a00, a00, a00, a00
        for p0 in range(s * chunk, p_end, BLOCK_P):
            x_rows, ih0, iw0, p_mask, gd = _grad_tile(x_ptr, gd_ptr, p0, p_end, ci, c_ok, H, W, C, Ho, Wo, stride_h,
                                                      stride_w, pad_h, pad_w, BLOCK_P)
            d = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            d, a00, a01, a02 = _tap_row(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr,
                                        K_SLOT, 0,
                                        PRE_RELU, ASM, STORE_D, a00, a01, a02)
            d, a10, a11, a12 = _tap_row(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr,
                                        K_SLOT, 1,
                                        PRE_RELU, ASM, STORE_D, a10, a11, a12)
            d, a20, a21, a22 = _tap_row(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr,
                                        K_SLOT, 2,
                                        PRE_RELU, ASM, STORE_D, a20, a21, a22)
            _store_d(d_ptr, d, p0, p_mask, ci, c_ok, C, STORE_D, BLOCK_P)
        grad_dw = _put(_put(_put(grad_dw, taps, 0, a00), taps, 1, a01), taps, 2, a02)
        grad_dw = _put(_put(_put(grad_dw, taps, 3, a10), taps, 4, a11), taps, 5, a12)
        grad_dw = _put(_put(_put(grad_dw, taps, 6, a20), taps, 7, a21), taps, 8, a22)
    else:
        for p0 in range(s * chunk, p_end, BLOCK_P):
            x_rows, ih0, iw0, p_mask, gd = _grad_tile(x_ptr, gd_ptr, p0, p_end, ci, c_ok, H, W, C, Ho, Wo, stride_h,
                                                      stride_w, pad_h, pad_w, BLOCK_P)
            d = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for i in tl.static_range(KH):
                for j in tl.static_range(KW):
                    t, d = _tap(gd, d, x_rows, ih0, iw0, p_mask, ci, c_ok, H, W, C, dil_h, dil_w, dwt_ptr, K_SLOT, i, j,
                                KW,
                                PRE_RELU, ASM, STORE_D)
                    grad_dw = tl.where(taps[:, None] == i * KW + j, grad_dw + tl.sum(t, axis=0)[None, :], grad_dw)
            _store_d(d_ptr, d, p0, p_mask, ci, c_ok, C, STORE_D, BLOCK_P)
    offs = s.to(tl.int64) * C * (KH * KW) + ci[None, :] * (KH * KW) + taps[:, None]
    tl.store(part_ptr + offs, grad_dw, mask=(taps < KH * KW)[:, None] & c_ok[None, :])


@triton.autotune(configs=dw_input_grad_configs(), key=["C", "Q_BUCKET", "KH", "KW", "STRIDE_H", "STRIDE_W"])
@triton.jit
def _dw_input_grad_kernel(
    # pointers
    gd_ptr,  # [N, Ho, Wo, C] grad of the depthwise output
    dwt_ptr,  # [KH * KW, K_SLOT] fp32 depthwise taps (tap-major: one contiguous vector load per tap)
    x_ptr,  # [N, H, W, C] input (read only if PRE_RELU, for its mask)
    gx_ptr,  # [N, H, W, C] out: grad of x
    # sizes
    Q, Q_BUCKET, H, W, C, Ho, Wo, K_SLOT,  # Q_BUCKET: the autotuning key only; K_SLOT: the taps' row pitch
    # convolution (the strides are compile-time: Xception's are 1 and 2)
    pad_h, pad_w, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PRE_RELU: tl.constexpr,
    C_ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    # Each input position gathers from the outputs whose window covers it: oh * stride - pad + i * dil
    # = ih, for each tap (i, j). Written as a gather so that no two programs write one element.
    c_tiles = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    pid_q, pid_c = pid // c_tiles, pid % c_tiles
    q = pid_q * BLOCK_P + tl.arange(0, BLOCK_P)
    q_mask = q < Q
    n = q // (H * W)
    r = q - n * (H * W)
    ih = r // W
    iw = r - ih * W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # Tap (i, j) reads output row (ih + pad_h - i * dil_h) / STRIDE_H, where that divides. With unit
    # strides, each tap is a scalar offset from one row pointer per position (as in the forward).
    g_rows = gd_ptr + ((n.to(tl.int64) * Ho + (ih + pad_h) // STRIDE_H) * Wo + (iw + pad_w) // STRIDE_W) * C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KH):
        th = ih + pad_h - i * dil_h
        th_c = tl.maximum(th, 0)  # non-negative before // and %, whose sign rules differ by backend
        oh = th_c // STRIDE_H
        ok_h = q_mask & (th >= 0) & (oh < Ho)
        if STRIDE_H != 1:
            ok_h = ok_h & (th_c - oh * STRIDE_H == 0)
        for j in tl.static_range(KW):
            tw = iw + pad_w - j * dil_w
            tw_c = tl.maximum(tw, 0)
            ow = tw_c // STRIDE_W
            ok = ok_h & (tw >= 0) & (ow < Wo)
            if STRIDE_W != 1:
                ok = ok & (tw_c - ow * STRIDE_W == 0)
            if STRIDE_H == 1 and STRIDE_W == 1:
                ptrs = g_rows[:, None] + (c - (i * dil_h * Wo + j * dil_w) * C)[None, :]
            else:
                ptrs = gd_ptr + ((n.to(tl.int64) * Ho + oh) * Wo + ow)[:, None] * C + c[None, :]
            g = tl.load(ptrs, mask=ok[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(dwt_ptr + (i * KW + j) * K_SLOT + c, mask=c_mask, other=0.0)
            acc += g.to(tl.float32) * wv[None, :]
    offs = q.to(tl.int64)[:, None] * C + c[None, :]
    mask = q_mask[:, None] & c_mask[None, :]
    if PRE_RELU:
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0)
        acc = tl.where(xv > 0, acc, 0.0)
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


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
    a view, no copy). Without it, `_dw_weight_grad_kernel` stores d while it has the taps loaded."""
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
    if d is None:
        d = new_empty((geo.P, geo.C), x.dtype, device)
        grad_dw = dw_weight_grad(geo, x, grad_d, dw_weight, pre_relu, dwt, d)
    else:
        if d.dim() != 2 or d.shape[0] < geo.P or d.shape[1] < geo.C or d.stride(1) != 1 or d.dtype != x.dtype:
            raise ValueError(f"d must be a row-major [>= {geo.P}, >= {geo.C}] {x.dtype} matrix, got "
                             f"{d.dtype} {list(d.shape)} with strides {d.stride()}")
        d = d[:geo.P, :geo.C]
        grad_dw = dw_weight_grad(geo, x, grad_d, dw_weight, pre_relu)
    grad_pw = _weight_grad_product(gz, d, pw_weight.dtype).view(pw_weight.shape)
    del d  # a stored d is freed before grad_x is allocated

    grad_x = empty_nhwc((geo.N, geo.C, geo.H, geo.W), x.dtype, device)
    dw_input_grad(geo, grad_d, dwt, x, grad_x, pre_relu)
    return grad_x, grad_dw, grad_pw


def dw_weight_grad(geo: Geometry, x: Tensor, grad_d: Tensor, dw_weight: Tensor, pre_relu: bool,
                   dwt: Optional[Tensor] = None, d: Optional[Tensor] = None) -> Tensor:
    """grad of the depthwise weight (shaped and typed as dw_weight) from grad_d [P, C] in x's dtype;
    with d [P, C] given, d = dw(pre(x)) is stored there too (dwt: `depthwise_taps(dw, geo, taps_pitch(C))`)."""
    device, c, kk = x.device, geo.C, geo.KH * geo.KW
    store_d = d is not None
    block_p, block_c = DW_BLOCKS[store_d]
    splits, chunk = position_split(geo.P, triton.cdiv(c, block_c), device)
    part = new_empty((splits, c, kk), torch.float32, device)
    if store_d:
        assert dwt.shape[1] % block_c == 0 and dwt.shape[1] >= c, "the taps' pitch must be taps_pitch(C)"
    _dw_weight_grad_kernel[(splits * triton.cdiv(c, block_c),)](
        x, grad_d, part, dwt if store_d else part, d if store_d else grad_d, geo.P, chunk, geo.H, geo.W, c, geo.Ho,
        geo.Wo, dwt.shape[1] if store_d else c, *geo.conv_args(), KH=geo.KH, KW=geo.KW,
        KK_PAD=triton.next_power_of_2(kk), PRE_RELU=bool(pre_relu), ASM=INLINE_ASM and device.type == "cuda",
        C_ALIGN=channel_align(c), STORE_D=store_d, BLOCK_P=block_p, BLOCK_C=block_c)
    return batchnorm.sum_rows(part.view(splits, -1), dw_weight.dtype).view(dw_weight.shape)


def dw_backward(geo: Geometry, x: Tensor, dw: Tensor, dw_weight: Tensor, grad_d: Tensor,
                pre_relu: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_dw_weight) from grad_d [P, C] in x's dtype; x, dw as `_prepare` returns them."""
    grad_dw = dw_weight_grad(geo, x, grad_d, dw_weight, pre_relu)
    grad_x = empty_nhwc((geo.N, geo.C, geo.H, geo.W), x.dtype, x.device)
    dw_input_grad(geo, grad_d, depthwise_taps(dw, geo, geo.C), x, grad_x, pre_relu)
    return grad_x, grad_dw


def dw_input_grad(geo: Geometry, grad_d: Tensor, dwt: Tensor, x: Tensor, grad_x: Tensor, pre_relu: bool) -> None:
    """grad_x [N, C, H, W] channels_last = the transposed depthwise of grad_d [N, Ho, Wo, C] (x's dtype),
    through the pre-ReLU's mask; dwt: `depthwise_taps(dw, geo, width)`, any width >= C."""
    q = geo.N * geo.H * geo.W

    def grid_x(meta):
        return (triton.cdiv(q, meta["BLOCK_P"]) * triton.cdiv(geo.C, meta["BLOCK_C"]),)

    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = geo.stride, geo.padding, geo.dilation
    _dw_input_grad_kernel[grid_x](grad_d, dwt, x, grad_x, q, position_bucket(q), geo.H, geo.W, geo.C, geo.Ho, geo.Wo,
                                  dwt.shape[1], pad_h, pad_w, dil_h, dil_w, KH=geo.KH, KW=geo.KW, STRIDE_H=stride_h,
                                  STRIDE_W=stride_w, PRE_RELU=bool(pre_relu), C_ALIGN=channel_align(geo.C))


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
