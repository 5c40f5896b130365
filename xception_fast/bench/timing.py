"""Median timing of a callable: `triton.testing.do_bench` on a GPU, `torch.utils.benchmark` on the CPU.

On a GPU, `do_bench` brackets every repetition with CUDA events (the GPU's time for the work, not
the time to launch it), flushes the L2 cache before each one (outside the events), drops the
gradients of `grad_to_none`, and sizes warm-up and repetitions from millisecond budgets. On the CPU
(a smoke that the code runs: its numbers are not GPU numbers) `Timer.blocked_autorange` times blocks
of calls. Medians are reported with the 20th and 80th percentiles and the minimum.

First calls (compilation, cuDNN autotuning) are not part of any timing: `first_call_seconds`
measures them separately, synchronised, with the wall clock.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.utils.benchmark as torch_benchmark

from xception_fast.bench.common import synchronize

METHOD_GPU = "do_bench"
METHOD_CPU = "torch.utils.benchmark"
QUANTILES = (0.5, 0.2, 0.8, 0.0)  # median, p20, p80, min


@dataclass(frozen=True)
class TimingConfig:
    warmup_ms: float  # GPU: do_bench's warm-up budget; the CPU warms up with one call
    rep_ms: float     # GPU: do_bench's repetition budget; CPU: blocked_autorange's minimum run time


# The one table of budgets, by (what is timed, BenchSettings.timing). Models: longer, as a step is.
_GPU_BUDGETS = {
    ("layer", "full"): TimingConfig(25.0, 200.0),
    ("layer", "quick"): TimingConfig(10.0, 50.0),
    ("model", "full"): TimingConfig(250.0, 1500.0),
    ("model", "quick"): TimingConfig(50.0, 200.0),
}
CPU_SMOKE = TimingConfig(0.0, 10.0)


def config_for(kind: str, device, timing: str = "full") -> TimingConfig:
    """The timing budgets for "layer" or "model" rows on `device` ("full" or "quick")."""
    return _GPU_BUDGETS[kind, timing] if torch.device(device).type == "cuda" else CPU_SMOKE


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    method: str  # METHOD_GPU or METHOD_CPU

    def as_dict(self) -> dict:
        return asdict(self)


def first_call_seconds(fn: Callable[[], object], device) -> float:
    """Wall-clock seconds of one synchronised call: compile time for a compiled callable."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_fn(fn: Callable[[], object], device, config: Optional[TimingConfig] = None,
            grad_to_none: Iterable[torch.Tensor] = ()) -> Timing:
    """Median time of `fn()` on `device` (see the module docstring)."""
    grad_to_none = list(grad_to_none)
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        config = config or _GPU_BUDGETS["layer", "full"]
        values = do_bench(fn, warmup=config.warmup_ms, rep=config.rep_ms, grad_to_none=grad_to_none or None,
                          quantiles=list(QUANTILES))
        return Timing(*values, method=METHOD_GPU)
    config = config or CPU_SMOKE
    fn()  # warm-up
    measured = torch_benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=config.rep_ms * 1e-3)
    values = torch.tensor(measured.times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return Timing(*(float(v) * 1e3 for v in values), method=METHOD_CPU)


def synchronized(fn: Callable[[], object], device) -> Callable[[], object]:
    """`fn` followed by a device synchronisation: what a wall-clock timer (pytest-benchmark) may time."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call
