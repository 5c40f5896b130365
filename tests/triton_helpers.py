"""Compile every Triton kernel of the provider for a GPU architecture, without a GPU.

The CPU interpreter checks indexing, masking and arithmetic, but not what only the GPU compiler
enforces (tl.dot operand shapes and dtypes, static control flow on constexprs, layouts, shared
memory). Triton's CUDA backend ships its own ptxas, so kernels compile to cubins on a machine with
no GPU. `test_triton_static.test_kernels_compile_for_a_gpu_without_one` runs this file in a fresh
process (the interpreter, once on in a process, cannot be switched off there).

    python tests/triton_helpers.py [ARCH=90] [DTYPE=bf16] [all]

compiles the first autotune config of each kernel (or all configs) and prints, per kernel, its
registers and stack (spills) per thread, the shared memory it needs and the compile time. Exit status
1 if any kernel needs more shared memory than the architecture has. The compile is the static cost
model's (`xception_fast.bench.static.triton_compile`); `python -m xception_fast bench --static` goes
on from there to time estimates.
"""

from __future__ import annotations

import os
import sys
import time

# Shared memory per block (opt-in maximum): sm_80 163 KB, sm_90 227 KB.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def kernels():
    from xception_fast.spec import MID_ACTIVATIONS
    from xception_fast.triton_kernels import backward, batchnorm, depthwise_pointwise, mid_unit
    from xception_fast.triton_kernels.autotune import SUM_BLOCK_M, SUM_BLOCK_S

    fixed = dict(BLOCK_S=SUM_BLOCK_S, BLOCK_M=SUM_BLOCK_M, BLOCK_C=SUM_BLOCK_M)
    # The mid variant: the depthwise kernel with its mid code on (both BatchNorm modes), and every
    # activation and its derivative once (the interpreter runs Python's math, not the GPU compiler's).
    mid = [
        (depthwise_pointwise._depthwise_kernel, dict(MID_BN=1, MID_ACT="gelu")),
        (depthwise_pointwise._depthwise_kernel, dict(MID_BN=2, MID_ACT="silu")),
        (mid_unit._depthwise_stats_kernel, dict(BLOCK_P=mid_unit.STATS_BLOCK_P, BLOCK_C=mid_unit.STATS_BLOCK_C)),
    ] + [(mid_unit._mid_recompute_kernel, dict(MID_BN=2, MID_ACT=act)) for act in MID_ACTIVATIONS] \
        + [(mid_unit._mid_act_grad_kernel, dict(MID_BN=2, MID_ACT=act)) for act in MID_ACTIVATIONS]
    return mid + [
        (depthwise_pointwise._depthwise_kernel, {}),
        (depthwise_pointwise._sepconv_infer_kernel, {}),
        (depthwise_pointwise._sepconv_infer_kernel, dict(AFFINE=False, POST_RELU=False, HAS_RESIDUAL=False)),
        (depthwise_pointwise._sepconv_grad_z_kernel, {}),
        (batchnorm._stats_partial_kernel, dict(BLOCK_P=batchnorm.STATS_BLOCK_P, BLOCK_C=batchnorm.STATS_BLOCK_C)),
        (batchnorm._merge_stats_kernel, dict(BLOCK_S=batchnorm.MERGE_BLOCK_S, BLOCK_C=batchnorm.MERGE_BLOCK_C)),
        (batchnorm._bn_apply_kernel, {}),
        (batchnorm._bn_grad_z_kernel, {}),
        (batchnorm._bn_backward_reduce_kernel, {}),
        (batchnorm._sum_rows_kernel, fixed),
        # d stored (the base variant) or not (the mid variant, or d given); unit and 2-pixel strides.
        # (C is a compile-time constant of both depthwise-gradient kernels: Xception's middle flow's here)
        (backward._dw_weight_grad_kernel, dict(zip(("BLOCK_P", "BLOCK_C", "RW"), backward.DW_BLOCKS[True]), C=728,
                                               STORE_D=True)),
        (backward._dw_weight_grad_kernel, dict(zip(("BLOCK_P", "BLOCK_C", "RW"), backward.DW_BLOCKS[False]), C=728,
                                               STORE_D=False)),
        # the one pass (grad_dw, d, grad_x): groups of 3 storing d (the entry flow), of 2 without (the exit's mid)
        (backward._dw_backward_kernel, dict(BLOCK_P=backward.ONE_PASS_BLOCK_P, BLOCK_C=backward.ONE_PASS_BLOCK_C,
                                            RW=3, C=728, STORE_D=True)),
        (backward._dw_backward_kernel, dict(BLOCK_P=backward.ONE_PASS_BLOCK_P, BLOCK_C=backward.ONE_PASS_BLOCK_C,
                                            RW=2, C=1536, STORE_D=False)),
        (backward._dw_input_grad_kernel, dict(C=728, STRIDE_H=1, STRIDE_W=1)),
        (backward._dw_input_grad_kernel, dict(C=728, STRIDE_H=2, STRIDE_W=2)),
    ]


def configs_for(kernel, dtype: str, arch: int, affine: bool = True) -> list:
    """The autotune configs of `kernel`, as its own pruning leaves them for `dtype` on `arch` (and
    `affine`: the inference GEMM's epilogue, or the training z store)."""
    from xception_fast.triton_kernels import autotune

    configs = getattr(kernel, "configs", [None])
    if getattr(kernel, "early_config_prune", None) is not None:
        configs = autotune.prune_gemm(configs, 4 if dtype == "fp32" else 2, arch, affine)
    return configs


def compile_kernel(kernel, extra: dict, config, arch: int, dtype: str):
    """The kernel compiled for sm_`arch` (the static model's compile, `DEFAULT_FLAGS` for the flags)."""
    from xception_fast.bench.static.triton_compile import compile_kernel as compile_for

    return compile_for(kernel, config, arch, dtype, extra)


def resource_usage(compiled) -> str:
    """Registers and stack (spills) per thread, from the cubin (the static model's `sass.resources`)."""
    from xception_fast.bench.static import sass

    found = sass.resources(compiled.asm["cubin"]).get(compiled.metadata.name)
    return f"regs={found['regs']} stack={found['stack']} " if found else ""


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter builds no GPU code")
        return 2
    arch = int(argv[0]) if argv else 90
    dtype = argv[1] if len(argv) > 1 else "bf16"
    every = len(argv) > 2 and argv[2] == "all"
    failed = 0
    for kernel, extra in kernels():
        configs = configs_for(kernel, dtype, arch, extra.get("AFFINE", True))
        for config in configs if every else configs[:1]:
            start = time.time()
            compiled = compile_kernel(kernel, extra, config, arch, dtype)
            shared = compiled.metadata.shared
            too_big = shared > MAX_SHARED.get(arch, 99 * 1024)
            failed += too_big
            name = (kernel.fn if config is not None else kernel).__name__
            print(f"sm_{arch} {dtype} {name} {config.kwargs if config else ''} "
                  f"{'w%d s%d ' % (config.num_warps, config.num_stages) if config else ''}"
                  f"{'maxnreg=%d ' % config.maxnreg if config and config.maxnreg else ''}"
                  f"{resource_usage(compiled)}shared={shared}{' TOO MUCH' if too_big else ''} "
                  f"({time.time() - start:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
