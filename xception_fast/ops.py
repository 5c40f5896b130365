"""The public custom ops (namespace ``xception_fast``): schemas, input checks, fake kernels, autograd.

Each op is defined once here; its implementation validates the inputs and hands them to
`dispatch.call`, which runs the provider selected (cuda, triton or reference, all with the
signatures of `xception_fast.reference`): an explicit one, or `auto`'s verified, measured choice.
The unit is described once as a `UnitSpec`; the schemas take the spec's fields
(`UnitSpec.op_args`), which callers pass as ``*spec.op_args()``. Fake (meta) kernels let
`torch.compile` trace the ops without graph breaks, and the backward formulas are themselves ops so
compiled backward graphs see them too.

Forward ops:
- ``sepconv_bn_infer``: y = post(z * scale + shift) + residual, z = pw(dw(pre(x))). Used for
  BatchNorm in eval mode (scale and shift are the folded BN) and for a separable conv without BN.
- ``sepconv_bn_train``: the same unit with batch statistics; returns (y, z, mean, var), where z (the
  pre-BN output) and the statistics are saved for backward and for the running-statistics update.
  Only x, z and per-channel vectors are saved: the depthwise output is recomputed in backward.
Backward ops: ``sepconv_bn_infer_backward``, ``bn_backward_reduce``, ``sepconv_bn_train_backward``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from xception_fast import dispatch
from xception_fast.reference import accumulation_dtype
from xception_fast.spec import UnitSpec, output_size  # noqa: F401  (output_size: part of this module's API)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def output_shape(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, stride, padding, dilation) -> list[int]:
    return UnitSpec.of(dw_weight, stride, padding, dilation, False, False).output_shape(x, pw_weight.shape[0])


def _empty_cl(shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last)


def _vector(like: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    return torch.empty((n,), dtype=dtype, device=like.device)


def _check_pair(name: str, value: Sequence[int], minimum: int) -> None:
    if len(value) != 2 or any(v < minimum for v in value):
        raise ValueError(f"{name} must be two integers >= {minimum}, got {list(value)}")


def check_vectors(x: Tensor, vectors: dict[str, Optional[Tensor]], length: int, label: str,
                  devices_of: Optional[dict[str, Tensor]] = None) -> None:
    """Per-channel vectors (absent ones skipped): [length], floating point; then every tensor of
    `devices_of` and every vector on x's device."""
    present = {name: v for name, v in vectors.items() if v is not None}
    for name, v in present.items():
        if tuple(v.shape) != (length,):
            raise ValueError(f"{name} must be a [{label}={length}] vector, got {list(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    for name, t in {**(devices_of or {}), **present}.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")


def check_inputs(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, vectors: dict[str, Optional[Tensor]],
                 residual: Optional[Tensor], stride, padding, dilation) -> list[int]:
    """Validate the unit's inputs before any kernel runs; returns the output shape."""
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got {x.dim()}-D with shape {list(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    channels = x.shape[1]
    if dw_weight.dim() != 4 or dw_weight.shape[0] != channels or dw_weight.shape[1] != 1:
        raise ValueError(f"dw_weight must be [C={channels}, 1, kh, kw] (a depthwise conv weight), "
                         f"got {list(dw_weight.shape)}")
    if pw_weight.dim() != 4 or pw_weight.shape[1] != channels or tuple(pw_weight.shape[2:]) != (1, 1):
        raise ValueError(f"pw_weight must be [Cout, C={channels}, 1, 1] (a 1x1 conv weight), "
                         f"got {list(pw_weight.shape)}")
    _check_pair("stride", stride, 1)
    _check_pair("padding", padding, 0)
    _check_pair("dilation", dilation, 1)
    shape = output_shape(x, dw_weight, pw_weight, stride, padding, dilation)
    if shape[2] <= 0 or shape[3] <= 0:
        raise ValueError(f"input of spatial size {list(x.shape[2:])} is too small for a "
                         f"{list(dw_weight.shape[2:])} kernel with padding {list(padding)} and dilation "
                         f"{list(dilation)}")
    out_channels = pw_weight.shape[0]
    tensors = {"dw_weight": dw_weight, "pw_weight": pw_weight}
    if residual is not None:
        if list(residual.shape) != shape:
            raise ValueError(f"residual must have the output's shape {shape}, got {list(residual.shape)}")
        tensors["residual"] = residual
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    check_vectors(x, vectors, out_channels, "Cout", devices_of=tensors)
    return shape


# --- inference: BatchNorm folded into scale and shift ---------------------------------------------

@torch.library.custom_op("xception_fast::sepconv_bn_infer", mutates_args=())
def sepconv_bn_infer(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, scale: Optional[Tensor],
                     shift: Optional[Tensor], residual: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], pre_relu: bool, post_relu: bool,
                     backend: str) -> Tensor:
    check_inputs(x, dw_weight, pw_weight, {"scale": scale, "shift": shift}, residual, stride, padding, dilation)
    spec = UnitSpec.of(dw_weight, stride, padding, dilation, pre_relu, post_relu, residual is not None)
    return dispatch.call("sepconv_bn_infer", backend, x, dw_weight, pw_weight, scale, shift, residual, spec)


@sepconv_bn_infer.register_fake
def _(x, dw_weight, pw_weight, scale, shift, residual, stride, padding, dilation, pre_relu, post_relu, backend):
    shape = check_inputs(x, dw_weight, pw_weight, {"scale": scale, "shift": shift}, residual, stride, padding,
                         dilation)
    return _empty_cl(shape, x)


@torch.library.custom_op("xception_fast::sepconv_bn_infer_backward", mutates_args=())
def sepconv_bn_infer_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                              scale: Optional[Tensor], shift: Optional[Tensor], stride: Sequence[int],
                              padding: Sequence[int], dilation: Sequence[int], pre_relu: bool, post_relu: bool,
                              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = UnitSpec.of(dw_weight, stride, padding, dilation, pre_relu, post_relu)
    return dispatch.call("sepconv_bn_infer_backward", backend, grad_y, x, dw_weight, pw_weight, scale, shift, spec)


@sepconv_bn_infer_backward.register_fake
def _(grad_y, x, dw_weight, pw_weight, scale, shift, stride, padding, dilation, pre_relu, post_relu, backend):
    return (_empty_cl(x.shape, x), torch.empty_like(dw_weight, memory_format=torch.contiguous_format),
            torch.empty_like(pw_weight, memory_format=torch.contiguous_format),
            _vector(x, 0, x.dtype) if scale is None else torch.empty_like(scale),
            _vector(x, 0, x.dtype) if shift is None else torch.empty_like(shift))


def _infer_setup_context(ctx, inputs, output):
    x, dw_weight, pw_weight, scale, shift, residual, stride, padding, dilation, pre_relu, post_relu, backend = inputs
    ctx.save_for_backward(x, dw_weight, pw_weight, scale, shift)
    ctx.spec, ctx.backend = UnitSpec.of(dw_weight, stride, padding, dilation, pre_relu, post_relu), backend
    ctx.has_residual = residual is not None


def _infer_backward(ctx, grad_y):
    x, dw_weight, pw_weight, scale, shift = ctx.saved_tensors
    grad_x, grad_dw, grad_pw, grad_scale, grad_shift = sepconv_bn_infer_backward(
        grad_y, x, dw_weight, pw_weight, scale, shift, *ctx.spec.op_args(), ctx.backend)
    return (grad_x, grad_dw, grad_pw, grad_scale if scale is not None else None,
            grad_shift if shift is not None else None, grad_y if ctx.has_residual else None,
            None, None, None, None, None, None)


sepconv_bn_infer.register_autograd(_infer_backward, setup_context=_infer_setup_context)


# --- training: batch statistics ---------------------------------------------------------------------

@torch.library.custom_op("xception_fast::sepconv_bn_train", mutates_args=())
def sepconv_bn_train(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bn_weight: Optional[Tensor],
                     bn_bias: Optional[Tensor], residual: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], pre_relu: bool, post_relu: bool,
                     eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_inputs(x, dw_weight, pw_weight, {"bn_weight": bn_weight, "bn_bias": bn_bias}, residual, stride, padding,
                 dilation)
    spec = UnitSpec.of(dw_weight, stride, padding, dilation, pre_relu, post_relu, residual is not None)
    return dispatch.call("sepconv_bn_train", backend, x, dw_weight, pw_weight, bn_weight, bn_bias, residual, spec,
                         eps)


@sepconv_bn_train.register_fake
def _(x, dw_weight, pw_weight, bn_weight, bn_bias, residual, stride, padding, dilation, pre_relu, post_relu, eps,
      backend):
    shape = check_inputs(x, dw_weight, pw_weight, {"bn_weight": bn_weight, "bn_bias": bn_bias}, residual, stride,
                         padding, dilation)
    acc = accumulation_dtype(x.dtype)
    return _empty_cl(shape, x), _empty_cl(shape, x), _vector(x, shape[1], acc), _vector(x, shape[1], acc)


@torch.library.custom_op("xception_fast::bn_backward_reduce", mutates_args=())
def bn_backward_reduce(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], post_relu: bool, backend: str) -> tuple[Tensor, Tensor]:
    return dispatch.call("bn_backward_reduce", backend, grad_y, z, mean, invstd, bn_weight, bn_bias, post_relu)


@bn_backward_reduce.register_fake
def _(grad_y, z, mean, invstd, bn_weight, bn_bias, post_relu, backend):
    return torch.empty_like(mean), torch.empty_like(mean)


@torch.library.custom_op("xception_fast::sepconv_bn_train_backward", mutates_args=())
def sepconv_bn_train_backward(grad_y: Tensor, x: Tensor, z: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                              mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                              mean_dy: Tensor, mean_dy_xhat: Tensor, stride: Sequence[int],
                              padding: Sequence[int], dilation: Sequence[int], pre_relu: bool, post_relu: bool,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    spec = UnitSpec.of(dw_weight, stride, padding, dilation, pre_relu, post_relu)
    return dispatch.call("sepconv_bn_train_backward", backend, grad_y, x, z, dw_weight, pw_weight, mean, invstd,
                         bn_weight, bn_bias, mean_dy, mean_dy_xhat, spec)


@sepconv_bn_train_backward.register_fake
def _(grad_y, x, z, dw_weight, pw_weight, mean, invstd, bn_weight, bn_bias, mean_dy, mean_dy_xhat, stride, padding,
      dilation, pre_relu, post_relu, backend):
    return (_empty_cl(x.shape, x), torch.empty_like(dw_weight, memory_format=torch.contiguous_format),
            torch.empty_like(pw_weight, memory_format=torch.contiguous_format))


def _train_setup_context(ctx, inputs, output):
    (x, dw_weight, pw_weight, bn_weight, bn_bias, residual, stride, padding, dilation, pre_relu, post_relu, eps,
     backend) = inputs
    _, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    ctx.save_for_backward(x, z, dw_weight, pw_weight, bn_weight, bn_bias, mean, var)
    ctx.spec = UnitSpec.of(dw_weight, stride, padding, dilation, pre_relu, post_relu)
    ctx.eps, ctx.backend = eps, backend
    ctx.has_residual = residual is not None


def _train_backward(ctx, grad_y, _grad_z, _grad_mean, _grad_var):
    x, z, dw_weight, pw_weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    invstd = torch.rsqrt(var + ctx.eps)
    sum_dy, sum_dy_xhat = bn_backward_reduce(grad_y, z, mean, invstd, bn_weight, bn_bias, ctx.spec.post_relu,
                                             ctx.backend)
    count = max(z.numel() // max(z.shape[1], 1), 1)
    grad_x, grad_dw, grad_pw = sepconv_bn_train_backward(
        grad_y, x, z, dw_weight, pw_weight, mean, invstd, bn_weight, bn_bias, sum_dy / count, sum_dy_xhat / count,
        *ctx.spec.op_args(), ctx.backend)
    return (grad_x, grad_dw, grad_pw,
            sum_dy_xhat.to(bn_weight.dtype) if bn_weight is not None else None,
            sum_dy.to(bn_bias.dtype) if bn_bias is not None else None,
            grad_y if ctx.has_residual else None,
            None, None, None, None, None, None, None)


sepconv_bn_train.register_autograd(_train_backward, setup_context=_train_setup_context)
