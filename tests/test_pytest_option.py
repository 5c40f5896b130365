"""`pytest --benchmark` (the repository root's conftest.py): the options are registered and listed,
plain `pytest` collects the tests only, `--benchmark` the benchmark suite with the --bench-* options
applied. Collection only (a few seconds each); CI runs `pytest --benchmark` itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATIC_ROWS = ROOT / "benchmarks" / "test_bench_static.py"
OPTIONS = ("--benchmark", "--static", "--bench-mode", "--bench-dtype", "--bench-batch", "--bench-providers",
           "--bench-quick")


def pytest_in_root(*args: str) -> subprocess.CompletedProcess:
    """`python -m pytest ARGS` in the repository root, as a user types it, without our variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCEPTION_FAST_BENCH_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def collected(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_options_are_registered(pytestconfig):
    # This session loaded the root conftest too; getoption raises ValueError for an unknown option.
    assert isinstance(pytestconfig.getoption("run_benchmarks"), bool)
    assert isinstance(pytestconfig.getoption("static_rows"), bool)
    assert isinstance(pytestconfig.getoption("bench_quick"), bool)
    with pytest.raises(ValueError):
        pytestconfig.getoption("no_such_option_here")


def test_help_lists_the_options_beside_pytest_benchmarks():
    result = pytest_in_root("--help")
    assert result.returncode == 0, result.stderr
    listed = {word.split("=")[0] for line in result.stdout.splitlines() for word in line.split()[:1]}
    assert set(OPTIONS) <= listed
    assert {"--benchmark-only", "--benchmark-skip"} <= listed  # pytest-benchmark's own, untouched


def test_plain_pytest_collects_the_tests_only():
    result = pytest_in_root("--collect-only", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    items = collected(result)
    assert items and all(item.startswith("tests/") for item in items)
    assert "tests/test_pytest_option.py::test_plain_pytest_collects_the_tests_only" in items


def test_benchmark_collects_the_suite_with_the_bench_options():
    result = pytest_in_root("--benchmark", "--collect-only", "-q", "--bench-mode", "infer",
                            "--bench-providers", "eager,reference")
    assert result.returncode == 0, result.stdout + result.stderr
    items = collected(result)
    assert items and all(item.startswith("benchmarks/") for item in items)
    gpu_layers = [item for item in items if "::test_layer[" in item]
    gpu_models = [item for item in items if "::test_model[" in item]
    # The GPU grid is collected (its rows skip at run time without a GPU), narrowed by the options.
    assert gpu_layers and gpu_models
    assert all("-infer-" in item and item.endswith(("-eager]", "-reference]")) for item in gpu_layers)
    assert all("-infer-" in item for item in gpu_models)
    assert any("::test_layer_cpu_smoke[" in item for item in items)
    assert any("::test_model_cpu_smoke[" in item for item in items)


def test_invalid_bench_options_are_usage_errors():
    result = pytest_in_root("--benchmark", "--collect-only", "-q", "--bench-dtype", "fp8")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "dtype must be one of" in result.stderr


def test_static_selects_the_static_rows_or_says_they_are_missing():
    result = pytest_in_root("--benchmark", "--static", "--collect-only", "-q")
    if STATIC_ROWS.exists():  # the static cost model's rows: those only
        assert result.returncode == 0, result.stdout + result.stderr
        items = collected(result)
        assert items and all(item.startswith("benchmarks/test_bench_static.py::") for item in items)
    else:  # a version without the static model: an error that says so, no measured rows
        assert result.returncode == pytest.ExitCode.USAGE_ERROR
        assert "static cost model rows (static estimate, sm_90 model) are not available" in result.stderr
