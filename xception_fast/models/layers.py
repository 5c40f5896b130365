"""Two model-level pieces the Xception needs beyond the fused units: TensorFlow-"same" max pooling
(for Keras-exact numerics) and per-block gradient checkpointing that leaves BatchNorm's running
statistics as plain training would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one dimension: total max((ceil(n/s)-1)*s+k-n, 0), the odd pixel
    after. For Keras's 3x3 stride-2 pools that is (1, 1) on odd sizes and (0, 1) on even ones."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaxPool2dSame(nn.Module):
    """`MaxPool2d` with TensorFlow/Keras "same" padding (padded with -inf, so the padding never wins).

    timm has the same layer (`timm.layers.MaxPool2dSame`); timm is not a dependency of this package,
    so this is its few lines. Symmetric padding goes to `max_pool2d` itself; only the asymmetric case
    pads explicitly.
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Tensor) -> Tensor:
        (top, bottom), (left, right) = (same_pad(n, self.kernel_size, self.stride) for n in x.shape[-2:])
        if top == bottom and left == right:
            return F.max_pool2d(x, self.kernel_size, self.stride, (top, left))
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding='same'"


def checkpoint_module(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` under non-reentrant activation checkpointing.

    The recomputation in backward runs `module` a second time; in training mode that would update
    BatchNorm's running statistics (and `num_batches_tracked`) twice. Batch statistics, hence the
    recomputed activations and the gradients, are exact either way; the buffers are restored after
    the recomputation so the running statistics are those of plain training too.
    """
    if torch.compiler.is_compiling():
        # Compiled, the recomputation is the partitioner's: it replays only the ops that backward
        # needs, never the running-statistics updates, and the call counter below cannot be traced.
        return checkpoint(module, x, use_reentrant=False)
    calls = 0

    def run(inp: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return module(inp)
        saved = [b.clone() for b in module.buffers()]
        try:
            return module(inp)
        finally:  # also when checkpoint stops the recomputation early, by raising
            with torch.no_grad():
                for buffer, value in zip(module.buffers(), saved):
                    buffer.copy_(value)

    return checkpoint(run, x, use_reentrant=False)
