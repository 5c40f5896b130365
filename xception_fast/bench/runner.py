"""Runs benchmark cases into result rows: skip reasons, errors, progress, measured rates, autosave.

Both the CLI and the pytest suite go through `Runner`, so a row means the same thing in either.
A row is a flat dict: the case (kind, name, provider, mode, dtype, batch, ...), ``status`` ("ok",
"skipped" or "error") with ``reason`` when not ok, and for ok rows the timing (``median_ms``,
``p20_ms``, ``p80_ms``, ``min_ms``, ``method``), ``first_call_s`` (the
untimed first call; ``compile_s`` for compiled rows), ``peak_mem_bytes`` (GPU only: the peak of
`torch.cuda.max_memory_allocated` during one warm call minus what was allocated before the row built
anything), and for layers the roofline metrics, for models ``images_per_s``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from xception_fast.bench import results as results_mod
from xception_fast.bench.common import NO_GPU_REASON, BenchSettings, configure_torch, free_memory, provider_status
from xception_fast.bench.layers import LayerCase, layer_cases, layer_metrics, prepare_layer
from xception_fast.bench.models import ModelCase, model_cases, model_skip_reason, prepare_model
from xception_fast.bench.roofline import Rates, measure_copy_gbps, measure_rates
from xception_fast.bench.timing import config_for, first_call_seconds, synchronized, time_fn

# on_ready(fn, grad_to_none, measured): called after the timing with the warm, synchronised callable
# (for a second timer such as pytest-benchmark) and what was measured so far.
OnReady = Callable[[Callable[[], object], list, dict], None]


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_row(row: dict) -> str:
    """One line of what a row measured (or why not)."""
    if row.get("status") != "ok":
        return f"{row.get('status', '?')}: {row.get('reason', '')}"
    parts = []
    if row.get("kind") == "model":
        parts.append(f"{row['images_per_s']:.1f} img/s ({row['median_ms']:.3f} ms/iter)")
    else:
        parts.append(f"{row['median_ms']:.4f} ms")
        parts.append(f"{row['tflops']:.2f} TFLOP/s, {row['gbps']:.1f} GB/s")
        if row.get("roofline_fraction") is not None:
            parts.append(f"{100 * row['roofline_fraction']:.1f}% of roofline ({row['bound']}-bound)")
    if row.get("peak_mem_bytes") is not None:
        parts.append(f"peak {row['peak_mem_bytes'] / 2 ** 30:.2f} GiB")
    if row.get("compile_s") is not None:
        parts.append(f"compile {row['compile_s']:.1f} s")
    return ", ".join(parts)


class Runner:
    """Measures cases on one device and keeps the rows; see the module docstring."""

    def __init__(self, settings: BenchSettings, progress: Optional[Callable[[str], None]] = stderr_progress,
                 autosave: Optional[Path] = None):
        self.settings = settings
        self.device = torch.device(settings.device)
        self.progress = progress
        self.autosave = Path(autosave) if autosave is not None else None
        self.rows: list[dict] = []
        self.rates: dict[str, Rates] = {}
        self._copy: Optional[tuple[float, int]] = None
        self.flags: dict = {}
        self.started = time.time()
        self._configured = False

    # --- setup -------------------------------------------------------------------------------
    def gpu_missing(self) -> Optional[str]:
        return NO_GPU_REASON if self.device.type == "cuda" and not torch.cuda.is_available() else None

    def _configure(self) -> None:
        if not self._configured:
            self.flags = configure_torch(self.device)
            self._configured = True

    @contextlib.contextmanager
    def _cpu_threads(self):
        """CPU rows run with `settings.cpu_threads` torch threads (restored afterwards)."""
        if self.device.type != "cpu" or not self.settings.cpu_threads:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(self.settings.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def rates_for(self, dtype: str) -> Rates:
        """The machine's matmul rate in `dtype` and copy bandwidth, measured once per run."""
        self._configure()
        if dtype not in self.rates:
            if self._copy is None:
                self._copy = measure_copy_gbps(self.device)
            self.rates[dtype] = measure_rates(self.device, dtype, self._copy)
            free_memory(self.device)
            if self.progress:
                r = self.rates[dtype]
                self.progress(f"measured on {self.device}: {dtype} matmul {r.matmul_tflops:.2f} TFLOP/s "
                              f"(n={r.matmul_n}), copy {r.copy_gbps:.1f} GB/s")
        return self.rates[dtype]

    # --- rows --------------------------------------------------------------------------------
    def _record(self, row: dict, index: Optional[tuple[int, int]] = None, what: str = "") -> dict:
        self.rows.append(row)
        if self.progress:
            prefix = f"[{index[0]:>{len(str(index[1]))}}/{index[1]}] " if index else ""
            self.progress(f"{prefix}{what}: {format_row(row)}")
        if self.autosave is not None:
            self.save(self.autosave)
        return row

    def _skip_reason(self, provider: str) -> Optional[str]:
        missing = self.gpu_missing()
        if missing:
            return missing
        ok, reason = provider_status(provider, self.device, self.settings.compile_mode)
        return None if ok else f"{provider}: {reason}"

    def _run(self, base: dict, skip: Optional[str], measure: Callable[[], dict], what: str,
             index: Optional[tuple[int, int]], raise_errors: bool) -> dict:
        if skip:
            return self._record({**base, "status": "skipped", "reason": skip}, index, what)
        if self.progress and index:
            self.progress(f"[{index[0]:>{len(str(index[1]))}}/{index[1]}] {what} ...")
        try:
            with self._cpu_threads():
                measured = measure()
        except Exception as exc:  # noqa: BLE001: a failing row must not lose the others
            oom = is_oom(exc)
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "(no message)"
            row = {**base, "status": "error", "error": "oom" if oom else type(exc).__name__,
                   "reason": ("out of memory: " if oom else f"{type(exc).__name__}: ") + message}
            self._record(row, index, what)
            if raise_errors and not oom:
                raise
            exc.__traceback__ = None  # let the tensors of the failed row go
            free_memory(self.device)
            return row
        return self._record({**base, "status": "ok", **measured}, index, what)

    def run_layer(self, case: LayerCase, on_ready: Optional[OnReady] = None, index=None,
                  raise_errors: bool = False) -> dict:
        return self._run(case.base_row(self.device), self._skip_reason(case.provider),
                         lambda: self._measure_layer(case, on_ready), case.describe(), index, raise_errors)

    def run_model(self, case: ModelCase, on_ready: Optional[OnReady] = None, index=None,
                  raise_errors: bool = False) -> dict:
        skip = self.gpu_missing() or model_skip_reason(case, self.device, self.settings.compile_mode)
        return self._run(case.base_row(self.device), skip, lambda: self._measure_model(case, on_ready),
                         case.describe(), index, raise_errors)

    def _baseline_memory(self) -> int:
        free_memory(self.device)
        return torch.cuda.memory_allocated() if self.device.type == "cuda" else 0

    def _peak_of_one_call(self, fn: Callable[[], object], baseline: int) -> Optional[int]:
        """Peak GPU memory of one warm call above `baseline` (outside the timing, whose L2-flush
        buffer is not the workload's)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - baseline)

    def _cleanup(self, compiled: bool) -> None:
        if compiled:
            torch._dynamo.reset()
        free_memory(self.device)

    def _measure_layer(self, case: LayerCase, on_ready: Optional[OnReady]) -> dict:
        rates = self.rates_for(case.dtype)  # measured before the row's baseline memory
        return self._measure("layer", lambda: prepare_layer(case, self.device, self.settings.compile_mode),
                             lambda timing, _: layer_metrics(case, timing.median_ms, rates), on_ready)

    def _measure_model(self, case: ModelCase, on_ready: Optional[OnReady]) -> dict:
        return self._measure("model", lambda: prepare_model(case, self.device, self.settings.compile_mode),
                             lambda timing, prepared: {"images_per_s": case.batch / (timing.median_ms * 1e-3),
                                                       "parameters": prepared.parameters}, on_ready)

    def _measure(self, kind: str, prepare: Callable, metrics: Callable, on_ready: Optional[OnReady]) -> dict:
        """Build the row's callable, time its first call, its peak memory and its median, then add
        `metrics(timing, prepared)`; compiled state and memory are released afterwards."""
        self._configure()
        config = config_for(kind, self.device, self.settings.timing)
        baseline = self._baseline_memory()
        prepared = prepare()
        try:
            grad_to_none = list(getattr(prepared, "grad_to_none", []))
            first = first_call_seconds(prepared.fn, self.device)
            peak = self._peak_of_one_call(prepared.fn, baseline)
            timing = time_fn(prepared.fn, self.device, config, grad_to_none)
            out = {**timing.as_dict(), "first_call_s": first, **metrics(timing, prepared), "peak_mem_bytes": peak}
            if prepared.compiled:
                out.update(compile_s=first, compile_mode=self.settings.compile_mode)
            if on_ready is not None:
                on_ready(synchronized(prepared.fn, self.device), grad_to_none, out)
            return out
        finally:
            compiled = prepared.compiled
            del prepared
            self._cleanup(compiled)

    # --- whole runs --------------------------------------------------------------------------
    def cases(self) -> list:
        cases: list = []
        if self.settings.run_layers:
            cases += layer_cases(self.settings)
        if self.settings.run_models:
            cases += model_cases(self.settings)
        return cases

    def run_all(self, cases: Optional[Iterable] = None, budget_s: Optional[float] = None) -> list[dict]:
        """Run every case in order. With `budget_s`, cases not started within that many seconds of
        the first are recorded as skipped (a row already running is never cut short)."""
        cases = list(self.cases() if cases is None else cases)
        start = time.time()
        for i, case in enumerate(cases, 1):
            if budget_s is not None and time.time() - start > budget_s:
                what = case.describe()
                self._record({**case.base_row(self.device), "status": "skipped",
                              "reason": f"not run: the time budget of {budget_s:.0f} s was spent"}, (i, len(cases)),
                             what)
                continue
            if isinstance(case, LayerCase):
                self.run_layer(case, index=(i, len(cases)))
            else:
                self.run_model(case, index=(i, len(cases)))
        return self.rows

    def results(self) -> dict:
        return results_mod.make_results(self.device, self.settings.as_dict(), self.flags,
                                        {k: v.as_dict() for k, v in self.rates.items()}, self.rows,
                                        started=self.started)

    def save(self, path: Path) -> Path:
        return results_mod.save_results(self.results(), path)
