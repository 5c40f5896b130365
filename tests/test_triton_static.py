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


def _run_fresh(args: list[str], with_a_gpu: str) -> None:
    """`python args` in a fresh process without the interpreter, importing the installed package: run from
    tests/, since `python -c` puts the working directory first on sys.path and the repository's root holds
    a source `xception_fast/` without `triton_kernels` (a regular install maps that in from the root).
    Skipped without triton, and on a GPU machine (`with_a_gpu`: what checks it there instead)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        pytest.skip(f"with a GPU {with_a_gpu}")
    import xception_fast

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(xception_fast.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, *args], env=env, cwd=os.path.join(ROOT, "tests"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]


def test_kernels_compile_for_a_gpu_without_one():
    """Every kernel compiled to an sm_90 cubin in bfloat16 (the configs' first entries), in a fresh
    process without the interpreter. See triton_helpers.py."""
    if importlib.util.find_spec("triton") is not None:
        import triton

        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if not os.path.exists(ptxas):
            pytest.skip(f"triton's CUDA backend has no ptxas at {ptxas}")
    _run_fresh([os.path.join(ROOT, "tests", "triton_helpers.py"), "90", "bf16"],
               "the conformance suite compiles and runs the kernels for real")


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
    _run_fresh(["-c", _Z_STORE_CHECK, os.path.join(ROOT, "tests")], "the autotuner compiles the rows for real")


_ONE_PASS_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
import triton
from triton_helpers import compile_kernel
from xception_fast.bench.static import sass
from xception_fast.triton_kernels import backward as bw

for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
    for rw in (2, 3):
        regs, ctas = bw.one_pass_cap(torch_dtype, rw)
        config = triton.Config({}, num_warps=bw.DW_WARPS, num_stages=1, maxnreg=regs)
        for pre_relu in (False, True):
            extra = dict(BLOCK_P=bw.ONE_PASS_BLOCK_P, BLOCK_C=bw.ONE_PASS_BLOCK_C, RW=rw, C=728, STORE_D=True,
                         PRE_RELU=pre_relu)
            compiled = compile_kernel(bw._dw_backward_kernel, extra, config, 90, dtype)
            found = sass.resources(compiled.asm["cubin"])[compiled.metadata.name]
            print(dtype, rw, pre_relu, regs, ctas, found, flush=True)
            assert found["stack"] == 0, f"{dtype} RW={rw} pre_relu={pre_relu} spills at maxnreg={regs}"
            assert ctas * 32 * bw.DW_WARPS * found["regs"] <= 65536, "the split's programs do not fit an SM"
"""


def test_the_one_pass_register_cap_leaves_no_spill():
    """`_dw_backward_kernel` at its sm_90 register cap (`backward.one_pass_cap`, by dtype and group width)
    compiles without spills in bf16, fp16 and fp32, with d stored and with and without the pre-ReLU, and
    the programs per SM its split counts on fit. In a fresh process without the interpreter, as above."""
    _run_fresh(["-c", _ONE_PASS_CHECK, os.path.join(ROOT, "tests")], "the conformance suite compiles the kernel for real")


_STATS_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton_helpers import compile_kernel
from xception_fast.bench.static import sass
from xception_fast.triton_kernels import mid_unit as mu

config = triton.Config({}, num_warps=4, num_stages=3, maxnreg=mu.STATS_MAXNREG)  # the launch's defaults + cap
for dtype in ("bf16", "fp16"):
    for pre_relu in (False, True):
        extra = dict(KH=3, KW=3, PRE_RELU=pre_relu, ASM=True, C_ALIGN=8, BLOCK_P=mu.STATS_BLOCK_P,
                     BLOCK_C=mu.STATS_BLOCK_C)
        compiled = compile_kernel(mu._depthwise_stats_kernel, extra, config, 90, dtype)
        found = sass.resources(compiled.asm["cubin"])[compiled.metadata.name]
        print(dtype, pre_relu, found, flush=True)
        assert found["stack"] == 0, f"{dtype} pre_relu={pre_relu} spills at maxnreg={mu.STATS_MAXNREG}"
"""


def test_the_mid_statistics_kernel_leaves_no_spill_at_its_cap():
    """The mid variant's `_depthwise_stats_kernel` at its sm_90 register cap (`mid_unit.STATS_MAXNREG`)
    compiles without spills in bf16 and fp16 with the inline-PTX pre-ReLU on and off (uncapped, ptxas
    stops at 96 registers and spills in fp16). In a fresh process without the interpreter, as above."""
    _run_fresh(["-c", _STATS_CHECK, os.path.join(ROOT, "tests")], "the conformance suite compiles the kernel for real")
