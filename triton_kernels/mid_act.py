"""Device helpers of the mid variant: the BatchNorm and activation between dw and pw, in registers.

`mid_transform` turns a depthwise tile d (fp32) into the pointwise operand act(midBN(d)), rounding
where the unfused modules store (the depthwise output, the BatchNorm output, in the input dtype); the
activation runs in fp32, as torch computes it for 16-bit tensors. The per-channel vectors are one
[3, width] fp32 buffer (mean, gain = invstd * weight, shift), zero past C, so padded channels give 0.
MID_BN: 0 none; 1 inference, the BatchNorm folded into the depthwise weight plus a bias (`shift`);
2 training, normalised with batch statistics. MID_ACT: "" or a name of `spec.MID_ACTIVATIONS`.
The derivatives are those of aten's backward ops (`reference._MID_BACKWARD`).
"""

from __future__ import annotations

import triton
import triton.language as tl

BN_NONE, BN_BIAS, BN_BATCH = 0, 1, 2
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # globals a kernel reads must be constexpr
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def mid_act(u, ACT: tl.constexpr):
    """act(u) in fp32; NaN passes (no tl.maximum, which may drop it)."""
    if ACT == "relu":
        u = tl.where(u < 0.0, 0.0, u)
    elif ACT == "relu6":
        u = tl.where(u < 0.0, 0.0, tl.where(u > 6.0, 6.0, u))
    elif ACT == "silu":
        u = u / (1.0 + tl.exp(-u))
    elif ACT == "gelu":  # the exact (erf) form, nn.GELU's default
        u = 0.5 * u * (1.0 + tl.math.erf(u * _SQRT1_2))
    elif ACT == "hardswish":
        u = u * tl.where(u < -3.0, 0.0, tl.where(u > 3.0, 6.0, u + 3.0)) / 6.0
    return u


@triton.jit
def mid_act_grad(g, u, ACT: tl.constexpr):
    """grad of act at u times g, fp32 (threshold_, hardtanh_, silu_, gelu_, hardswish_backward)."""
    if ACT == "relu":
        g = tl.where(u > 0.0, g, 0.0)
    elif ACT == "relu6":
        g = tl.where((u > 0.0) & (u < 6.0), g, 0.0)
    elif ACT == "silu":
        s = 1.0 / (1.0 + tl.exp(-u))
        g = g * s * (1.0 + u * (1.0 - s))
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(u * _SQRT1_2))
        g = g * (cdf + u * tl.exp(-0.5 * u * u) * _INV_SQRT_2PI)
    elif ACT == "hardswish":
        g = tl.where(u < -3.0, 0.0, tl.where(u <= 3.0, g * (u / 3.0 + 0.5), g))
    return g


@triton.jit
def mid_input(d, mid_ptr, c, width, like_ptr, MID_BN: tl.constexpr):
    """The depthwise output as the unfused path stores it: d (+ the folded bias), rounded to like_ptr's
    dtype, back in fp32. c: the channels of d's columns (< width)."""
    if MID_BN == 1:
        d = d + tl.load(mid_ptr + 2 * width + c)[None, :]
    return d.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def mid_normalize(t, mid_ptr, c, width, like_ptr, MID_BN: tl.constexpr):
    """u = midBN(t) for t from `mid_input` (fp32, rounded like the BatchNorm's stored output)."""
    if MID_BN == 2:
        mean = tl.load(mid_ptr + c)
        gain = tl.load(mid_ptr + width + c)
        shift = tl.load(mid_ptr + 2 * width + c)
        t = ((t - mean[None, :]) * gain[None, :] + shift[None, :]).to(like_ptr.dtype.element_ty).to(tl.float32)
    return t


@triton.jit
def mid_transform(d, mid_ptr, c, width, like_ptr, MID_BN: tl.constexpr, MID_ACT: tl.constexpr):
    """act(midBN(d)) in fp32 for a depthwise tile d [rows, len(c)] fp32."""
    t = mid_input(d, mid_ptr, c, width, like_ptr, MID_BN)
    return mid_act(mid_normalize(t, mid_ptr, c, width, like_ptr, MID_BN), MID_ACT)
