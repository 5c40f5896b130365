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


_Z_STORE_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
from triton_helpers import compile_kernel, configs_for
from xception_fast.bench.static import sass
from xception_fast.triton_kernels import depthwise_pointwise as dp

store = dict(AFFINE=False, POST_RELU=False, HAS_RESIDUAL=False)
three = [c for c in configs_for(dp._sepconv_infer_kernel, "bf16", 90, affine=False) if c.kwargs["PER_SM"] == 3]
assert three, "no three-programs-per-SM row for the z store"
assert not [c for c in configs_for(dp._sepconv_infer_kernel, "bf16", 90) if c.kwargs["PER_SM"] == 3]
for dtype in ("bf16", "fp16"):
    for config in three:
        compiled = compile_kernel(dp._sepconv_infer_kernel, store, config, 90, dtype)
        found = sass.resources(compiled.asm["cubin"])[compiled.metadata.name]
        smem = compiled.metadata.shared
        print(dtype, config.kwargs, config.num_warps, found, smem)
        threads = 32 * config.num_warps
        assert found["stack"] == 0, "spills"
        assert 3 * threads * found["regs"] <= 65536 and 3 * (smem + 1024) <= 228 * 1024, "three CTAs do not fit an SM"
"""


def test_the_z_store_row_fits_three_programs_per_sm_without_spills():
    """The training z store's 4-warp row (`autotune.gemm_configs(infer=True)`, PER_SM 3) compiles for
    sm_90 in bf16 and fp16 without spills, within the registers and shared memory of three CTAs per
    SM (what its grid launches); the inference epilogue never gets it (`prune_gemm`). In a fresh
    process without the interpreter, as above."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("with a GPU the autotuner compiles the rows for real")
    import xception_fast

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(xception_fast.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, "-c", _Z_STORE_CHECK, os.path.join(ROOT, "tests")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
