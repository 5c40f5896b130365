"""One description of a fused unit, passed from the functional API through the ops to the providers.

The unit is ``y = post(BN(pw(dw(pre(x))))) (+ residual)``; `UnitSpec` holds everything about it that
is not a tensor. The custom ops keep primitive arguments in their schemas (`op_args`), and the
CUDA extension fills its params struct from those in one place (csrc/checks.h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The output length of a convolution along one dimension (as `nn.Conv2d`)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# The activations a unit may apply between dw and pw (and their `torch.nn.functional` names).
MID_ACTIVATIONS = ("relu", "relu6", "silu", "gelu", "hardswish")


def mid_name(norm: bool, act: Optional[str]) -> Optional[str]:
    """`UnitSpec.mid` for a BatchNorm (or not) and an activation (or None) between dw and pw."""
    if act is not None and act not in MID_ACTIVATIONS:
        raise ValueError(f"mid_act must be None or one of {MID_ACTIVATIONS}, got {act!r}")
    return "_".join(["bn"] * norm + [act] * (act is not None)) or None


@dataclass(frozen=True)
class UnitSpec:
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    pre_relu: bool = False
    post_relu: bool = False
    residual: bool = False
    # Between dw and pw: None (Xception), or "bn", "bn_<act>" or "<act>" (`mid_name`): a BatchNorm
    # over the depthwise output and/or an activation (aligned Xception, MobileNet V1).
    mid: Optional[str] = None

    @classmethod
    def of(cls, dw_weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
           pre_relu: bool, post_relu: bool, residual: bool = False, mid: Optional[str] = None) -> "UnitSpec":
        """The spec of a unit with this depthwise weight [C, 1, kh, kw] and these op arguments."""
        kh, kw = (tuple(dw_weight.shape[2:]) + (1, 1))[:2]  # of any rank: the ops' checks reject a wrong one
        return cls((int(kh), int(kw)), tuple(stride), tuple(padding), tuple(dilation), bool(pre_relu),
                   bool(post_relu), bool(residual), mid)

    @property
    def mid_norm(self) -> bool:
        return self.mid is not None and self.mid.split("_")[0] == "bn"

    @property
    def mid_act(self) -> Optional[str]:
        """The activation between dw and pw (one of MID_ACTIVATIONS), or None."""
        act = self.mid[3:] if self.mid_norm else self.mid
        return act or None

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        return tuple(output_size(size, *args) for size, *args in
                     zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation))

    def output_shape(self, x: Tensor, out_channels: int) -> list[int]:
        return [x.shape[0], out_channels, *self.output_hw(x.shape[2], x.shape[3])]

    def op_args(self) -> tuple[list[int], list[int], list[int], bool, bool]:
        """(stride, padding, dilation, pre_relu, post_relu): the spec as the ops' schemas take it."""
        return list(self.stride), list(self.padding), list(self.dilation), self.pre_relu, self.post_relu

    def variants(self) -> frozenset[str]:
        """The unit's features beyond dw -> pw -> BN (see `backends.Provider.variants`)."""
        used = {name for name in ("pre_relu", "post_relu", "residual") if getattr(self, name)}
        return frozenset(used | ({f"mid_{self.mid}"} if self.mid else set()))
