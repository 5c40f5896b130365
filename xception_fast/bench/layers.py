"""Layer benchmarks: one separable unit of Xception per row, per competitor.

Competitors (the `provider` of a row), all with the same weights, inputs and memory format
(channels_last):
- ``cuda``, ``triton``, ``reference``: `xception_fast.SeparableConvBN2d` with that backend. On a GPU
  ``reference`` is F.conv2d (cuDNN) + BatchNorm math called through the fused op's custom-op
  boundary.
- ``eager``: the unit as plain modules (ReLU, nn.Conv2d(groups=C), nn.Conv2d(1x1), nn.BatchNorm2d,
  ReLU, add), i.e. what a PyTorch user runs today: the cuDNN baseline every speed-up is taken against.
- ``compile``: the same plain modules under ``torch.compile(mode=compile_mode)`` ("max-autotune").
Inference runs the module in eval mode (BatchNorm folded by the fused providers) under
`torch.inference_mode`; training runs forward and backward in train mode (batch statistics) with a
fixed random upstream gradient, input and parameter gradients dropped before each repetition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from xception_fast.bench.common import (COMPILE, EAGER, FUSED_PROVIDERS, LAYER_PROVIDERS, BenchCase, BenchSettings,
                                        random_tensor, torch_dtype)
from xception_fast.bench.roofline import Rates, roofline_metrics, unit_bytes, unit_flops
from xception_fast.bench.shapes import UnitShape, select_shapes, unit_shapes
from xception_fast.testing import randomize_batchnorm_, unfused_unit


class PlainUnit(nn.Module):
    """ReLU? -> depthwise -> pointwise -> BatchNorm -> ReLU? (+ residual), as plain PyTorch modules.

    Parameter names are those of `SeparableConvBN2d`, so its state dict loads here."""

    def __init__(self, shape: UnitShape):
        super().__init__()
        c = shape.in_channels
        self.depthwise = nn.Conv2d(c, c, shape.kernel_size, shape.stride, shape.padding, shape.dilation, groups=c,
                                   bias=False)
        self.pointwise = nn.Conv2d(c, shape.out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(shape.out_channels)
        self.pre_relu, self.post_relu = shape.pre_relu, shape.post_relu

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return unfused_unit(self, x, residual)


@dataclass(frozen=True)
class LayerCase(BenchCase):
    kind: ClassVar[str] = "layer"
    shape: UnitShape

    @property
    def name(self) -> str:
        return self.shape.slug

    def row_fields(self) -> dict:
        s = self.shape
        return {"label": s.label, "in_channels": s.in_channels, "out_channels": s.out_channels, "height": s.height,
                "width": s.width, "kernel_size": s.kernel_size, "stride": s.stride, "padding": s.padding,
                "dilation": s.dilation, "pre_relu": s.pre_relu, "post_relu": s.post_relu, "residual": s.residual,
                "count": s.count, "flow": s.flow, "first_module": s.first_module}


def layer_cases(settings: BenchSettings, shapes: Optional[list[UnitShape]] = None) -> list[LayerCase]:
    """Every (dtype, mode, shape, provider) the settings ask for, providers in `LAYER_PROVIDERS` order."""
    if shapes is None:
        shapes = unit_shapes(settings.layer_image_size)
    shapes = select_shapes(shapes, settings.shapes)
    providers = [p for p in LAYER_PROVIDERS if settings.wants_provider(p)]
    return [LayerCase(provider, mode, dtype, settings.layer_batch, shape)
            for dtype in settings.dtypes for mode in settings.modes for shape in shapes for provider in providers]


@dataclass
class PreparedLayer:
    fn: Callable[[], object]
    grad_to_none: list
    module: nn.Module
    compiled: bool


def prepare_layer(case: LayerCase, device, compile_mode: str = "max-autotune") -> PreparedLayer:
    """Build the competitor's module and inputs on `device`; `fn()` runs one repetition."""
    device = torch.device(device)
    shape, dtype = case.shape, torch_dtype(case.dtype)
    backend = case.provider if case.provider in FUSED_PROVIDERS else "reference"
    from xception_fast.nn import SeparableConvBN2d

    fused = SeparableConvBN2d(shape.in_channels, shape.out_channels, shape.kernel_size, shape.stride, shape.padding,
                              shape.dilation, pre_relu=shape.pre_relu, post_relu=shape.post_relu, backend=backend)
    randomize_batchnorm_(fused)
    if case.provider in FUSED_PROVIDERS:
        module: nn.Module = fused
    elif case.provider in (EAGER, COMPILE):
        module = PlainUnit(shape)
        module.load_state_dict(fused.state_dict())
    else:
        raise ValueError(f"unknown layer provider {case.provider!r}")
    module = module.to(device=device, dtype=dtype, memory_format=torch.channels_last).train(case.mode == "train")
    training = case.mode == "train"
    x = random_tensor((case.batch, shape.in_channels, shape.height, shape.width), dtype, device, channels_last=True,
                      requires_grad=training)
    out_shape = (case.batch, shape.out_channels, shape.out_height, shape.out_width)
    residual = random_tensor(out_shape, dtype, device, channels_last=True) if shape.residual else None
    call = module
    compiled = case.provider == COMPILE
    mark_step = None
    if compiled:
        call = torch.compile(module, mode=compile_mode)
        mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if device.type == "cuda" else None

    if not training:
        def fn():
            if mark_step is not None:
                mark_step()
            with torch.inference_mode():
                return call(x, residual)
        return PreparedLayer(fn, [], module, compiled)

    grad_y = random_tensor(out_shape, dtype, device, channels_last=True)

    def fn():
        if mark_step is not None:
            mark_step()
        call(x, residual).backward(grad_y)

    return PreparedLayer(fn, [x] + list(module.parameters()), module, compiled)


def layer_metrics(case: LayerCase, median_ms: float, rates: Optional[Rates]) -> dict:
    return roofline_metrics(unit_flops(case.shape, case.batch, case.mode),
                            unit_bytes(case.shape, case.batch, case.mode, case.dtype), median_ms, rates)
