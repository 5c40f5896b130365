"""Xception (Chollet, CVPR 2017, arXiv 1610.02357), built from fused separable units.

The architecture of the paper's Fig. 5, layer for layer as timm's `legacy_xception` (whose weights
were ported from Keras): a stem of two plain 3x3 convs; entry flow blocks to 128, 256, 728 channels;
middle flow of 8 blocks at 728; exit flow block to 1024, separable convs to 1536 and 2048; global
average pooling and a logistic-regression classifier. 36 conv layers in 14 modules; 22,855,952
parameters with 1000 classes. Each "ReLU -> SeparableConv -> BN" of the paper is one
`SeparableConvBN2d(pre_relu=True)`; the identity shortcut of the middle flow is fused into its last
unit as `residual`.

By default the numerics are timm's: BatchNorm eps 1e-5 and max pools padded symmetrically (1, 1).
Keras's original (`keras.applications.Xception`, whose ImageNet weights timm ported) differs in
exactly two places: BatchNorm eps 1e-3, and max pools padded TensorFlow-"same" (per dimension,
symmetric on odd sizes, (0, 1) on even ones: at 299x299 only the 74 -> 37 pool differs, at 224x224
two do). `keras_compat=True` switches both, and BatchNorm momentum to Keras's (0.99, i.e. 0.01 here).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from xception_fast.models.layers import MaxPool2dSame, checkpoint_module
from xception_fast.nn import SeparableConvBN2d

# Keras's BatchNormalization defaults; Keras's momentum m is PyTorch's 1 - m.
KERAS_BN_EPS, KERAS_BN_MOMENTUM = 1e-3, 0.01

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
                 mid_activation: Optional[str] = None, backend: str = "auto", same_pool: bool = False):
        super().__init__()
        units = []
        for i in range(reps):
            if grow_first:
                unit_in, unit_out = (in_channels if i == 0 else out_channels), out_channels
            else:
                unit_in, unit_out = in_channels, (in_channels if i < reps - 1 else out_channels)
            units.append(_unit(unit_in, unit_out, mid_activation, backend, pre_relu=start_with_relu or i > 0))
        self.rep = nn.ModuleList(units)
        if stride == 1:
            self.pool = None
        else:
            self.pool = MaxPool2dSame(3, stride) if same_pool else nn.MaxPool2d(3, stride, 1)
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
                 mid_activation: Optional[str] = None, fc_layers: Sequence[int] = (), backend: str = "auto",
                 keras_compat: bool = False):
        super().__init__()
        if mid_activation is not None and mid_activation not in _ACTIVATIONS:
            raise ValueError(f"mid_activation must be None, 'relu' or 'elu', got {mid_activation!r}")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.num_features, self.keras_compat, self.grad_checkpointing = 2048, keras_compat, False
        flow = dict(residual=residual, mid_activation=mid_activation, backend=backend, same_pool=keras_compat)

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

        # timm legacy_xception's taps: the stem, the ReLU'd outputs of block1, block2 and block11 (the
        # ReLU the next block starts with), the exit flow. `_feature_ends`: blocks run before each tap.
        self.feature_info = [
            dict(num_chs=64, reduction=2, module="act2"),
            dict(num_chs=128, reduction=4, module="block1"),
            dict(num_chs=256, reduction=8, module="block2"),
            dict(num_chs=728, reduction=16, module="block11"),
            dict(num_chs=self.num_features, reduction=32, module="conv4"),
        ]
        self._feature_ends = [0, 1, 2, 11, 12]

        self.global_pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        width = self.num_features
        for features in fc_layers:
            head += [nn.Linear(width, features), nn.ReLU(inplace=True)]
            width = features
        self.fc_layers = nn.Sequential(*head)
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if keras_compat:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eps, m.momentum = KERAS_BN_EPS, KERAS_BN_MOMENTUM

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block (and the exit flow's two units) in backward instead of storing its
        activations. Gradients are exact: recomputation reruns the same ops on the same inputs."""
        self.grad_checkpointing = enable

    def _run(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_module(module, x)
        return module(x)

    def _stem(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(x)))

    def _exit(self, x: Tensor) -> Tensor:
        return self._run(self.conv4, self._run(self.conv3, x))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        for i in range(1, 13):
            x = self._run(getattr(self, f"block{i}"), x)
        return self._exit(x)

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              stop_early: bool = False, intermediates_only: bool = False,
                              output_fmt: str = "NCHW", norm: bool = False):
        """The feature maps of `feature_info` (timm's `forward_intermediates`, same taps and values
        as timm's `legacy_xception`): `indices` None for all five, n for the last n, or a sequence.
        Returns (final features, [maps]), or only the maps with `intermediates_only`; `stop_early`
        stops after the deepest requested map (the final features are then that map)."""
        from xception_fast.models.features import feature_take_indices  # features imports this module

        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self._feature_ends), indices)
        last = len(self._feature_ends) - 1
        intermediates = []
        x = self._stem(x)
        if 0 in take:
            intermediates.append(x)
        num_blocks = self._feature_ends[max_index] if stop_early else self._feature_ends[-1]
        tap = 1
        for i in range(1, num_blocks + 1):
            x = self._run(getattr(self, f"block{i}"), x)
            if tap < last and i == self._feature_ends[tap]:
                if tap in take:
                    intermediates.append(torch.relu(x))
                tap += 1
        if num_blocks == self._feature_ends[-1]:
            x = self._exit(x)
            if last in take:
                intermediates.append(x)
        elif num_blocks > 0:
            x = torch.relu(x)  # stopped at a block tap: the features end at its activation, as the tap
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc_layers(torch.flatten(self.global_pool(x), 1))
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new, freshly initialised classifier with `num_classes` outputs (0: none, `forward`
        returns the pooled features), on the old one's device and dtype. Pooling is always average
        pooling (`global_pool` is accepted as timm's signature has it: None or "avg")."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"only average pooling is supported, got global_pool={global_pool!r}")
        width = self.fc_layers[-2].out_features if len(self.fc_layers) else self.num_features
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.fc = nn.Linear(width, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 \
            else nn.Identity()


def xception(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, residual: bool = True,
             mid_activation: Optional[str] = None, fc_layers: Sequence[int] = (), backend: str = "auto",
             keras_compat: bool = False, features_only: bool = False,
             out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3, 4)) -> Xception:
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
        keras_compat: Keras's numerics (`keras.applications.Xception`): BatchNorm eps 1e-3 and
            momentum 0.01 (Keras's 0.99), TensorFlow-"same" max pooling. Default: timm's (eps 1e-5,
            momentum 0.1, symmetric pools). Running variances are updated with the unbiased batch
            variance either way (PyTorch's rule; Keras uses the biased one).
        features_only: return an `XceptionFeatures`, whose forward gives the feature maps of
            `out_indices` (stage indices into `feature_info`: 0 stem, 1-3 blocks 1, 2, 11, 4 exit).
    Any input of at least 71x71 pixels works; 299x299 is the paper's size.
    """
    args = dict(in_chans=in_chans, residual=residual, mid_activation=mid_activation, backend=backend,
                keras_compat=keras_compat)
    if features_only:
        from xception_fast.models.features import XceptionFeatures  # it subclasses Xception

        return XceptionFeatures(out_indices, **args)
    return Xception(num_classes, drop_rate=drop_rate, fc_layers=fc_layers, **args)
