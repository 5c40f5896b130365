"""The `reference` provider: the fused unit composed from plain PyTorch ops.

This is the ground truth every kernel is tested against, the CPU path, and on a GPU exactly the
cuDNN baseline: depthwise and pointwise convolutions run through `F.conv2d` and their gradients
through `aten.convolution_backward`, BatchNorm statistics in float32 (float64 for float64 inputs).
Low-precision inputs are rounded where the unfused modules would store them: the depthwise and
pointwise outputs in the input dtype, the normalised output computed in float32 and stored in the
input dtype, the residual added in the input dtype.

Every function takes the unit's `UnitSpec` (xception_fast.spec) but `bn_backward_reduce`, which
needs only its post-ReLU flag. Shapes: x [N, C, H, W], dw_weight [C, 1, kh, kw], pw_weight
[Cout, C, 1, 1], per-channel vectors [Cout], residual / grad_y / z [N, Cout, Ho, Wo]. Outputs are
channels_last.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from xception_fast.spec import UnitSpec

_CHANNEL_DIMS = (0, 2, 3)


def channels_last_strides(shape: Sequence[int]) -> tuple[int, int, int, int]:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _restrided(t: Tensor, strides: tuple[int, ...], memory_format: torch.memory_format) -> Tensor:
    # Exact strides, not just `is_contiguous`: fake kernels promise them, and size-1 dims make
    # several stride patterns count as contiguous.
    if t.stride() == strides:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format)
    return out.copy_(t)


def to_channels_last(t: Tensor) -> Tensor:
    """`t` with exactly the strides `torch.empty(..., memory_format=channels_last)` gives."""
    return _restrided(t, channels_last_strides(t.shape), torch.channels_last)


def to_contiguous(t: Tensor) -> Tensor:
    return _restrided(t, contiguous_strides(t.shape), torch.contiguous_format)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _per_channel(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


def _depthwise(x: Tensor, dw_weight: Tensor, spec: UnitSpec) -> tuple[Tensor, Tensor]:
    xr = torch.relu(x) if spec.pre_relu else x
    return xr, F.conv2d(xr, dw_weight, None, spec.stride, spec.padding, spec.dilation, groups=x.shape[1])


def _affine(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    acc = accumulation_dtype(z.dtype)
    y = z.to(acc)
    if scale is not None:
        y = y * _per_channel(scale, acc)
    if shift is not None:
        y = y + _per_channel(shift, acc)
    return y


def _finish(y_acc: Tensor, dtype: torch.dtype, residual: Optional[Tensor], post_relu: bool) -> Tensor:
    y = y_acc.to(dtype)
    if post_relu:
        y = torch.relu(y)
    if residual is not None:
        y = y + residual
    return to_channels_last(y)


def _backward_convs(grad_z: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                    spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x, the depthwise and the pointwise weights, recomputing the depthwise output."""
    xr, d = _depthwise(x, dw_weight, spec)
    grad_d, grad_pw, _ = torch.ops.aten.convolution_backward(
        grad_z, d, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
    grad_xr, grad_dw, _ = torch.ops.aten.convolution_backward(
        grad_d, xr, dw_weight, None, list(spec.stride), list(spec.padding), list(spec.dilation), False, [0, 0],
        x.shape[1], [True, True, False])
    grad_x = torch.where(x > 0, grad_xr, 0) if spec.pre_relu else grad_xr
    return to_channels_last(grad_x), to_contiguous(grad_dw), to_contiguous(grad_pw)


def _relu_mask(grad_y: Tensor, pre_activation: Tensor, post_relu: bool) -> Tensor:
    g = grad_y.to(pre_activation.dtype)
    return torch.where(pre_activation > 0, g, 0) if post_relu else g


def _empty_vector(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def sepconv_bn_infer(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, scale: Optional[Tensor],
                     shift: Optional[Tensor], residual: Optional[Tensor], spec: UnitSpec) -> Tensor:
    """y = post(z * scale + shift) + residual, z = pw(dw(pre(x))): BatchNorm folded (inference)."""
    _, d = _depthwise(x, dw_weight, spec)
    z = F.conv2d(d, pw_weight)
    return _finish(_affine(z, scale, shift), x.dtype, residual, spec.post_relu)


def sepconv_bn_infer_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                              scale: Optional[Tensor], shift: Optional[Tensor],
                              spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight, grad_scale, grad_shift); absent scale/shift give
    empty gradients. The forward is recomputed: nothing but x is saved."""
    _, d = _depthwise(x, dw_weight, spec)
    z = F.conv2d(d, pw_weight)
    g = _relu_mask(grad_y, _affine(z, scale, shift), spec.post_relu)
    acc = g.dtype
    grad_scale = (g * z.to(acc)).sum(_CHANNEL_DIMS).to(scale.dtype) if scale is not None else _empty_vector(x)
    grad_shift = g.sum(_CHANNEL_DIMS).to(shift.dtype) if shift is not None else _empty_vector(x)
    grad_z = (g * _per_channel(scale, acc) if scale is not None else g).to(x.dtype)
    grad_x, grad_dw, grad_pw = _backward_convs(grad_z, x, dw_weight, pw_weight, spec)
    return grad_x, grad_dw, grad_pw, grad_scale, grad_shift


def _normalize(z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
               bn_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(x_hat, bn output) in the accumulation dtype."""
    acc = accumulation_dtype(z.dtype)
    xhat = (z.to(acc) - _per_channel(mean, acc)) * _per_channel(invstd, acc)
    return xhat, _affine(xhat, bn_weight, bn_bias)


def sepconv_bn_train(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], residual: Optional[Tensor], spec: UnitSpec,
                     eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mean, var): BatchNorm with batch statistics. z = pw(dw(pre(x))) is the pre-BN output,
    kept for backward; mean and the biased var are per output channel, float32 (float64 for float64)."""
    _, d = _depthwise(x, dw_weight, spec)
    z = to_channels_last(F.conv2d(d, pw_weight))
    acc = accumulation_dtype(z.dtype)
    if z.numel() == 0:
        mean = torch.zeros(z.shape[1], dtype=acc, device=z.device)
        var = torch.ones(z.shape[1], dtype=acc, device=z.device)
    else:
        var, mean = torch.var_mean(z.to(acc), dim=_CHANNEL_DIMS, correction=0)
    invstd = torch.rsqrt(var + eps)
    return bn_act(z, mean, invstd, bn_weight, bn_bias, residual, spec.post_relu), z, mean, var


def bn_act(z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
           residual: Optional[Tensor], post_relu: bool) -> Tensor:
    """y = post(((z - mean) * invstd) * bn_weight + bn_bias) + residual: the normalisation step."""
    _, y = _normalize(z, mean, invstd, bn_weight, bn_bias)
    return _finish(y, z.dtype, residual, post_relu)


def bn_backward_reduce(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], post_relu: bool) -> tuple[Tensor, Tensor]:
    """(sum_dy, sum_dy_xhat) per channel in the accumulation dtype, dy masked by the post-ReLU.
    These are the BatchNorm bias and weight gradients."""
    xhat, y = _normalize(z, mean, invstd, bn_weight, bn_bias)
    g = _relu_mask(grad_y, y, post_relu)
    return g.sum(_CHANNEL_DIMS), (g * xhat).sum(_CHANNEL_DIMS)


def sepconv_bn_train_backward(grad_y: Tensor, x: Tensor, z: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                              mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                              mean_dy: Tensor, mean_dy_xhat: Tensor, spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight). mean_dy and mean_dy_xhat are the reductions of
    `bn_backward_reduce` divided by the number of values per channel (all ranks' under SyncBN)."""
    xhat, y = _normalize(z, mean, invstd, bn_weight, bn_bias)
    g = _relu_mask(grad_y, y, spec.post_relu)
    acc = g.dtype
    gain = _per_channel(invstd, acc)
    if bn_weight is not None:
        gain = gain * _per_channel(bn_weight, acc)
    grad_z = ((g - _per_channel(mean_dy, acc) - xhat * _per_channel(mean_dy_xhat, acc)) * gain).to(x.dtype)
    return _backward_convs(grad_z, x, dw_weight, pw_weight, spec)
