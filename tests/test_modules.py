"""The fused modules against the unfused nn.Conv2d(groups=C) + nn.Conv2d(1x1) + nn.BatchNorm2d.

Every case runs the same module twice, fused (`backend="reference"`) and as the plain PyTorch
modules it holds, on fresh random inputs, and compares outputs, every gradient, and the BatchNorm
buffers after several steps. float64 makes the comparison tight enough that a wrong formula (a
biased running variance, a missing ReLU mask, a wrong momentum) cannot hide in the tolerance.
"""

import copy

import pytest
import torch
from torch import nn

from xception_fast import SeparableConv2d, SeparableConvBN2d
from xception_fast.testing import randomize_batchnorm_, run_fused_and_plain, unfused_unit


def run_both(fused, x, residual, steps=3):
    return run_fused_and_plain(fused, unfused_unit, x, residual, steps)


def assert_close_all(outs, grads, fused, plain, atol, rtol):
    torch.testing.assert_close(outs[0], outs[1], atol=atol, rtol=rtol)
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    for g_fused, g_plain in zip(*grads):
        if g_plain is None:
            assert g_fused is None or not g_fused.any()
        else:
            torch.testing.assert_close(g_fused, g_plain, atol=atol, rtol=rtol)
    for (name, b_fused), (_, b_plain) in zip(fused.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(b_fused, b_plain, atol=atol, rtol=rtol, msg=f"buffer {name}")


CASES = [
    # in, out, k, stride, dilation, padding, pre_relu, post_relu, residual
    (5, 7, 3, 1, 1, None, True, False, False),
    (6, 4, 3, 2, 1, 1, True, True, False),
    (3, 9, 5, 1, 2, None, False, True, True),
    (4, 4, 3, 1, 1, None, True, False, True),
    (7, 5, 3, 2, 2, 3, False, False, False),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_sepconv_bn_matches_unfused_modules(case, train):
    cin, cout, k, stride, dilation, padding, pre, post, with_residual = case
    fused = randomize_batchnorm_(SeparableConvBN2d(cin, cout, k, stride, padding, dilation, pre_relu=pre,
                                                   post_relu=post, backend="reference").double()).train(train)
    x = torch.randn(3, cin, 11, 9, dtype=torch.float64)
    y_shape = unfused_unit(fused, x).shape
    residual = torch.randn(y_shape, dtype=torch.float64) if with_residual else None
    for step in run_both(fused, x, residual):
        assert_close_all(*step, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("config", [
    dict(momentum=None), dict(track_running_stats=False), dict(affine=False), dict(momentum=0.3, eps=1e-3),
], ids=["momentum_none", "no_running_stats", "no_affine", "momentum_eps"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_options_match_nn_batchnorm(config, train):
    fused = SeparableConvBN2d(6, 5, pre_relu=True, backend="reference", **config).double()
    fused = randomize_batchnorm_(fused).train(train)
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    for step in run_both(fused, x, None, steps=4):
        assert_close_all(*step, atol=1e-10, rtol=1e-9)
    if config.get("track_running_stats", True):
        expected = 4 if train else 0
        assert fused.bn.num_batches_tracked.item() == expected


def _fused_and_plain_results(module, x, grad_y):
    """(outputs, input grad and parameter grads) of the fused module and of its unfused copy."""
    results = []
    for fn in (lambda m, a: m(a), unfused_unit):
        m = copy.deepcopy(module)
        a = x.clone().requires_grad_(True)
        y = fn(m, a)
        y.backward(grad_y.to(y.dtype))
        results.append([y, a.grad] + [p.grad for p in m.parameters()] + [m.bn.running_var])
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_the_unfused_error(dtype):
    """In low precision the fused and unfused paths round differently; both are compared with the
    float64 result, and the fused error may be at most twice the unfused one (plus a tiny floor)."""
    module = randomize_batchnorm_(SeparableConvBN2d(8, 12, pre_relu=True, post_relu=True, backend="reference")).train()
    x = torch.randn(2, 8, 10, 13).contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(2, 12, 10, 13)
    # Near the post-ReLU's kink the two roundings may take different sides, which changes a
    # gradient by its full size in either path; no gradient flows from there, so neither can.
    with torch.no_grad():
        y_exact = unfused_unit(copy.deepcopy(module).double(), x.double())
    grad_y = grad_y * (y_exact > 0.1).float()
    exact = _fused_and_plain_results(module.double(), x.double(), grad_y.double())[1]
    fused, plain = _fused_and_plain_results(module.to(dtype), x.to(dtype), grad_y)
    assert fused[0].dtype == dtype and fused[0].is_contiguous(memory_format=torch.channels_last)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    for f, p, e in zip(fused, plain, exact):
        fused_err = (f.double() - e).abs().max().item()
        plain_err = (p.double() - e).abs().max().item()
        assert fused_err <= 2 * plain_err + floor * e.abs().max().item(), (fused_err, plain_err)


def test_training_mode_updates_running_statistics_like_nn():
    fused = randomize_batchnorm_(SeparableConvBN2d(4, 6, backend="reference").double())
    before = fused.bn.running_var.clone()
    for step in run_both(fused.train(), torch.randn(5, 4, 6, 6, dtype=torch.float64), None, steps=1):
        assert_close_all(*step, atol=1e-10, rtol=1e-9)
    assert not torch.equal(before, fused.bn.running_var)


def test_empty_batch():
    fused = randomize_batchnorm_(SeparableConvBN2d(4, 6, stride=2, padding=1, backend="reference"))
    for train in (True, False):
        for step in run_both(fused.train(train), torch.randn(0, 4, 9, 9), None, steps=1):
            outs, grads, _, _ = step
            assert outs[0].shape == outs[1].shape == (0, 6, 5, 5)
            assert_close_all(*step, atol=0, rtol=0)


def test_one_value_per_channel_in_training_raises_pytorch_message():
    module = SeparableConvBN2d(3, 4, backend="reference").train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        module(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_separable_conv_matches_unfused_unit(bias, train):
    fused = randomize_batchnorm_(SeparableConv2d(5, 7, stride=2, bias=bias, pre_relu=True, post_relu=True,
                                      backend="reference").double()).train(train)
    x = torch.randn(2, 5, 9, 10, dtype=torch.float64)
    residual = torch.randn(unfused_unit(fused, x).shape, dtype=torch.float64)
    for step in run_both(fused, x, residual, steps=1):
        assert_close_all(*step, atol=1e-10, rtol=1e-9)


def test_state_dict_keys_are_the_plain_modules_keys():
    module = SeparableConvBN2d(4, 8)
    plain = nn.ModuleDict({"depthwise": nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                           "pointwise": nn.Conv2d(4, 8, 1, bias=False), "bn": nn.BatchNorm2d(8)})
    assert list(module.state_dict()) == list(plain.state_dict())
    randomize_batchnorm_(plain)
    module.load_state_dict(plain.state_dict())
    assert torch.equal(module.bn.running_mean, plain.bn.running_mean)


def test_from_modules_shares_parameters_and_checks_layers():
    dw, pw, bn = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 1, bias=False), \
        nn.BatchNorm2d(6)
    fused = SeparableConvBN2d.from_modules(dw, pw, bn, pre_relu=True, backend="reference")
    assert fused.depthwise.weight is dw.weight and fused.bn.running_mean is bn.running_mean
    fused.train()(torch.randn(2, 4, 5, 5))
    assert bn.num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match="depthwise"):
        SeparableConvBN2d.from_modules(nn.Conv2d(4, 4, 3, groups=2, bias=False), pw, bn)
    with pytest.raises(ValueError, match="bias"):
        SeparableConvBN2d.from_modules(dw, nn.Conv2d(4, 6, 1), bn)
    with pytest.raises(ValueError, match="BatchNorm"):
        SeparableConvBN2d.from_modules(dw, pw, nn.BatchNorm2d(5))


def test_sync_batchnorm_conversion_sees_a_batchnorm():
    model = nn.Sequential(SeparableConvBN2d(4, 8))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0].bn, nn.SyncBatchNorm)


def test_padding_none_is_same_and_even_kernel_needs_padding():
    assert SeparableConvBN2d(3, 3, 5, dilation=2).depthwise.padding == (4, 4)
    with pytest.raises(ValueError, match="odd kernel_size"):
        SeparableConvBN2d(3, 3, 4)
