"""Functional forms of the fused units, with BatchNorm semantics identical to `F.batch_norm`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from xception_fast import ops

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
    stride, padding, dilation = list(_pair(stride)), list(_pair(padding)), list(_pair(dilation))
    if training or running_mean is None or running_var is None:
        if training and x.dim() == 4 and dw_weight.dim() == 4:
            F._verify_batch_size(ops.output_shape(x, dw_weight, pw_weight, stride, padding, dilation))
        y, z, mean, var = ops.sepconv_bn_train(x, dw_weight, pw_weight, bn_weight, bn_bias, residual, stride,
                                               padding, dilation, pre_relu, post_relu, eps, backend)
        if training and running_mean is not None and running_var is not None:
            _update_running_stats(running_mean, running_var, mean, var, z, momentum)
        return y
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shift = -running_mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias
    return ops.sepconv_bn_infer(x, dw_weight, pw_weight, scale, shift, residual, stride, padding, dilation,
                                pre_relu, post_relu, backend)


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
    return ops.sepconv_bn_infer(x, dw_weight, pw_weight, None, bias, residual, list(_pair(stride)),
                                list(_pair(padding)), list(_pair(dilation)), pre_relu, post_relu, backend)
