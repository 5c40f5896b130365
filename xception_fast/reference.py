"""The `reference` provider: the fused unit composed from plain PyTorch ops.

This is the ground truth every kernel is tested against, the CPU path, and on a GPU exactly the
cuDNN baseline: depthwise and pointwise convolutions run through `F.conv2d` and their gradients
through `aten.convolution_backward`, BatchNorm statistics in float32 (float64 for float64 inputs).
Low-precision inputs are rounded where the unfused modules would store them: the depthwise and
pointwise outputs in the input dtype, the normalised output computed in float32 and stored in the
input dtype, the residual added in the input dtype.

The BatchNorm steps run two ways that compute the same function (see `aten_batchnorm`): on CUDA
tensors of float16/bfloat16/float32, aten's own BatchNorm kernels, those `F.batch_norm` and
`SyncBatchNorm` run (one pass each, reading the input dtype, computing in float32); elsewhere (the
CPU, float64) elementwise ops in the accumulation dtype. They differ by float32 rounding only
(association, a possible fused multiply-add), and in two places the kernels' form decides: the
post-ReLU's backward mask is taken on the stored (rounded) BatchNorm output, as the unfused ReLU
takes it, and a zero may come out as +0 where the composed form gives -0.

Every function takes the unit's `UnitSpec` (xception_fast.spec) but `bn_backward_reduce`, which
needs only its post-ReLU flag. Shapes: x [N, C, H, W], dw_weight [C, 1, kh, kw], pw_weight
[Cout, C, 1, 1], per-channel vectors [Cout], residual / grad_y / z [N, Cout, Ho, Wo]. Outputs are
channels_last.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

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


# --- BatchNorm steps on aten's CUDA kernels ----------------------------------------------------------
# torch.ops.aten's SyncBatchNorm kernels (batch_norm_update_stats, batch_norm_elemt,
# batch_norm_backward_reduce, batch_norm_backward_elemt) have CUDA implementations only. Each is one
# pass over the activation in its own dtype with float32 statistics, where the composed form below
# makes float32 copies of it (28-86 bytes per element against 2-6 in bfloat16: benchmarks/NOTES.md).
_ATEN = torch.ops.aten
_ATEN_BN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The self-check's baseline (xception_fast.verify) is the composed form, which the CPU tests run:
# the tolerance a fused provider gets is twice the baseline's own error, so the baseline must be
# code whose error is known, not a second fast path checked only where a GPU is.
_composed_only = contextvars.ContextVar("xception_fast_reference_composed_only", default=False)


@contextlib.contextmanager
def composed_batchnorm() -> Iterator[None]:
    """Within it, the BatchNorm steps run the composed form on every device."""
    token = _composed_only.set(True)
    try:
        yield
    finally:
        _composed_only.reset(token)


def aten_batchnorm(t: Tensor) -> bool:
    """Whether the BatchNorm steps on `t` (z, or the depthwise output d) run aten's CUDA kernels."""
    return (t.device.type == "cuda" and t.dtype in _ATEN_BN_DTYPES and t.numel() > 0
            and not _composed_only.get())


def _stat_vector(v: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    # The kernels read the statistics as contiguous float32 (the accumulation dtype) and the affine
    # parameters in it too once they differ from the input's dtype: all go in that dtype.
    return None if v is None else v.to(accumulation_dtype(like.dtype)).contiguous()


def _bn_elemt(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, invstd: Tensor) -> Tensor:
    """aten: weight * (z - mean) * invstd + bias in float32, stored in z's dtype, channels-last."""
    v = [_stat_vector(t, z) for t in (weight, bias, mean, invstd)]
    return _ATEN.batch_norm_elemt(to_channels_last(z), *v, 0.0)


def _scale_shift_stored(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    """aten: z * scale + shift in float32, stored in z's dtype (z itself when both are absent). With
    mean 0 and invstd 1 the kernel's rounding is the composed form's: w * (z - 0) * 1 + b rounds once
    for the product and once for the sum."""
    if scale is None and shift is None:
        return z
    acc = accumulation_dtype(z.dtype)
    zero = torch.zeros(z.shape[1], dtype=acc, device=z.device)
    return _bn_elemt(z, scale, shift, zero, torch.ones_like(zero))


def _epilogue(y: Tensor, residual: Optional[Tensor], post_relu: bool) -> Tensor:
    """post(y) + residual in y's dtype, in place: y is a temporary of the caller's."""
    if post_relu:
        y = y.relu_()
    if residual is not None:
        y = y.add_(residual)
    return to_channels_last(y)


def _stored_grad(grad_y: Tensor, y: Optional[Tensor], like: Tensor) -> Tensor:
    """grad_y in `like`'s dtype and channels-last, zero where the stored BatchNorm output y (if given:
    the post-ReLU's input) is not > 0 (NaN included, as the composed mask)."""
    g = to_channels_last(grad_y.to(like.dtype))
    return g if y is None else to_channels_last(torch.where(y > 0, g, 0))


def _bn_sums(g: Tensor, z: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """aten: (sum g, sum g * (z - mean)) per channel in float32; g and z channels-last."""
    v = _stat_vector(mean, z)
    sum_dy, sum_dy_xmu, _, _ = _ATEN.batch_norm_backward_reduce(g, to_channels_last(z), v, torch.ones_like(v), None,
                                                              True, False, False)
    return sum_dy, sum_dy_xmu


def _folded_bn_backward(grad_y: Tensor, z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                        post_relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_z in z's dtype, grad_scale, grad_shift) of y = post(z * scale + shift); absent scale/shift
    give empty gradients."""
    if aten_batchnorm(z):
        y = _scale_shift_stored(z, scale, shift) if post_relu else None
        g = _stored_grad(grad_y, y, z)
        grad_scale, grad_shift = _empty_vector(z), _empty_vector(z)
        if scale is not None or shift is not None:
            sum_g, sum_gz = _bn_sums(g, z, torch.zeros(z.shape[1], dtype=accumulation_dtype(z.dtype), device=z.device))
            grad_scale = sum_gz.to(scale.dtype) if scale is not None else grad_scale
            grad_shift = sum_g.to(shift.dtype) if shift is not None else grad_shift
        grad_z = _scale_shift_stored(g, scale, None)
        return grad_z, grad_scale, grad_shift
    g = _relu_mask(grad_y, _affine(z, scale, shift), post_relu)
    acc = g.dtype
    grad_scale = (g * z.to(acc)).sum(_CHANNEL_DIMS).to(scale.dtype) if scale is not None else _empty_vector(z)
    grad_shift = g.sum(_CHANNEL_DIMS).to(shift.dtype) if shift is not None else _empty_vector(z)
    grad_z = (g * _per_channel(scale, acc) if scale is not None else g).to(z.dtype)
    return grad_z, grad_scale, grad_shift


def _scale_shift_act(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
                     post_relu: bool) -> Tensor:
    """post(z * scale + shift) + residual, stored in z's dtype; z is the caller's temporary."""
    if aten_batchnorm(z):
        return _epilogue(_scale_shift_stored(z, scale, shift), residual, post_relu)
    return _finish(_affine(z, scale, shift), z.dtype, residual, post_relu)


def sepconv_bn_infer(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, scale: Optional[Tensor],
                     shift: Optional[Tensor], residual: Optional[Tensor], spec: UnitSpec) -> Tensor:
    """y = post(z * scale + shift) + residual, z = pw(dw(pre(x))): BatchNorm folded (inference)."""
    _, d = _depthwise(x, dw_weight, spec)
    return _scale_shift_act(F.conv2d(d, pw_weight), scale, shift, residual, spec.post_relu)


def sepconv_bn_infer_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                              scale: Optional[Tensor], shift: Optional[Tensor],
                              spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight, grad_scale, grad_shift); absent scale/shift give
    empty gradients. The forward is recomputed: nothing but x is saved."""
    _, d = _depthwise(x, dw_weight, spec)
    grad_z, grad_scale, grad_shift = _folded_bn_backward(grad_y, F.conv2d(d, pw_weight), scale, shift,
                                                         spec.post_relu)
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
    if aten_batchnorm(z):
        return _epilogue(_bn_elemt(z, bn_weight, bn_bias, mean, invstd), residual, post_relu)
    _, y = _normalize(z, mean, invstd, bn_weight, bn_bias)
    return _finish(y, z.dtype, residual, post_relu)


def _bn_transform(t: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """((t - mean) * invstd) * weight + bias computed in float32, stored in t's dtype."""
    if aten_batchnorm(t):
        return _bn_elemt(t, weight, bias, mean, invstd)
    return _normalize(t, mean, invstd, weight, bias)[1].to(t.dtype)


def bn_backward_reduce(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], post_relu: bool) -> tuple[Tensor, Tensor]:
    """(sum_dy, sum_dy_xhat) per channel in the accumulation dtype, dy masked by the post-ReLU.
    These are the BatchNorm bias and weight gradients."""
    if aten_batchnorm(z):
        y = _bn_elemt(z, bn_weight, bn_bias, mean, invstd) if post_relu else None
        sum_dy, sum_dy_xmu = _bn_sums(_stored_grad(grad_y, y, z), z, mean)
        return sum_dy, sum_dy_xmu * _stat_vector(invstd, z)
    xhat, y = _normalize(z, mean, invstd, bn_weight, bn_bias)
    g = _relu_mask(grad_y, y, post_relu)
    return g.sum(_CHANNEL_DIMS), (g * xhat).sum(_CHANNEL_DIMS)


def sepconv_bn_train_backward(grad_y: Tensor, x: Tensor, z: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                              mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                              mean_dy: Tensor, mean_dy_xhat: Tensor, spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_pw_weight). mean_dy and mean_dy_xhat are the reductions of
    `bn_backward_reduce` divided by the number of values per channel (all ranks' under SyncBN)."""
    grad_z = _bn_input_grad(grad_y, z, mean, invstd, bn_weight, bn_bias, mean_dy, mean_dy_xhat, spec.post_relu)
    return _backward_convs(grad_z, x, dw_weight, pw_weight, spec)


def _bn_input_grad(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], mean_dy: Tensor, mean_dy_xhat: Tensor, post_relu: bool) -> Tensor:
    """The gradient of a batch-statistics BatchNorm's input z, stored in z's dtype, dy masked by the
    post-ReLU."""
    if not aten_batchnorm(z):
        return _bn_input_grad_composed(grad_y, z, mean, invstd, bn_weight, bn_bias, mean_dy, mean_dy_xhat,
                                       post_relu).to(z.dtype)
    y = _bn_elemt(z, bn_weight, bn_bias, mean, invstd) if post_relu else None
    return _bn_backward_elemt(_stored_grad(grad_y, y, z), z, mean, invstd, bn_weight, mean_dy, mean_dy_xhat)


def _bn_backward_elemt(g: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], mean_dy: Tensor,
                       mean_dy_xhat: Tensor) -> Tensor:
    """aten: (g - mean_dy - x_hat * mean_dy_xhat) * invstd * weight in float32, stored in z's dtype;
    g channels-last in z's dtype."""
    inv, m_dy_xhat = _stat_vector(invstd, z), _stat_vector(mean_dy_xhat, z)
    # The kernel takes mean(dy * (z - mean)) = mean(dy * x_hat) / invstd; with invstd 0 that term is 0
    # (NaN stays NaN), as x_hat's is in the composed form.
    m_dy_xmu = torch.where(inv != 0, m_dy_xhat / inv, m_dy_xhat * 0)
    count = torch.ones(1, dtype=torch.int32, device=z.device)  # the means are already per value
    return _ATEN.batch_norm_backward_elemt(g, to_channels_last(z), _stat_vector(mean, z), inv,
                                           _stat_vector(weight, z), _stat_vector(mean_dy, z), m_dy_xmu, count)


def _bn_input_grad_composed(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                            bn_bias: Optional[Tensor], mean_dy: Tensor, mean_dy_xhat: Tensor,
                            post_relu: bool) -> Tensor:
    """`_bn_input_grad` in the accumulation dtype, composed from elementwise ops."""
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
    if aten_batchnorm(t):  # one Welford pass, float32 (the kernel F.batch_norm's training runs)
        return _ATEN.batch_norm_update_stats(t, None, None, 0.0)
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
    u = _bn_transform(d, mid_mean, mid_invstd, mid_weight, mid_bias) if spec.mid_norm else d
    return u, MID_FUNCTIONS[spec.mid_act](u)


def sepconv_mid_infer(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], pw_weight: Tensor,
                      scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
                      spec: UnitSpec) -> Tensor:
    """y = post(pw(act(dw(pre(x)) + dw_bias)) * scale + shift) + residual: both BatchNorms folded."""
    z = _mid_infer_forward(x, dw_weight, dw_bias, pw_weight, spec)[3]
    return _scale_shift_act(z, scale, shift, residual, spec.post_relu)


def sepconv_mid_infer_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                               pw_weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                               spec: UnitSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_dw_weight, grad_dw_bias, grad_pw_weight, grad_scale, grad_shift); absent optional
    inputs give empty gradients. The forward is recomputed from x."""
    xr, u, a, z = _mid_infer_forward(x, dw_weight, dw_bias, pw_weight, spec)
    grad_z, grad_scale, grad_shift = _folded_bn_backward(grad_y, z, scale, shift, spec.post_relu)
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
    grad_a, grad_pw = _pw_backward(grad_z, a, pw_weight)
    grad_u = _mid_act_backward(grad_a, u, spec.mid_act)
    grad_mid_weight, grad_mid_bias = _empty_vector(x), _empty_vector(x)
    if spec.mid_norm and aten_batchnorm(d):
        g = to_channels_last(grad_u)
        count = d.numel() // d.shape[1]
        sum_g, sum_g_dmu = _bn_sums(g, d, mid_mean)
        sum_g_dhat = sum_g_dmu * _stat_vector(mid_invstd, d)
        grad_u = _bn_backward_elemt(g, d, mid_mean, mid_invstd, mid_weight, sum_g / count, sum_g_dhat / count)
        if mid_weight is not None:
            grad_mid_weight = sum_g_dhat.to(mid_weight.dtype)
        if mid_bias is not None:
            grad_mid_bias = sum_g.to(mid_bias.dtype)
    elif spec.mid_norm:
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
