"""Aligned Xception 41/65/71 (DeepLab v3+'s backbones), built from fused separable units.

Layer for layer as timm's `xception_aligned` (`xception41`, `xception65`, `xception71`), itself a port
of the TensorFlow DeepLab models: a stem of two 3x3 conv-BN-ReLU layers, then blocks of three
separable units (`dw -> BN -> [act] -> pw -> BN`) with a 1x1 conv-BN shortcut where the shape
changes, the last block without shortcut and with a ReLU after both BatchNorms of each unit; global
average pooling and a linear classifier. BatchNorm eps is 1e-3 (TensorFlow's), momentum 0.1.

Each of timm's `act -> SeparableConv2d` pairs is one `SeparableConvBN2d(pre_relu=True, mid_norm=True)`
whose `bn_dw` is timm's `bn_dw`; the shortcut (or the identity) is added inside the block's last unit.
State-dict keys differ from timm's only inside the units (conv_dw/conv_pw/bn_pw here are
depthwise/pointwise/bn): `load_timm_weights` and `to_timm_state_dict` convert.

``output_stride`` 8 or 16 replaces the last strides by dilation exactly as timm does (DeepLab's
atrous backbone). Features follow timm's conventions: taps inside each strided block (the input of
its last, strided unit, after that unit's ReLU) and the final block's output; `feature_info` lists
them as dicts (num_chs, reduction, module; a `features.FeatureInfo` with ``features_only``),
`forward_intermediates` returns them, and ``features_only=True`` makes `forward` return the ones at
``out_indices`` (without the classifier).

The pre-activation variants (timm's `xception41p`/`65p`) put the BatchNorm before the depthwise conv
(`BN -> ReLU -> dw -> pw`), a different unit; they are not built here.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from xception_fast.models.features import FeatureInfo, Indices, feature_take_indices
from xception_fast.nn import SeparableConvBN2d

BN_EPS, BN_MOMENTUM = 1e-3, 0.1


def _padding(kernel: int, stride: int, dilation: int) -> int:
    # timm's symmetric default padding (timm.layers.padding.get_padding)
    return ((stride - 1) + dilation * (kernel - 1)) // 2


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample (as timm's DropPath); torch has no module for it."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class ConvBNAct(nn.Module):
    """conv -> BN (-> ReLU); the names are timm's ConvNormAct's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, _padding(kernel_size, stride, 1),
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels, BN_EPS, BN_MOMENTUM)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class AlignedBlock(nn.Module):
    """Three separable units in `stack` (conv1..conv3, the last one strided) and the shortcut.

    With `start_with_relu` each unit is ReLU -> dw -> BN -> pw -> BN (timm's XceptionModule with its
    act1..act3); without, each unit is dw -> BN -> ReLU -> pw -> BN -> ReLU.
    """

    def __init__(self, in_channels: int, out_channels: Union[int, Sequence[int]], stride: int = 1,
                 dilation: int = 1, start_with_relu: bool = True, no_skip: bool = False, drop_path: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        out = tuple(out_channels) if isinstance(out_channels, Sequence) else (out_channels,) * 3
        self.in_channels, self.out_channels = in_channels, out[-1]
        self.no_skip, self.drop_path = no_skip, drop_path
        self.shortcut = ConvBNAct(in_channels, out[-1], 1, stride, act=False) \
            if not no_skip and (out[-1] != in_channels or stride != 1) else None
        units, channels = OrderedDict(), in_channels
        for i, width in enumerate(out):
            unit_stride = stride if i == 2 else 1
            units[f"conv{i + 1}"] = SeparableConvBN2d(
                channels, width, 3, unit_stride, _padding(3, unit_stride, dilation), dilation,
                pre_relu=start_with_relu, post_relu=not start_with_relu, eps=BN_EPS, momentum=BN_MOMENTUM,
                backend=backend, mid_norm=True, mid_act=None if start_with_relu else "relu")
            channels = width
        self.stack = nn.Sequential(units)

    def forward_with_tap(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, tap): the tap is the last unit's input after its ReLU (timm's `stack.act3`)."""
        h = x
        for unit in self.stack[:-1]:
            h = unit(h)
        last = self.stack[-1]
        tap = torch.relu(h) if last.pre_relu else h
        if self.no_skip:
            return last(h), tap
        skip = x if self.shortcut is None else self.shortcut(x)
        if self.drop_path > 0 and self.training:
            return _drop_path(last(h), self.drop_path, True) + skip, tap
        return last(h, residual=skip), tap  # the residual add fused into the unit

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_tap(x)[0]


class XceptionAligned(nn.Module):
    """Aligned Xception; see `xception41`/`xception65`/`xception71` for the arguments."""

    def __init__(self, block_cfg: Sequence[dict], num_classes: int = 1000, in_chans: int = 3,
                 output_stride: int = 32, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 features_only: bool = False, out_indices: Indices = None, backend: str = "auto"):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.stem = nn.Sequential(ConvBNAct(in_chans, 32, 3, 2), ConvBNAct(32, 64, 3, 1))

        # timm's schedule: a stride that would pass output_stride becomes dilation for the blocks after it.
        dilation, stride = 1, 2
        entries, self.feature_ends, blocks = [], [], []
        for i, cfg in enumerate(block_cfg):
            cfg = dict(cfg)
            block_stride = cfg.pop("stride")
            out = cfg["out_channels"]
            if block_stride > 1:
                tap_chs = out[-2] if isinstance(out, Sequence) else out
                entries.append(dict(num_chs=tap_chs, reduction=stride, module=f"blocks.{i}.stack.conv3"))
                self.feature_ends.append(i)
                if stride * block_stride > output_stride:
                    next_dilation, block_stride = dilation * block_stride, 1
                else:
                    next_dilation, stride = dilation, stride * block_stride
            else:
                next_dilation = dilation
            rate = drop_path_rate * i / (len(block_cfg) - 1)  # timm's linear stochastic-depth decay
            blocks.append(AlignedBlock(**cfg, stride=block_stride, dilation=dilation, drop_path=rate,
                                       backend=backend))
            dilation = next_dilation
        self.blocks = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = blocks[-1].out_channels
        entries.append(dict(num_chs=self.num_features, reduction=stride, module=f"blocks.{len(blocks) - 1}"))
        self.feature_ends.append(len(blocks) - 1)

        self.features_only = features_only
        self.feature_info = FeatureInfo(entries, feature_take_indices(len(entries), out_indices)[0]) \
            if features_only else entries
        self.head = None if features_only else nn.Module()
        if self.head is not None:  # timm's ClassifierHead: average pool, dropout, fc
            self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- weights as timm names them ---------------------------------------------------------------
    _TIMM = {"conv_dw": "depthwise", "conv_pw": "pointwise", "bn_pw": "bn"}
    _OURS = {v: k for k, v in _TIMM.items()}

    @classmethod
    def timm_key_to_ours(cls, key: str) -> str:
        return re.sub(r"(\.stack\.conv\d)\.(conv_dw|conv_pw|bn_pw)\.", lambda m: f"{m[1]}.{cls._TIMM[m[2]]}.", key)

    @classmethod
    def our_key_to_timm(cls, key: str) -> str:
        return re.sub(r"(\.stack\.conv\d)\.(depthwise|pointwise|bn)\.", lambda m: f"{m[1]}.{cls._OURS[m[2]]}.", key)

    # --- forward ----------------------------------------------------------------------------------
    def forward_intermediates(self, x: Tensor, indices: Indices = None, stop_early: bool = False,
                              intermediates_only: bool = False, output_fmt: str = "NCHW", norm: bool = False):
        """As timm's: (final features, [taps]), or only the taps; `stop_early` stops after the block of
        the deepest tap asked for. `norm` has nothing to apply (no final norm), as in timm."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        taken, deepest = feature_take_indices(len(self.feature_ends), indices)
        last_block = self.feature_ends[deepest] if stop_early or intermediates_only else len(self.blocks) - 1
        intermediates = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks[:last_block + 1]):
            if i in self.feature_ends:
                feature = self.feature_ends.index(i)
                x, tap = block.forward_with_tap(x)
                if feature == len(self.feature_ends) - 1:
                    tap = x  # the final block's own output
                if feature in taken:
                    intermediates.append(tap)
            else:
                x = block(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head.fc(x)

    def forward(self, x: Tensor):
        if self.features_only:
            return self.forward_intermediates(x, self.feature_info.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))


def _entry(*widths_and_strides) -> list[dict]:
    return [dict(in_channels=i, out_channels=o, stride=s) for i, o, s in widths_and_strides]


def _exit() -> list[dict]:
    return [dict(in_channels=728, out_channels=(728, 1024, 1024), stride=2),
            dict(in_channels=1024, out_channels=(1536, 1536, 2048), stride=1, no_skip=True, start_with_relu=False)]


_MIDDLE = (728, 728, 1)
_BLOCKS = {
    "xception41": _entry((64, 128, 2), (128, 256, 2), (256, 728, 2), *[_MIDDLE] * 8) + _exit(),
    "xception65": _entry((64, 128, 2), (128, 256, 2), (256, 728, 2), *[_MIDDLE] * 16) + _exit(),
    "xception71": _entry((64, 128, 2), (128, 256, 1), (256, 256, 2), (256, 728, 1), (728, 728, 2),
                         *[_MIDDLE] * 16) + _exit(),
}


def _build(name: str, **kwargs) -> XceptionAligned:
    return XceptionAligned(_BLOCKS[name], **kwargs)


def xception41(**kwargs) -> XceptionAligned:
    """Aligned Xception-41 (timm `xception41`). Keyword arguments: num_classes (1000; 0 for none),
    in_chans (3), output_stride (32, 16 or 8), drop_rate, drop_path_rate, features_only,
    out_indices (of the 5 feature taps; default all), backend (the fused units' provider)."""
    return _build("xception41", **kwargs)


def xception65(**kwargs) -> XceptionAligned:
    """Aligned Xception-65 (timm `xception65`, DeepLab v3+'s backbone); arguments as `xception41`."""
    return _build("xception65", **kwargs)


def xception71(**kwargs) -> XceptionAligned:
    """Aligned Xception-71 (timm `xception71`); arguments as `xception41` (7 feature taps)."""
    return _build("xception71", **kwargs)
