"""Fixtures of the benchmark suite: ``pytest --benchmark`` from the repository root (an option of the
root conftest.py: this folder with pytest-benchmark's --benchmark-only), or ``pytest benchmarks
--benchmark-only``.

With a GPU, every layer and model row of the grid runs (`xception_fast.bench.common.BenchSettings`:
bf16, both modes, layers at batch 256, models at batch 1, 32 and 256, 299x299; narrow it with the
root conftest's --bench-* options or the XCEPTION_FAST_BENCH_{DTYPES,MODES,BATCHES,LAYER_BATCH,
IMAGE_SIZE,MODELS,PROVIDERS,SHAPES,COMPILE_MODE,TIMING} environment variables they set,
comma-separated). Each row is timed with `do_bench`
(`xception_fast.bench.timing`: warm-up and first call/compilation excluded, medians) and that
figure, with TFLOP/s, GB/s, roofline fraction, images/s and peak memory, goes into
``benchmark.extra_info``. pytest-benchmark's own columns time the same callable followed by
`torch.cuda.synchronize()` (wall clock, a few rounds): a secondary figure that includes launch
and synchronisation overhead. The rows are written as a results JSON under benchmarks/results/
after every test (XCEPTION_FAST_BENCH_RESULTS_DIR overrides the directory, "none" disables), and
the Markdown table is printed at the end.

Without a GPU, every GPU row skips with the reason, and a CPU smoke (reference provider and eager
modules on four unit shapes, the three models at batch 2, 75x75) runs in seconds; its rows are
saved only when XCEPTION_FAST_BENCH_RESULTS_DIR is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from xception_fast.bench import report, results
from xception_fast.bench.common import NO_GPU_REASON, BenchSettings
from xception_fast.bench.layers import LayerCase
from xception_fast.bench.runner import Runner

RESULTS_ENV = "XCEPTION_FAST_BENCH_RESULTS_DIR"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
_RUNNERS = pytest.StashKey[list]()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skips with the reason without one")
    config.stash[_RUNNERS] = []


def _results_target(device: str):
    value = os.environ.get(RESULTS_ENV, "").strip()
    if value.lower() == "none":
        return None
    if value:
        return results.results_path(value, device)
    return results.results_path(DEFAULT_RESULTS_DIR, device) if device == "cuda" else None


@pytest.fixture(scope="session")
def gpu_runner(request) -> Runner:
    """The runner of the GPU grid (skips the test without a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU_REASON)
    runner = Runner(BenchSettings.from_env("cuda"), progress=None, autosave=_results_target("cuda"))
    request.config.stash[_RUNNERS].append(runner)
    return runner


@pytest.fixture(scope="session")
def cpu_runner(request) -> Runner:
    """The runner of the CPU smoke (skips the test when a GPU is present: the GPU rows run instead)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU rows run instead of the CPU smoke")
    runner = Runner(BenchSettings.cpu_smoke(), progress=None, autosave=_results_target("cpu"))
    request.config.stash[_RUNNERS].append(runner)
    return runner


def _rounds(median_ms: float, device: torch.device) -> tuple[int, int]:
    """(rounds, warm-up rounds) of pytest-benchmark's secondary timing: about 0.3 s on a GPU,
    one round on the CPU (the smoke checks that things run)."""
    if device.type != "cuda":
        return 1, 0
    return int(min(50, max(3, 300.0 / max(median_ms, 1e-3)))), 1


@pytest.fixture
def measure(benchmark):
    """measure(runner, case) -> row: runs the case, records it in benchmark.extra_info, times the
    synchronised callable with pytest-benchmark, and skips (with the reason) rows that can't run."""

    def run(runner: Runner, case) -> dict:
        def on_ready(fn, grad_to_none, measured):
            rounds, warmup = _rounds(measured["median_ms"], runner.device)

            def setup():
                for t in grad_to_none:
                    t.grad = None

            benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)

        if isinstance(case, LayerCase):
            row = runner.run_layer(case, on_ready=on_ready, raise_errors=True)
        else:
            row = runner.run_model(case, on_ready=on_ready, raise_errors=True)
        benchmark.extra_info.update({k: v for k, v in row.items()
                                     if v is None or isinstance(v, (str, int, float, bool))})
        if row["status"] != "ok":
            pytest.skip(row["reason"])  # not available here, or out of memory (other errors raise)
        return row

    return run


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table: the comparison comes last
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for runner in config.stash.get(_RUNNERS, []):
        if not runner.rows:
            continue
        data = runner.results()
        terminalreporter.section(f"xception_fast benchmark ({runner.device})")
        for line in report.markdown([data]).splitlines():
            terminalreporter.write_line(line)
        if runner.autosave is not None:
            runner.save(runner.autosave)
            terminalreporter.write_line(f"results written to {runner.autosave}")
        elif runner.device.type != "cuda":
            terminalreporter.write_line(f"CPU smoke rows not saved (--bench-out DIR or {RESULTS_ENV}=DIR keeps them)")
