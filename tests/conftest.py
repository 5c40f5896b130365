"""Test-session set-up shared by every test module."""

import os
import sys

import pytest
import torch

# Triton's CPU interpreter must be on when triton itself is first imported (its standard library is
# decorated then), and timm imports triton while test modules are collected. Without a GPU, import
# triton and our kernels here with the interpreter on, then restore the environment: other tests see what they were
# started with, and the conformance suite (test_providers.py) sets TRITON_INTERPRET again around its tests.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401

        import xception_fast.triton_kernels  # noqa: F401  (its @triton.jit kernels, interpreted)
    except ImportError:
        pass
    finally:
        if _saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _saved


@pytest.fixture(scope="session", autouse=True)
def exact_float32():
    """On a GPU, float32 convolutions and matmuls default to TF32 in cuDNN/cuBLAS; the reference
    provider is held to exact float32 in the tests, so that the float32 comparisons of the fused
    kernels are not lenient. A fixture, not an import-time setting: `pytest --benchmark` loads this
    file too (testpaths), and the benchmarks must run with torch's defaults, as the bench CLI does."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def seed() -> int:
    """A fresh random seed, set as torch's; tests put it in their failure messages."""
    value = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(value)
    return value
