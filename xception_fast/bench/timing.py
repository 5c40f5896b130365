"""Median timing of a callable: CUDA events on a GPU, `time.perf_counter` on the CPU.

On a GPU every repetition is bracketed by two CUDA events recorded on the current stream, so the
figure is the GPU's time for the work, not the time to launch it; the events are read after one
`torch.cuda.synchronize()` at the end. As `triton.testing.do_bench`: the callable runs once and is
timed over a few calls to estimate its cost, then warms up for `warmup_ms` (at least `min_warmup`
calls), then runs `rep_ms` worth of timed repetitions (clamped to [min_reps, max_reps]); gradients
of `grad_to_none` are dropped and, if `flush_l2`, a 256 MiB buffer is zeroed before each repetition
(outside the events), so no repetition finds its inputs in the L2 cache of the previous one.
Medians are reported with the 20th and 80th percentiles.

First calls (compilation, cuDNN autotuning) are not part of any timing: `first_call_seconds`
measures them separately, synchronised, with the wall clock.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch

from xception_fast.bench.common import synchronize

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TimingConfig:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_warmup: int = 1
    min_reps: int = 10
    max_reps: int = 1000
    flush_l2: bool = True


# Layers: do_bench-like, L2 flushed. Models: longer, no flush (a training loop doesn't flush).
LAYER_GPU = TimingConfig(warmup_ms=25.0, rep_ms=200.0, min_warmup=3, min_reps=20, max_reps=2000, flush_l2=True)
MODEL_GPU = TimingConfig(warmup_ms=250.0, rep_ms=1500.0, min_warmup=3, min_reps=10, max_reps=300, flush_l2=False)
QUICK_GPU = TimingConfig(warmup_ms=10.0, rep_ms=50.0, min_warmup=2, min_reps=5, max_reps=200, flush_l2=True)
# The CPU smoke checks that the code runs; its numbers are not GPU numbers (and 2 shared cores are noisy).
CPU_SMOKE = TimingConfig(warmup_ms=0.0, rep_ms=10.0, min_warmup=1, min_reps=2, max_reps=3, flush_l2=False)


def config_for(kind: str, device, timing: str = "full") -> TimingConfig:
    """The timing configuration for "layer" or "model" rows on `device` ("full" or "quick")."""
    if torch.device(device).type != "cuda":
        return CPU_SMOKE
    if timing == "quick":
        return QUICK_GPU if kind == "layer" else TimingConfig(warmup_ms=50.0, rep_ms=200.0, min_warmup=2, min_reps=5,
                                                              max_reps=50, flush_l2=False)
    return LAYER_GPU if kind == "layer" else MODEL_GPU


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    reps: int
    warmup_reps: int
    method: str  # "cuda_events" or "perf_counter"

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    data = sorted(values)
    if not data:
        raise ValueError("quantile of no values")
    pos = (len(data) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(times_ms: list[float], warmup_reps: int, method: str) -> Timing:
    return Timing(median_ms=statistics.median(times_ms), p20_ms=quantile(times_ms, 0.2),
                  p80_ms=quantile(times_ms, 0.8), min_ms=min(times_ms), mean_ms=statistics.fmean(times_ms),
                  reps=len(times_ms), warmup_reps=warmup_reps, method=method)


def first_call_seconds(fn: Callable[[], object], device) -> float:
    """Wall-clock seconds of one synchronised call: compile time for a compiled callable."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    return _flush_buffers[device]


def flush_buffer_bytes(device) -> int:
    """Bytes held by the L2 flush buffer on `device` (subtracted from peak-memory figures)."""
    buf = _flush_buffers.get(torch.device(device))
    return 0 if buf is None else buf.numel()


def _counts(estimate_ms: float, config: TimingConfig) -> tuple[int, int]:
    estimate_ms = max(estimate_ms, 1e-4)
    warmup = max(config.min_warmup, math.ceil(config.warmup_ms / estimate_ms))
    reps = min(config.max_reps, max(config.min_reps, math.ceil(config.rep_ms / estimate_ms)))
    return warmup, reps


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_cuda(fn: Callable[[], object], config: TimingConfig = LAYER_GPU,
              grad_to_none: Iterable[torch.Tensor] = (), device=None) -> Timing:
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    grad_to_none = list(grad_to_none)
    cache = _flush_buffer(device) if config.flush_l2 else None
    _clear_grads(grad_to_none)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probes = 3
    start.record()
    for _ in range(probes):
        _clear_grads(grad_to_none)
        fn()
    end.record()
    torch.cuda.synchronize(device)
    warmup, reps = _counts(start.elapsed_time(end) / probes, config)
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _clear_grads(grad_to_none)
        if cache is not None:
            cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], warmup + probes + 1, "cuda_events")


def time_cpu(fn: Callable[[], object], config: TimingConfig = CPU_SMOKE,
             grad_to_none: Iterable[torch.Tensor] = ()) -> Timing:
    grad_to_none = list(grad_to_none)
    _clear_grads(grad_to_none)
    t0 = time.perf_counter()
    fn()
    estimate_ms = (time.perf_counter() - t0) * 1e3
    warmup, reps = _counts(estimate_ms, config)
    warmup = max(0, warmup - 1)  # the estimating call was a warm-up call too
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        fn()
    times = []
    for _ in range(reps):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times, warmup + 1, "perf_counter")


def time_fn(fn: Callable[[], object], device, config: Optional[TimingConfig] = None,
            grad_to_none: Iterable[torch.Tensor] = ()) -> Timing:
    """Median time of `fn()` on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return time_cuda(fn, config or LAYER_GPU, grad_to_none, device)
    return time_cpu(fn, config or CPU_SMOKE, grad_to_none)


def synchronized(fn: Callable[[], object], device) -> Callable[[], object]:
    """`fn` followed by a device synchronisation: what a wall-clock timer (pytest-benchmark) may time."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call
