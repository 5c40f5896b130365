"""Fused depthwise k x k + pointwise 1x1 convolution: the forward main loop and its three epilogues.

Layout: every activation is channels_last, addressed as a row-major [positions, channels] matrix
(position p = (n * Ho + oh) * Wo + ow). A program owns BLOCK_P output positions x BLOCK_CO output
channels. For each block of BLOCK_CI input channels it loads the k x k input taps of its positions
(the tile with its halo, one tap at a time: Triton has no explicit shared memory, so the halo's
reuse across taps and across neighbouring programs comes from L1/L2), applies the pre-ReLU,
accumulates the depthwise result in fp32 registers, rounds it to the input dtype (as the unfused
path stores it) and feeds it as the A operand of `tl.dot` against the [BLOCK_CI, BLOCK_CO] slice
of the pointwise weight. The depthwise output never goes to memory.

Epilogues (one kernel each, same main loop):
- `_sepconv_infer_kernel`: y = post(z * scale + shift) + residual, stored once.
- `_sepconv_train_kernel`: stores z and per-split, per-channel statistics (a reference value, the
  mean's offset from it, M2; the count follows from the split), merged by
  `batchnorm.merge_statistics` (Chan's formula), then normalised by `batchnorm.normalize`.
- `_sepconv_grad_z_kernel`: inference backward, which saves nothing but x: recomputes z, applies
  the post-ReLU mask to grad_y, stores grad_z = g * scale and the partial sums of g and g * z
  (the gradients of shift and scale).

Design limit: positions are int32 (N*H*W and N*Ho*Wo at most 2^30, checked on the host); element
offsets are int64, so activations may exceed 2^31 elements.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from xception_fast.spec import UnitSpec

from . import batchnorm
from .autotune import position_split, sepconv_forward_configs, sepconv_split_configs
from .utils import (channel_align, check_dtype, check_positions, empty_nhwc, matrix, new_empty, nhwc,
                    vector_f32)


# --- shared device helpers ----------------------------------------------------------------------------

@triton.jit
def _output_positions(p_start, p_end, Ho, Wo, BLOCK_P: tl.constexpr):
    """Positions p_start + [0, BLOCK_P) below p_end, split into (image (int64), row, column)."""
    p = p_start + tl.arange(0, BLOCK_P)
    p_mask = p < p_end
    n = p // (Ho * Wo)
    r = p - n * (Ho * Wo)
    oh = r // Wo
    ow = r - oh * Wo
    return p, p_mask, n.to(tl.int64), oh, ow


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
def _input_tap(x_ptr, n, oh, ow, p_mask, ci, ci_mask, H, W, C, i, j,
               stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, PRE_RELU: tl.constexpr):
    """The input under tap (i, j) of each output position, [BLOCK_P, BLOCK_CI] in fp32, zero in the
    padding, after the optional pre-ReLU."""
    ih = oh * stride_h - pad_h + i * dil_h
    iw = ow * stride_w - pad_w + j * dil_w
    ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    row = (n * H + ih) * W + iw  # int64: n is
    xv = tl.load(x_ptr + row[:, None] * C + ci[None, :], mask=ok[:, None] & ci_mask[None, :], other=0.0)
    xv = xv.to(tl.float32)
    if PRE_RELU:
        xv = tl.where(xv < 0.0, 0.0, xv)  # not tl.maximum: NaN must pass, as in torch.relu
    return xv


@triton.jit
def _depthwise_tile(x_ptr, dw_ptr, n, oh, ow, p_mask, ci, ci_mask, H, W, C,
                    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                    KH: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr):
    """d = dw(pre(x)) for BLOCK_P positions x BLOCK_CI channels, fp32, zero outside the masks."""
    d = tl.zeros((BLOCK_P, BLOCK_CI), dtype=tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            xv = _input_tap(x_ptr, n, oh, ow, p_mask, ci, ci_mask, H, W, C, i, j,
                            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, PRE_RELU)
            wv = tl.load(dw_ptr + ci * (KH * KW) + (i * KW + j), mask=ci_mask, other=0.0).to(tl.float32)
            d += xv * wv[None, :]
    return d


@triton.jit
def _sepconv_tile(x_ptr, dw_ptr, pw_ptr, n, oh, ow, p_mask, co, co_mask, H, W, C,
                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  KH: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr):
    """The main loop: z = pw(dw(pre(x))) for BLOCK_P positions x BLOCK_CO channels, fp32 accumulator."""
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_CI):
        ci = c0 + tl.arange(0, BLOCK_CI)
        ci_mask = ci < C
        d = _depthwise_tile(x_ptr, dw_ptr, n, oh, ow, p_mask, ci, ci_mask, H, W, C,
                            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, PRE_RELU, BLOCK_P, BLOCK_CI)
        # Rounded where the unfused path stores the depthwise output; also the tensor-core operand type.
        a = d.to(x_ptr.dtype.element_ty)
        b = tl.load(pw_ptr + co[None, :] * C + ci[:, None], mask=ci_mask[:, None] & co_mask[None, :], other=0.0)
        acc = _mma(a, b, acc)
    return acc


# --- kernels --------------------------------------------------------------------------------------------

@triton.autotune(configs=sepconv_forward_configs(), key=["C", "Cout", "P", "KH", "KW"])
@triton.jit
def _sepconv_infer_kernel(
    # pointers
    x_ptr,  # [N, H, W, C] input (channels_last)
    dw_ptr,  # [C, KH * KW] depthwise weight
    pw_ptr,  # [Cout, C] pointwise weight
    scale_ptr,  # [Cout] fp32 (1 where absent)
    shift_ptr,  # [Cout] fp32 (0 where absent)
    res_ptr,  # [N, Ho, Wo, Cout] residual (read only if HAS_RESIDUAL)
    y_ptr,  # [N, Ho, Wo, Cout] output
    # sizes
    P, H, W, C, Ho, Wo, Cout,
    # convolution
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr, POST_RELU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, C_ALIGN: tl.constexpr, COUT_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    Cout = Cout // COUT_ALIGN * COUT_ALIGN
    # Output-channel tiles of one position tile are neighbours in launch order: they read the same x.
    co_tiles = tl.cdiv(Cout, BLOCK_CO)
    pid = tl.program_id(0)
    pid_p, pid_co = pid // co_tiles, pid % co_tiles
    p, p_mask, n, oh, ow = _output_positions(pid_p * BLOCK_P, P, Ho, Wo, BLOCK_P)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < Cout
    acc = _sepconv_tile(x_ptr, dw_ptr, pw_ptr, n, oh, ow, p_mask, co, co_mask, H, W, C,
                        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, PRE_RELU, BLOCK_P, BLOCK_CO, BLOCK_CI)

    # Epilogue, rounding where the reference does: z stored in the input dtype, the affine map in
    # fp32 and stored, the residual added to the stored value.
    z = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0)
    shift = tl.load(shift_ptr + co, mask=co_mask, other=0.0)
    y = z * scale[None, :] + shift[None, :]
    if POST_RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not tl.maximum: NaN must pass, as in torch.relu
    offs = p.to(tl.int64)[:, None] * Cout + co[None, :]
    mask = p_mask[:, None] & co_mask[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=sepconv_split_configs(), key=["C", "Cout", "P", "KH", "KW"])
@triton.jit
def _sepconv_train_kernel(
    # pointers
    x_ptr,  # [N, H, W, C] input (channels_last)
    dw_ptr,  # [C, KH * KW] depthwise weight
    pw_ptr,  # [Cout, C] pointwise weight
    z_ptr,  # [N, Ho, Wo, Cout] pre-BN output
    stats_ptr,  # [3, S, Cout] fp32: per split, (reference value, mean - reference value, M2)
    # sizes
    P, chunk, H, W, C, Ho, Wo, Cout, S,
    # convolution
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr, C_ALIGN: tl.constexpr, COUT_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    Cout = Cout // COUT_ALIGN * COUT_ALIGN
    # Split s owns positions [s * chunk, (s + 1) * chunk): the number of partial rows is fixed by
    # the host, whatever config the autotuner picks.
    co_tiles = tl.cdiv(Cout, BLOCK_CO)
    pid = tl.program_id(0)
    s, pid_co = pid // co_tiles, pid % co_tiles
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < Cout
    p_begin = s * chunk
    p_end = tl.minimum(p_begin + chunk, P)

    # Statistics about a reference value `ref` (the first tile's mean): with |mean| >> std (1e4 vs
    # 1e-2), deviations from it are small and exact, so fp32 keeps their precision. Tiles merge with
    # Chan's formula; within a tile, the corrected two-pass sum of squares.
    count = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    ref = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p, p_mask, n, oh, ow = _output_positions(p0, p_end, Ho, Wo, BLOCK_P)
        acc = _sepconv_tile(x_ptr, dw_ptr, pw_ptr, n, oh, ow, p_mask, co, co_mask, H, W, C,
                            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, PRE_RELU,
                            BLOCK_P, BLOCK_CO, BLOCK_CI)
        z = acc.to(z_ptr.dtype.element_ty)
        offs = p.to(tl.int64)[:, None] * Cout + co[None, :]
        tl.store(z_ptr + offs, z, mask=p_mask[:, None] & co_mask[None, :])

        rows = p_mask[:, None]
        zf = tl.where(rows, z.to(tl.float32), 0.0)  # statistics of the stored (rounded) z
        cnt = tl.sum(p_mask.to(tl.float32), axis=0)
        ref = tl.where(count > 0, ref, tl.sum(zf, axis=0) / cnt)
        dz = tl.where(rows, zf - ref[None, :], 0.0)
        t_mean = tl.sum(dz, axis=0) / cnt
        e = tl.where(rows, dz - t_mean[None, :], 0.0)
        e_sum = tl.sum(e, axis=0)
        t_m2 = tl.sum(e * e, axis=0) - e_sum * e_sum / cnt
        new_count = count + cnt
        delta = t_mean - mean
        mean += delta * (cnt / new_count)
        m2 += t_m2 + delta * delta * (count * cnt / new_count)
        count = new_count

    out = stats_ptr + s * Cout + co
    tl.store(out, ref, mask=co_mask)
    tl.store(out + S * Cout, mean, mask=co_mask)
    tl.store(out + 2 * S * Cout, m2, mask=co_mask)


@triton.autotune(configs=sepconv_split_configs(), key=["C", "Cout", "P", "KH", "KW"])
@triton.jit
def _sepconv_grad_z_kernel(
    # pointers
    x_ptr,  # [N, H, W, C] input (channels_last)
    dw_ptr,  # [C, KH * KW] depthwise weight
    pw_ptr,  # [Cout, C] pointwise weight
    scale_ptr,  # [Cout] fp32 (1 where absent)
    shift_ptr,  # [Cout] fp32 (0 where absent)
    gy_ptr,  # [N, Ho, Wo, Cout] grad of y (channels_last, any float dtype)
    gz_ptr,  # [N, Ho, Wo, Cout] out: grad of z, input dtype
    sums_ptr,  # [S, 2, Cout] fp32 out: per split, sum of g (grad shift) and of g * z (grad scale)
    # sizes
    P, chunk, H, W, C, Ho, Wo, Cout,
    # convolution
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, PRE_RELU: tl.constexpr, POST_RELU: tl.constexpr,
    C_ALIGN: tl.constexpr, COUT_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    Cout = Cout // COUT_ALIGN * COUT_ALIGN
    co_tiles = tl.cdiv(Cout, BLOCK_CO)
    pid = tl.program_id(0)
    s, pid_co = pid // co_tiles, pid % co_tiles
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < Cout
    p_begin = s * chunk
    p_end = tl.minimum(p_begin + chunk, P)
    scale = tl.load(scale_ptr + co, mask=co_mask, other=0.0)
    shift = tl.load(shift_ptr + co, mask=co_mask, other=0.0)

    sum_g = tl.zeros((BLOCK_CO,), dtype=tl.float32)  # reduced per tile: 2-D accumulators would spill
    sum_gz = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p, p_mask, n, oh, ow = _output_positions(p0, p_end, Ho, Wo, BLOCK_P)
        acc = _sepconv_tile(x_ptr, dw_ptr, pw_ptr, n, oh, ow, p_mask, co, co_mask, H, W, C,
                            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, KH, KW, PRE_RELU,
                            BLOCK_P, BLOCK_CO, BLOCK_CI)
        z = acc.to(gz_ptr.dtype.element_ty).to(tl.float32)
        offs = p.to(tl.int64)[:, None] * Cout + co[None, :]
        mask = p_mask[:, None] & co_mask[None, :]
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if POST_RELU:
            g = tl.where(z * scale[None, :] + shift[None, :] > 0, g, 0.0)
        tl.store(gz_ptr + offs, (g * scale[None, :]).to(gz_ptr.dtype.element_ty), mask=mask)
        sum_g += tl.sum(g, axis=0)
        sum_gz += tl.sum(g * z, axis=0)

    out = sums_ptr + s * 2 * Cout + co
    tl.store(out, sum_g, mask=co_mask)
    tl.store(out + Cout, sum_gz, mask=co_mask)


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


def sepconv_bn_infer(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, scale: Optional[Tensor],
                     shift: Optional[Tensor], residual: Optional[Tensor], spec: UnitSpec) -> Tensor:
    """y = post(z * scale + shift) + residual, z = pw(dw(pre(x))): one kernel launch."""
    geo, x, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    y = empty_nhwc(geo.out_shape, x.dtype, x.device)
    if y.numel() == 0:
        return y
    scale = vector_f32(scale, geo.Cout, 1.0, x.device)
    shift = vector_f32(shift, geo.Cout, 0.0, x.device)
    res = nhwc(residual.to(x.dtype)) if residual is not None else y  # y: never read without HAS_RESIDUAL

    def grid(meta):
        return (triton.cdiv(geo.P, meta["BLOCK_P"]) * triton.cdiv(geo.Cout, meta["BLOCK_CO"]),)

    _sepconv_infer_kernel[grid](
        x, dw, pw, scale, shift, res, y,
        geo.P, geo.H, geo.W, geo.C, geo.Ho, geo.Wo, geo.Cout, *geo.conv_args(),
        KH=geo.KH, KW=geo.KW, PRE_RELU=spec.pre_relu, POST_RELU=spec.post_relu,
        HAS_RESIDUAL=residual is not None, **geo.align())
    return y


def sepconv_bn_train(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], residual: Optional[Tensor], spec: UnitSpec,
                     eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mean, biased var): main loop + statistics epilogue, statistics merge, normalisation."""
    geo, x, dw, pw = _prepare(x, dw_weight, pw_weight, spec)
    z = empty_nhwc(geo.out_shape, x.dtype, x.device)
    if geo.P == 0 or geo.Cout == 0:  # as the reference: mean 0, var 1 for an empty batch
        mean = torch.zeros(geo.Cout, dtype=torch.float32, device=x.device)
        var = torch.ones(geo.Cout, dtype=torch.float32, device=x.device)
        return empty_nhwc(geo.out_shape, x.dtype, x.device), z, mean, var
    splits, chunk = position_split(geo.P, triton.cdiv(geo.Cout, 128), x.device)
    stats = new_empty((3, splits, geo.Cout), torch.float32, x.device)

    def grid(meta):
        return (splits * triton.cdiv(geo.Cout, meta["BLOCK_CO"]),)

    _sepconv_train_kernel[grid](
        x, dw, pw, z, stats,
        geo.P, chunk, geo.H, geo.W, geo.C, geo.Ho, geo.Wo, geo.Cout, splits, *geo.conv_args(),
        KH=geo.KH, KW=geo.KW, PRE_RELU=spec.pre_relu, **geo.align())
    mean, var = batchnorm.merge_statistics(stats, geo.P, chunk)
    invstd = torch.rsqrt(var + eps)  # as the reference (and ops.py's backward) compute it
    y = batchnorm.normalize(z, mean, invstd, bn_weight, bn_bias, residual, spec.post_relu)
    return y, z, mean, var


def recompute_grad_z(grad_y: Tensor, x: Tensor, dw: Tensor, pw: Tensor, geo: Geometry, scale: Tensor,
                     shift: Tensor, pre_relu: bool, post_relu: bool) -> tuple[Tensor, Tensor]:
    """Inference backward's first pass: (grad_z, sums [2, Cout] fp32 of g and g * z). x, dw, pw as
    `_prepare` returns them; scale/shift fp32 vectors."""
    grad_z = empty_nhwc(geo.out_shape, x.dtype, x.device)
    splits, chunk = position_split(geo.P, triton.cdiv(geo.Cout, 128), x.device)
    sums = new_empty((splits, 2, geo.Cout), torch.float32, x.device)

    def grid(meta):
        return (splits * triton.cdiv(geo.Cout, meta["BLOCK_CO"]),)

    _sepconv_grad_z_kernel[grid](
        x, dw, pw, scale, shift, grad_y, grad_z, sums,
        geo.P, chunk, geo.H, geo.W, geo.C, geo.Ho, geo.Wo, geo.Cout, *geo.conv_args(),
        KH=geo.KH, KW=geo.KW, PRE_RELU=bool(pre_relu), POST_RELU=bool(post_relu), **geo.align())
    return grad_z, batchnorm.sum_rows(sums.view(splits, 2 * geo.Cout)).view(2, geo.Cout)
