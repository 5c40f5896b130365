"""Options of ``pytest`` in this repository: ``pytest --benchmark`` runs the benchmark suite.

    pytest                                   the tests only (testpaths = tests)
    pytest --benchmark                       benchmarks/ in benchmark mode (pytest-benchmark's
                                             --benchmark-only), the comparison table at the end
    pytest --benchmark --bench-mode infer --bench-dtype bf16,fp16 --bench-batch 256
                                             the GPU grid narrowed like `python -m xception_fast bench`
    pytest --benchmark --static              the static cost model's rows only (benchmarks/test_bench_static.py),
                                             a usage error where that file is absent

It lives at the repository root because pytest loads a rootdir conftest on every run from here,
whatever the paths: `pytest --benchmark` names no path, and `pytest --help` must list the options.
The --bench-* options are named apart from pytest-benchmark's own --benchmark-* ones; each sets the
XCEPTION_FAST_BENCH_* environment variable that benchmarks/ reads (see benchmarks/conftest.py), so
they shape the GPU grid; without a GPU those rows skip with the reason and the fixed CPU smoke runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parent / "benchmarks"
STATIC_ROWS = BENCHMARKS_DIR / "test_bench_static.py"  # the static cost model's rows, where it is present
ENV_PREFIX = "XCEPTION_FAST_BENCH_"  # as xception_fast.bench.common.ENV_PREFIX (not imported: no torch for --help)

# (option, XCEPTION_FAST_BENCH_* variable, help): the options of `python -m xception_fast bench` that
# make sense under pytest. Lists are comma-separated, as in the environment variables.
BENCH_OPTIONS = (
    ("--bench-mode", "MODES", "infer and/or train (default: both)"),
    ("--bench-dtype", "DTYPES", "bf16, fp16 and/or fp32 (default: bf16)"),
    ("--bench-batch", "BATCHES", "model batch sizes (default: 1,32,256)"),
    ("--bench-layer-batch", "LAYER_BATCH", "layer batch size (default: 256)"),
    ("--bench-size", "IMAGE_SIZE", "model input size (default: 299)"),
    ("--bench-models", "MODELS", "models to run (default: all)"),
    ("--bench-providers", "PROVIDERS", "cuda, triton, reference, eager and/or compile (default: all)"),
    ("--bench-shapes", "SHAPES", "layer shapes whose name contains any of these (default: all)"),
    ("--bench-compile-mode", "COMPILE_MODE", "torch.compile mode of the compile rows (default: max-autotune; "
                                             "none drops them)"),
    ("--bench-out", "RESULTS_DIR", "directory of the results JSON (default: benchmarks/results on a GPU; "
                                   "none: not saved)"),
)

STATIC_UNAVAILABLE = (
    "--static: the static cost model rows (static estimate, sm_90 model) are not available in this version "
    "of xception_fast yet; `pytest --benchmark` runs the measured rows only")

_SAVED_ENV = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("xception_fast", "xception_fast benchmarks")
    group.addoption("--benchmark", action="store_true", dest="run_benchmarks",
                    help="run the benchmark suite (benchmarks/, benchmark mode) instead of the tests and "
                         "print the comparison table; GPU rows skip with the reason without a GPU")
    group.addoption("--static", action="store_true", dest="static_rows",
                    help="benchmark mode, the static cost model rows only (static estimate, sm_90 model; "
                         "no GPU needed); an error where this version has none")
    for option, variable, text in BENCH_OPTIONS:
        group.addoption(option, default=None, metavar="VALUE",
                        help=f"benchmarks: {text}; comma-separated, as {ENV_PREFIX}{variable}")
    group.addoption("--bench-quick", action="store_true",
                    help=f"benchmarks: fewer repetitions, a rough look; as {ENV_PREFIX}TIMING=quick")


def _requested_env(config) -> dict[str, str]:
    env = {ENV_PREFIX + variable: config.getoption(option) for option, variable, _ in BENCH_OPTIONS
           if config.getoption(option) is not None}
    if env.get(ENV_PREFIX + "MODES") == "both":  # as the CLI's --mode both: the default
        del env[ENV_PREFIX + "MODES"]
    if config.getoption("bench_quick"):
        env[ENV_PREFIX + "TIMING"] = "quick"
    return env


def pytest_configure(config):
    static = config.getoption("static_rows")
    if static and not STATIC_ROWS.exists():
        # Say so rather than run measured rows under the static model's name.
        raise pytest.UsageError(STATIC_UNAVAILABLE)
    env = _requested_env(config)
    config.stash[_SAVED_ENV] = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    if env:
        from xception_fast.bench.common import BenchSettings  # imports torch: only when asked

        try:
            BenchSettings.from_env("cuda")  # the GPU grid's settings, checked before collection
        except ValueError as exc:
            raise pytest.UsageError(f"--bench-* options: {exc}") from exc
    if not (config.getoption("run_benchmarks") or static):
        return
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("--benchmark needs pytest-benchmark: pip install '.[test]'")
    # pytest-benchmark reads its options in its own (trylast) pytest_configure, after this one.
    config.option.benchmark_only = True
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        # No path given: benchmarks/ (or its static rows) instead of the testpaths (tests/).
        config.args = [str(STATIC_ROWS if static else BENCHMARKS_DIR)]
        config.args_source = pytest.Config.ArgsSource.ARGS


def pytest_unconfigure(config):
    for name, value in config.stash.get(_SAVED_ENV, {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_report_header(config):
    if config.getoption("run_benchmarks") or config.getoption("static_rows"):
        return "xception_fast: --benchmark (benchmark mode: tests that use the benchmark fixture only)"
    return None
