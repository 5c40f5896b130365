"""Weights in and out: timm's `legacy_xception` layout <-> this package's Xception.

The two models are the same network layer for layer; only the names differ. timm names each block's
layers in one `rep` Sequential of [ReLU, SeparableConv2d(conv1 = depthwise, pointwise), BatchNorm2d]
triples (block1's lacks the first ReLU), and the exit flow's separable convs `conv3`/`conv4` with
their BatchNorms `bn3`/`bn4` beside them. Here each triple is one `SeparableConvBN2d` at `rep.<unit>`
holding `depthwise`, `pointwise` and `bn`. Everything else (stem, shortcuts, classifier) has the
same name. timm's weights were ported from Keras, whose BatchNorm eps is 1e-3; timm (and this model)
use 1e-5, so outputs match timm's, not Keras's, to the last digit (`xception(keras_compat=True)` and
`xception_fast.keras_weights` for Keras's).
"""

from __future__ import annotations

import re
from typing import Mapping, Union

import torch
from torch import nn

_SEPARABLE = {"conv1": "depthwise", "pointwise": "pointwise"}
_SEPARABLE_BACK = {v: k for k, v in _SEPARABLE.items()}
_REP = re.compile(r"^block(\d+)\.rep\.(\d+)\.(.+)$")
_EXIT = re.compile(r"^(conv[34])\.(conv1|pointwise)\.(.+)$")
_EXIT_BN = re.compile(r"^bn([34])\.(.+)$")
_OURS_REP = re.compile(r"^block(\d+)\.rep\.(\d+)\.(depthwise|pointwise|bn)\.(.+)$")
_OURS_EXIT = re.compile(r"^conv([34])\.(depthwise|pointwise|bn)\.(.+)$")


def _rep_offset(block: int) -> int:
    return 1 if block == 1 else 0  # block1 starts without a ReLU, so its triples start at index 0


def timm_key_to_ours(key: str) -> str:
    if m := _REP.match(key):
        block, index, rest = int(m[1]), int(m[2]), m[3]
        unit, role = divmod(index + _rep_offset(block), 3)
        if role == 1:
            layer, _, rest = rest.partition(".")
            return f"block{block}.rep.{unit}.{_SEPARABLE[layer]}.{rest}"
        return f"block{block}.rep.{unit}.bn.{rest}"
    if m := _EXIT.match(key):
        return f"{m[1]}.{_SEPARABLE[m[2]]}.{m[3]}"
    if m := _EXIT_BN.match(key):
        return f"conv{m[1]}.bn.{m[2]}"
    return key


def our_key_to_timm(key: str) -> str:
    if m := _OURS_REP.match(key):
        block, unit, layer, rest = int(m[1]), int(m[2]), m[3], m[4]
        if layer == "bn":
            return f"block{block}.rep.{3 * unit + 2 - _rep_offset(block)}.{rest}"
        return f"block{block}.rep.{3 * unit + 1 - _rep_offset(block)}.{_SEPARABLE_BACK[layer]}.{rest}"
    if m := _OURS_EXIT.match(key):
        if m[2] == "bn":
            return f"bn{m[1]}.{m[3]}"
        return f"conv{m[1]}.{_SEPARABLE_BACK[m[2]]}.{m[3]}"
    return key


def load_timm_weights(model: nn.Module, source: Union[Mapping[str, torch.Tensor], nn.Module],
                      strict: bool = True):
    """Load a timm `legacy_xception` state dict (or the timm model itself) into our `Xception`, or a
    timm `xception41/65/71` one into our `XceptionAligned`.

    Returns what `load_state_dict` returns (missing and unexpected keys, when `strict=False`).
    """
    state = source.state_dict() if isinstance(source, nn.Module) else source
    to_ours = getattr(model, "timm_key_to_ours", timm_key_to_ours)  # a model with its own timm layout says so
    return model.load_state_dict({to_ours(k): v for k, v in state.items()}, strict=strict)


def to_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our `Xception`'s state dict under timm `legacy_xception`'s names (or a model's own timm names)."""
    to_timm = getattr(model, "our_key_to_timm", our_key_to_timm)
    return {to_timm(k): v for k, v in model.state_dict().items()}
