"""Drop-in modules for the fused units.

Their parameters and buffers live in real submodules (`depthwise`, `pointwise`, `bn`, and `bn_dw`
for a BatchNorm between dw and pw, named as timm's aligned Xception names it), so
`state_dict` keys are those of `nn.Conv2d(groups=C)` + `nn.Conv2d(1x1)` + `nn.BatchNorm2d`, and
tools that look for BatchNorm layers (SyncBatchNorm conversion, FSDP wrapping policies) find one.
The submodules are never called; their tensors feed the fused op.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from xception_fast import backends
from xception_fast.distributed import sync_separable_conv_bn
from xception_fast.functional import autocast_inputs, separable_conv, separable_conv_bn, separable_conv_mid_bn
from xception_fast.spec import UnitSpec, mid_name

_pair = nn.modules.utils._pair


def same_padding(kernel_size, stride, dilation) -> tuple[int, int]:
    """The symmetric padding that keeps the spatial size at stride 1 (odd kernels only)."""
    kernel_size, dilation = _pair(kernel_size), _pair(dilation)
    if any(k % 2 == 0 for k in kernel_size):
        raise ValueError(f"padding=None ('same') needs an odd kernel_size, got {kernel_size}; pass padding")
    return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))


def _depthwise_and_pointwise(in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
                             factory) -> tuple[nn.Conv2d, nn.Conv2d]:
    if padding is None:
        padding = same_padding(kernel_size, stride, dilation)
    depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation, groups=in_channels,
                          bias=False, **factory)
    pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias, **factory)
    return depthwise, pointwise


def _check_separable_pair(depthwise: nn.Conv2d, pointwise: nn.Conv2d) -> None:
    if not isinstance(depthwise, nn.Conv2d) or not isinstance(pointwise, nn.Conv2d):
        raise TypeError("depthwise and pointwise must be nn.Conv2d modules")
    c = depthwise.in_channels
    if depthwise.groups != c or depthwise.out_channels != c:
        raise ValueError(f"depthwise must be a depthwise conv (groups = in = out channels), got groups="
                         f"{depthwise.groups}, in={c}, out={depthwise.out_channels}")
    if depthwise.bias is not None:
        raise ValueError("depthwise must have bias=False")
    if depthwise.padding_mode != "zeros" or isinstance(depthwise.padding, str):
        raise ValueError(f"depthwise must use numeric zero padding, got padding={depthwise.padding!r}, "
                         f"padding_mode={depthwise.padding_mode!r}")
    if pointwise.in_channels != c or pointwise.kernel_size != (1, 1) or pointwise.stride != (1, 1) \
            or pointwise.groups != 1 or pointwise.padding != (0, 0):
        raise ValueError(f"pointwise must be a plain 1x1 conv from {c} channels, got {pointwise}")


def _conv_args(depthwise: nn.Conv2d) -> dict:
    return dict(stride=depthwise.stride, padding=depthwise.padding, dilation=depthwise.dilation)


def _batchnorm_mode(bn: nn.modules.batchnorm._BatchNorm):
    """(use batch statistics, running mean, running var, momentum factor) as
    nn.modules.batchnorm._BatchNorm.forward decides them, verbatim in effect (num_batches_tracked
    is advanced here, as there)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    update_running = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if update_running else None
    running_var = bn.running_var if update_running else None
    return use_batch_stats, running_mean, running_var, factor


class _SeparableUnit(nn.Module):
    """What both fused modules share: the flags, the provider, the unit's `UnitSpec`."""

    mid_act: Optional[str] = None

    def _set_unit(self, pre_relu: bool, post_relu: bool, backend: str, mid_act: Optional[str] = None) -> None:
        self.pre_relu, self.post_relu = pre_relu, post_relu
        self.backend = backends._check_name(backend, "backend")
        self.mid_act = mid_act
        mid_name(False, mid_act)  # validates the name

    @classmethod
    def _wrap(cls, pre_relu: bool, post_relu: bool, backend: str, mid_act: Optional[str] = None,
              **modules: Optional[nn.Module]):
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        for name, child in modules.items():
            setattr(module, name, child)
        module._set_unit(pre_relu, post_relu, backend, mid_act)
        return module

    @property
    def mid(self) -> Optional[str]:
        """`UnitSpec.mid`: what runs between dw and pw (None: nothing)."""
        return mid_name(getattr(self, "bn_dw", None) is not None, self.mid_act)

    @property
    def spec(self) -> UnitSpec:
        dw = self.depthwise
        return UnitSpec.of(dw.weight, dw.stride, dw.padding, dw.dilation, self.pre_relu, self.post_relu, mid=self.mid)

    def extra_repr(self) -> str:
        mid = f", mid_act={self.mid_act!r}" if self.mid_act else ""
        return f"pre_relu={self.pre_relu}, post_relu={self.post_relu}{mid}, backend={self.backend!r}"


class SeparableConvBN2d(_SeparableUnit):
    """post_relu(BatchNorm(pointwise(depthwise(pre_relu(x))))) + residual, fused.

    Args mirror `nn.Conv2d` and `nn.BatchNorm2d`; ``padding=None`` is "same" at stride 1.
    ``mid_norm=True`` adds a BatchNorm over the depthwise output (submodule ``bn_dw``, built with the
    same eps, momentum, affine and track_running_stats) and ``mid_act`` an activation after it
    (None, "relu", "relu6", "silu", "gelu", "hardswish"): the unit of timm's aligned Xception
    (`SeparableConv2d`: conv_dw, bn_dw, act_dw, conv_pw, bn_pw, act_pw) and MobileNet V1. Only the
    ``reference`` provider computes that variant today (``auto`` picks it). ``bn_dw`` and ``bn``
    must both be in training mode or both in eval mode.
    ``backend`` is "auto", "cuda", "triton" or "reference" (see `xception_fast.backends`).
    Inputs of any memory format are accepted; the output is channels_last.
    After `nn.SyncBatchNorm.convert_sync_batchnorm`, training with more than one process
    synchronises the BatchNorm statistics across processes (see `xception_fast.distributed`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=None, dilation=1,
                 pre_relu: bool = False, post_relu: bool = False, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, backend: str = "auto", device=None,
                 dtype=None, mid_norm: bool = False, mid_act: Optional[str] = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        depthwise, pointwise = _depthwise_and_pointwise(
            in_channels, out_channels, kernel_size, stride, padding, dilation, False, factory)
        self.depthwise = depthwise  # registration order = timm's parameter order: dw, bn_dw, pw, bn
        self.bn_dw = nn.BatchNorm2d(in_channels, eps, momentum, affine, track_running_stats, **factory) \
            if mid_norm else None
        self.pointwise = pointwise
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **factory)
        self._set_unit(pre_relu, post_relu, backend, mid_act)

    @classmethod
    def from_modules(cls, depthwise: nn.Conv2d, pointwise: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm,
                     pre_relu: bool = False, post_relu: bool = False, backend: str = "auto",
                     bn_dw: Optional[nn.modules.batchnorm._BatchNorm] = None,
                     mid_act: Optional[str] = None) -> "SeparableConvBN2d":
        """Wrap existing layers; the new module shares their parameters and buffers. `bn_dw` is the
        BatchNorm between the depthwise and the pointwise conv, `mid_act` the activation after it."""
        _check_separable_pair(depthwise, pointwise)
        if pointwise.bias is not None:
            raise ValueError("pointwise must have bias=False when followed by BatchNorm")
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != pointwise.out_channels:
            raise ValueError(f"bn must be a BatchNorm over {pointwise.out_channels} channels, got {bn}")
        if bn_dw is not None and (not isinstance(bn_dw, nn.modules.batchnorm._BatchNorm)
                                  or bn_dw.num_features != depthwise.out_channels):
            raise ValueError(f"bn_dw must be a BatchNorm over {depthwise.out_channels} channels, got {bn_dw}")
        return cls._wrap(pre_relu, post_relu, backend, mid_act, depthwise=depthwise, bn_dw=bn_dw,
                         pointwise=pointwise, bn=bn)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        bn = self.bn
        use_batch_stats, running_mean, running_var, factor = _batchnorm_mode(bn)
        if self.mid is not None:
            return self._forward_mid(x, residual, use_batch_stats, running_mean, running_var, factor)
        if use_batch_stats and self._synchronised(bn):
            return self._forward_sync(x, residual, running_mean, running_var, factor)
        return separable_conv_bn(
            x, self.depthwise.weight, self.pointwise.weight, running_mean, running_var, bn.weight, bn.bias,
            training=use_batch_stats, momentum=factor, eps=bn.eps, pre_relu=self.pre_relu,
            post_relu=self.post_relu, residual=residual, backend=self.backend, **_conv_args(self.depthwise))

    def _forward_mid(self, x, residual, use_batch_stats, running_mean, running_var, factor):
        bn, bn_dw = self.bn, self.bn_dw
        mid_stats = _batchnorm_mode(bn_dw) if bn_dw is not None else (use_batch_stats, None, None, factor)
        if use_batch_stats and (self._synchronised(bn) or (bn_dw is not None and self._synchronised(bn_dw))):
            raise NotImplementedError("SyncBatchNorm across processes is not implemented for units with a "
                                      "BatchNorm between depthwise and pointwise (bn_dw)")
        if mid_stats[0] != use_batch_stats:
            raise NotImplementedError("bn_dw and bn must both use batch statistics or both running statistics; "
                                      "put both in training mode or both in eval mode")
        _, mid_running_mean, mid_running_var, mid_factor = mid_stats
        return separable_conv_mid_bn(
            x, self.depthwise.weight, self.pointwise.weight, running_mean, running_var, bn.weight, bn.bias,
            mid_norm=bn_dw is not None, mid_act=self.mid_act, mid_running_mean=mid_running_mean,
            mid_running_var=mid_running_var, mid_weight=getattr(bn_dw, "weight", None),
            mid_bias=getattr(bn_dw, "bias", None), training=use_batch_stats, momentum=factor,
            mid_momentum=mid_factor, eps=bn.eps, mid_eps=getattr(bn_dw, "eps", None), pre_relu=self.pre_relu,
            post_relu=self.post_relu, residual=residual, backend=self.backend, **_conv_args(self.depthwise))

    @staticmethod
    def _synchronised(bn: nn.Module) -> bool:
        return (isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(bn.process_group) > 1)

    def _forward_sync(self, x, residual, running_mean, running_var, factor):
        x, dw_weight, pw_weight, residual, late_residual = autocast_inputs(
            x, self.depthwise.weight, self.pointwise.weight, residual)
        bn = self.bn
        y = sync_separable_conv_bn(x, dw_weight, pw_weight, bn.weight, bn.bias, running_mean, running_var,
                                   momentum=factor, eps=bn.eps, spec=self.spec, residual=residual,
                                   backend=self.backend, group=bn.process_group)
        return y if late_residual is None else y + late_residual



class SeparableConv2d(_SeparableUnit):
    """post_relu(pointwise(depthwise(pre_relu(x)))) + residual, fused, without normalisation.

    Parameters are those of `nn.Conv2d(groups=C)` (no bias) + `nn.Conv2d(1x1, bias=bias)`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=None, dilation=1,
                 bias: bool = False, pre_relu: bool = False, post_relu: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.depthwise, self.pointwise = _depthwise_and_pointwise(
            in_channels, out_channels, kernel_size, stride, padding, dilation, bias, factory)
        self._set_unit(pre_relu, post_relu, backend)

    @classmethod
    def from_modules(cls, depthwise: nn.Conv2d, pointwise: nn.Conv2d, pre_relu: bool = False,
                     post_relu: bool = False, backend: str = "auto") -> "SeparableConv2d":
        """Wrap existing layers; the new module shares their parameters."""
        _check_separable_pair(depthwise, pointwise)
        return cls._wrap(pre_relu, post_relu, backend, depthwise=depthwise, pointwise=pointwise)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return separable_conv(x, self.depthwise.weight, self.pointwise.weight, self.pointwise.bias,
                              pre_relu=self.pre_relu, post_relu=self.post_relu, residual=residual,
                              backend=self.backend, **_conv_args(self.depthwise))
