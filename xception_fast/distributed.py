"""The fused unit under `nn.SyncBatchNorm`: statistics synchronised across processes.

Same protocol as PyTorch's SyncBatchNorm: each rank computes its per-channel count, mean and biased
variance in the fused forward; these are gathered and merged (Chan's parallel formula, stable for
large means) into global statistics, which normalise the local pre-BN output and update the running
statistics with the global unbiased variance. In backward the two per-channel reductions (sum of dy,
sum of dy * x_hat) are all-reduced before the fused convolution backward; the BatchNorm weight and
bias gradients stay local (DDP averages them, as for SyncBatchNorm).

The fused forward also normalises with the local statistics, which this path discards: one extra
elementwise pass, paid only under SyncBatchNorm with more than one process.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from xception_fast import ops, reference
from xception_fast.spec import UnitSpec


def merge_statistics(counts: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan et al.'s merge of per-rank (count [R], mean [R, C], biased var [R, C]) into the total
    count, mean and biased variance."""
    total = counts.sum()
    weights = (counts / total.clamp_min(1)).unsqueeze(1)
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean).square())).sum(0)
    return total, mean, var


class _SyncSeparableConvBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dw_weight, pw_weight, bn_weight, bn_bias, residual, running_mean, running_var, momentum,
                eps, spec, backend, group):
        _, z, mean, var = ops.sepconv_bn_train(x, dw_weight, pw_weight, bn_weight, bn_bias, None, *spec.op_args(), eps,
                                               backend)
        count = torch.full((1,), z.numel() // z.shape[1], dtype=mean.dtype, device=mean.device)
        local = torch.cat([count, mean, var]).unsqueeze(0)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        stats = torch.cat(gathered)
        channels = mean.shape[0]
        total, mean, var = merge_statistics(stats[:, 0], stats[:, 1:1 + channels], stats[:, 1 + channels:])
        if running_mean is not None and total > 0:
            unbiased = var * (total / (total - 1).clamp_min(1))
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)
        invstd = torch.rsqrt(var + eps)
        y = reference.bn_act(z, mean, invstd, bn_weight, bn_bias, residual, spec.post_relu)
        ctx.save_for_backward(x, z, dw_weight, pw_weight, bn_weight, bn_bias, mean, invstd)
        ctx.args = (spec, backend, group, total, residual is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, z, dw_weight, pw_weight, bn_weight, bn_bias, mean, invstd = ctx.saved_tensors
        spec, backend, group, total, has_residual = ctx.args
        sum_dy, sum_dy_xhat = ops.bn_backward_reduce(grad_y, z, mean, invstd, bn_weight, bn_bias, spec.post_relu,
                                                     backend)
        combined = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(combined, group=group)
        mean_dy, mean_dy_xhat = (combined / total.clamp_min(1)).split(sum_dy.shape[0])
        grad_x, grad_dw, grad_pw = ops.sepconv_bn_train_backward(
            grad_y, x, z, dw_weight, pw_weight, mean, invstd, bn_weight, bn_bias, mean_dy, mean_dy_xhat,
            *spec.op_args(), backend)
        return (grad_x, grad_dw, grad_pw,
                sum_dy_xhat.to(bn_weight.dtype) if bn_weight is not None else None,
                sum_dy.to(bn_bias.dtype) if bn_bias is not None else None,
                grad_y if has_residual else None) + (None,) * 7


def sync_separable_conv_bn(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                           *, momentum: float, eps: float, spec: UnitSpec, residual: Optional[Tensor], backend: str,
                           group=None) -> Tensor:
    """Training forward of the fused unit `spec` with statistics synchronised over `group`."""
    return _SyncSeparableConvBN.apply(x, dw_weight, pw_weight, bn_weight, bn_bias, residual, running_mean,
                                      running_var, momentum, eps, spec, backend, group)
