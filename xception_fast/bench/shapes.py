"""The distinct separable-unit shapes of Xception, derived from the model itself.

`unit_shapes(image_size)` builds `xception_fast.xception()` on the meta device (no memory, no
compute), runs one forward pass with a hook on every `SeparableConvBN2d`, and groups the units by
everything that decides their cost: input channels, output channels, input height and width, kernel,
stride, padding, dilation, the ReLU before and after, and whether a residual is added. At 299x299
the 34 units of the model fall into 11 distinct shapes; `count` says how many units share one, so a
per-layer time multiplied by `count` and summed is the model's total separable-unit time.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from xception_fast.spec import output_size

# Xception's three flows (paper Fig. 5) by the module that holds the unit.
_ENTRY = {"block1", "block2", "block3"}
_MIDDLE = {f"block{i}" for i in range(4, 12)}


def flow_of(module_name: str) -> str:
    top = module_name.split(".")[0]
    if top in _ENTRY:
        return "entry"
    if top in _MIDDLE:
        return "middle"
    return "exit"


@dataclass(frozen=True)
class UnitShape:
    """One separable unit's geometry: input [N, in_channels, height, width] -> [N, out_channels, ...]."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    pre_relu: bool = True
    post_relu: bool = False
    residual: bool = False
    count: int = 1  # units of the model with this shape
    flow: str = ""  # "entry", "middle", "exit", or e.g. "middle+exit" when shared
    first_module: str = ""  # the first module of the model with this shape, e.g. "block1.rep.0"
    mid: str = ""  # `UnitSpec.mid`: what runs between dw and pw ("bn", "bn_relu", ...; "" for nothing)

    @property
    def out_height(self) -> int:
        return output_size(self.height, self.kernel_size, self.stride, self.padding, self.dilation)

    @property
    def out_width(self) -> int:
        return output_size(self.width, self.kernel_size, self.stride, self.padding, self.dilation)

    @property
    def slug(self) -> str:
        """A short ASCII id, unique among Xception's shapes: e.g. ``middle-728x728-19-res``."""
        flags = []
        if not self.pre_relu:
            flags.append("nopre")
        if self.post_relu:
            flags.append("post")
        if self.residual:
            flags.append("res")
        if self.stride != 1:
            flags.append(f"s{self.stride}")
        if self.dilation != 1:
            flags.append(f"d{self.dilation}")
        if self.kernel_size != 3:
            flags.append(f"k{self.kernel_size}")
        if self.mid:
            flags.append(f"mid{self.mid}")
        size = str(self.height) if self.height == self.width else f"{self.height}x{self.width}"
        flow = self.flow.split("+")[0] or "unit"
        return "-".join([flow, f"{self.in_channels}x{self.out_channels}", size] + flags)

    @property
    def label(self) -> str:
        """Human-readable: ``middle 728->728 @19x19, ReLU first, +residual (x8)``."""
        parts = [f"{self.flow or 'unit'} {self.in_channels}->{self.out_channels} @{self.height}x{self.width}"]
        if self.pre_relu:
            parts.append("ReLU first")
        if self.post_relu:
            parts.append("ReLU after")
        if self.residual:
            parts.append("+residual")
        if self.mid:
            parts.append(f"{self.mid.replace('_', '+').replace('bn', 'BN')} between dw and pw")
        return ", ".join(parts) + f" (x{self.count})"

    def key(self) -> tuple:
        return (self.in_channels, self.out_channels, self.height, self.width, self.kernel_size, self.stride,
                self.padding, self.dilation, self.pre_relu, self.post_relu, self.residual, self.mid)

    def as_dict(self) -> dict:
        return asdict(self)


def _single(value) -> int:
    value = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if value[0] != value[1]:
        raise ValueError(f"the benchmark shapes assume square kernels, strides and padding, got {value}")
    return int(value[0])


def derive_unit_shapes(model: torch.nn.Module, image_size: int = 299, in_chans: int = 3) -> list[UnitShape]:
    """Run `model` once on a meta-device [1, in_chans, image_size, image_size] input and return its
    distinct `SeparableConvBN2d` shapes in order of first appearance. `model` is moved to meta."""
    from xception_fast.nn import SeparableConvBN2d

    seen: dict[tuple, dict] = {}
    handles = []

    def hook(name):
        def record(module, args, kwargs, output):
            x = args[0]
            residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
            dw = module.depthwise
            shape = UnitShape(
                in_channels=int(x.shape[1]), out_channels=int(output.shape[1]), height=int(x.shape[2]),
                width=int(x.shape[3]), kernel_size=_single(dw.kernel_size), stride=_single(dw.stride),
                padding=_single(dw.padding), dilation=_single(dw.dilation), pre_relu=bool(module.pre_relu),
                post_relu=bool(module.post_relu), residual=residual is not None, mid=module.mid or "")
            entry = seen.setdefault(shape.key(), {"shape": shape, "modules": []})
            entry["modules"].append(name)
        return record

    for name, module in model.named_modules():
        if isinstance(module, SeparableConvBN2d):
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    try:
        model = model.to("meta").eval()
        with torch.no_grad():
            model(torch.empty(1, in_chans, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()

    shapes = []
    for entry in seen.values():
        modules = entry["modules"]
        flows = []
        for name in modules:
            flow = flow_of(name)
            if flow not in flows:
                flows.append(flow)
        shape = entry["shape"]
        shapes.append(UnitShape(**{**shape.as_dict(), "count": len(modules), "flow": "+".join(flows),
                                   "first_module": modules[0]}))
    return shapes


@functools.lru_cache(maxsize=8)
def _xception_unit_shapes(image_size: int) -> tuple[UnitShape, ...]:
    from xception_fast.models.xception import xception

    return tuple(derive_unit_shapes(xception(backend="reference"), image_size))


def unit_shapes(image_size: int = 299) -> list[UnitShape]:
    """Xception's distinct separable-unit shapes for a square input of `image_size` (299 in the paper)."""
    return list(_xception_unit_shapes(int(image_size)))


@functools.lru_cache(maxsize=8)
def _aligned_unit_shapes(image_size: int) -> tuple[UnitShape, ...]:
    from xception_fast.models.xception_aligned import xception65

    shapes = derive_unit_shapes(xception65(backend="reference"), image_size)
    return tuple(UnitShape(**{**s.as_dict(), "flow": "aligned"}) for s in shapes)


def aligned_unit_shapes(image_size: int = 299) -> list[UnitShape]:
    """The aligned Xception65's (DeepLab's backbone, timm `xception65`) distinct separable-unit shapes:
    the mid variant (`dw -> BN [-> ReLU] -> pw -> BN`), flow "aligned"."""
    return list(_aligned_unit_shapes(int(image_size)))


def select_shapes(shapes: list[UnitShape], patterns) -> list[UnitShape]:
    """The shapes whose slug contains any of `patterns` (all when `patterns` is empty or None)."""
    if not patterns:
        return list(shapes)
    return [s for s in shapes if any(p in s.slug for p in patterns)]
