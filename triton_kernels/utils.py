"""Host-side helpers shared by the Triton provider: input layouts, dtype checks, output allocation.

The kernels address every activation as a row-major [positions, channels] matrix, i.e. an NHWC
(channels_last) tensor; weights as contiguous matrices. These helpers bring any input to that
layout (a no-op when it already is) and allocate outputs with exactly the strides the reference
provider returns.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from xception_fast.backends import FUSED_DTYPES
from xception_fast.reference import to_channels_last, to_contiguous

# Positions are int32 in the kernels, and a split's end (s + 1) * chunk may reach 1.5 x the count.
MAX_POSITIONS = 2**30


def check_dtype(x: Tensor) -> None:
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"the triton provider runs float32, float16 and bfloat16, got {x.dtype}; "
                        f"use backend='reference' for {x.dtype}")


def check_positions(*counts: int) -> None:
    """Position indices are int32 inside the kernels (element offsets are int64)."""
    for count in counts:
        if count > MAX_POSITIONS:
            raise ValueError(f"the triton provider indexes positions (N*H*W) with int32; {count} positions "
                             f"is too many: split the batch")


def nhwc(t: Tensor) -> Tensor:
    """`t` [N, C, H, W] as a channels_last tensor with exactly the channels_last strides."""
    return to_channels_last(t)


def matrix(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A conv weight [O, I, kh, kw] as a contiguous tensor in `dtype` (read as an [O, I*kh*kw] matrix)."""
    return to_contiguous(weight.to(dtype))


# The forward GEMM's operands (the pointwise weight and d) through TMA tensor descriptors (Hopper and
# later; the interpreter reads them too). XCEPTION_FAST_TRITON_TMA=0 turns it off, for comparisons.
WEIGHT_TMA = os.environ.get("XCEPTION_FAST_TRITON_TMA", "1") not in ("", "0")


# Inline PTX in the depthwise kernels (`depthwise_pointwise._pre_f32`, GPU only); =0 for the plain
# triton.language path that the interpreter tests, to compare the two on a GPU.
INLINE_ASM = os.environ.get("XCEPTION_FAST_TRITON_ASM", "1") not in ("", "0")


def weight_operand(pw: Tensor) -> tuple[object, bool]:
    """(operand, is_descriptor) for a contiguous matrix (the [Cout, C] weight, or d): a TensorDescriptor
    where TMA applies (rows 16-byte aligned, as TMA requires; a Hopper GPU or the interpreter), else the
    tensor itself. The descriptor's block shape is set per autotune config (`autotune._set_weight_block`)."""
    aligned = pw.stride(0) * pw.element_size() % 16 == 0 and pw.data_ptr() % 16 == 0
    hopper = pw.device.type != "cuda" or torch.cuda.get_device_capability(pw.device)[0] >= 9
    if not (WEIGHT_TMA and aligned and hopper and pw.is_contiguous()):
        return pw, False
    from triton.tools.tensor_descriptor import TensorDescriptor  # Triton >= 3.4 (3.6 on the GPU machines)
    return TensorDescriptor.from_tensor(pw, [16, 16]), True


def vector_f32(v: Optional[Tensor], length: int, fill: float, device: torch.device) -> Tensor:
    """A per-channel vector in float32 (as the reference casts it), or `fill` where it is absent.
    An absent scale becomes 1 and an absent shift 0: multiplying by 1.0 and adding 0.0 are exact,
    so one kernel serves both cases without changing a single bit of the result."""
    if v is None:
        return torch.full((length,), fill, dtype=torch.float32, device=device)
    return v.detach().to(torch.float32).contiguous()


# Debugging aid (and what the tests switch on), read at every call as the CUDA provider reads it:
# every buffer a kernel is meant to fill completely starts as NaN, so an element no program writes
# shows up in the result instead of hiding as whatever the allocator left there.
POISON_ENV_VAR = "XCEPTION_FAST_POISON_OUTPUTS"


def new_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device, channels_last: bool = False) -> Tensor:
    """torch.empty for kernel outputs (NaN-filled under XCEPTION_FAST_POISON_OUTPUTS=1). channels_last
    gives exactly `channels_last_strides`, the layout the kernels write."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=fmt)
    return out.fill_(float("nan")) if os.environ.get(POISON_ENV_VAR, "0") not in ("", "0") else out


def empty_nhwc(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return new_empty(shape, dtype, device, channels_last=True)


def channel_align(channels: int) -> int:
    """The largest power of two up to 16 dividing `channels`. Kernels take it as a constexpr and
    rewrite C as C // align * align: a no-op that tells the compiler channel rows start on that
    multiple, so loads of 728-channel rows (not a multiple of 16, Triton's own integer hint) still
    vectorise. Without it an unaligned 64 x 64 tile spills kilobytes of registers on sm_90."""
    align = 1
    while align < 16 and channels % (2 * align) == 0 and channels > 0:
        align *= 2
    return align

