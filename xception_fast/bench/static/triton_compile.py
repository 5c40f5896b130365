"""Compile a Triton kernel for a GPU architecture without a GPU, as its launch would.

`compile_kernel(kernel, config, arch, dtype, constexprs, ints)` builds the `ASTSource` that
`kernel[grid](...)` would build for those arguments: pointers typed by `dtype` (the fp32 ones by
name, `FP32_POINTERS`) and 16-byte aligned (torch allocations are), integer arguments specialised as
Triton's JIT does (a value of 1 becomes a constant, a multiple of 16 gets `tt.divisibility`), then
`triton.compile(..., target=GPUTarget("cuda", arch, 32))`. Triton's CUDA backend ships its own
ptxas, so the cubin comes out on a machine with no GPU. Results are cached in memory (and on disk
by Triton itself).
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

# Pointer arguments holding fp32 vectors or partial sums; every other pointer has the activation dtype.
FP32_POINTERS = frozenset({"dwt_ptr", "scale_ptr", "shift_ptr", "stats_ptr", "sums_ptr", "mean_ptr", "var_ptr", "invstd_ptr",
                           "w_ptr", "b_ptr", "mdy_ptr", "mdyx_ptr", "part_ptr", "mid_ptr"})
# Constexpr flags used when a caller gives none: the most demanding variant (every optional input
# present, 3x3, channels 8-aligned: the 728-channel case).
# ASM: the depthwise kernels' inline PTX, on for a GPU. W_TMA and A_TMA (the pointwise weight `pw_op`
# and the depthwise output `d_op` through TMA descriptors) default to the architecture's: Hopper and later.
# STRIDE_W, DIL_W: the depthwise kernels' column stride and dilation (1: Xception's); WIDE: int64 offsets
# in `_depthwise_kernel` (off: a tile's span below 2^31 elements); P_ALIGN: the GPU's POSITION_ALIGN.
DEFAULT_FLAGS = dict(KH=3, KW=3, KK_PAD=16, AFFINE=True, PRE_RELU=True, POST_RELU=True, HAS_RESIDUAL=True, ASM=True,
                     C_ALIGN=8, COUT_ALIGN=8, MID_BN=0, MID_ACT="",  # MID_*: the plain unit, no mid variant
                     STRIDE_W=1, DIL_W=1, WIDE=False, P_ALIGN=128)
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "bfloat16": "bf16", "float16": "fp16",
          "float32": "fp32"}


def jit_function(kernel):
    """The @triton.jit function under an @triton.autotune wrapper (or the kernel itself)."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


def _int_specialization(value: int) -> tuple[str, list]:
    """(signature type, attributes) Triton's JIT gives an int argument of this value."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
    return kind, CUDABackend.parse_attr(key) if isinstance(key, str) and key else []


def _specialization_class(value: int) -> int:
    """A representative of the values the JIT compiles alike (1; multiples of 16; others; by width),
    so that layers of different sizes share one compiled variant."""
    wide = value >= 2 ** 31 or value < -2 ** 31
    if value == 1:
        return 1
    if value % 16 == 0:
        return 2 ** 32 if wide else 16
    return 2 ** 32 + 1 if wide else 17


def compile_kernel(kernel, config=None, arch: int = 90, dtype: str = "bf16",
                   constexprs: Optional[Mapping] = None, ints: Optional[Mapping[str, int]] = None,
                   pointer_types: Optional[Mapping[str, str]] = None):
    """Compile one kernel (autotuned or plain) for sm_`arch`; returns Triton's CompiledKernel.

    `config`: a `triton.Config` (its kwargs, num_warps, num_stages) or None; `constexprs`: the
    remaining constexpr values (missing flags default to `DEFAULT_FLAGS`); `ints`: the values of
    integer arguments, specialised as the JIT would (unknown ones stay plain i32);
    `pointer_types`: element types of pointers by name, where neither `dtype` nor fp32 is right.
    """
    config_key = None
    if config is not None:
        config_key = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages,
                      getattr(config, "maxnreg", None))
    classes = {name: _specialization_class(int(v)) for name, v in (ints or {}).items()}
    return _compile(kernel, config_key, int(arch), DTYPES[dtype],
                    tuple(sorted((constexprs or {}).items())), tuple(sorted(classes.items())),
                    tuple(sorted((pointer_types or {}).items())))


@functools.lru_cache(maxsize=1024)
def _compile(kernel, config_key, arch, dtype, constexprs, ints, pointer_types):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = jit_function(kernel)
    given = dict(constexprs)
    ints = dict(ints)
    pointer_types = dict(pointer_types)
    options = {}
    if config_key is not None:
        kwargs, num_warps, num_stages, maxnreg = config_key
        given.update(dict(kwargs))
        options = dict(num_warps=num_warps, num_stages=num_stages)
        if maxnreg is not None:
            options["maxnreg"] = maxnreg
    given.setdefault("W_TMA", arch >= 90)
    given.setdefault("A_TMA", arch >= 90)
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(jit.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[name] = given.get(name, DEFAULT_FLAGS.get(name))
        elif name == "pw_op" and given["W_TMA"]:  # the pointwise weight as a TMA descriptor of the config's tile
            signature[name] = f"tensordesc<{dtype}[{given['BLOCK_N']},{given['BLOCK_K']}]>"
        elif name == "d_op" and given["A_TMA"]:  # the depthwise output d likewise
            signature[name] = f"tensordesc<{dtype}[{given['BLOCK_P']},{given['BLOCK_K']}]>"
        elif name.endswith("_ptr") or name in ("pw_op", "d_op"):
            element = pointer_types.get(name, "fp32" if name in FP32_POINTERS else dtype)
            signature[name] = "*" + element
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in ints:
            kind, attr = _int_specialization(int(ints[name]))
            signature[name] = kind
            if kind == "constexpr":
                constants[name] = int(ints[name])
            elif attr:
                attrs[(index,)] = attr
        else:
            signature[name] = "i32"
    missing = [k for k, v in constants.items() if v is None]
    if missing:
        raise ValueError(f"{jit.__name__}: no value for constexpr {missing}")
    source = ASTSource(jit, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compiler(kernel, config=None, arch: int = 90, dtype: str = "bf16", constexprs: Optional[Mapping] = None,
             ints: Optional[Mapping[str, int]] = None, pointer_types: Optional[Mapping[str, str]] = None):
    """A function that compiles the kernel (as `compile_kernel`) and returns the model's `Compiled`."""
    def build():
        from xception_fast.bench.static import sass
        from xception_fast.bench.static.model import Compiled

        compiled = compile_kernel(kernel, config, arch, dtype, constexprs, ints, pointer_types)
        name = compiled.metadata.name
        res = sass.resources(compiled.asm["cubin"]).get(name, {})
        stages = config.num_stages if config is not None else compiled.metadata.num_stages
        warps = config.num_warps if config is not None else compiled.metadata.num_warps
        return Compiled(cubin=compiled.asm["cubin"], function=name, regs=res.get("regs", 0),
                        spill_bytes=res.get("stack", 0), smem_bytes=compiled.metadata.shared + res.get("shared", 0),
                        num_warps=warps, num_stages=stages, operand="tf32" if DTYPES[dtype] == "fp32" else DTYPES[dtype])
    return build
