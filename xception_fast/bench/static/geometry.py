"""One unit's sizes at a batch, as the providers' host code computes them (shared by the plan modules)."""

from __future__ import annotations

from dataclasses import dataclass, field

from xception_fast.bench.shapes import UnitShape

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Unit:
    shape: UnitShape
    batch: int
    dtype: str
    # The short names the plans' formulas use, from the shape and the dtype (element bytes e, channels
    # C -> Cout, input H x W, output Ho x Wo, kernel K).
    e: int = field(init=False)
    C: int = field(init=False)
    Cout: int = field(init=False)
    H: int = field(init=False)
    W: int = field(init=False)
    Ho: int = field(init=False)
    Wo: int = field(init=False)
    K: int = field(init=False)

    def __post_init__(self):
        s = self.shape
        names = dict(e=ELEMENT_BYTES[self.dtype], C=s.in_channels, Cout=s.out_channels, H=s.height, W=s.width,
                     Ho=s.out_height, Wo=s.out_width, K=s.kernel_size)
        for name, value in names.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    @property
    def P(self) -> int:
        """Output positions N x Ho x Wo."""
        return self.batch * self.Ho * self.Wo

    @property
    def Q(self) -> int:
        """Input positions N x H x W."""
        return self.batch * self.H * self.W

    def conv_ints(self) -> dict:
        s, p, d = self.shape.stride, self.shape.padding, self.shape.dilation
        return dict(stride_h=s, stride_w=s, pad_h=p, pad_w=p, dil_h=d, dil_w=d)

    def x_bytes(self) -> int:
        return self.e * self.Q * self.C

    def y_bytes(self) -> int:
        return self.e * self.P * self.Cout

    def d_bytes(self) -> int:
        return self.e * self.P * self.C

    def weight_bytes(self) -> int:
        return self.e * (self.C * self.K * self.K + self.C * self.Cout)

    def split_trips(self, splits: int, chunk: int, block: int) -> float:
        """Average iterations of a loop over one position split's positions in steps of `block`."""
        total = sum(cdiv(min(chunk, self.P - s * chunk), block) for s in range(splits))
        return total / splits
