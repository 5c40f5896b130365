"""Autotuning configurations for the Triton kernels, and how many programs to launch.

Every autotuned kernel takes its configs from one function here, keyed on the layer's channel
counts (and position count where it matters). Under the CPU interpreter (``TRITON_INTERPRET=1``)
each list is a single pinned config: the autotuner would otherwise run every config, and the
interpreter costs about 0.03 s per channel block per program instance (see TOOLCHAIN.md).
Small blocks there on purpose: channel counts like 19 then span several blocks, so the tests
exercise the masking of partial blocks.

GPU lists are for Hopper (H100/H200) and Ampere (A100): tiles whose pointwise product fills
the tensor cores (M = positions, N = output channels, K = input channels, every side >= 16, as
`tl.dot` requires), with 4-8 warps. They are guesses until measured on a GPU (benchmarks/NOTES.md).

Block sizes over positions are all powers of two dividing `POSITION_ALIGN`, so that the position
chunks of the split kernels (see `position_split`) never end inside a tile.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when @triton.jit builds interpreted functions (read at import, like Triton itself)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpreting()

# The interpreter's one config per kernel: blocks of 16 channels, 32 positions.
_PINNED_P, _PINNED_C = 32, 16
POSITION_ALIGN = _PINNED_P if INTERPRET else 128


def _configs(gpu: list[tuple], pinned: tuple, names: tuple[str, ...]) -> list[triton.Config]:
    rows = [pinned] if INTERPRET else gpu
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


def sepconv_forward_configs() -> list[triton.Config]:
    """Inference main loop: (BLOCK_P positions, BLOCK_CO out channels, BLOCK_CI in channels).

    BLOCK_CO is wide on purpose: the depthwise result of a [BLOCK_P, BLOCK_CI] tile is recomputed by
    every program along Cout, on the CUDA cores, so Cout / BLOCK_CO is the recompute factor.
    One pipeline stage mostly: the k x k tap loads feed CUDA-core FMAs, not the dot, and staging
    them through shared memory (num_stages=3) took 100-240 KB per program on sm_90.
    """
    gpu = [
        (64, 128, 32, 8, 1),
        (64, 256, 16, 8, 1),
        (128, 128, 16, 8, 1),
        (64, 128, 32, 8, 2),
        (128, 64, 32, 8, 1),
        (64, 64, 32, 4, 1),
    ]
    return _configs(gpu, (_PINNED_P, _PINNED_C, _PINNED_C, 4, 1), ("BLOCK_P", "BLOCK_CO", "BLOCK_CI"))


def sepconv_split_configs() -> list[triton.Config]:
    """Training forward and the inference backward's recompute: the same main loop inside a loop
    over a chunk of positions, with statistics in registers (more state: fewer, smaller tiles)."""
    gpu = [
        (64, 128, 32, 8, 1),
        (64, 128, 32, 8, 2),
        (128, 64, 32, 8, 1),
        (64, 64, 32, 4, 1),
    ]
    return _configs(gpu, (_PINNED_P, _PINNED_C, _PINNED_C, 4, 1), ("BLOCK_P", "BLOCK_CO", "BLOCK_CI"))


def pw_weight_grad_configs() -> list[triton.Config]:
    """grad of the pointwise weight: a [BLOCK_CO, BLOCK_CI] tile reduced over BLOCK_P positions at a time."""
    gpu = [
        (64, 128, 32, 8, 1),
        (32, 128, 64, 8, 1),
        (64, 64, 64, 8, 1),
        (128, 64, 32, 8, 1),
        (64, 128, 32, 8, 2),
    ]
    return _configs(gpu, (_PINNED_P, _PINNED_C, _PINNED_C, 4, 1), ("BLOCK_P", "BLOCK_CO", "BLOCK_CI"))


def dw_output_grad_configs() -> list[triton.Config]:
    """grad of the depthwise output: [BLOCK_P, BLOCK_CI] tiles, a product over Cout in BLOCK_CO steps."""
    gpu = [
        (64, 64, 64, 4, 1),
        (128, 64, 32, 8, 1),
        (64, 128, 64, 8, 1),
        (64, 64, 32, 4, 1),
        (64, 64, 64, 8, 2),
    ]
    return _configs(gpu, (_PINNED_P, _PINNED_C, _PINNED_C, 4, 1), ("BLOCK_P", "BLOCK_CO", "BLOCK_CI"))


def dw_input_grad_configs() -> list[triton.Config]:
    """Transposed depthwise gather: [BLOCK_P, BLOCK_C] tiles; small per-thread tiles, because the
    compiler hoists all k x k taps' loads and 32 elements per thread reached 250 registers."""
    gpu = [
        (32, 64, 4, 1),
        (64, 32, 4, 1),
        (64, 64, 8, 1),
        (128, 32, 8, 1),
    ]
    return _configs(gpu, (_PINNED_P, _PINNED_C, 4, 1), ("BLOCK_P", "BLOCK_C"))


def elementwise_configs() -> list[triton.Config]:
    """Channels-last elementwise passes and per-channel reductions: [BLOCK_P, BLOCK_C] tiles."""
    gpu = [
        (64, 64, 4, 1),
        (128, 64, 8, 1),
        (32, 128, 4, 1),
        (16, 256, 4, 1),
        (64, 64, 4, 2),
    ]
    return _configs(gpu, (_PINNED_P, _PINNED_C, 4, 1), ("BLOCK_P", "BLOCK_C"))


# Fixed (not autotuned) blocks of the small final reductions over partial rows.
SUM_BLOCK_S, SUM_BLOCK_M = (4, 16) if INTERPRET else (32, 128)


def target_programs(device: torch.device) -> int:
    """How many programs the split kernels aim for: a few waves on a GPU, very few in the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def position_split(positions: int, other_programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunk) for kernels that reduce over positions: `splits` programs along the positions,
    each owning `chunk` consecutive positions (a multiple of POSITION_ALIGN), times `other_programs`
    along the channels. Fixed by the shape, not by the autotuned config, so that the partial buffers
    have a known size and the reduction order does not depend on which config won."""
    want = max(1, target_programs(device) // max(other_programs, 1))
    chunk = triton.cdiv(triton.cdiv(positions, want), POSITION_ALIGN) * POSITION_ALIGN
    chunk = max(chunk, POSITION_ALIGN)
    return triton.cdiv(positions, chunk), chunk
