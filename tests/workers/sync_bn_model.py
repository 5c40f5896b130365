"""The model and data shared by the SyncBatchNorm test and its torchrun workers."""

import torch
from torch import nn

from xception_fast import SeparableConvBN2d


class TwoUnits(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = SeparableConvBN2d(3, 5, stride=2, post_relu=True, backend="reference")
        self.b = SeparableConvBN2d(5, 5, pre_relu=True, momentum=None, backend="reference")

    def forward(self, x):
        x = self.a(x)
        return self.b(x, residual=x)


def build() -> nn.Module:
    torch.manual_seed(0)
    model = TwoUnits().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64, generator=generator) * 2 + 3
    grad = torch.randn(6, 5, 5, 5, dtype=torch.float64, generator=generator)
    return x, grad
