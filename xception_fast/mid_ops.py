"""The custom ops of the mid variant: a BatchNorm and/or an activation between dw and pw.

The unit is ``y = post(BN(pw(act(midBN(dw(pre(x))))))) (+ residual)``, the separable unit of the
aligned Xception (DeepLab) and of MobileNet V1; `UnitSpec.mid` names it ("bn", "bn_relu", "relu",
...; see `spec.mid_name`) and the schemas take that name as ``mid``. Like `ops`, each op validates
its inputs and hands them to the provider `backends.resolve` picks for the spec's variants: a
provider that does not list the variant is passed over by ``auto`` and refused when named.

- ``sepconv_mid_infer``: inference, both BatchNorms folded: the mid one into the depthwise weight
  plus a per-channel ``dw_bias`` (`functional.fold_batchnorm`), the outer one into scale and shift.
- ``sepconv_mid_train``: both BatchNorms with batch statistics; returns
  (y, z, mid_mean, mid_var, mean, var). The mid statistics are those of the depthwise output, which
  is recomputed in backward rather than saved. The outer BatchNorm's backward reductions reuse
  ``xception_fast::bn_backward_reduce`` (they do not depend on the variant).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from xception_fast import backends, ops
from xception_fast.reference import accumulation_dtype
from xception_fast.spec import UnitSpec


def _spec(dw_weight, stride, padding, dilation, pre_relu, post_relu, mid, residual=False) -> UnitSpec:
    if not mid:
        raise ValueError("mid must name the variant (see xception_fast.spec.mid_name), got an empty string")
    return UnitSpec.of(dw_weight, stride, padding, dilation, pre_relu, post_relu, residual, mid)


def _provider(backend: str, x: Tensor, spec: UnitSpec):
    return backends.provider(backend, x.device, x.dtype, spec.variants())


def _check_mid(x: Tensor, vectors: dict[str, Optional[Tensor]]) -> None:
    """The mid vectors are per input channel (the depthwise output's channels)."""
    ops.check_vectors(x, vectors, x.shape[1] if x.dim() == 4 else -1, "C")


def _empty_cl(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _empty_or_like(v: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty((0,)) if v is None else torch.empty_like(v)


# --- inference -----------------------------------------------------------------------------------

@torch.library.custom_op("xception_fast::sepconv_mid_infer", mutates_args=())
def sepconv_mid_infer(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor], pw_weight: Tensor,
                      scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], pre_relu: bool,
                      post_relu: bool, mid: str, backend: str) -> Tensor:
    ops.check_inputs(x, dw_weight, pw_weight, {"scale": scale, "shift": shift}, residual, stride, padding, dilation)
    _check_mid(x, {"dw_bias": dw_bias})
    spec = _spec(dw_weight, stride, padding, dilation, pre_relu, post_relu, mid, residual is not None)
    return _provider(backend, x, spec).sepconv_mid_infer(x, dw_weight, dw_bias, pw_weight, scale, shift, residual,
                                                         spec)


@sepconv_mid_infer.register_fake
def _(x, dw_weight, dw_bias, pw_weight, scale, shift, residual, stride, padding, dilation, pre_relu, post_relu,
      mid, backend):
    shape = ops.check_inputs(x, dw_weight, pw_weight, {"scale": scale, "shift": shift}, residual, stride, padding,
                             dilation)
    _check_mid(x, {"dw_bias": dw_bias})
    return _empty_cl(shape, x)


@torch.library.custom_op("xception_fast::sepconv_mid_infer_backward", mutates_args=())
def sepconv_mid_infer_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                               pw_weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                               pre_relu: bool, post_relu: bool, mid: str,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = _spec(dw_weight, stride, padding, dilation, pre_relu, post_relu, mid)
    return _provider(backend, x, spec).sepconv_mid_infer_backward(grad_y, x, dw_weight, dw_bias, pw_weight, scale,
                                                                  shift, spec)


@sepconv_mid_infer_backward.register_fake
def _(grad_y, x, dw_weight, dw_bias, pw_weight, scale, shift, stride, padding, dilation, pre_relu, post_relu, mid,
      backend):
    return (_empty_cl(x.shape, x), torch.empty_like(dw_weight, memory_format=torch.contiguous_format),
            _empty_or_like(dw_bias, x), torch.empty_like(pw_weight, memory_format=torch.contiguous_format),
            _empty_or_like(scale, x), _empty_or_like(shift, x))


def _infer_setup_context(ctx, inputs, output):
    (x, dw_weight, dw_bias, pw_weight, scale, shift, residual, stride, padding, dilation, pre_relu, post_relu, mid,
     backend) = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, pw_weight, scale, shift)
    ctx.spec, ctx.backend = _spec(dw_weight, stride, padding, dilation, pre_relu, post_relu, mid), backend
    ctx.has_residual = residual is not None


def _infer_backward(ctx, grad_y):
    x, dw_weight, dw_bias, pw_weight, scale, shift = ctx.saved_tensors
    grads = sepconv_mid_infer_backward(grad_y, x, dw_weight, dw_bias, pw_weight, scale, shift, *ctx.spec.op_args(),
                                       ctx.spec.mid, ctx.backend)
    grad_x, grad_dw, grad_dw_bias, grad_pw, grad_scale, grad_shift = grads
    present = lambda grad, t: grad if t is not None else None  # noqa: E731
    return (grad_x, grad_dw, present(grad_dw_bias, dw_bias), grad_pw, present(grad_scale, scale),
            present(grad_shift, shift), grad_y if ctx.has_residual else None) + (None,) * 7


sepconv_mid_infer.register_autograd(_infer_backward, setup_context=_infer_setup_context)


# --- training ------------------------------------------------------------------------------------

@torch.library.custom_op("xception_fast::sepconv_mid_train", mutates_args=())
def sepconv_mid_train(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, mid_weight: Optional[Tensor],
                      mid_bias: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      residual: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], pre_relu: bool, post_relu: bool, mid: str, mid_eps: float, eps: float,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ops.check_inputs(x, dw_weight, pw_weight, {"bn_weight": bn_weight, "bn_bias": bn_bias}, residual, stride,
                     padding, dilation)
    _check_mid(x, {"mid_weight": mid_weight, "mid_bias": mid_bias})
    spec = _spec(dw_weight, stride, padding, dilation, pre_relu, post_relu, mid, residual is not None)
    return _provider(backend, x, spec).sepconv_mid_train(x, dw_weight, pw_weight, mid_weight, mid_bias, bn_weight,
                                                         bn_bias, residual, spec, mid_eps, eps)


@sepconv_mid_train.register_fake
def _(x, dw_weight, pw_weight, mid_weight, mid_bias, bn_weight, bn_bias, residual, stride, padding, dilation,
      pre_relu, post_relu, mid, mid_eps, eps, backend):
    shape = ops.check_inputs(x, dw_weight, pw_weight, {"bn_weight": bn_weight, "bn_bias": bn_bias}, residual,
                             stride, padding, dilation)
    _check_mid(x, {"mid_weight": mid_weight, "mid_bias": mid_bias})
    acc = accumulation_dtype(x.dtype)
    mid_channels = x.shape[1] if _spec(dw_weight, stride, padding, dilation, pre_relu, post_relu, mid).mid_norm else 0

    def vector(n):
        return torch.empty((n,), dtype=acc, device=x.device)

    return (_empty_cl(shape, x), _empty_cl(shape, x), vector(mid_channels), vector(mid_channels), vector(shape[1]),
            vector(shape[1]))


@torch.library.custom_op("xception_fast::sepconv_mid_train_backward", mutates_args=())
def sepconv_mid_train_backward(grad_y: Tensor, x: Tensor, z: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                               mid_mean: Tensor, mid_invstd: Tensor, mid_weight: Optional[Tensor],
                               mid_bias: Optional[Tensor], mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                               bn_bias: Optional[Tensor], mean_dy: Tensor, mean_dy_xhat: Tensor,
                               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                               pre_relu: bool, post_relu: bool, mid: str,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = _spec(dw_weight, stride, padding, dilation, pre_relu, post_relu, mid)
    return _provider(backend, x, spec).sepconv_mid_train_backward(
        grad_y, x, z, dw_weight, pw_weight, mid_mean, mid_invstd, mid_weight, mid_bias, mean, invstd, bn_weight,
        bn_bias, mean_dy, mean_dy_xhat, spec)


@sepconv_mid_train_backward.register_fake
def _(grad_y, x, z, dw_weight, pw_weight, mid_mean, mid_invstd, mid_weight, mid_bias, mean, invstd, bn_weight,
      bn_bias, mean_dy, mean_dy_xhat, stride, padding, dilation, pre_relu, post_relu, mid, backend):
    return (_empty_cl(x.shape, x), torch.empty_like(dw_weight, memory_format=torch.contiguous_format),
            torch.empty_like(pw_weight, memory_format=torch.contiguous_format), _empty_or_like(mid_weight, x),
            _empty_or_like(mid_bias, x))


def _train_setup_context(ctx, inputs, output):
    (x, dw_weight, pw_weight, mid_weight, mid_bias, bn_weight, bn_bias, residual, stride, padding, dilation, pre_relu,
     post_relu, mid, mid_eps, eps, backend) = inputs
    _, z, mid_mean, mid_var, mean, var = output
    ctx.mark_non_differentiable(z, mid_mean, mid_var, mean, var)
    ctx.save_for_backward(x, z, dw_weight, pw_weight, mid_weight, mid_bias, mid_mean, mid_var, bn_weight, bn_bias,
                          mean, var)
    ctx.spec = _spec(dw_weight, stride, padding, dilation, pre_relu, post_relu, mid)
    ctx.mid_eps, ctx.eps, ctx.backend = mid_eps, eps, backend
    ctx.has_residual = residual is not None


def _train_backward(ctx, grad_y, _grad_z, _grad_mid_mean, _grad_mid_var, _grad_mean, _grad_var):
    x, z, dw_weight, pw_weight, mid_weight, mid_bias, mid_mean, mid_var, bn_weight, bn_bias, mean, var = \
        ctx.saved_tensors
    invstd = torch.rsqrt(var + ctx.eps)
    sum_dy, sum_dy_xhat = ops.bn_backward_reduce(grad_y, z, mean, invstd, bn_weight, bn_bias, ctx.spec.post_relu,
                                                 ctx.backend)
    count = max(z.numel() // max(z.shape[1], 1), 1)
    grad_x, grad_dw, grad_pw, grad_mid_weight, grad_mid_bias = sepconv_mid_train_backward(
        grad_y, x, z, dw_weight, pw_weight, mid_mean, torch.rsqrt(mid_var + ctx.mid_eps), mid_weight, mid_bias, mean,
        invstd, bn_weight, bn_bias, sum_dy / count, sum_dy_xhat / count, *ctx.spec.op_args(), ctx.spec.mid,
        ctx.backend)
    return (grad_x, grad_dw, grad_pw,
            grad_mid_weight if mid_weight is not None else None,
            grad_mid_bias if mid_bias is not None else None,
            sum_dy_xhat.to(bn_weight.dtype) if bn_weight is not None else None,
            sum_dy.to(bn_bias.dtype) if bn_bias is not None else None,
            grad_y if ctx.has_residual else None) + (None,) * 9


sepconv_mid_train.register_autograd(_train_backward, setup_context=_train_setup_context)
