"""Xception (Chollet, CVPR 2017, arXiv 1610.02357), built from fused separable units.

The architecture of the paper's Fig. 5, layer for layer as timm's `legacy_xception` (whose weights
were ported from Keras): a stem of two plain 3x3 convs; entry flow blocks to 128, 256, 728 channels;
middle flow of 8 blocks at 728; exit flow block to 1024, separable convs to 1536 and 2048; global
average pooling and a logistic-regression classifier. 36 conv layers in 14 modules; 22,855,952
parameters with 1000 classes. Each "ReLU -> SeparableConv -> BN" of the paper is one
`SeparableConvBN2d(pre_relu=True)`; the identity shortcut of the middle flow is fused into its last
unit as `residual`.

Max pools pad symmetrically (1, 1) as timm's do; Keras pads TF-"same" (0 before, 1 after): the
output sizes agree, the windows are shifted by one pixel.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from xception_fast.nn import SeparableConvBN2d

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU}


class UnfusedSeparableConvBN2d(nn.Module):
    """ReLU? -> depthwise -> activation -> pointwise -> BN, as plain modules.

    The paper's Fig. 10 ablation puts an activation between the depthwise and the pointwise conv,
    which the fused kernels cannot express: this module runs those layers one by one. Its parameter
    names match `SeparableConvBN2d`'s, so state dicts move between the two.
    """

    def __init__(self, in_channels: int, out_channels: int, mid_activation: str, pre_relu: bool = False,
                 post_relu: bool = False):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.mid = _ACTIVATIONS[mid_activation]()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pre_relu, self.post_relu = pre_relu, post_relu

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = self.bn(self.pointwise(self.mid(self.depthwise(torch.relu(x) if self.pre_relu else x))))
        if self.post_relu:
            y = torch.relu(y)
        return y if residual is None else y + residual


def _unit(in_channels: int, out_channels: int, mid_activation: Optional[str], backend: str, **flags) -> nn.Module:
    if mid_activation is None:
        return SeparableConvBN2d(in_channels, out_channels, 3, backend=backend, **flags)
    return UnfusedSeparableConvBN2d(in_channels, out_channels, mid_activation, **flags)


class Block(nn.Module):
    """`reps` separable units, an optional stride-2 max pool, and the shortcut (1x1 conv + BN when the
    shape changes, identity otherwise, none when `residual` is False)."""

    def __init__(self, in_channels: int, out_channels: int, reps: int, stride: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True, residual: bool = True,
                 mid_activation: Optional[str] = None, backend: str = "auto"):
        super().__init__()
        units = []
        for i in range(reps):
            if grow_first:
                unit_in, unit_out = (in_channels if i == 0 else out_channels), out_channels
            else:
                unit_in, unit_out = in_channels, (in_channels if i < reps - 1 else out_channels)
            units.append(_unit(unit_in, unit_out, mid_activation, backend, pre_relu=start_with_relu or i > 0))
        self.rep = nn.ModuleList(units)
        self.pool = nn.MaxPool2d(3, stride, 1) if stride != 1 else None
        self.residual = residual
        if residual and (out_channels != in_channels or stride != 1):
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_channels)
        else:
            self.skip = self.skipbn = None

    def forward(self, inp: Tensor) -> Tensor:
        x = inp
        identity = self.residual and self.skip is None and self.pool is None
        for i, unit in enumerate(self.rep):
            x = unit(x, residual=inp) if identity and i == len(self.rep) - 1 else unit(x)
        if self.pool is not None:
            x = self.pool(x)
        if self.skip is not None:
            x = x + self.skipbn(self.skip(inp))
        return x


class Xception(nn.Module):
    """Xception with fused separable units. See `xception()` for the arguments."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, residual: bool = True,
                 mid_activation: Optional[str] = None, fc_layers: Sequence[int] = (), backend: str = "auto"):
        super().__init__()
        if mid_activation is not None and mid_activation not in _ACTIVATIONS:
            raise ValueError(f"mid_activation must be None, 'relu' or 'elu', got {mid_activation!r}")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.num_features = 2048
        flow = dict(residual=residual, mid_activation=mid_activation, backend=backend)

        self.conv1 = nn.Conv2d(in_chans, 32, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.act2 = nn.ReLU(inplace=True)

        self.block1 = Block(64, 128, 2, 2, start_with_relu=False, **flow)
        self.block2 = Block(128, 256, 2, 2, **flow)
        self.block3 = Block(256, 728, 2, 2, **flow)
        for i in range(4, 12):
            setattr(self, f"block{i}", Block(728, 728, 3, 1, **flow))
        self.block12 = Block(728, 1024, 2, 2, grow_first=False, **flow)

        self.conv3 = _unit(1024, 1536, mid_activation, backend, post_relu=True)
        self.conv4 = _unit(1536, self.num_features, mid_activation, backend, post_relu=True)

        self.global_pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        width = self.num_features
        for features in fc_layers:
            head += [nn.Linear(width, features), nn.ReLU(inplace=True)]
            width = features
        self.fc_layers = nn.Sequential(*head)
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        for i in range(1, 13):
            x = getattr(self, f"block{i}")(x)
        return self.conv4(self.conv3(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc_layers(torch.flatten(self.global_pool(x), 1))
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def xception(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, residual: bool = True,
             mid_activation: Optional[str] = None, fc_layers: Sequence[int] = (), backend: str = "auto") -> Xception:
    """The paper's Xception (22,855,952 parameters with the defaults), with fused separable units.

    Args:
        num_classes: classifier outputs (0 for none: `forward` returns the pooled features).
        in_chans: input channels.
        drop_rate: dropout before the classifier (the paper used 0.5 on ImageNet).
        residual: False removes every shortcut, as the paper's Fig. 9 ablation.
        mid_activation: None, "relu" or "elu" between depthwise and pointwise (Fig. 10). With an
            activation there the units cannot use the fused kernels and run as plain modules.
        fc_layers: widths of fully connected layers (each followed by ReLU) before the classifier;
            the paper's JFT models used (4096, 4096).
        backend: provider for the fused units ("auto", "cuda", "triton", "reference").
    Any input of at least 71x71 pixels works; 299x299 is the paper's size.
    """
    return Xception(num_classes, in_chans, drop_rate, residual, mid_activation, fc_layers, backend)
