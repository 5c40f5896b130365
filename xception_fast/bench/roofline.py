"""FLOPs and bytes of a separable unit, the machine's measured rates, and the roofline floor.

The floor of a unit is ``max(flops / matrix_rate, bytes / copy_bandwidth)``, with both rates
measured on the machine in the same run (`measure_rates`): the matrix rate from a large square
matmul in the row's dtype, the copy bandwidth from a large device-to-device copy (read + write
bytes), each from its fastest repetition (a peak rate, so the floor stays a floor). A row's ``roofline_fraction`` is floor / measured time: 1.0 would be a kernel that runs at
the matmul rate or at copy speed, whichever binds. It is a lower bound on time, not a promise: the
depthwise FLOPs are counted at the matrix rate although they cannot use tensor cores (they are
k*k / Cout of the total, about 1% for Xception's 728-channel units).

FLOPs (multiply-add = 2), for input [N, C, H, W], output [N, Cout, Ho, Wo], k x k depthwise:
    depthwise  2 * N * C * Ho * Wo * k * k
    pointwise  2 * N * Ho * Wo * C * Cout
    inference  depthwise + pointwise  (BatchNorm, ReLU and residual are elementwise and not counted)
    training   3 x inference: forward, and in backward the grad of the input and of the weights of
               both convolutions (any recomputation an implementation chooses is not counted)
Bytes are the compulsory traffic: each tensor of the unit's interface read or written once per pass,
in the row's dtype:
    inference  read x, weights (C*k*k + C*Cout) and the 2*Cout folded BatchNorm vectors,
               read the residual if any, write y
    training   forward: as inference (2*Cout BatchNorm weight and bias), write y;
               backward: read grad_y, x, y and the weights, write grad_x and the weight gradients
               (the residual's gradient is grad_y itself: no traffic)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from xception_fast.bench.common import dtype_name, element_size, random_tensor, torch_dtype
from xception_fast.bench.shapes import UnitShape
from xception_fast.bench.timing import TimingConfig, time_fn


def unit_flops(shape: UnitShape, batch: int, mode: str) -> int:
    ho, wo, k = shape.out_height, shape.out_width, shape.kernel_size
    depthwise = 2 * batch * shape.in_channels * ho * wo * k * k
    pointwise = 2 * batch * ho * wo * shape.in_channels * shape.out_channels
    forward = depthwise + pointwise
    if mode == "infer":
        return forward
    if mode == "train":
        return 3 * forward
    raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")


def unit_bytes(shape: UnitShape, batch: int, mode: str, dtype) -> int:
    e = element_size(dtype)
    x = batch * shape.in_channels * shape.height * shape.width
    y = batch * shape.out_channels * shape.out_height * shape.out_width
    weights = shape.in_channels * shape.kernel_size ** 2 + shape.in_channels * shape.out_channels
    vectors = 2 * shape.out_channels
    residual = y if shape.residual else 0
    forward = x + weights + vectors + residual + y
    if mode == "infer":
        return e * forward
    if mode == "train":
        backward = y + x + y + weights + x + weights + vectors  # grad_y, x, y, W in; grad_x, grad W out
        return e * (forward + backward)
    raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")


@dataclass(frozen=True)
class Rates:
    """A machine's measured matrix rate (dtype-specific) and copy bandwidth."""

    device: str
    dtype: str
    matmul_tflops: float
    copy_gbps: float
    matmul_n: int
    copy_bytes: int
    float32_matmul_precision: Optional[str] = None  # for fp32: "high" means TF32 tensor cores

    def as_dict(self) -> dict:
        return asdict(self)


_RATE_TIMING_GPU = TimingConfig(warmup_ms=50.0, rep_ms=300.0)
_RATE_TIMING_CPU = TimingConfig(warmup_ms=0.0, rep_ms=20.0)


def _rate_timing(device: torch.device) -> TimingConfig:
    return _RATE_TIMING_GPU if device.type == "cuda" else _RATE_TIMING_CPU


def measure_matmul_tflops(device, dtype, n: Optional[int] = None) -> tuple[float, int, Optional[str]]:
    """(TFLOP/s, n, fp32 precision) of an n x n x n matmul. On a GPU in fp32, TF32 is allowed when
    cuDNN convolutions may use it (`torch.backends.cudnn.allow_tf32`, on by default), so the floor
    of an fp32 row is set by the rate its cuDNN competitors can reach."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 256)
    dt = torch_dtype(dtype)
    a = random_tensor((n, n), dt, device)
    b = random_tensor((n, n), dt, device)
    out = torch.empty((n, n), dtype=dt, device=device)
    previous = torch.get_float32_matmul_precision()
    precision = None
    if dt == torch.float32:
        precision = previous
        if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
            precision = "high"
    try:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        timing = time_fn(lambda: torch.mm(a, b, out=out), device, _rate_timing(device))
    finally:
        torch.set_float32_matmul_precision(previous)
    return 2 * n ** 3 / (timing.min_ms * 1e-3) / 1e12, n, precision


def measure_copy_gbps(device, nbytes: Optional[int] = None) -> tuple[float, int]:
    """(GB/s, bytes) of a device copy of `nbytes` (1 GiB on a GPU), counting the read and the write."""
    device = torch.device(device)
    nbytes = nbytes or (2 ** 30 if device.type == "cuda" else 32 * 2 ** 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, _rate_timing(device))
    return 2 * src.numel() * 4 / (timing.min_ms * 1e-3) / 1e9, src.numel() * 4


def measure_rates(device, dtype, copy_gbps: Optional[tuple[float, int]] = None) -> Rates:
    """The matmul rate in `dtype` and the copy bandwidth (pass a previous copy measurement to reuse it)."""
    device = torch.device(device)
    tflops, n, precision = measure_matmul_tflops(device, dtype)
    gbps, nbytes = copy_gbps or measure_copy_gbps(device)
    return Rates(device=str(device), dtype=dtype_name(dtype), matmul_tflops=tflops, copy_gbps=gbps, matmul_n=n,
                 copy_bytes=nbytes, float32_matmul_precision=precision)


def roofline_metrics(flops: int, nbytes: int, time_ms: float, rates: Optional[Rates]) -> dict:
    """Achieved TFLOP/s and GB/s at `time_ms`, and the floor and fraction of it against `rates`."""
    seconds = time_ms * 1e-3
    out = {"flops": int(flops), "bytes": int(nbytes), "tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9}
    if rates is not None and rates.matmul_tflops > 0 and rates.copy_gbps > 0:
        compute_s = flops / (rates.matmul_tflops * 1e12)
        memory_s = nbytes / (rates.copy_gbps * 1e9)
        floor_s = max(compute_s, memory_s)
        out.update(floor_ms=floor_s * 1e3, roofline_fraction=floor_s / seconds,
                   bound="compute" if compute_s >= memory_s else "memory")
    return out
