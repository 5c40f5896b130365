"""fuse_model on the mid variant: timm's aligned Xception and a MobileNet-V1-like network, end to end."""

import copy

import pytest
import torch
from torch import nn

from xception_fast import SeparableConvBN2d
from xception_fast.fuse import fuse_model
from xception_fast.testing import randomize_batchnorm_

timm = pytest.importorskip("timm")


def mobilenet_v1_toy(width=8, num_classes=5, act=nn.ReLU):
    """MobileNet V1's shape in miniature: conv-BN-ReLU stem, then dw-BN-act-pw-BN-act blocks."""
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), act(),
                             nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)),
        block(width, 2 * width, 1), block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 1),
        nn.Sequential(nn.Conv2d(4 * width, 4 * width, 3, 1, 2, dilation=2, groups=4 * width, bias=False),
                      nn.BatchNorm2d(4 * width), act(), nn.Conv2d(4 * width, 6 * width, 1, bias=False),
                      nn.BatchNorm2d(6 * width)),  # no trailing activation
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6 * width, num_classes))


def step(model, x, grad):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(grad)
    return y, x.grad, [p.grad for p in model.parameters()]


def assert_fused_equals_original(original, fused, x, classes, steps=2):
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), original.eval()(x), rtol=1e-10, atol=1e-10)
    for _ in range(steps):
        grad = torch.randn(x.shape[0], classes, dtype=torch.float64)
        y_f, gx_f, grads_f = step(fused.train(), x, grad)
        y_o, gx_o, grads_o = step(original.train(), x, grad)
        torch.testing.assert_close(y_f, y_o, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(gx_f, gx_o, rtol=1e-8, atol=1e-10)
        assert len(grads_f) == len(grads_o)  # fusion keeps the parameters and their order
        for g_f, g_o in zip(grads_f, grads_o):
            torch.testing.assert_close(g_f, g_o, rtol=1e-7, atol=1e-9)
    for (name, b_f), (_, b_o) in zip(fused.named_buffers(), original.named_buffers()):
        torch.testing.assert_close(b_f, b_o, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.Hardswish])
def test_mobilenet_v1_toy_fused_end_to_end(act):
    original = randomize_batchnorm_(mobilenet_v1_toy(act=act)).double()
    fused, report = fuse_model(copy.deepcopy(original), backend="reference")
    assert report.fused == ["1.0", "2.0", "3.0", "4.0"], str(report)
    assert report.skipped == []
    units = [m for m in fused.modules() if isinstance(m, SeparableConvBN2d)]
    assert [(u.post_relu, u.mid_act, u.bn_dw is not None) for u in units] == \
        [(True, _name(act), True)] * 3 + [(False, _name(act), True)]
    assert units[-1].depthwise.dilation == (2, 2)
    assert_fused_equals_original(original, fused, torch.randn(3, 3, 17, 15, dtype=torch.float64), 5)


def _name(act):
    return {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}[act]


def test_unsupported_mid_activation_is_left_alone_and_reported():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4),
                          nn.GELU(approximate="tanh"), nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6))
    _, report = fuse_model(model)
    assert report.fused == [] and [name for name, _ in report.skipped] == ["0"]


def narrow_timm_aligned():
    from functools import partial

    from timm.models.xception_aligned import XceptionAligned

    cfg = [dict(in_chs=64, out_chs=16, stride=2), dict(in_chs=16, out_chs=16, stride=1),
           dict(in_chs=16, out_chs=(16, 24, 24), stride=2),
           dict(in_chs=24, out_chs=(32, 32, 40), stride=1, no_skip=True, start_with_relu=False)]
    return XceptionAligned(cfg, num_classes=4, norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1))


def test_timm_aligned_units_fused_float64_training():
    original = randomize_batchnorm_(narrow_timm_aligned()).double()
    fused, report = fuse_model(copy.deepcopy(original), backend="reference")
    assert len(report.fused) == 12 and report.skipped == [], str(report)
    assert report.fused[0] == "blocks.0.stack.conv1"
    last = fused.blocks[3].stack.conv3
    assert last.mid_act == "relu" and last.post_relu and not last.pre_relu
    assert_fused_equals_original(original, fused, torch.randn(2, 3, 48, 48, dtype=torch.float64), 4)
    # timm's feature taps (the ReLU modules before the strided units) still read the right tensor.
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        for got, want in zip(fused.eval().forward_intermediates(x, intermediates_only=True),
                             original.eval().forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_timm_xception41_after_fuse_model_equals_timm():
    original = randomize_batchnorm_(timm.create_model("xception41", pretrained=False, num_classes=10)).eval()
    fused, report = fuse_model(copy.deepcopy(original), backend="reference")
    assert len(report.fused) == 13 * 3 and report.skipped == [], str(report)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-6)
