"""The Triton kernels compiled for a GPU without one: the GPU compiler's rules (dot shapes and
dtypes, constexpr control flow, shared memory) are what the CPU interpreter does not check. Their
values are checked by the conformance suite (tests/test_providers.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_a_gpu_without_one():
    """Every kernel compiled to an sm_90 cubin in bfloat16 (the configs' first entries), in a fresh
    process without the interpreter. See triton_helpers.py."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the conformance suite compiles and runs the kernels for real")
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"triton's CUDA backend has no ptxas at {ptxas}")
    import xception_fast

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(xception_fast.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_helpers.py"), "90", "bf16"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
