"""`fuse_model`: replace depthwise -> pointwise -> BatchNorm chains in an existing model with
`SeparableConvBN2d`, sharing the parameters and buffers.

A chain is fused only where the order in which its layers run is certain:
- consecutive children of an `nn.Sequential`: an optional `nn.ReLU`, then either a depthwise
  `nn.Conv2d` and a 1x1 `nn.Conv2d` or a timm `legacy_xception` `SeparableConv2d` (`conv1`,
  `pointwise`), then a BatchNorm; the fused module takes the first position and the others become
  `nn.Identity`, so the indices (and state-dict keys) of later children do not move;
- the same with a BatchNorm and/or an activation between the depthwise and the 1x1 conv (MobileNet
  V1's `dw -> BN -> act -> pw -> BN (-> ReLU)`, the `mid` variant; a ReLU right after the last
  BatchNorm joins the unit);
- timm's `SeparableConvNormAct` (`conv_dw`, `conv_pw`, `bn` = BatchNorm + ReLU/identity) and timm's
  aligned-Xception `SeparableConv2d` (`conv_dw, bn_dw, act_dw, conv_pw, bn_pw, act_pw`), replaced
  whole (the ReLU before the latter stays a module of its own: timm's feature taps read it).
Layers wired together in a parent's own `forward` (timm's exit-flow `conv3`/`bn3`) cannot be matched
safely without tracing the forward; they are left alone and reported. State-dict keys of fused
chains change (they become `<name>.depthwise/pointwise/bn`): fuse after loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from xception_fast.nn import SeparableConvBN2d
from xception_fast.spec import MID_ACTIVATIONS

_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass
class FuseReport:
    fused: list[str] = field(default_factory=list)  # qualified names of the fused chains
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (depthwise conv, why it was left alone)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} depthwise -> pointwise -> BatchNorm chains"]
        lines += [f"  fused   {name}" for name in self.fused]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _is_depthwise(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1
            and m.bias is None and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _is_pointwise(m: nn.Module, channels: int) -> bool:
    return (isinstance(m, nn.Conv2d) and m.in_channels == channels and m.kernel_size == (1, 1)
            and m.stride == (1, 1) and m.padding == (0, 0) and m.groups == 1 and m.bias is None)


def _timm_class(m: nn.Module, name: str) -> bool:
    return type(m).__name__ == name and type(m).__module__.startswith("timm.")


def _separable_pair(m: nn.Module) -> Optional[tuple[nn.Conv2d, nn.Conv2d]]:
    if _timm_class(m, "SeparableConv2d") and hasattr(m, "conv1") and hasattr(m, "pointwise"):
        return m.conv1, m.pointwise
    return None


def _bn_post_relu(bn: nn.Module) -> Optional[bool]:
    """Whether the BatchNorm ends in a ReLU (timm's BatchNormAct2d), or None if it can't be fused."""
    if type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return False
    if _timm_class(bn, "BatchNormAct2d") and isinstance(bn, _BatchNorm):
        if not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
            return None
        act = getattr(bn, "act", nn.Identity())
        if isinstance(act, nn.Identity):
            return False
        return True if type(act) is nn.ReLU else None
    return None


# Activation modules the mid variant computes, by name (`spec.MID_ACTIVATIONS`); Identity is none.
_ACTIVATION_TYPES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish"}
assert set(_ACTIVATION_TYPES.values()) == set(MID_ACTIVATIONS)
_NOT_AN_ACTIVATION = "?"


def _activation(m: nn.Module) -> Optional[str]:
    """The mid activation `m` computes: a name, None for nn.Identity, `_NOT_AN_ACTIVATION` otherwise."""
    if type(m) is nn.Identity:
        return None
    if type(m) is nn.GELU and m.approximate != "none":
        return _NOT_AN_ACTIVATION
    return _ACTIVATION_TYPES.get(type(m), _NOT_AN_ACTIVATION)


def _plain_bn(m: nn.Module, channels: int) -> bool:
    return type(m) is nn.BatchNorm2d and m.num_features == channels


def _mid_chain(children: list[nn.Module], i: int, depthwise: nn.Conv2d):
    """After a depthwise conv at children[i - 1]: (index of the 1x1 conv, bn_dw, mid_act), or None."""
    bn_dw = None
    if i < len(children) and _plain_bn(children[i], depthwise.out_channels):
        bn_dw, i = children[i], i + 1
    act = _activation(children[i]) if i < len(children) else None
    if act not in (None, _NOT_AN_ACTIVATION):
        i += 1
    else:
        act = None
    if (bn_dw is None and act is None) or i >= len(children) or not _is_pointwise(children[i], depthwise.out_channels):
        return None
    return i, bn_dw, act


def _try_chain(children: list[nn.Module], start: int):
    """A fusable chain starting at `start`:
    (length, depthwise, pointwise, bn, pre_relu, post_relu, bn_dw, mid_act)."""
    i, pre_relu = start, False
    if type(children[i]) is nn.ReLU and i + 1 < len(children):
        # An in-place ReLU first in a Sequential would also modify the caller's tensor; fusing it
        # would drop that side effect, so such a ReLU stays.
        if not (children[i].inplace and i == 0):
            pre_relu, i = True, i + 1
    pair = _separable_pair(children[i])
    bn_dw = mid_act = None
    if pair is not None:
        depthwise, pointwise, i = pair[0], pair[1], i + 1
    elif _is_depthwise(children[i]) and i + 1 < len(children) and _is_pointwise(children[i + 1],
                                                                                  children[i].out_channels):
        depthwise, pointwise, i = children[i], children[i + 1], i + 2
    elif _is_depthwise(children[i]) and (mid := _mid_chain(children, i + 1, children[i])) is not None:
        (j, bn_dw, mid_act), depthwise = mid, children[i]
        pointwise, i = children[j], j + 1
    else:
        return None
    if not _is_depthwise(depthwise) or not _is_pointwise(pointwise, depthwise.out_channels) or i >= len(children):
        return None
    bn = children[i]
    post_relu = _bn_post_relu(bn) if isinstance(bn, _BatchNorm) else None
    if post_relu is None or bn.num_features != pointwise.out_channels:
        return None
    mid = bn_dw is not None or mid_act is not None
    if mid and not post_relu and i + 1 < len(children) and type(children[i + 1]) is nn.ReLU:
        post_relu, i = True, i + 1  # MobileNet V1's trailing ReLU
    return i + 1 - start, depthwise, pointwise, bn, pre_relu, post_relu, bn_dw, mid_act


def _fuse_sequential(seq: nn.Sequential, prefix: str, backend: str, report: FuseReport, done: set) -> None:
    children = list(seq.children())
    names = list(seq._modules)
    i = 0
    while i < len(children):
        chain = _try_chain(children, i)
        if chain is None:
            i += 1
            continue
        length, depthwise, pointwise, bn, pre_relu, post_relu, bn_dw, mid_act = chain
        seq._modules[names[i]] = SeparableConvBN2d.from_modules(depthwise, pointwise, bn, pre_relu, post_relu,
                                                                backend, bn_dw=bn_dw, mid_act=mid_act)
        for j in range(i + 1, i + length):
            seq._modules[names[j]] = nn.Identity()
        done.add(id(depthwise))
        report.fused.append(f"{prefix}{names[i]}")
        i += length


def _walk(module: nn.Module, prefix: str, backend: str, report: FuseReport, done: set) -> None:
    if isinstance(module, SeparableConvBN2d):
        done.add(id(module.depthwise))
        return
    if isinstance(module, nn.Sequential):
        _fuse_sequential(module, prefix, backend, report, done)
    for name, child in list(module.named_children()):
        if _timm_class(child, "SeparableConvNormAct"):
            post_relu = _bn_post_relu(child.bn)
            if _is_depthwise(child.conv_dw) and _is_pointwise(child.conv_pw, child.conv_dw.out_channels) \
                    and post_relu is not None:
                setattr(module, name, SeparableConvBN2d.from_modules(child.conv_dw, child.conv_pw, child.bn,
                                                                     False, post_relu, backend))
                done.add(id(child.conv_dw))
                report.fused.append(f"{prefix}{name}")
                continue
        if _timm_class(child, "SeparableConv2d") and hasattr(child, "bn_dw"):
            fused = _fuse_aligned(child, backend)
            if isinstance(fused, str):
                report.skipped.append((f"{prefix}{name}.conv_dw", fused))
                done.add(id(child.conv_dw))
            else:
                setattr(module, name, fused)
                done.add(id(child.conv_dw))
                report.fused.append(f"{prefix}{name}")
            continue
        _walk(child, f"{prefix}{name}.", backend, report, done)


def _fuse_aligned(m: nn.Module, backend: str):
    """timm's aligned-Xception SeparableConv2d as one fused unit, or why not."""
    dw, pw = m.conv_dw, m.conv_pw
    if type(dw) is not nn.Conv2d or not _is_depthwise(dw) or type(pw) is not nn.Conv2d or \
            not _is_pointwise(pw, dw.out_channels):
        return "conv_dw/conv_pw are not a plain depthwise conv and 1x1 conv (e.g. dynamic 'same' padding)"
    if not _plain_bn(m.bn_dw, dw.out_channels) or not _plain_bn(m.bn_pw, pw.out_channels):
        return "bn_dw/bn_pw are not nn.BatchNorm2d"
    mid_act, post = _activation(m.act_dw), _activation(m.act_pw)
    if mid_act == _NOT_AN_ACTIVATION or post not in (None, "relu"):
        return f"activations {type(m.act_dw).__name__}/{type(m.act_pw).__name__} are not fused"
    return SeparableConvBN2d.from_modules(dw, pw, m.bn_pw, False, post == "relu", backend, bn_dw=m.bn_dw,
                                          mid_act=mid_act)


def fuse_model(model: nn.Module, backend: str = "auto") -> tuple[nn.Module, FuseReport]:
    """Fuse `model` in place; returns it and a report of what was fused and what was left alone."""
    report, done = FuseReport(), set()
    _walk(model, "", backend, report, done)
    for name, m in model.named_modules():
        if _is_depthwise(m) and id(m) not in done:
            report.skipped.append((name, "not followed by a 1x1 conv and a BatchNorm in an nn.Sequential "
                                         "(or wired in a parent's forward, whose call order is unknown)"))
    return model, report
