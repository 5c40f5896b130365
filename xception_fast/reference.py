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
    grad_d, grad_pw = _pw_backward(grad_z, d, pw_weight)
    return (*_dw_backward(grad_d, xr, x, dw_weight, spec), grad_pw)


def _pw_backward(grad_z: Tensor, d: Tensor, pw_weight: Tensor) -> tuple[Tensor, Tensor]:
    """(grad of the pointwise conv's input d, grad of its weight)."""
    grad_d, grad_pw, _ = torch.ops.aten.convolution_backward(
        grad_z, d, pw_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
    return grad_d, to_contiguous(grad_pw)


def _dw_backward(grad_d: Tensor, xr: Tensor, x: Tensor, dw_weight: Tensor, spec: UnitSpec) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_dw_weight) from the gradient of the depthwise output; xr = pre(x)."""
    grad_xr, grad_dw, _ = torch.ops.aten.convolution_backward(
        grad_d, xr, dw_weight, None, list(spec.stride), list(spec.padding), list(spec.dilation), False, [0, 0],
        x.shape[1], [True, True, False])
    grad_x = torch.where(x > 0, grad_xr, 0) if spec.pre_relu else grad_xr
    return to_channels_last(grad_x), to_contiguous(grad_dw)


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
    mean, var = _batch_stats(z)
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
    grad_z = _bn_input_grad(grad_y, z, mean, invstd, bn_weight, bn_bias, mean_dy, mean_dy_xhat, spec.post_relu)
    return _backward_convs(grad_z.to(x.dtype), x, dw_weight, pw_weight, spec)


def _bn_input_grad(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], mean_dy: Tensor, mean_dy_xhat: Tensor, post_relu: bool) -> Tensor:
    """The gradient of a batch-statistics BatchNorm's input z (accumulation dtype), dy masked by the post-ReLU."""
    xhat, y = _normalize(z, mean, invstd, bn_weight, bn_bias)
    g = _relu_mask(grad_y, y, post_relu)
    acc = g.dtype
    gain = _per_channel(invstd, acc)
    if bn_weight is not None:
        gain = gain * _per_channel(bn_weight, acc)
    return (g - _per_channel(mean_dy, acc) - xhat * _per_channel(mean_dy_xhat, acc)) * gain


# --- the mid variant: pre -> dw -> mid BN -> mid act -> pw -> BN -> post (aligned Xception, MobileNet V1) ---
# In inference the mid BatchNorm arrives folded into the depthwise weight plus a per-channel bias
# (`functional.fold_batchnorm`); in training its batch statistics are those of the depthwise output.
# The mid tensors are stored in the input dtype, as the unfused modules store them.

MID_FUNCTIONS = {None: lambda t: t, "relu": torch.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu,
                 "hardswish": F.hardswish}


# The activations' derivatives: the aten backward ops autograd itself runs for them (autograd is off
# inside a custom op's implementation).
_MID_BACKWARD = {
    "relu": lambda g, u: torch.ops.aten.threshold_backward(g, u, 0),
    "relu6": lambda g, u: torch.ops.aten.hardtanh_backward(g, u, 0.0, 6.0),
    "silu": torch.ops.aten.silu_backward,
    "gelu": torch.ops.aten.gelu_backward,
    "hardswish": torch.ops.aten.hardswish_backward,
}


def _mid_act_backward(grad_a: Tensor, u: Tensor, act: Optional[str]) -> Tensor:
    return grad_a if act is None else _MID_BACKWARD[act](grad_a, u)


def _batch_stats(t: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased var) per channel in the accumulation dtype; (0, 1) for an empty batch."""
    acc = accumulation_dtype(t.dtype)
    if t.numel() == 0:
        return (torch.zeros(t.shape[1], dtype=acc, device=t.device),
                torch.ones(t.shape[1], dtype=acc, device=t.device))
    var, mean = torch.var_mean(t.to(acc), dim=_CHANNEL_DIMS, correction=0)
    return mean, var


def _mid_infer_forward(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], pw_weight: Tensor,
                       spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pre(x), u = dw(pre(x)) + dw_bias, a = act(u), z = pw(a))."""
    xr = torch.relu(x) if spec.pre_relu else x
    u = F.conv2d(xr, dw_weight, dw_bias, spec.stride, spec.padding, spec.dilation, groups=x.shape[1])
    a = MID_FUNCTIONS[spec.mid_act](u)
    return xr, u, a, F.conv2d(a, pw_weight)


def _mid_bn_act(d: Tensor, mid_mean: Tensor, mid_invstd: Tensor, mid_weight: Optional[Tensor],
                mid_bias: Optional[Tensor], spec: UnitSpec) -> tuple[Tensor, Tensor]:
    """(u = midBN(d), a = act(u)) for the depthwise output d, with the given batch statistics."""
    u = _normalize(d, mid_mean, mid_invstd, mid_weight, mid_bias)[1].to(d.dtype) if spec.mid_norm else d
    return u, MID_FUNCTIONS[spec.mid_act](u)


def sepconv_mid_infer(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], pw_weight: Tensor,
                      scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
                      spec: UnitSpec) -> Tensor:
    """y = post(pw(act(dw(pre(x)) + dw_bias)) * scale + shift) + residual: both BatchNorms folded."""
    z = _mid_infer_forward(x, dw_weight, dw_bias, pw_weight, spec)[3]
    return _finish(_affine(z, scale, shift), x.dtype, residual, spec.post_relu)


def sepconv_mid_infer_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                               pw_weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                               spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_dw_bias, grad_pw_weight, grad_scale, grad_shift); absent optional
    inputs give empty gradients. The forward is recomputed from x."""
    xr, u, a, z = _mid_infer_forward(x, dw_weight, dw_bias, pw_weight, spec)
    g = _relu_mask(grad_y, _affine(z, scale, shift), spec.post_relu)
    acc = g.dtype
    grad_scale = (g * z.to(acc)).sum(_CHANNEL_DIMS).to(scale.dtype) if scale is not None else _empty_vector(x)
    grad_shift = g.sum(_CHANNEL_DIMS).to(shift.dtype) if shift is not None else _empty_vector(x)
    grad_z = (g * _per_channel(scale, acc) if scale is not None else g).to(x.dtype)
    grad_a, grad_pw = _pw_backward(grad_z, a, pw_weight)
    grad_u = _mid_act_backward(grad_a, u, spec.mid_act)
    grad_dw_bias = grad_u.sum(_CHANNEL_DIMS).to(dw_bias.dtype) if dw_bias is not None else _empty_vector(x)
    grad_x, grad_dw = _dw_backward(grad_u, xr, x, dw_weight, spec)
    return grad_x, grad_dw, grad_dw_bias, grad_pw, grad_scale, grad_shift


def sepconv_mid_train(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, mid_weight: Optional[Tensor],
                      mid_bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      residual: Optional[Tensor], spec: UnitSpec, mid_eps: float,
                      eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, z, mid_mean, mid_var, mean, var): both BatchNorms with batch statistics. The mid statistics
    (of the depthwise output, per input channel; empty without a mid BatchNorm) come first, as a
    fused kernel's statistics pass computes them before its main loop; z is the pre-BN output."""
    _, d = _depthwise(x, dw_weight, spec)
    mid_mean, mid_var = _batch_stats(d) if spec.mid_norm else (_empty_vector(d), _empty_vector(d))
    a = _mid_bn_act(d, mid_mean, torch.rsqrt(mid_var + mid_eps), mid_weight, mid_bias, spec)[1]
    z = to_channels_last(F.conv2d(a, pw_weight))
    mean, var = _batch_stats(z)
    y = bn_act(z, mean, torch.rsqrt(var + eps), bn_weight, bn_bias, residual, spec.post_relu)
    return y, z, mid_mean, mid_var, mean, var


def sepconv_mid_train_backward(grad_y: Tensor, x: Tensor, z: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                               mid_mean: Tensor, mid_invstd: Tensor, mid_weight: Optional[Tensor],
                               mid_bias: Optional[Tensor], mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                               bn_bias: Optional[Tensor], mean_dy: Tensor, mean_dy_xhat: Tensor,
                               spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight, grad_mid_weight, grad_mid_bias); the mid gradients are
    empty without a mid BatchNorm (or its affine parameters). The depthwise output is recomputed from
    x; mean_dy and mean_dy_xhat are the outer BatchNorm's reductions (`bn_backward_reduce` / count)."""
    grad_z = _bn_input_grad(grad_y, z, mean, invstd, bn_weight, bn_bias, mean_dy, mean_dy_xhat, spec.post_relu)
    xr, d = _depthwise(x, dw_weight, spec)
    u, a = _mid_bn_act(d, mid_mean, mid_invstd, mid_weight, mid_bias, spec)
    grad_a, grad_pw = _pw_backward(grad_z.to(x.dtype), a, pw_weight)
    grad_u = _mid_act_backward(grad_a, u, spec.mid_act)
    grad_mid_weight, grad_mid_bias = _empty_vector(x), _empty_vector(x)
    if spec.mid_norm:
        acc = accumulation_dtype(x.dtype)
        g, dhat = grad_u.to(acc), _normalize(d, mid_mean, mid_invstd, None, None)[0]
        sum_g, sum_g_dhat = g.sum(_CHANNEL_DIMS), (g * dhat).sum(_CHANNEL_DIMS)
        count = max(d.numel() // max(d.shape[1], 1), 1)
        gain = _per_channel(mid_invstd, acc) * (_per_channel(mid_weight, acc) if mid_weight is not None else 1)
        grad_u = ((g - _per_channel(sum_g / count, acc) - dhat * _per_channel(sum_g_dhat / count, acc)) * gain)
        if mid_weight is not None:
            grad_mid_weight = sum_g_dhat.to(mid_weight.dtype)
        if mid_bias is not None:
            grad_mid_bias = sum_g.to(mid_bias.dtype)
    grad_x, grad_dw = _dw_backward(grad_u.to(x.dtype), xr, x, dw_weight, spec)
    return grad_x, grad_dw, grad_pw, grad_mid_weight, grad_mid_bias
