"""Functional forms of the fused units, with BatchNorm semantics identical to `F.batch_norm`.

When `auto` has no fused provider verified for the tensors (always so on the CPU), the unit runs as
the plain modules would (`F.conv2d`, `F.conv2d`, `F.batch_norm`, ReLU, add): the maths of the
`reference` provider with the rounding points of the unfused modules, without the custom op's
overhead or its recomputing backward. That is the faster exact path there, and the same kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from xception_fast import dispatch, mid_ops, ops, reference
from xception_fast.spec import UnitSpec, mid_name

_pair = torch.nn.modules.utils._pair


def separable_conv_bn(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], bn_weight: Optional[Tensor] = None,
                      bn_bias: Optional[Tensor] = None, *, training: bool = False, momentum: float = 0.1,
                      eps: float = 1e-5, stride=1, padding=0, dilation=1, pre_relu: bool = False,
                      post_relu: bool = False, residual: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """post(BN(pw(dw(pre(x))))) + residual in one fused op.

    BatchNorm arguments mean what they mean to `F.batch_norm`: batch statistics when `training` or
    when there are no running statistics, in which case the running statistics (if given) are
    updated in place with `momentum` and the unbiased batch variance; otherwise the running
    statistics are folded into a per-channel scale and shift.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x, dw_weight, pw_weight, residual, late_residual = autocast_inputs(x, dw_weight, pw_weight, residual)
    if late_residual is not None:
        return separable_conv_bn(x, dw_weight, pw_weight, running_mean, running_var, bn_weight, bn_bias,
                                 training=training, momentum=momentum, eps=eps, stride=stride, padding=padding,
                                 dilation=dilation, pre_relu=pre_relu, post_relu=post_relu,
                                 backend=backend) + late_residual
    if _runs_plain(x, dw_weight, pw_weight, {"bn_weight": bn_weight, "bn_bias": bn_bias}, residual, stride, padding,
                   dilation, pre_relu, post_relu, backend):
        batch_stats = training or running_mean is None or running_var is None
        return _plain_unit(x, dw_weight, pw_weight, None, (running_mean, running_var, bn_weight, bn_bias,
                                                           batch_stats, momentum, eps),
                           residual, stride, padding, dilation, pre_relu, post_relu)
    spec = UnitSpec.of(dw_weight, stride, padding, dilation, pre_relu, post_relu, residual is not None)
    args = spec.op_args()
    if training or running_mean is None or running_var is None:
        if training and x.dim() == 4 and dw_weight.dim() == 4:
            F._verify_batch_size(spec.output_shape(x, pw_weight.shape[0]))
        y, z, mean, var = ops.sepconv_bn_train(x, dw_weight, pw_weight, bn_weight, bn_bias, residual, *args, eps,
                                               backend)
        if training and running_mean is not None and running_var is not None:
            _update_running_stats(running_mean, running_var, mean, var, z, momentum)
        return y
    scale, shift = _fold_outer(running_mean, running_var, bn_weight, bn_bias, eps)
    return ops.sepconv_bn_infer(x, dw_weight, pw_weight, scale, shift, residual, *args, backend)


def _fold_outer(running_mean: Tensor, running_var: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                eps: float) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as a per-channel (scale, shift)."""
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -running_mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    return scale, shift


def autocast_inputs(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, residual: Optional[Tensor]):
    """Under `torch.autocast`, cast as autocast casts the convolutions (float32/16 inputs to the autocast
    dtype; BatchNorm parameters and statistics stay float32). A residual of another dtype is added
    after the fused op, as eager's type promotion would: (x, dw, pw, fused residual, late residual)."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return x, dw_weight, pw_weight, residual, None
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t

    x, dw_weight, pw_weight = cast(x), cast(dw_weight), cast(pw_weight)
    if residual is not None and residual.dtype != x.dtype:
        return x, dw_weight, pw_weight, None, residual
    return x, dw_weight, pw_weight, residual, None


def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, z: Tensor,
                          momentum: float) -> None:
    count = z.numel() // z.shape[1]
    if count == 0:  # as aten's batch_norm: an empty batch leaves the running statistics alone
        return
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
        running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)


def separable_conv(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bias: Optional[Tensor] = None, *, stride=1,
                   padding=0, dilation=1, pre_relu: bool = False, post_relu: bool = False,
                   residual: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """post(pw(dw(pre(x))) + bias) + residual in one fused op (no normalisation)."""
    x, dw_weight, pw_weight, residual, late_residual = autocast_inputs(x, dw_weight, pw_weight, residual)
    if bias is not None and torch.is_autocast_enabled(x.device.type):
        bias = bias.to(x.dtype)  # as autocast's conv2d, which adds the bias in the low precision
    if late_residual is not None:
        return separable_conv(x, dw_weight, pw_weight, bias, stride=stride, padding=padding, dilation=dilation,
                              pre_relu=pre_relu, post_relu=post_relu, backend=backend) + late_residual
    spec = UnitSpec.of(dw_weight, _pair(stride), _pair(padding), _pair(dilation), pre_relu, post_relu,
                       residual is not None)
    stride, padding, dilation = spec.stride, spec.padding, spec.dilation
    if _runs_plain(x, dw_weight, pw_weight, {"bias": bias}, residual, stride, padding, dilation, pre_relu, post_relu,
                   backend):
        return _plain_unit(x, dw_weight, pw_weight, bias, None, residual, stride, padding, dilation, pre_relu,
                           post_relu)
    return ops.sepconv_bn_infer(x, dw_weight, pw_weight, None, bias, residual, *spec.op_args(), backend)


def fold_batchnorm(dw_weight: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """(folded depthwise weight, per-channel bias): eval-mode BatchNorm(conv(x, dw_weight)) equals
    conv(x, folded weight) + bias. Differentiable, so eval-mode gradients reach the BatchNorm's
    affine parameters; computed in float32 (float64 for float64) and returned in dw_weight's dtype."""
    acc = torch.promote_types(dw_weight.dtype, torch.float32)
    gain = torch.rsqrt(running_var.to(acc) + eps)
    if weight is not None:
        gain = gain * weight.to(acc)
    shift = -running_mean.to(acc) * gain
    if bias is not None:
        shift = shift + bias.to(acc)
    return (dw_weight.to(acc) * gain.view(-1, 1, 1, 1)).to(dw_weight.dtype), shift.to(dw_weight.dtype)


def separable_conv_mid_bn(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], bn_weight: Optional[Tensor] = None,
                          bn_bias: Optional[Tensor] = None, *, mid_norm: bool = True, mid_act: Optional[str] = None,
                          mid_running_mean: Optional[Tensor] = None, mid_running_var: Optional[Tensor] = None,
                          mid_weight: Optional[Tensor] = None, mid_bias: Optional[Tensor] = None,
                          training: bool = False, momentum: float = 0.1, mid_momentum: Optional[float] = None,
                          eps: float = 1e-5, mid_eps: Optional[float] = None, stride=1, padding=0, dilation=1,
                          pre_relu: bool = False, post_relu: bool = False, residual: Optional[Tensor] = None,
                          backend: str = "auto") -> Tensor:
    """post(BN(pw(act(midBN(dw(pre(x))))))) + residual in one fused op (the `UnitSpec.mid` variant).

    Both BatchNorms take `F.batch_norm`'s arguments (the mid ones prefixed ``mid_``, per input
    channel; `mid_momentum` and `mid_eps` default to the outer ones); `mid_norm=False` leaves only
    the activation `mid_act` (None, "relu", "relu6", "silu", "gelu", "hardswish") between dw and pw.
    With batch statistics the running statistics given are updated as `F.batch_norm` updates them;
    in inference the mid BatchNorm folds into the depthwise weight plus a bias (`fold_batchnorm`).
    The two BatchNorms must agree on batch vs running statistics.
    """
    mid = mid_name(mid_norm, mid_act)
    if mid is None:
        return separable_conv_bn(x, dw_weight, pw_weight, running_mean, running_var, bn_weight, bn_bias,
                                 training=training, momentum=momentum, eps=eps, stride=stride, padding=padding,
                                 dilation=dilation, pre_relu=pre_relu, post_relu=post_relu, residual=residual,
                                 backend=backend)
    mid_momentum = momentum if mid_momentum is None else mid_momentum
    mid_eps = eps if mid_eps is None else mid_eps
    batch = training or running_mean is None or running_var is None
    if mid_norm and batch != (training or mid_running_mean is None or mid_running_var is None):
        raise NotImplementedError("the mid and the outer BatchNorm must both use batch statistics or both use "
                                  "running statistics (one is in training mode and the other not?)")
    if mid_norm and not batch:  # folded before autocast's cast, from the full-precision weight
        dw_weight, dw_bias = fold_batchnorm(dw_weight, mid_running_mean, mid_running_var, mid_weight, mid_bias,
                                            mid_eps)
    x, dw_weight, pw_weight, residual, late_residual = autocast_inputs(x, dw_weight, pw_weight, residual)
    spec = UnitSpec.of(dw_weight, _pair(stride), _pair(padding), _pair(dilation), pre_relu, post_relu,
                       residual is not None, mid)
    args = (*spec.op_args(), mid)
    if batch:
        if training and x.dim() == 4 and dw_weight.dim() == 4:
            F._verify_batch_size(spec.output_shape(x, pw_weight.shape[0]))
        y, z, m_mean, m_var, mean, var = mid_ops.sepconv_mid_train(
            x, dw_weight, pw_weight, mid_weight if mid_norm else None, mid_bias if mid_norm else None, bn_weight,
            bn_bias, residual, *args, mid_eps, eps, backend)
        if training and running_mean is not None and running_var is not None:
            _update_running_stats(running_mean, running_var, mean, var, z, momentum)
        if training and mid_norm and mid_running_mean is not None and mid_running_var is not None:
            _update_running_stats(mid_running_mean, mid_running_var, m_mean, m_var, z, mid_momentum)  # z: same count
    else:
        dw_bias = dw_bias.to(x.dtype) if mid_norm else None
        scale, shift = _fold_outer(running_mean, running_var, bn_weight, bn_bias, eps)
        y = mid_ops.sepconv_mid_infer(x, dw_weight, dw_bias, pw_weight, scale, shift, residual, *args, backend)
    return y if late_residual is None else y + late_residual


def _runs_plain(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, vectors: dict, residual: Optional[Tensor], stride,
                padding, dilation, pre_relu: bool, post_relu: bool, backend: str) -> bool:
    """Whether `auto` runs the plain modules' composition here (after the ops' own input checks)."""
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] == 0:
        return False  # the op gives the errors, and the empty batch its defined statistics
    if not dispatch.runs_reference(x.device, x.dtype, pre_relu, post_relu, residual is not None, backend):
        return False
    ops.check_inputs(x, dw_weight, pw_weight, vectors, residual, stride, padding, dilation)
    return True


def _plain_unit(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, pw_bias: Optional[Tensor], bn: Optional[tuple],
                residual: Optional[Tensor], stride, padding, dilation, pre_relu: bool, post_relu: bool) -> Tensor:
    """post(BN(pw(dw(pre(x))) + pw_bias)) + residual as the unfused modules compute it; `bn` holds
    `F.batch_norm`'s arguments after the input (running statistics updated in place when training)."""
    y = torch.relu(x) if pre_relu else x
    y = F.conv2d(y, dw_weight, None, stride, padding, dilation, groups=x.shape[1])
    y = F.conv2d(y, pw_weight, pw_bias)
    if bn is not None:
        y = F.batch_norm(y, *bn)
    if post_relu:
        y = torch.relu(y)
    if residual is not None:
        y = y + residual
    return reference.to_channels_last(y)
