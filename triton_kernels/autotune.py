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
# XCEPTION_FAST_TRITON_ONE_CONFIG=1: every kernel runs the first config of its list that fits the
# dtype and GPU, untimed. For compute-sanitizer runs, where timing each config under the tool takes
# minutes, and for quick checks; the benchmarks and users keep the autotuner.
ONE_CONFIG = os.environ.get("XCEPTION_FAST_TRITON_ONE_CONFIG", "0") not in ("", "0")

# The interpreter's one config per kernel: blocks of 16 channels, 32 positions.
_PINNED_P, _PINNED_C = 32, 16
POSITION_ALIGN = _PINNED_P if INTERPRET else 128
# The depthwise output d's rows are C rounded up to this many columns (every BLOCK_K and BLOCK_D divides it).
SLOT_ALIGN = 64


def _configs(gpu: list[tuple], pinned: tuple, names: tuple[str, ...]) -> list[triton.Config]:
    rows = [pinned] if INTERPRET else gpu[:1] if ONE_CONFIG else gpu
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


def _set_weight_block(nargs: dict) -> None:
    """Autotune pre-hook: a TMA descriptor's block is the config's tile, [BLOCK_N, BLOCK_K] of the
    weight, [BLOCK_P, BLOCK_K] of d."""
    for name, rows in (("pw_op", "BLOCK_N"), ("d_op", "BLOCK_P")):
        op = nargs.get(name)
        if op is not None and not isinstance(op, torch.Tensor):
            op.block_shape = [nargs[rows], nargs["BLOCK_K"]]


def prune_gemm(configs: list[triton.Config], element_size: int, arch: int, affine: bool = True) -> list[triton.Config]:
    """The GEMM configs worth compiling for this element size and architecture (spills and shared
    memory checked on sm_90 and sm_80 with tests/triton_helpers.py), and `affine` (the inference
    kernel's epilogue; False: the training forward's z store):
    - fp32 (an IEEE FMA product, no tensor cores: accumulator and operands all in registers) only
      the small tiles, 16-bit types only the tensor-core ones;
    - BLOCK_N = 256 only on Hopper (wgmma keeps A and B in shared memory; mma.sync spills);
    - pipeline buffers, num_stages x (A + B tiles), within 160 KB (sm_80 has 163 KB);
    - register caps (`maxnreg`) only on Hopper;
    - three programs per SM (PER_SM 3, the 4-warp row) only for the z store: the affine epilogue
      spills 128 B at the 168-register cap those three CTAs need."""
    def fits(c):
        bp, bn, bk = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if not INTERPRET and (bp * bn <= 64 * 64) != (element_size == 4):
            return False
        if affine and c.kwargs.get("PER_SM", 2) > 2:
            return False
        if c.maxnreg and arch < 90:  # a cap that fits Hopper's wgmma code spills mma.sync's (208-233 uncapped)
            return False
        return (bn < 256 or arch >= 90) and c.num_stages * (bp + bn) * bk * element_size <= 160 * 1024

    kept = [c for c in configs if fits(c)]
    assert kept, "no GEMM config fits"
    return kept


def _prune_for_device(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    d = named_args["d_op"]
    d = d if isinstance(d, torch.Tensor) else d.base  # a TensorDescriptor keeps its tensor
    kept = prune_gemm(configs, d.element_size(), device_arch(d.device), kwargs.get("AFFINE", True))
    return kept[:1] if ONE_CONFIG else kept


# The widest Cout tile (BLOCK_N) of `gemm_configs`: the per-channel vectors the inference epilogue reads
# unmasked are padded to a multiple of it (`depthwise_pointwise.padded_f32`).
MAX_BLOCK_N = 256


def gemm_configs(infer: bool = False) -> dict:
    """The GEMM kernels of the forward (depthwise_pointwise.py): (BLOCK_P positions, BLOCK_N out
    channels, BLOCK_K in channels per K-step, warps, pipeline stages, register cap), launched two
    programs per SM. `infer`: `_sepconv_infer_kernel`'s list, whose configs also say how many programs
    per SM its grid launches (PER_SM, `Pointwise.tile_grid`), with one more row: 128 x 128 x 64 w4 s2
    capped at 168 registers, three programs per SM (12 warps, 3 per scheduler, against the 8-warp
    rows' 2 x 8), for the training forward's z store only (`prune_gemm`: the affine epilogue spills
    there). A 4-warp CTA issues each K step's pipeline code (about 84 instructions, the same as an
    8-warp CTA's warps) once per warpgroup for 8 HGMMA instead of 4: 1,436 warp-instructions a tile
    per warp x 4 against 1,256 x 8; calibrated static estimate (sm_90 model), training z store,
    middle / exit (conv4) unit: 222.7 / 316.1 us against 239.3 / 342.3 (benchmarks/NOTES.md,
    "Triton GEMM: instructions per tile").

    128-position tiles: the GEMM's M side. BLOCK_N 256 is the widest wgmma; 728 channels pad to 768
    (5.5% of the MMA wasted, with 128- or 256-wide tiles). BLOCK_P divides POSITION_ALIGN (the
    programs' chunks are multiples of it), BLOCK_K divides SLOT_ALIGN (d's row pitch). The kernels
    hold the accumulator, the pipeline's addresses and an epilogue quarter. First, the calibrated
    static estimate's pick (sm_90 model; benchmarks/NOTES.md, "Triton GEMM kernels: toward cuBLAS")
    on the middle, entry and exit units, inference: 128 x 128 x 64 w8 at 2 stages (65 KB of shared
    memory) capped at 128 registers, two CTAs per SM (4 warps per scheduler); it compiles to 122-128
    registers with the affine epilogue, 103 for the z store. The same tile at 3 stages uncapped
    (sm_80's: the cap is Hopper's only, see `prune_gemm`), and a 16-warp 128 x 256 tile (one CTA, 4
    warps per scheduler). Calibrated, inference middle (residual) / exit (conv4) unit, us: 257 /
    357, 261 / 361, 261 / 365. Pruned: 128 x 256 x 64 w8 (one 8-warp CTA per SM, 175-236 registers:
    299 / 386 inference; training tied on those two, 3.5x on the entry unit), 4 stages (one CTA
    per SM at BLOCK_K 64, 1.4x; 128 x 128 x 32 s4: 1.2x), 4-warp tiles at two programs per SM (2
    warps per scheduler, 1.4x; three: the z-store row above), 128 x 128 x 128 s2 (one CTA per SM,
    1.2x).
    The last two rows are for fp32 (see `prune_gemm`). Returned as the autotune keyword arguments
    (configs, the TMA block pre-hook, pruning by dtype and architecture)."""
    gpu = [
        (128, 128, 64, 8, 2, 128),
        (128, 128, 64, 8, 3, None),
        (128, 256, 64, 16, 3, None),
        (64, 64, 16, 4, 2, None),
        (32, 64, 32, 4, 1, None),
    ]
    pinned = [(_PINNED_P, _PINNED_C, _PINNED_C, 4, 1, None)]
    assert max(row[1] for row in gpu + pinned) <= MAX_BLOCK_N
    rows = pinned if INTERPRET else gpu
    if infer:  # (..., programs per SM); the 4-warp row second: XCEPTION_FAST_TRITON_ONE_CONFIG keeps the first
        rows = [row + (2,) for row in rows]
        if not INTERPRET:
            rows.insert(1, (128, 128, 64, 4, 2, 168, 3))
    names = ("BLOCK_P", "BLOCK_N", "BLOCK_K", "PER_SM")
    configs = [triton.Config(dict(zip(names, row[:3] + row[6:])), num_warps=row[3], num_stages=row[4],
                             maxnreg=row[5], pre_hook=_set_weight_block)
               for row in rows]
    return dict(configs=configs, prune_configs_by={"early_config_prune": _prune_for_device})


# The most groups (`depthwise_configs`' BLOCK_G) a depthwise tile holds: bounds its offsets' span.
DEPTHWISE_MAX_GROUPS = 128


def depthwise_configs() -> list[triton.Config]:
    """`depthwise_pointwise._depthwise_kernel`: (BLOCK_G groups of RW horizontally adjacent outputs,
    BLOCK_D channels, RW, CHUNKS channel chunks per program, warps). A thread holds 8 channels (one
    16-byte load) of one group; RW outputs side by side share the input columns their windows overlap
    on. A program walks its CHUNKS chunks in a run-time loop (its positions' divisions and bases once
    for them all) and each chunk's kernel rows in a run-time loop: unrolled, the compiler hoists every
    load of a chunk and needs 128-233 registers (2-4 CTAs per SM); rolled, 80 (RW = 3), 66 (RW = 2)
    and 104 (RW = 4) on sm_90, 6, 7 and 9 CTAs per SM. Calibrated static estimate (sm_90 model),
    middle / entry (block1.rep.1) / exit (conv4) unit, us: 32 x 32 x 3 x 8 w4 114 / 1,010 / 65,
    32 x 32 x 2 x 8 w4 114 / 1,102 / 59, 16 x 32 x 4 x 8 w2 120 / 1,151 / 71. Pruned there: RW = 4
    at 4 warps (104 registers, 4 CTAs: 135 us middle), `maxnreg` 80-96 on RW = 4 (no spill at 96, 5
    CTAs: 118; spills at 80), BLOCK_D 16 (64 registers, 3.7 instructions per element-tap: 117), more
    chunks per program (24: 1% fewer instructions). BLOCK_D divides SLOT_ALIGN: the chunks cover d's
    columns exactly. The interpreter: 16-channel chunks, two per program, so that a 19-channel layer
    spans full, partial and empty ones and programs loop; groups of 4, so that odd widths cut the last
    group of a row (a test runs RW = 1 to 3 and other chunk counts as well)."""
    gpu = [
        (32, 32, 3, 8, 4, 1),
        (32, 32, 2, 8, 4, 1),
        (16, 32, 4, 8, 2, 1),
    ]
    return _configs(gpu, (8, _PINNED_C, 4, 2, 4, 1), ("BLOCK_G", "BLOCK_D", "RW", "CHUNKS"))


def device_arch(device: torch.device) -> int:
    """sm_XY as XY (90 for an H100); 90 off the GPU, where it only picks tile sizes."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def sm_count(device: torch.device) -> int:
    """The SMs the split kernels spread over; 3 in the interpreter (several programs, few of them)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def dw_input_grad_configs() -> list[triton.Config]:
    """Transposed depthwise gather (`backward._dw_input_grad_kernel`): (BLOCK_P rows, BLOCK_C channels,
    RW, warps). With unit strides a row is a group of RW horizontally adjacent input positions that
    share the grad_d columns their taps read (as the forward's groups), the kernel rows in a loop (not
    unrolled: one row's columns and taps live at a time); other strides take one position per row.
    BLOCK_C divides `backward.TAPS_ALIGN` (the taps are read unmasked). sm_90, bf16, middle unit, SASS
    instructions per element-tap: 16 x 32 x 4 w2 3.3 at 96 registers (10 CTAs per SM; the calibrated
    pick on the middle, entry and exit units), 32 x 32 x 2 w4 4.3 at 62 (8), 64 x 32 x 1 w4 5.1 at 62
    (the strided path's config). Calibrated static estimates (sm_90 model) in benchmarks/NOTES.md,
    "Triton depthwise backward: instructions per element-tap". Pruned: 16 x 32 x 4 w2 capped at 80-88
    registers (16-24 B of spill), 32 x 32 x 4 w4 (the code of 16 x 32 x 4 w2 in bigger CTAs)."""
    gpu = [
        (16, 32, 4, 2, 1),
        (32, 32, 2, 4, 1),
        (64, 32, 1, 4, 1),
    ]
    return _configs(gpu, (8, _PINNED_C, 4, 4, 1), ("BLOCK_P", "BLOCK_C", "RW"))


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


def program_slots(sms: int, per_sm: int) -> int:
    """How many persistent programs the forward's GEMM kernels launch at most: `per_sm` per SM, or one
    per `sm_count` in the interpreter (three: several programs, few of them)."""
    return sms if INTERPRET else sms * per_sm


def persistent_split(positions: int, sms: int, per_sm: int = 1) -> tuple[int, int]:
    """(programs, chunk) of the forward's GEMM kernels: `per_sm` persistent programs per SM (one per
    `sm_count` in the interpreter: three, so tests see several programs and tiles each), each owning `chunk`
    consecutive positions (a multiple of POSITION_ALIGN: whole tiles). For a middle-flow unit at batch
    256 (92,416 positions, 132 SMs, per_sm 1): 121 programs of 768 positions, 6 tiles of 128 each.
    Fixed by the shape, not by the config, so that the partial-statistics buffers have a known size;
    a config that fits fewer programs per SM than `per_sm` runs them in waves."""
    want = program_slots(sms, per_sm)
    chunk = max(triton.cdiv(triton.cdiv(positions, want), POSITION_ALIGN) * POSITION_ALIGN, POSITION_ALIGN)
    return triton.cdiv(positions, chunk), chunk


def position_bucket(positions: int) -> int:
    """The position count as the autotuners see it: the next power of two, so a new batch size (a last
    partial batch) re-tunes only when it crosses a power of two."""
    return triton.next_power_of_2(max(positions, 1))
