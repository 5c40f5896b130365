"""The Triton provider's own paths beyond the conformance suite (tests/test_providers.py): the weight
read through a TMA descriptor or through pointers, NaN through the packed pre-ReLU, and the program
splits the launches rely on. Under the CPU interpreter without a GPU (fp32, small shapes)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from xception_fast import reference
from xception_fast.spec import UnitSpec
from xception_fast.testing import require_provider

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton provider needs the triton package", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def provider(monkeypatch):
    require_provider("triton", DEVICE, monkeypatch)
    from xception_fast import backends
    return backends.PROVIDERS["triton"].load()


def _unit(cin, cout, dtype=torch.float32):
    x = torch.randn(2, cin, 6, 7, dtype=dtype, device=DEVICE)
    dw = (torch.randn(cin, 1, 3, 3, device=DEVICE) / 3).to(dtype)
    pw = (torch.randn(cout, cin, 1, 1, device=DEVICE) / cin ** 0.5).to(dtype)
    return x, dw, pw


def test_weight_descriptor_and_pointer_paths_agree(provider, monkeypatch):
    """The pointwise weight through a TMA tensor descriptor and through masked pointer loads: the same
    values in the same order, so bitwise the same result."""
    from xception_fast.triton_kernels import utils

    x, dw, pw = _unit(16, 24)
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True, post_relu=True)
    scale, shift = torch.rand(24, device=DEVICE) + 0.5, torch.randn(24, device=DEVICE)
    outs = []
    for tma in (True, False):
        monkeypatch.setattr(utils, "WEIGHT_TMA", tma)
        assert utils.weight_operand(pw.view(24, 16))[1] == tma
        outs.append(provider.sepconv_bn_infer(x, dw, pw, scale, shift, None, spec))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_stored_and_recomputed_depthwise_give_the_same_gradients(provider, monkeypatch, dtype):
    """grad_pw from the d that `_dw_weight_grad_kernel` stores and from d recomputed in the pointwise
    weight-gradient kernel: the same FMAs in the same order, rounded alike, so bitwise the same gradients (stride 2,
    dilation 2, k=5, a NaN in x among them)."""
    from xception_fast.triton_kernels import backward

    x, dw, pw = _unit(19, 33, dtype)
    dw = (torch.randn(19, 1, 5, 5, device=DEVICE) / 5).to(dtype)
    x[1, 4, 3, 3] = float("nan")  # under taps: stride 2, dilation 2 and padding 3 sample odd rows
    spec = UnitSpec((5, 5), stride=(2, 2), padding=(3, 3), dilation=(2, 2), pre_relu=True)
    grad_y = torch.randn(2, 33, *spec.output_hw(6, 7), device=DEVICE).to(dtype)
    outs = []
    for tiles in (1, 10 ** 9):  # always stored, never stored
        monkeypatch.setattr(backward, "STORE_D_FROM_TILES", tiles)
        outs.append(provider.sepconv_bn_infer_backward(grad_y, x, dw, pw, None, None, spec))
    for stored, recomputed in zip(*outs):
        assert torch.equal(stored.isnan(), recomputed.isnan())
        assert torch.equal(stored.nan_to_num(), recomputed.nan_to_num())
    assert outs[0][2].isnan().any()  # the NaN reached grad_pw through d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_nan_input_propagates_like_the_reference(provider, dtype):
    """A NaN in x passes the pre-ReLU (as torch.relu) and reaches exactly the outputs whose window
    covers it, in every output channel; no other output becomes NaN."""
    x, dw, pw = _unit(5, 7, dtype)
    x[1, 2, 3, 4] = float("nan")
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True)
    got = provider.sepconv_bn_infer(x, dw, pw, None, None, None, spec)
    want = reference.sepconv_bn_infer(x, dw, pw, None, None, None, spec)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got).sum() == 9 * 7


def test_program_splits_cover_the_positions_in_whole_tiles():
    """Every position in exactly one split, chunks in whole tiles (POSITION_ALIGN), and the
    weight-gradient split count filling whole waves when it can."""
    from xception_fast.triton_kernels import autotune

    align = autotune.POSITION_ALIGN
    for positions in (1, align - 1, 92416, 25600, 3 * align + 5):
        for sms, per_sm in ((132, 1), (132, 2), (108, 1), (3, 1)):
            programs, chunk = autotune.persistent_split(positions, sms, per_sm)
            assert chunk % align == 0 and (programs - 1) * chunk < positions <= programs * chunk
        splits, chunk = autotune.balanced_split(positions, 36, 132)
        assert chunk % align == 0 and (splits - 1) * chunk < positions <= splits * chunk
        splits, chunk = autotune.balanced_split(positions, 1, 132)  # one weight tile: more splits allowed
        assert chunk % align == 0 and (splits - 1) * chunk < positions <= splits * chunk
    if align == 128:  # the GPU's tiles: the middle-flow grad_pw in exactly 3 waves, the entry flow's
        assert autotune.balanced_split(92416, 36, 132) == (11, 8448)  # single tile on every SM
        assert autotune.balanced_split(256 * 147 * 147, 1, 132)[0] == 132


def test_exact_matmul_switches_the_cublas_flags_off_and_restores_them():
    """grad_d goes through torch.matmul: inside `exact_matmul` no TF32 for fp32 (whichever API the caller
    used: PyTorch refuses to read a flag set through the other one), fp32 accumulation for fp16/bf16;
    outside, the caller's flags exactly as they were. The flags are global state, settable without a GPU."""
    from xception_fast.triton_kernels.backward import exact_matmul

    flags = torch.backends.cuda.matmul
    saved = (flags.allow_fp16_reduced_precision_reduction, flags.allow_bf16_reduced_precision_reduction,
             flags.allow_fp16_accumulation, flags.allow_tf32)
    try:
        flags.allow_tf32 = True  # the legacy API (torch.set_float32_matmul_precision("high") sets it too)
        with exact_matmul(torch.float32):
            assert not flags.allow_tf32
        assert flags.allow_tf32
        flags.allow_tf32 = False
        flags.fp32_precision = "tf32"  # the new API
        with exact_matmul(torch.float32):
            assert flags.fp32_precision == "ieee"
        assert flags.fp32_precision == "tf32"
        flags.fp32_precision = "none"  # back to a state both APIs can read

        flags.allow_fp16_reduced_precision_reduction = True
        flags.allow_bf16_reduced_precision_reduction = True
        flags.allow_fp16_accumulation = True
        with exact_matmul(torch.float16):
            assert not flags.allow_fp16_reduced_precision_reduction and not flags.allow_fp16_accumulation
        assert flags.allow_fp16_reduced_precision_reduction and flags.allow_fp16_accumulation
        with exact_matmul(torch.bfloat16):
            assert not flags.allow_bf16_reduced_precision_reduction
        assert flags.allow_bf16_reduced_precision_reduction
    finally:
        flags.fp32_precision = "none"
        flags.allow_tf32 = saved[3]
        flags.allow_fp16_reduced_precision_reduction, flags.allow_bf16_reduced_precision_reduction = saved[:2]
        flags.allow_fp16_accumulation = saved[2]
