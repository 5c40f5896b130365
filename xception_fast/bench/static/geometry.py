"""One unit's sizes at a batch, as the providers' host code computes them (shared by the plan modules)."""

from __future__ import annotations

from dataclasses import dataclass

from xception_fast.bench.shapes import UnitShape

ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Unit:
    shape: UnitShape
    batch: int
    dtype: str

    @property
    def e(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @property
    def C(self) -> int:
        return self.shape.in_channels

    @property
    def Cout(self) -> int:
        return self.shape.out_channels

    @property
    def H(self) -> int:
        return self.shape.height

    @property
    def W(self) -> int:
        return self.shape.width

    @property
    def Ho(self) -> int:
        return self.shape.out_height

    @property
    def Wo(self) -> int:
        return self.shape.out_width

    @property
    def K(self) -> int:
        return self.shape.kernel_size

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
