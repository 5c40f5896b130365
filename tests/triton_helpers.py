"""Compile every Triton kernel of the provider for a GPU architecture, without a GPU.

The CPU interpreter checks indexing, masking and arithmetic, but not what only the GPU compiler
enforces (tl.dot operand shapes and dtypes, static control flow on constexprs, layouts, shared
memory). Triton's CUDA backend ships its own ptxas, so kernels compile to cubins on a machine with
no GPU. `test_triton_static.test_kernels_compile_for_a_gpu_without_one` runs this file in a fresh
process (the interpreter, once on in a process, cannot be switched off there).

    python tests/triton_helpers.py [ARCH=90] [DTYPE=bf16] [all]

compiles the first autotune config of each kernel (or all configs) and prints, per kernel, its
registers and stack (spills) per thread, the shared memory it needs and the compile time. Exit status 1 if any kernel needs more shared memory
than the architecture has.
"""

from __future__ import annotations

import os
import sys
import time

# Shared memory per block (opt-in maximum): sm_80 163 KB, sm_90 227 KB.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# Pointer arguments holding fp32 vectors or partial sums; every other pointer has the activation dtype.
FP32_POINTERS = {"scale_ptr", "shift_ptr", "stats_ptr", "sums_ptr", "mean_ptr", "var_ptr", "invstd_ptr", "w_ptr",
                 "b_ptr", "mdy_ptr", "mdyx_ptr", "part_ptr"}
# Constexpr flags: the most demanding variant (every optional input present, 3x3, channels 8-aligned:
# the 728-channel case).
FLAGS = dict(KH=3, KW=3, KK_PAD=16, PRE_RELU=True, POST_RELU=True, HAS_RESIDUAL=True, GZ_FROM_BN=True,
             C_ALIGN=8, COUT_ALIGN=8)


def kernels():
    from xception_fast.triton_kernels import backward, batchnorm, depthwise_pointwise
    from xception_fast.triton_kernels.autotune import SUM_BLOCK_M, SUM_BLOCK_S

    fixed = dict(BLOCK_S=SUM_BLOCK_S, BLOCK_M=SUM_BLOCK_M, BLOCK_C=SUM_BLOCK_M)
    return [
        (depthwise_pointwise._sepconv_infer_kernel, {}),
        (depthwise_pointwise._sepconv_train_kernel, {}),
        (depthwise_pointwise._sepconv_grad_z_kernel, {}),
        (batchnorm._merge_stats_kernel, fixed),
        (batchnorm._bn_apply_kernel, {}),
        (batchnorm._bn_backward_reduce_kernel, {}),
        (batchnorm._sum_rows_kernel, fixed),
        (backward._pw_weight_grad_kernel, {}),
        (backward._dw_output_grad_kernel, {}),
        (backward._dw_input_grad_kernel, {}),
    ]


def compile_kernel(kernel, extra: dict, config, arch: int, dtype: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = kernel.fn if hasattr(kernel, "configs") else kernel
    constants = {**extra, **(config.kwargs if config is not None else {})}
    signature, attrs = {}, {}
    for index, param in enumerate(jit.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants.setdefault(name, FLAGS.get(name))
        elif name.endswith("_ptr"):
            signature[name] = "*" + ("fp32" if name in FP32_POINTERS else dtype)
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[name] = "i32"
    constants = {k: v for k, v in constants.items() if k in jit.arg_names}
    missing = [k for k, v in constants.items() if v is None]
    assert not missing, f"{jit.__name__}: no value for constexpr {missing}"
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages) if config is not None else {}
    source = ASTSource(jit, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_usage(compiled) -> str:
    """Registers and stack (spills) per thread, from the cubin, with the cuobjdump Triton ships."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={found.group(1)} stack={found.group(2)} " if found else ""


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter builds no GPU code")
        return 2
    arch = int(argv[0]) if argv else 90
    dtype = argv[1] if len(argv) > 1 else "bf16"
    every = len(argv) > 2 and argv[2] == "all"
    failed = 0
    for kernel, extra in kernels():
        configs = getattr(kernel, "configs", [None])
        for config in configs if every else configs[:1]:
            start = time.time()
            compiled = compile_kernel(kernel, extra, config, arch, dtype)
            shared = compiled.metadata.shared
            too_big = shared > MAX_SHARED.get(arch, 99 * 1024)
            failed += too_big
            name = (kernel.fn if config is not None else kernel).__name__
            print(f"sm_{arch} {dtype} {name} {config.kwargs if config else ''} "
                  f"{'w%d s%d ' % (config.num_warps, config.num_stages) if config else ''}"
                  f"{resource_usage(compiled)}shared={shared}{' TOO MUCH' if too_big else ''} "
                  f"({time.time() - start:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
