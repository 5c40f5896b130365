"""The Triton provider's one-pass depthwise backward (`backward._dw_backward_kernel`: grad_dw, d and grad_x
from one pass over x and grad_d) against torch autograd in fp64 and against the two kernels it replaces
(`_dw_weight_grad_kernel`, `_dw_input_grad_kernel`), and the dispatch between them (`one_pass_width`).
Under the CPU interpreter without a GPU (fp32 and fp16, small odd shapes, outputs poisoned with NaN)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from xception_fast.spec import UnitSpec
from xception_fast.testing import require_provider

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton provider needs the triton package", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
C = 19  # channel blocks of 16 in the interpreter: a full block and a partial one


@pytest.fixture
def backward(monkeypatch):
    require_provider("triton", DEVICE, monkeypatch)
    from xception_fast import backends
    from xception_fast.triton_kernels import backward
    from xception_fast.triton_kernels.utils import POISON_ENV_VAR

    backends.PROVIDERS["triton"].load()
    monkeypatch.setenv(POISON_ENV_VAR, "1")  # the grad_dw partials start as NaN
    return backward


def _case(n, h, w, dil, dtype, pre_relu=True, nan=False):
    """(geo, x channels_last, dw [C, 1, 3, 3], taps, grad_d [P, C], x, spec) of a "same" 3 x 3 unit."""
    from xception_fast.triton_kernels import backward
    from xception_fast.triton_kernels import depthwise_pointwise as dp

    x = torch.randn(n, C, h, w, dtype=dtype, device=DEVICE)
    if nan:
        x[-1, 4, h // 2, w // 2] = float("nan")
    dw = (torch.randn(C, 1, 3, 3, device=DEVICE) / 3).to(dtype)
    spec = UnitSpec((3, 3), padding=(dil, dil), dilation=(dil, dil), pre_relu=pre_relu)
    geo, xc, dwm, _ = dp._prepare(x, dw, torch.ones(8, C, 1, 1, dtype=dtype, device=DEVICE), spec)
    grad_d = torch.randn(geo.P, geo.C, device=DEVICE).to(dtype)
    return geo, xc, dw, dp.depthwise_taps(dwm, geo, backward.taps_pitch(C)), grad_d, x, spec


def _poisoned(geo, dtype):
    from xception_fast.triton_kernels.utils import empty_nhwc

    grad_x = empty_nhwc((geo.N, geo.C, geo.H, geo.W), dtype, DEVICE).fill_(float("nan"))
    return grad_x, torch.full((geo.P, geo.C), float("nan"), dtype=dtype, device=DEVICE)


def _one_pass(backward, geo, xc, dw, taps, grad_d, pre_relu, rw, store_d=True):
    grad_x, d = _poisoned(geo, xc.dtype)
    grad_dw = backward.dw_backward_one_pass(geo, xc, grad_d, dw, pre_relu, taps, grad_x, d if store_d else None,
                                            rw=rw)
    return grad_dw, grad_x, d


def _two_kernels(backward, geo, xc, dw, taps, grad_d, pre_relu):
    grad_x, d = _poisoned(geo, xc.dtype)
    grad_dw = backward.dw_weight_grad(geo, xc, grad_d, dw, pre_relu, taps, d)
    backward.dw_input_grad(geo, grad_d, taps, xc, grad_x, pre_relu)
    return grad_dw, grad_x, d


# (batch, height, width, dilation, group width): a program's chunk of groups wraps across rows and images
# (1 x 3 images: a tile's worth of groups spans several images), rows cut inside a last group (widths not
# multiples of the group), dilation 2 (the halo two rows and columns out), every group width 1-4.
CASES = [(9, 1, 3, 1, 3), (3, 2, 5, 1, 2), (2, 5, 19, 1, 4), (2, 6, 11, 2, 3), (3, 4, 7, 1, 1), (2, 7, 10, 2, 2)]


@pytest.mark.parametrize("pre_relu", [True, False], ids=["pre_relu", "no_pre_relu"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_one_pass_matches_autograd(backward, dtype, case, pre_relu):
    """grad_dw, grad_x and d (both written over NaN) against torch autograd of the reference depthwise
    (ReLU, conv2d) in fp64: d and grad_x rounded once to the input dtype, grad_dw in fp32."""
    n, h, w, dil, rw = case
    geo, xc, dw, taps, grad_d, x, spec = _case(n, h, w, dil, dtype, pre_relu)
    grad_dw, grad_x, d = _one_pass(backward, geo, xc, dw, taps, grad_d, pre_relu, rw)

    x64 = x.double().requires_grad_()
    dw64 = dw.double().requires_grad_()
    d64 = torch.nn.functional.conv2d(torch.relu(x64) if pre_relu else x64, dw64, None, spec.stride, spec.padding,
                                     spec.dilation, groups=C)
    d64.backward(grad_d.double().view(n, h, w, C).permute(0, 3, 1, 2))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(d, d64.detach().to(dtype).permute(0, 2, 3, 1).reshape(geo.P, C), **tol)
    torch.testing.assert_close(grad_x.double(), x64.grad.to(dtype).double(), **tol)
    torch.testing.assert_close(grad_dw.double(), dw64.grad, atol=1e-4 * geo.P ** 0.5, rtol=1e-3)
    assert grad_dw.dtype == dw.dtype and grad_x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_one_pass_is_bitwise_the_two_kernels(backward, dtype, case):
    """d bitwise equal to the two kernels' (the same FMAs in the same tap order), a NaN in x included;
    grad_dw bitwise too in groups of 4 (the weight-gradient kernel's blocks and split), within fp32
    rounding in other groups; grad_x (its taps summed in the reverse order) within a rounding of the
    input dtype. Without d stored, the same grad_dw and grad_x."""
    n, h, w, dil, rw = case
    geo, xc, dw, taps, grad_d, _, _ = _case(n, h, w, dil, dtype, nan=True)
    want_dw, want_x, want_d = _two_kernels(backward, geo, xc, dw, taps, grad_d, True)
    for group in (rw, 4):
        grad_dw, grad_x, d = _one_pass(backward, geo, xc, dw, taps, grad_d, True, group)
        assert d.isnan().any() and torch.equal(d.isnan(), want_d.isnan())
        assert torch.equal(d.nan_to_num(), want_d.nan_to_num())
        assert not grad_x.isnan().any()  # the NaN is masked by the pre-ReLU
        torch.testing.assert_close(grad_x, want_x, atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-3)
        assert torch.equal(grad_dw.isnan(), want_dw.isnan()) and grad_dw.isnan().any()
        if group == 4:
            assert torch.equal(grad_dw.nan_to_num(), want_dw.nan_to_num())
        else:
            torch.testing.assert_close(grad_dw, want_dw, equal_nan=True, atol=1e-3, rtol=1e-3)
        no_d = _one_pass(backward, geo, xc, dw, taps, grad_d, True, group, store_d=False)
        assert torch.equal(no_d[0].nan_to_num(), grad_dw.nan_to_num()) and torch.equal(no_d[1], grad_x)
        assert no_d[2].isnan().all()  # not written


@pytest.mark.parametrize("chunk", [8, 24, 4096], ids=["one_tile", "three_tiles", "one_split"])
def test_every_split_count_gives_the_same_results(backward, monkeypatch, chunk):
    """The fixed split over groups (`weight_grad_split`) replaced by chunks of one tile of 8 groups, three
    tiles (a chunk ending inside an image), or one chunk for everything: d bitwise the two kernels',
    grad_dw and grad_x within fp32 rounding of theirs; 75 groups, so the last chunk is a partial one."""
    geo, xc, dw, taps, grad_d, _, _ = _case(3, 5, 13, 1, torch.float32)  # 3 x 5 rows of 5 groups of 3
    want = _two_kernels(backward, geo, xc, dw, taps, grad_d, True)
    splits = []
    monkeypatch.setattr(backward, "weight_grad_split",
                        lambda rows, blocks, device, ctas=0: splits.append(-(-rows // chunk)) or (splits[-1], chunk))
    got = _one_pass(backward, geo, xc, dw, taps, grad_d, True, 3)
    assert splits == [-(-75 // chunk)]
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


def test_int64_offsets_give_the_same_results(backward, monkeypatch):
    """WIDE (int64 offsets, where a program's span could pass 2^31 elements: too large to test) against
    the int32 offsets from the program's first image: bitwise the same grad_dw, grad_x and d."""
    geo, xc, dw, taps, grad_d, _, _ = _case(3, 4, 9, 1, torch.float32)
    outs = []
    for wide in (False, True):
        monkeypatch.setattr(backward, "_wide_weight_grad", lambda *args, wide=wide: wide)
        outs.append(_one_pass(backward, geo, xc, dw, taps, grad_d, True, 3))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def _geo(h, w, k=3, stride=1, pad=1, dil=1):
    from xception_fast.triton_kernels.depthwise_pointwise import Geometry

    x = torch.empty(2, C, h, w)
    spec = UnitSpec((k, k), stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil))
    return Geometry(x, torch.empty(C, 1, k, k), torch.empty(8, C, 1, 1), spec)


def test_the_dispatch_follows_the_row_width(backward):
    """One pass in groups of 3 for Xception's entry-flow rows (147, 74, 37), of 2 for the exit flow's 10;
    the middle flow's 19 and every geometry the kernel cannot run (stride 2, k = 5, padding other than
    the dilation) take the two kernels."""
    assert [backward.one_pass_width(_geo(5, w)) for w in (147, 74, 37, 10, 19)] == [3, 3, 3, 2, 0]
    assert backward.one_pass_width(_geo(6, 6, dil=2, pad=2)) == 3
    assert backward.one_pass_width(_geo(6, 6, stride=2)) == 0
    assert backward.one_pass_width(_geo(6, 6, k=5, pad=2)) == 0
    assert backward.one_pass_width(_geo(6, 6, pad=0)) == 0
    assert backward.one_pass_width(_geo(6, 6, pad=1, dil=2)) == 0


@pytest.mark.parametrize("width", [10, 19], ids=["one_pass", "two_kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_training_backward_runs_the_dispatched_kernels(backward, monkeypatch, dtype, width):
    """`_backward_convs` (the training backward after g_z) runs the one-pass kernel for rows of 10 and
    the two kernels for rows of 19, the three gradients within the reference's tolerance either way."""
    from xception_fast.triton_kernels.depthwise_pointwise import _prepare
    from xception_fast.triton_kernels.utils import nhwc

    ran = []
    for name in ("dw_backward_one_pass", "dw_weight_grad", "dw_input_grad"):
        real = getattr(backward, name)
        monkeypatch.setattr(backward, name, lambda *a, real=real, name=name, **k: ran.append(name) or real(*a, **k))
    x = torch.randn(2, C, 3, width, dtype=dtype, device=DEVICE)
    dw = (torch.randn(C, 1, 3, 3, device=DEVICE) / 3).to(dtype)
    pw = (torch.randn(7, C, 1, 1, device=DEVICE) / C ** 0.5).to(dtype)
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True)
    geo, xc, dwm, pwm = _prepare(x, dw, pw, spec)
    grad_z = torch.randn(2, 7, 3, width, device=DEVICE).to(dtype)
    grad_x, grad_dw, grad_pw = backward._backward_convs(geo, xc, dwm, pwm, dw, pw, True, nhwc(grad_z))
    assert ran == (["dw_backward_one_pass"] if width == 10 else ["dw_weight_grad", "dw_input_grad"])

    leaves = [t.double().requires_grad_() for t in (x, dw, pw)]
    xr = torch.relu(leaves[0])
    z = torch.nn.functional.conv2d(torch.nn.functional.conv2d(xr, leaves[1], None, 1, 1, 1, groups=C), leaves[2])
    z.backward(grad_z.double())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for got, leaf in zip((grad_x, grad_dw, grad_pw), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, **tol)
