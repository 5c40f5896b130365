"""The mid variant in Triton: dw -> mid BN -> act -> pw -> BN, the aligned Xception / MobileNet V1 unit.

The four functions of `xception_fast.reference` for `UnitSpec.mid` (`sepconv_mid_*`):
- inference: the base variant's two launches, the depthwise kernel applying the folded bias and
  the activation to its tile in registers before it stores d, the pointwise operand (`mid_act`).
- training forward: `_depthwise_stats_kernel` reads x once and writes per-split partial statistics
  of the depthwise output (rounded to the input dtype, as the unfused path stores it), in the format
  of the pointwise statistics, merged by Chan's formula in `batchnorm.merge_statistics`; nothing
  else is stored. Then the depthwise kernel normalises with them and activates its tile as it
  stores the pointwise operand, and the GEMM kernel with the statistics epilogue runs on it.
- backward: the depthwise output t and the operand a = act(midBN(t)) are recomputed from x once
  (`_mid_recompute_kernel`: two temporaries [P, C] for the length of the backward, where the unfused
  module keeps d and a saved from the forward); the two pointwise products are plain GEMMs on them
  (torch.matmul: cuBLAS, nothing for Triton to fuse there); `_mid_act_grad_kernel` applies the
  activation's derivative; the mid BatchNorm's backward is `batchnorm.dy_sums` + `batchnorm.grad_z`
  (the pointwise BatchNorm's kernels, with t as the normalised input); `backward.dw_backward` (the
  base variant's `_dw_weight_grad_kernel` and `_dw_input_grad_kernel`) the depthwise gradients.
Rounding follows the reference: t, u = midBN(t), a, grad_a, grad_u and grad_d in the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from xception_fast.spec import UnitSpec

from . import batchnorm
from .autotune import INTERPRET, device_arch, elementwise_configs, position_split
from .backward import _as_matrix, _split_channel_block, dw_backward, exact_matmul
from .depthwise_pointwise import (Geometry, _pre_f32, _prepare, _tap_rows, depthwise, depthwise_taps, empty_forward,
                                  recompute_grad_z, sepconv_bn_infer, slot_width, train_gemm)
from .mid_act import BN_BATCH, BN_BIAS, BN_NONE, mid_act, mid_act_grad, mid_input, mid_normalize
from .utils import INLINE_ASM, channel_align, check_dtype, empty_nhwc, new_empty, nhwc, vector_f32

# Fixed blocks of the kernels whose position split must not depend on an autotuned config. The
# statistics pass keeps two fp32 accumulators of a tile in registers besides the depthwise's; with the
# kernel rows rolled (`_depthwise_tile`) 64 x 32 (16 elements a thread: each tap's weights and a tile's
# index arithmetic shared by two positions) fits 128 registers, 4 CTAs per SM on sm_90; 16 x 64 took
# 66 registers but 20% more instructions, 64 x 64 240 registers (static estimate (sm_90 model),
# benchmarks/NOTES.md).
STATS_BLOCK_P, STATS_BLOCK_C = (32, 16) if INTERPRET else (64, 32)
# `_depthwise_stats_kernel`'s register cap on sm_90. Uncapped, ptxas settles on 96 registers and spills 8 B in
# fp16 with the inline-PTX pre-ReLU; a cap makes it use what it needs (fp16 126, bf16 128: no spill, four
# CTAs per SM either way). Checked by tests/test_triton_static.py.
STATS_MAXNREG = 128


# --- kernels --------------------------------------------------------------------------------------------

@triton.jit
def _depthwise_tile(x_rows, ih0, iw0, p_mask, dwt_ptr, c0, C, H, W, K_PAD, dil_h, dil_w,
                    KH: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr, ASM: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """d for BLOCK_P positions x channels [c0, c0 + BLOCK_C) in fp32, zero past C (the statistics and
    recompute kernels): each output sums its taps from zero in the order (i, j) in fp32 FMAs, as the
    unfused path and `_depthwise_kernel` do. x_rows (`_tap_rows`) points at channel 0 of each
    position's top-left tap (outside the image at the border: those taps are masked); the taps are
    int32 offsets from it (a window spans KH * dil_h rows of one image). The kernel-row loop is a
    run-time loop on purpose: unrolled, the compiler hoists every tap's load and weights (168-216
    registers on sm_90). A row's mask (positions, channels) is built once per kernel row, one unsigned
    compare testing both bounds (a negative index wraps above H or W)."""
    ci = c0 + tl.arange(0, BLOCK_C)
    c_ok = (ci < C)[None, :]
    offs = ci[None, :]
    d = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # A bound the compiler cannot see is KH (K_PAD >= 256 > KH, `_pad`): with a constant 3 it unrolls
    # the short loop of a plain (no pre-ReLU) 3x3 back into the hoisted form.
    for i in tl.range(tl.minimum(K_PAD, KH)):
        ih = ih0 + i * dil_h
        row_ok = (p_mask & (ih.to(tl.uint32, bitcast=True) < H))[:, None] & c_ok
        row_offs = offs + i * dil_h * W * C
        for j in tl.static_range(KW):
            col_ok = ((iw0 + j * dil_w).to(tl.uint32, bitcast=True) < W)[:, None]
            xv = tl.load(x_rows[:, None] + (row_offs + j * dil_w * C), mask=row_ok & col_ok, other=0.0)
            wv = tl.load(dwt_ptr + (i * KW + j) * K_PAD + ci)  # fp32, zero-padded to K_PAD: no mask
            d += _pre_f32(xv, PRE_RELU, ASM) * wv[None, :]
    return d


@triton.jit
def _depthwise_stats_kernel(
    x_ptr,  # [N, H, W, C] input (channels_last)
    dwt_ptr,  # [KH * KW, K_PAD] fp32 depthwise taps, zero past C
    stats_ptr,  # [3, S, C] fp32 out: per split, (reference value, mean - reference value, M2)
    P, chunk, H, W, C, Ho, Wo, K_PAD, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr, ASM: tl.constexpr, C_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (s, channel block): the positions of split s, in row s of the partial statistics (the
    # format `batchnorm.merge_statistics` merges). Sums of the deviations from a reference value ref
    # (the mean of the split's first tile, so that |mean| >> std costs no precision) and of their
    # squares accumulate elementwise in registers: one cross-warp reduction per program, not per tile.
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    s, c0, ci = _split_channel_block(C, BLOCK_C)
    p_begin = s * chunk
    p_end = tl.minimum(p_begin + chunk, P)
    x_rows, ih0, iw0, p_mask = _tap_rows(x_ptr, p_begin, p_end, H, W, C, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
                                         BLOCK_P)
    d = _depthwise_tile(x_rows, ih0, iw0, p_mask, dwt_ptr, c0, C, H, W, K_PAD, dil_h, dil_w,
                        KH, KW, PRE_RELU, ASM, BLOCK_P, BLOCK_C)
    # Statistics of d rounded to the input dtype, as the unfused path stores it.
    d = d.to(x_ptr.dtype.element_ty).to(tl.float32)
    ref = tl.sum(tl.where(p_mask[:, None], d, 0.0), axis=0) / tl.minimum(p_end - p_begin, BLOCK_P).to(tl.float32)
    s1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        x_rows, ih0, iw0, p_mask = _tap_rows(x_ptr, p0, p_end, H, W, C, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
                                             BLOCK_P)
        d = _depthwise_tile(x_rows, ih0, iw0, p_mask, dwt_ptr, c0, C, H, W, K_PAD, dil_h, dil_w,
                            KH, KW, PRE_RELU, ASM, BLOCK_P, BLOCK_C)
        dev = tl.where(p_mask[:, None], d.to(x_ptr.dtype.element_ty).to(tl.float32) - ref[None, :], 0.0)
        s1 += dev
        s2 += dev * dev
    n = (p_end - p_begin).to(tl.float32)
    t1 = tl.sum(s1, axis=0)
    offset = t1 / n
    m2 = tl.maximum(tl.sum(s2, axis=0) - t1 * offset, 0.0)
    c_ok = ci < C
    out = stats_ptr + s * C + ci
    tl.store(out, ref, mask=c_ok)
    tl.store(out + S * C, offset, mask=c_ok)
    tl.store(out + 2 * S * C, m2, mask=c_ok)


@triton.autotune(configs=elementwise_configs(), key=["C", "KH", "KW"])
@triton.jit
def _mid_recompute_kernel(
    x_ptr,  # [N, H, W, C] input (channels_last)
    dwt_ptr,  # [KH * KW, K_PAD] fp32 depthwise taps, zero past C
    mid_ptr,  # [3, K_PAD] fp32 (mean, gain, shift), zero past C
    t_ptr,  # [P, C] out: the depthwise output (+ the folded bias), input dtype
    a_ptr,  # [P, C] out: act(midBN(t)), the pointwise input, input dtype
    P, H, W, C, Ho, Wo, K_PAD,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr, MID_BN: tl.constexpr, MID_ACT: tl.constexpr,
    ASM: tl.constexpr, C_ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    p0 = tl.program_id(0) * BLOCK_P
    c0 = tl.program_id(1) * BLOCK_C
    ci = c0 + tl.arange(0, BLOCK_C)
    x_rows, ih0, iw0, p_mask = _tap_rows(x_ptr, p0, P, H, W, C, Ho, Wo, stride_h, stride_w, pad_h, pad_w, BLOCK_P)
    d = _depthwise_tile(x_rows, ih0, iw0, p_mask, dwt_ptr, c0, C, H, W, K_PAD, dil_h, dil_w,
                        KH, KW, PRE_RELU, ASM, BLOCK_P, BLOCK_C)
    t = mid_input(d, mid_ptr, ci, K_PAD, t_ptr, MID_BN)
    a = mid_act(mid_normalize(t, mid_ptr, ci, K_PAD, t_ptr, MID_BN), MID_ACT)
    offs = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None] * C + ci[None, :]
    mask = p_mask[:, None] & (ci < C)[None, :]
    tl.store(t_ptr + offs, t.to(t_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=elementwise_configs(), key=["C"])
@triton.jit
def _mid_act_grad_kernel(
    ga_ptr,  # [P, C] grad of a
    t_ptr,  # [P, C] the depthwise output (+ the folded bias), `_mid_recompute_kernel`'s
    mid_ptr,  # [3, K_PAD] fp32 (mean, gain, shift), zero past C
    gu_ptr,  # [P, C] out: grad of u = midBN(t), input dtype
    P, C, K_PAD,
    MID_BN: tl.constexpr, MID_ACT: tl.constexpr, C_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_pad = tl.minimum(c, K_PAD - 1)  # the vectors' reads stay inside the buffer
    mask = (p < P)[:, None] & (c < C)[None, :]
    offs = p.to(tl.int64)[:, None] * C + c[None, :]
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = mid_normalize(t, mid_ptr, c_pad, K_PAD, t_ptr, MID_BN)
    g = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gu_ptr + offs, mid_act_grad(g, u, MID_ACT).to(gu_ptr.dtype.element_ty), mask=mask)


# --- host side ------------------------------------------------------------------------------------------

def _mid_flags(spec: UnitSpec, mid_bn: int) -> dict:
    return dict(MID_BN=mid_bn, MID_ACT=spec.mid_act or "")


def _mid_vectors(width: int, c: int, device: torch.device, mean: Optional[Tensor] = None,
                 gain: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """[3, width] fp32 (mean, gain, shift), zero where absent and past c."""
    out = torch.zeros((3, width), dtype=torch.float32, device=device)
    for row, v in enumerate((mean, gain, shift)):
        if v is not None:
            out[row, :c] = v.detach().to(torch.float32)
    return out


def _batch_vectors(width: int, c: int, device: torch.device, mid_mean: Tensor, mid_invstd: Tensor,
                   mid_weight: Optional[Tensor], mid_bias: Optional[Tensor]) -> Tensor:
    gain = mid_invstd.to(torch.float32) * vector_f32(mid_weight, c, 1.0, device)
    return _mid_vectors(width, c, device, mid_mean, gain, mid_bias)


def _pad(c: int) -> int:
    """Width of the taps and vectors read unmasked by channel blocks of up to 256 (`elementwise_configs`)."""
    return triton.cdiv(max(c, 1), 256) * 256


def depthwise_statistics(x: Tensor, dw: Tensor, geo: Geometry, pre_relu: bool) -> tuple[Tensor, Tensor]:
    """(mean, biased var) fp32 [C] of the depthwise output rounded to x's dtype; x, dw as `_prepare`
    returns them. One pass over x; nothing stored but the [3, S, C] partial statistics."""
    splits, chunk = position_split(geo.P, triton.cdiv(geo.C, STATS_BLOCK_C), x.device)
    stats = new_empty((3, splits, geo.C), torch.float32, x.device)
    width = _pad(geo.C)
    grid = (splits * triton.cdiv(geo.C, STATS_BLOCK_C),)
    cap = dict(maxnreg=STATS_MAXNREG) if x.device.type == "cuda" and device_arch(x.device) >= 90 else {}
    _depthwise_stats_kernel[grid](x, depthwise_taps(dw, geo, width), stats, geo.P, chunk, geo.H, geo.W, geo.C,
                                  geo.Ho, geo.Wo, width, splits, *geo.conv_args(), KH=geo.KH, KW=geo.KW,
                                  PRE_RELU=bool(pre_relu), ASM=INLINE_ASM and x.device.type == "cuda",
                                  C_ALIGN=channel_align(geo.C),
                                  BLOCK_P=STATS_BLOCK_P, BLOCK_C=STATS_BLOCK_C, **cap)
    return batchnorm.merge_statistics(stats, geo.P, chunk)


def _as_nchw(m: Tensor, geo: Geometry) -> Tensor:
    """A [P, C] matrix as the [N, C, Ho, Wo] channels_last tensor it is."""
    return m.view(geo.N, geo.Ho, geo.Wo, -1).permute(0, 3, 1, 2)


def _zero_grads(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, *vectors: Optional[Tensor]) -> tuple:
    """Gradients of an empty unit (no positions or no channels): zeros, empty for absent vectors."""
    return (empty_nhwc(x.shape, x.dtype, x.device).zero_(),
            torch.zeros_like(dw_weight, memory_format=torch.contiguous_format),
            torch.zeros_like(pw_weight, memory_format=torch.contiguous_format),
            *(torch.zeros_like(v) if v is not None else x.new_empty((0,)) for v in vectors))


def _convs_backward(geo: Geometry, x: Tensor, dw: Tensor, pw: Tensor, grad_z: Tensor, spec: UnitSpec,
                    mid: Tensor, mid_bn: int) -> tuple[Tensor, Tensor, Tensor]:
    """(t, grad_u, grad_pw as [Cout, C]): the depthwise side recomputed, both pointwise products,
    the activation's derivative. grad_z channels_last [N, Cout, Ho, Wo] in x's dtype."""
    device, c = x.device, geo.C
    t = new_empty((geo.P, c), x.dtype, device)
    a = new_empty((geo.P, c), x.dtype, device)

    def grid(meta):
        return (triton.cdiv(geo.P, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))

    width = mid.shape[1]
    assert width >= geo.KH, "the kernel-row loop's bound is min(K_PAD, KH) (`_depthwise_tile`)"
    _mid_recompute_kernel[grid](x, depthwise_taps(dw, geo, width), mid, t, a, geo.P, geo.H, geo.W, c, geo.Ho,
                                geo.Wo, width, *geo.conv_args(), KH=geo.KH, KW=geo.KW, PRE_RELU=spec.pre_relu,
                                ASM=INLINE_ASM and device.type == "cuda", C_ALIGN=channel_align(c),
                                **_mid_flags(spec, mid_bn))
    gz = _as_matrix(grad_z)
    with exact_matmul(x.dtype):
        grad_pw = torch.matmul(gz.t(), a)
        del a
        grad_a = torch.matmul(gz, pw.view(geo.Cout, c))
    if not spec.mid_act:  # no activation: grad_u is grad_a
        return t, grad_a, grad_pw
    grad_u = new_empty((geo.P, c), x.dtype, device)
    _mid_act_grad_kernel[grid](grad_a, t, mid, grad_u, geo.P, c, width, C_ALIGN=channel_align(c),
                               **_mid_flags(spec, mid_bn))
    return t, grad_u, grad_pw


def _plain_sums(g: Tensor) -> tuple[Tensor, Tensor]:
    """(sum g, sum g * g) per channel, fp32, of a channels_last tensor."""
    c = g.shape[1]
    zeros = torch.zeros((c,), dtype=torch.float32, device=g.device)
    ones = torch.ones((c,), dtype=torch.float32, device=g.device)
    return batchnorm.dy_sums(g, g, zeros, ones, ones, zeros, False)


def sepconv_mid_infer(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], pw_weight: Tensor,
                      scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
                      spec: UnitSpec) -> Tensor:
    """y = post(pw(act(dw(pre(x)) + dw_bias)) * scale + shift) + residual: the depthwise kernel (bias and
    activation applied to its tile), then the GEMM kernel with the affine epilogue."""
    mid = _mid_vectors(slot_width(x.shape[1]), x.shape[1], x.device, shift=dw_bias)
    return sepconv_bn_infer(x, dw_weight, pw_weight, scale, shift, residual, spec, mid,
                            BN_BIAS if dw_bias is not None else BN_NONE)


def sepconv_mid_infer_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                               pw_weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                               spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_dw_bias, grad_pw_weight, grad_scale, grad_shift); empty [0] for
    absent inputs. Only x is saved: z is recomputed (the depthwise and GEMM kernels) where the post-ReLU's
    mask or grad_scale needs it."""
    geo, xc, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    device, c = x.device, geo.Cout
    if geo.P == 0 or geo.C == 0 or c == 0:
        grad_x, grad_dw, grad_pw, grad_dw_bias, grad_scale, grad_shift = _zero_grads(
            x, dw_weight, pw_weight, dw_bias, scale, shift)
        return grad_x, grad_dw, grad_dw_bias, grad_pw, grad_scale, grad_shift
    mid_bn = BN_BIAS if dw_bias is not None else BN_NONE
    gy = nhwc(grad_y)
    if spec.post_relu or scale is not None:
        grad_z, sums, _ = recompute_grad_z(gy, xc, dw, pw, geo, vector_f32(scale, c, 1.0, device),
                                           vector_f32(shift, c, 0.0, device), spec.pre_relu, spec.post_relu,
                                           _mid_vectors(slot_width(geo.C), geo.C, device, shift=dw_bias), mid_bn,
                                           spec.mid_act or "")
    else:  # g_z = grad_y: nothing to recompute
        grad_z = nhwc(gy.to(x.dtype))
        sums = torch.stack(_plain_sums(gy)) if shift is not None else None
    mid = _mid_vectors(_pad(geo.C), geo.C, device, shift=dw_bias)
    _, grad_u, grad_pw = _convs_backward(geo, xc, dw, pw, grad_z, spec, mid, mid_bn)
    grad_x, grad_dw = dw_backward(geo, xc, dw, dw_weight, grad_u, spec.pre_relu)
    empty = x.new_empty((0,))
    grad_dw_bias = _plain_sums(_as_nchw(grad_u, geo))[0].to(dw_bias.dtype) if dw_bias is not None else empty
    grad_scale = sums[1].to(scale.dtype, copy=True) if scale is not None else empty
    grad_shift = sums[0].to(shift.dtype, copy=True) if shift is not None else empty
    return grad_x, grad_dw, grad_dw_bias, grad_pw.view(pw_weight.shape).to(pw_weight.dtype), grad_scale, grad_shift


def sepconv_mid_train(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, mid_weight: Optional[Tensor],
                      mid_bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      residual: Optional[Tensor], spec: UnitSpec, mid_eps: float,
                      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mid_mean, mid_var, mean, var): the statistics pass over x, then the depthwise kernel with
    the mid BatchNorm and activation, the GEMM kernel with the statistics epilogue, the merge, the
    normalisation."""
    geo, x, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    device = x.device
    empty = x.new_empty((0,))
    mid_mean, mid_var = empty, empty.clone()
    if spec.mid_norm:
        if geo.P == 0:  # as the reference: mean 0, var 1 for an empty batch
            mid_mean = torch.zeros(geo.C, dtype=torch.float32, device=device)
            mid_var = torch.ones(geo.C, dtype=torch.float32, device=device)
        else:
            mid_mean, mid_var = depthwise_statistics(x, dw, geo, spec.pre_relu)
    if geo.P == 0 or geo.Cout == 0:  # as the reference: mean 0, var 1 for an empty batch
        y, z, mean, var = empty_forward(geo, x)
        return y, z, mid_mean, mid_var, mean, var
    width = slot_width(geo.C)
    mid = _batch_vectors(width, geo.C, device, mid_mean, torch.rsqrt(mid_var + mid_eps), mid_weight,
                         mid_bias) if spec.mid_norm else _mid_vectors(width, geo.C, device)
    d = depthwise(x, dw, geo, spec.pre_relu, mid, BN_BATCH if spec.mid_norm else BN_NONE, spec.mid_act or "")
    z, mean, var = train_gemm(geo, d, pw)
    y = batchnorm.normalize(z, mean, torch.rsqrt(var + eps), bn_weight, bn_bias, residual, spec.post_relu)
    return y, z, mid_mean, mid_var, mean, var


def sepconv_mid_train_backward(grad_y: Tensor, x: Tensor, z: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                               mid_mean: Tensor, mid_invstd: Tensor, mid_weight: Optional[Tensor],
                               mid_bias: Optional[Tensor], mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                               bn_bias: Optional[Tensor], mean_dy: Tensor, mean_dy_xhat: Tensor,
                               spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight, grad_mid_weight, grad_mid_bias); mid gradients empty
    without a mid BatchNorm (or its affine parameters). mean_dy, mean_dy_xhat: the outer BatchNorm's
    reductions divided by the count (`bn_backward_reduce`)."""
    geo, xc, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    check_dtype(z)
    device, c = x.device, geo.Cout
    norm = spec.mid_norm
    if geo.P == 0 or geo.C == 0 or c == 0:
        return _zero_grads(x, dw_weight, pw_weight, mid_weight if norm else None, mid_bias if norm else None)
    vec = [vector_f32(v, c, fill, device) for v, fill in
           ((mean, 0.0), (invstd, 1.0), (bn_weight, 1.0), (bn_bias, 0.0), (mean_dy, 0.0), (mean_dy_xhat, 0.0))]
    grad_z = batchnorm.grad_z(nhwc(grad_y), nhwc(z.to(x.dtype)), *vec, spec.post_relu)
    width = _pad(geo.C)
    mid = _batch_vectors(width, geo.C, device, mid_mean, mid_invstd, mid_weight, mid_bias) if norm else \
        _mid_vectors(width, geo.C, device)
    t, grad_u, grad_pw = _convs_backward(geo, xc, dw, pw, grad_z, spec, mid, BN_BATCH if norm else BN_NONE)
    empty = x.new_empty((0,))
    grad_mid_weight, grad_mid_bias, grad_d = empty, empty.clone(), grad_u
    if norm:
        cin = geo.C
        mvec = [vector_f32(v, cin, fill, device) for v, fill in
                ((mid_mean, 0.0), (mid_invstd, 1.0), (mid_weight, 1.0), (mid_bias, 0.0))]
        gu, tt = _as_nchw(grad_u, geo), _as_nchw(t, geo)
        sum_g, sum_g_that = batchnorm.dy_sums(gu, tt, *mvec, False)
        grad_d = _as_matrix(batchnorm.grad_z(gu, tt, *mvec, sum_g / geo.P, sum_g_that / geo.P, False))
        if mid_weight is not None:
            grad_mid_weight = sum_g_that.to(mid_weight.dtype)
        if mid_bias is not None:
            grad_mid_bias = sum_g.to(mid_bias.dtype)
    grad_x, grad_dw = dw_backward(geo, xc, dw, dw_weight, grad_d, spec.pre_relu)
    return (grad_x, grad_dw, grad_pw.view(pw_weight.shape).to(pw_weight.dtype), grad_mid_weight, grad_mid_bias)
