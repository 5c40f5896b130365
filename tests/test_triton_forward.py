"""The Triton provider's own paths beyond the conformance suite (tests/test_providers.py): the
depthwise kernel's output d (its zero padding, which the GEMM kernels read unmasked), the weight read
through a TMA descriptor or through pointers, NaN through the packed pre-ReLU, and the program splits
the launches rely on. Under the CPU interpreter without a GPU (fp32, small shapes)."""

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mid", [None, "bias-gelu"], ids=str)
def test_depthwise_output_is_exact_and_zero_padded_over_a_nan_buffer(provider, dtype, mid):
    """`depthwise` fills every element of d [P_pad, K_SLOT], starting from a buffer of NaN: dw(pre(x))
    rounded to the input dtype in [:P, :C] (the reference's depthwise convolution, pre-ReLU and stride 2
    and dilation 2 included), zeros in the padding rows and columns, which the GEMM reads unmasked.
    The mid variant's bias and activation (gelu(0 + 0) = 0 past C; not 0 for the padded rows)."""
    from xception_fast.triton_kernels import autotune
    from xception_fast.triton_kernels import depthwise_pointwise as dp
    from xception_fast.triton_kernels.mid_act import BN_BIAS, BN_NONE
    from xception_fast.triton_kernels.mid_unit import _mid_vectors

    x, dw, _ = _unit(19, 8, dtype)
    dw = (torch.randn(19, 1, 5, 5, device=DEVICE) / 5).to(dtype)
    spec = UnitSpec((5, 5), stride=(2, 2), padding=(3, 3), dilation=(2, 2), pre_relu=True)
    geo, xc, dwm, pw = dp._prepare(x, dw, torch.ones(8, 19, 1, 1, dtype=dtype, device=DEVICE), spec)
    rows, width = -(-geo.P // autotune.POSITION_ALIGN) * autotune.POSITION_ALIGN, dp.slot_width(geo.C)
    assert rows > geo.P and width > geo.C  # both paddings present
    bias = torch.randn(19, device=DEVICE) if mid else None
    vectors = _mid_vectors(width, geo.C, DEVICE, shift=bias) if mid else None
    out = torch.full((rows, width), float("nan"), dtype=dtype, device=DEVICE)
    d = dp.depthwise(xc, dwm, geo, spec.pre_relu, vectors, BN_BIAS if mid else BN_NONE, "gelu" if mid else "",
                     out=out)
    assert d.data_ptr() == out.data_ptr() and not d.isnan().any()
    assert torch.equal(d[geo.P:], torch.zeros_like(d[geo.P:]))
    assert torch.equal(d[:, geo.C:], torch.zeros_like(d[:, geo.C:]))
    want = torch.nn.functional.conv2d(torch.relu(x.float()), dw.float(), None, spec.stride, spec.padding,
                                      spec.dilation, groups=19)
    if mid:
        want = torch.nn.functional.gelu((want.to(dtype).float() + bias[None, :, None, None]).to(dtype).float())
    want = want.to(dtype).permute(0, 2, 3, 1).reshape(geo.P, geo.C)
    torch.testing.assert_close(d[:geo.P, :geo.C], want, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)


def test_weight_descriptor_and_pointer_paths_agree(provider, monkeypatch):
    """The GEMM's operands (d and the pointwise weight) through TMA tensor descriptors and through
    pointer loads: the same values in the same order, so bitwise the same result."""
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
def test_a_given_depthwise_output_gives_the_stored_ones_gradients(provider, dtype):
    """`backward._backward_convs` with d given (a [P_pad, K_pitch] buffer whose first P rows and C
    columns are d, NaN elsewhere) and with d stored by `_dw_weight_grad_kernel`: the same gradients.
    The stored d is the reference's depthwise output rounded to the input dtype (stride 2, dilation 2,
    k=5, a NaN in x that must reach grad_pw through d)."""
    from xception_fast.triton_kernels import backward
    from xception_fast.triton_kernels.depthwise_pointwise import _prepare, depthwise_taps
    from xception_fast.triton_kernels.utils import nhwc

    x, _, pw = _unit(19, 33, dtype)
    dw = (torch.randn(19, 1, 5, 5, device=DEVICE) / 5).to(dtype)
    x[1, 4, 3, 3] = float("nan")  # under taps: stride 2, dilation 2 and padding 3 sample odd rows
    spec = UnitSpec((5, 5), stride=(2, 2), padding=(3, 3), dilation=(2, 2), pre_relu=True)
    geo, xc, dwm, pwm = _prepare(x, dw, pw, spec)
    grad_z = nhwc(torch.randn(2, 33, geo.Ho, geo.Wo, device=DEVICE).to(dtype))

    stored_d = torch.full((geo.P, geo.C), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    taps = depthwise_taps(dwm, geo, backward.taps_pitch(geo.C))
    backward.dw_weight_grad(geo, xc, torch.zeros_like(stored_d), dw, True, taps, stored_d)
    want = reference._depthwise(x, dw, spec)[1].permute(0, 2, 3, 1).reshape(geo.P, geo.C)
    torch.testing.assert_close(stored_d, want, equal_nan=True, **({} if dtype == torch.float32 else
                                                                   dict(atol=2e-3, rtol=2e-3)))
    assert stored_d.isnan().any()

    buffer = torch.full((geo.P + 5, geo.C + 13), float("nan"), dtype=dtype, device=DEVICE)
    buffer[:geo.P, :geo.C] = stored_d
    given = backward._backward_convs(geo, xc, dwm, pwm, dw, pw, True, grad_z, d=buffer)
    stored = backward._backward_convs(geo, xc, dwm, pwm, dw, pw, True, grad_z)
    for a, b in zip(given, stored):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert given[2].isnan().any() and not given[2].isnan().all()  # the NaN reached grad_pw through d, only there
    with pytest.raises(ValueError, match="row-major"):
        backward._backward_convs(geo, xc, dwm, pwm, dw, pw, True, grad_z, d=buffer.t())


# (kernel, stride, padding, dilation, input width): the forward's groups of outputs along a row share
# loaded columns as the stride and dilation allow; odd output widths cut a row's last group.
DEPTHWISE_CASES = [(5, 2, 3, 2, 7), (3, 1, 1, 1, 9), (3, 2, 1, 1, 11), (3, 1, 2, 2, 6)]


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_forward_and_the_backward_make_the_same_depthwise_output(provider, dtype, case):
    """d from the forward's `_depthwise_kernel` (which the inference backward hands to `_backward_convs`)
    and d stored by `_dw_weight_grad_kernel`: the same FMAs in the same tap order, so bitwise equal (a
    NaN in x included), and handing one over instead of storing the other changes no gradient. The
    forward computes several outputs of a row from one load of each input column; the backward loads
    each tap of each output on its own."""
    from xception_fast.triton_kernels import backward
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    k, stride, pad, dil, width = case
    _, _, pw = _unit(19, 33, dtype)
    x = torch.randn(2, 19, 6, width, dtype=dtype, device=DEVICE)
    dw = (torch.randn(19, 1, k, k, device=DEVICE) / k).to(dtype)
    x[1, 4, 3, 3] = float("nan")
    spec = UnitSpec((k, k), stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil), pre_relu=True,
                    post_relu=True)
    geo, xc, dwm, _ = dp._prepare(x, dw, pw, spec)
    stored = torch.full((geo.P, geo.C), float("nan"), dtype=dtype, device=DEVICE)
    taps = dp.depthwise_taps(dwm, geo, backward.taps_pitch(geo.C))
    backward.dw_weight_grad(geo, xc, torch.zeros_like(stored), dw, True, taps, stored)
    d = dp.depthwise(xc, dwm, geo, True)[:geo.P, :geo.C]
    assert stored.isnan().any() and torch.equal(d.isnan(), stored.isnan())
    assert torch.equal(d.nan_to_num(), stored.nan_to_num())
    want = torch.nn.functional.conv2d(torch.relu(x.float()), dw.float(), None, spec.stride, spec.padding,
                                      spec.dilation, groups=19).to(dtype).permute(0, 2, 3, 1).reshape(geo.P, geo.C)
    torch.testing.assert_close(d, want, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3, equal_nan=True)


# (batch, height, width, stride, dilation) for the depthwise gradients: a program's tile of groups wraps
# across output rows and images (`_dw_weight_grad_kernel` steps them without dividing), from a 1 x 3 image
# (more tiles' worth of groups than an image holds) to 19-wide rows (the middle flow's, cut last groups).
DW_GRAD_CASES = [(9, 1, 3, 1, 1), (3, 2, 5, 1, 1), (2, 5, 19, 1, 1), (3, 7, 9, 2, 1), (2, 6, 11, 1, 2)]


@pytest.mark.parametrize("case", DW_GRAD_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_depthwise_gradients_match_autograd_across_row_and_image_wraps(provider, monkeypatch, dtype, case):
    """`backward.dw_weight_grad` (grad_dw, and d stored into a NaN-poisoned buffer) and `dw_input_grad`
    (into a poisoned grad_x) against torch autograd of the reference depthwise in fp64, at odd sizes
    (19 channels: full, partial and empty channel blocks), pre-ReLU on, several programs per split."""
    from xception_fast.triton_kernels import backward
    from xception_fast.triton_kernels import depthwise_pointwise as dp
    from xception_fast.triton_kernels.utils import POISON_ENV_VAR

    monkeypatch.setenv(POISON_ENV_VAR, "1")
    n, h, w, stride, dil = case
    x = torch.randn(n, 19, h, w, dtype=dtype, device=DEVICE)
    dw = (torch.randn(19, 1, 3, 3, device=DEVICE) / 3).to(dtype)
    spec = UnitSpec((3, 3), stride=(stride, stride), padding=(dil, dil), dilation=(dil, dil), pre_relu=True)
    geo, xc, dwm, _ = dp._prepare(x, dw, torch.ones(8, 19, 1, 1, dtype=dtype, device=DEVICE), spec)
    grad_d = torch.randn(geo.P, geo.C, device=DEVICE).to(dtype)
    stored = torch.full((geo.P, geo.C), float("nan"), dtype=dtype, device=DEVICE)
    taps = dp.depthwise_taps(dwm, geo, backward.taps_pitch(geo.C))
    grad_dw = backward.dw_weight_grad(geo, xc, grad_d, dw, True, taps, stored)
    grad_x = dp.empty_nhwc((geo.N, geo.C, geo.H, geo.W), dtype, DEVICE)
    assert grad_x.isnan().all()  # poisoned
    backward.dw_input_grad(geo, grad_d, taps, xc, grad_x, True)

    x64 = x.double().requires_grad_()
    dw64 = dw.double().requires_grad_()
    d64 = torch.nn.functional.conv2d(torch.relu(x64), dw64, None, spec.stride, spec.padding, spec.dilation, groups=19)
    d64.backward(grad_d.double().view(n, geo.Ho, geo.Wo, 19).permute(0, 3, 1, 2))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(stored, d64.detach().to(dtype).permute(0, 2, 3, 1).reshape(geo.P, geo.C), **tol)
    torch.testing.assert_close(grad_dw.double(), dw64.grad, atol=1e-4 * max(geo.P, 1) ** 0.5, rtol=1e-3)
    torch.testing.assert_close(grad_x.double(), x64.grad.to(dtype).double(), **tol)


def test_depthwise_weight_gradient_int64_offsets_give_the_same_results(provider, monkeypatch):
    """`_dw_weight_grad_kernel`'s int64 offsets (WIDE, where a program's span could pass 2^31 elements:
    too large to test) against its int32 ones from the program's first image: the same grad_dw and d,
    bitwise."""
    from xception_fast.triton_kernels import backward
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    x = torch.randn(3, 19, 5, 19, device=DEVICE)
    dw = torch.randn(19, 1, 3, 3, device=DEVICE) / 3
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True)
    geo, xc, dwm, _ = dp._prepare(x, dw, torch.ones(8, 19, 1, 1, device=DEVICE), spec)
    grad_d = torch.randn(geo.P, geo.C, device=DEVICE)
    taps = dp.depthwise_taps(dwm, geo, backward.taps_pitch(geo.C))
    outs = []
    for wide in (False, True):
        monkeypatch.setattr(backward, "_wide_weight_grad", lambda *args, wide=wide: wide)
        d = torch.full((geo.P, geo.C), float("nan"), device=DEVICE)
        outs.append((backward.dw_weight_grad(geo, xc, grad_d, dw, True, taps, d), d))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not outs[0][1].isnan().any()


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=str)
def test_every_group_width_and_chunk_count_gives_the_same_depthwise_output(provider, monkeypatch, case):
    """`_depthwise_kernel` with the group widths (RW) and channel chunks per program of the GPU's configs
    (the interpreter pins one): the same d, bitwise, over a NaN buffer (padding rows included), as the
    pinned config, whose d the test above matches with the backward's. Each output sums its taps in the
    same order whichever outputs share its loads."""
    import triton

    from xception_fast.triton_kernels import autotune
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    k, stride, pad, dil, width = case
    x = torch.randn(3, 19, 5, width, device=DEVICE)
    dw = torch.randn(19, 1, k, k, device=DEVICE) / k
    spec = UnitSpec((k, k), stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil), pre_relu=True)
    geo, xc, dwm, _ = dp._prepare(x, dw, torch.ones(8, 19, 1, 1, device=DEVICE), spec)
    rows = -(-geo.P // autotune.POSITION_ALIGN) * autotune.POSITION_ALIGN

    def run():
        out = torch.full((rows, dp.slot_width(geo.C)), float("nan"), device=DEVICE)
        return dp.depthwise(xc, dwm, geo, True, out=out)

    pinned = run()
    assert not pinned.isnan().any()
    for rw, chunks, groups in ((1, 1, 8), (2, 3, 4), (3, 1, 8), (3, 4, 16), (4, 1, 2)):
        config = triton.Config(dict(BLOCK_G=groups, BLOCK_D=16, RW=rw, CHUNKS=chunks), num_warps=4, num_stages=1)
        monkeypatch.setattr(dp._depthwise_kernel, "configs", [config])
        assert torch.equal(run(), pinned), (rw, chunks, groups)


def test_depthwise_int64_offsets_give_the_same_output(provider, monkeypatch):
    """`_depthwise_kernel`'s int64 offsets (WIDE, where a tile's span could pass 2^31 elements: too large
    to test) against its int32 ones from per-program bases: the same d, bitwise."""
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    x, dw, pw = _unit(19, 8)
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True)
    geo, xc, dwm, _ = dp._prepare(x, dw, pw, spec)
    outs = []
    for wide in (False, True):
        monkeypatch.setattr(dp, "_wide_offsets", lambda *args, wide=wide: wide)
        outs.append(dp.depthwise(xc, dwm, geo, True))
    assert torch.equal(outs[0], outs[1])


def test_a_wider_weight_dtype_gets_an_fp32_accumulated_weight_gradient():
    """grad_pw of half operands for an fp32 weight: fp32 accumulation rounded once to fp32, not the
    half-precision product widened afterwards."""
    from xception_fast.triton_kernels.backward import _weight_grad_product

    gen = torch.Generator().manual_seed(7)
    gz = torch.randn(300, 24, generator=gen).half().to(DEVICE)
    d = torch.randn(300, 40, generator=gen).half().to(DEVICE)
    got = _weight_grad_product(gz, d, torch.float32)
    exact = gz.double().t() @ d.double()
    # Half x half products are exact in fp32; 300 fp32 additions err by at most 300 u sum |a b|.
    bound = 300 * 2.0 ** -24 * (gz.double().abs().t() @ d.double().abs())
    assert got.dtype == torch.float32
    assert bool(((got.double() - exact).abs() <= bound).all())
    widened = _weight_grad_product(gz, d, torch.float16).double()
    assert bool(((widened - exact).abs() > bound).any())  # half rounding of the result exceeds the bound


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


# (mean, std) per dtype: fp16 holds 1e4 to 8 units, so its case keeps the std at 4 ulps of the mean.
_LARGE_MEAN = {torch.float32: (1e4, 1e-2), torch.float16: (1e3, 2.0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("drift", [0.0, 1e3], ids=["steady", "drifting"])
def test_training_statistics_with_a_large_mean_and_a_drifting_one(provider, dtype, drift):
    """The statistics pass (`batchnorm._stats_partial_kernel`) and the merge across splits against
    float64 statistics of the stored z, with |mean| >> std, and with the mean drifting by `drift` std
    across the batch (linearly in the position: within every program's tiles and across programs).
    z is x itself (1x1 depthwise weight 1, identity pointwise), so the stored values are known.
    Several programs (the interpreter runs 3) of several tiles each, a partial last tile, 19 channels
    (a partial channel block)."""
    from xception_fast.testing import STATISTICS_RTOL

    mean, std = _LARGE_MEAN[dtype]
    n, c, h, w = 4, 19, 11, 11
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, n * h * w, dtype=torch.float64).view(n, 1, h, w)
    x = (mean + drift * std * ramp + std * noise).to(dtype).to(DEVICE).contiguous(memory_format=torch.channels_last)
    dw = torch.ones(c, 1, 1, 1, dtype=dtype, device=DEVICE)
    pw = torch.eye(c, dtype=dtype, device=DEVICE).view(c, c, 1, 1)
    _, z, got_mean, got_var = provider.sepconv_bn_train(x, dw, pw, None, None, None, UnitSpec((1, 1)), 1e-5)
    assert torch.equal(z, x)
    var, mu = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
    assert var.min() > 0.5 * std ** 2  # the data kept their spread through the rounding
    torch.testing.assert_close(got_mean.double(), mu, atol=0, rtol=STATISTICS_RTOL["mean"])
    torch.testing.assert_close(got_var.double(), var, atol=0, rtol=STATISTICS_RTOL["var"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("positions", [484, 389], ids=["partial-tile", "short-last-split"])
def test_statistics_pass_merges_several_splits_of_uneven_slots(provider, dtype, positions, monkeypatch):
    """`batchnorm.statistics` over three position splits (the last one partial: 100 rows, or 5, fewer
    than a tile), each element slot of the tile holding a different count, with a large mean drifting
    by 1e3 std, against float64 statistics; over a NaN-poisoned statistics buffer."""
    from xception_fast.testing import STATISTICS_RTOL
    from xception_fast.triton_kernels import autotune, batchnorm

    if DEVICE.type != "cpu":
        pytest.skip("the splits are sized for the interpreter's POSITION_ALIGN (32)")
    monkeypatch.setenv("XCEPTION_FAST_POISON_OUTPUTS", "1")
    monkeypatch.setattr(autotune, "target_programs", lambda device: 7)  # 3 splits of 19 channels' 2 blocks
    assert autotune.position_split(positions, 2, torch.device("cpu"))[0] == 3
    mean, std = _LARGE_MEAN[dtype]
    gen = torch.Generator().manual_seed(11)
    ramp = torch.linspace(0.0, 1.0, positions, dtype=torch.float64)[:, None]
    z = (mean + 1e3 * std * ramp + std * torch.randn(positions, 19, generator=gen, dtype=torch.float64)).to(dtype)
    got_mean, got_var = batchnorm.statistics(z)
    var, mu = torch.var_mean(z.double(), dim=0, correction=0)
    torch.testing.assert_close(got_mean.double(), mu, atol=0, rtol=STATISTICS_RTOL["mean"])
    torch.testing.assert_close(got_var.double(), var, atol=0, rtol=STATISTICS_RTOL["var"])


def test_program_splits_cover_the_positions_in_whole_tiles():
    """Every position in exactly one program of the forward's GEMM kernels, chunks in whole tiles (POSITION_ALIGN)."""
    from xception_fast.triton_kernels import autotune

    align = autotune.POSITION_ALIGN
    for positions in (1, align - 1, 92416, 25600, 3 * align + 5):
        for sms, per_sm in ((132, 1), (132, 2), (108, 1), (3, 1)):
            programs, chunk = autotune.persistent_split(positions, sms, per_sm)
            assert chunk % align == 0 and (programs - 1) * chunk < positions <= programs * chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("programs", [1, 4, 5, 9])
def test_inference_tiles_dealt_in_runs_cover_the_output_once(provider, monkeypatch, programs, dtype):
    """`_sepconv_infer_kernel` deals its output tiles (3 position tiles x 2 Cout tiles here, in the
    interpreter's 32 x 16 blocks) out in equal runs, which start and end inside a row of Cout tiles
    (4 or 5 programs), one tile each, or fewer tiles than programs (9: the grid shrinks to the tiles).
    The epilogue addresses each tile from a 64-bit base plus int32 offsets, masked by the rows and
    columns left: every element written exactly once, as the reference computes it (the last position
    tile and the last Cout tile partial), over a NaN-poisoned output."""
    from xception_fast.testing import TOLERANCES
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    monkeypatch.setenv("XCEPTION_FAST_POISON_OUTPUTS", "1")
    monkeypatch.setattr(dp, "program_slots", lambda sms, per_sm: programs)
    x, dw, pw = _unit(16, 24, dtype)
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True, post_relu=True)
    scale, shift = torch.rand(24, device=DEVICE) + 0.5, torch.randn(24, device=DEVICE)
    res = torch.randn(2, 24, 6, 7, device=DEVICE).to(dtype)
    got = provider.sepconv_bn_infer(x, dw, pw, scale, shift, res, spec)
    want = reference.sepconv_bn_infer(x, dw, pw, scale, shift, res, spec)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("programs", [2, 5])
def test_training_z_store_over_tile_runs_at_an_odd_cout(provider, monkeypatch, programs, dtype):
    """The training forward's GEMM (`_sepconv_infer_kernel` without its affine map) stores z over runs
    of tiles that wrap from one position tile to the next, at 19 output channels (a Cout tile of 3
    columns, no aligned rows): z and the statistics of it as the reference's, over a poisoned z."""
    from xception_fast.testing import TOLERANCES
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    monkeypatch.setenv("XCEPTION_FAST_POISON_OUTPUTS", "1")
    monkeypatch.setattr(dp, "program_slots", lambda sms, per_sm: programs)
    x, dw, pw = _unit(16, 19, dtype)
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True)
    _, z, mean, _ = provider.sepconv_bn_train(x, dw, pw, None, None, None, spec, 1e-5)
    _, z_ref, mean_ref, _ = reference.sepconv_bn_train(x, dw, pw, None, None, None, spec, 1e-5)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(z, z_ref, atol=tol.atol, rtol=tol.rtol)
    torch.testing.assert_close(mean, mean_ref, atol=tol.atol, rtol=tol.rtol)


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
