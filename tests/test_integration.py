"""Where users train: fuse_model on timm models, autocast, torch.compile of a fused model."""

import copy

import pytest
import torch
from torch import nn

import xception_fast
from xception_fast.testing import randomize_batchnorm_, unfused_unit
from xception_fast import SeparableConvBN2d
from xception_fast.fuse import fuse_model

timm = pytest.importorskip("timm")


def _step(model, x, grad):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(grad)
    return y, x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,expected_fused,size", [("legacy_xception", 32, 71), ("ese_vovnet19b_slim_dw", 14, 64)])
def test_fuse_timm_models_keeps_outputs_and_gradients(name, expected_fused, size):
    original = randomize_batchnorm_(timm.create_model(name, pretrained=False, num_classes=4)).double()
    fused, report = fuse_model(copy.deepcopy(original), backend="reference")
    assert len(report.fused) == expected_fused, str(report)
    n_fused = sum(isinstance(m, SeparableConvBN2d) for m in fused.modules())
    assert n_fused == expected_fused
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), original.eval()(x), rtol=1e-10, atol=1e-10)
    grad = torch.randn(2, 4, dtype=torch.float64)
    y_f, gx_f, grads_f = _step(fused.train(), x, grad)
    y_o, gx_o, grads_o = _step(original.train(), x, grad)
    torch.testing.assert_close(y_f, y_o, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_o, rtol=1e-8, atol=1e-10)
    # Fusion keeps the parameters' order (depthwise, pointwise, BatchNorm), not their names.
    assert len(grads_f) == len(grads_o)
    for (n_o, g_o), (n_f, g_f) in zip(grads_o.items(), grads_f.items()):
        torch.testing.assert_close(g_f, g_o, rtol=1e-7, atol=1e-9, msg=f"{n_o} / {n_f}")


def test_fuse_report_names_what_was_left_alone():
    model = timm.create_model("legacy_xception", pretrained=False)
    _, report = fuse_model(model)
    assert [name for name, _ in report.skipped] == ["conv3.conv1", "conv4.conv1"]
    assert "block1.rep.0" in report.fused and "block4.rep.0" in report.fused
    assert "fused 32" in str(report)


def test_fuse_sequential_chains_and_inplace_relu_at_the_start():
    seq = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                        nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.Conv2d(6, 3, 1, bias=False),
                        nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, groups=3, bias=False))
    randomize_batchnorm_(seq)
    original = copy.deepcopy(seq)
    fused, report = fuse_model(seq, backend="reference")
    assert report.fused == ["1", "4"]
    assert isinstance(fused[0], nn.ReLU)  # the in-place ReLU stays: fusing it would drop its side effect
    assert isinstance(fused[1], SeparableConvBN2d) and not fused[1].pre_relu
    assert isinstance(fused[4], SeparableConvBN2d) and fused[4].pre_relu
    assert [name for name, _ in report.skipped] == ["8"]
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(fused.eval()(x.clone()), original.eval()(x.clone()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_computes_in_the_autocast_dtype_like_eager(dtype, train):
    unit = SeparableConvBN2d(6, 8, pre_relu=True, post_relu=True, backend="reference")
    randomize_batchnorm_(unit).train(train)
    plain = copy.deepcopy(unit)
    x = torch.randn(2, 6, 9, 9)
    residual = torch.randn(2, 8, 9, 9).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        y = unit(x, residual=residual)
        y_plain = unfused_unit(plain, x, residual)
    assert y.dtype == y_plain.dtype == dtype
    torch.testing.assert_close(y, y_plain, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert unit.depthwise.weight.grad.dtype == torch.float32 and unit.bn.weight.grad.dtype == torch.float32
    torch.testing.assert_close(unit.bn.running_mean, plain.bn.running_mean, rtol=1e-2, atol=1e-2)


def test_autocast_with_a_float32_residual_promotes_like_eager():
    unit = SeparableConvBN2d(3, 3, backend="reference").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = unit(torch.randn(1, 3, 5, 5), residual=torch.randn(1, 3, 5, 5))
    assert y.dtype == torch.float32  # bfloat16 + float32 promotes, as it does after an eager BatchNorm


def test_contiguous_and_channels_last_inputs_give_the_same_result():
    unit = randomize_batchnorm_(SeparableConvBN2d(5, 7, stride=2, backend="reference")).eval()
    x = torch.randn(2, 5, 11, 10)
    y1, y2 = unit(x), unit(x.contiguous(memory_format=torch.channels_last))
    assert y1.is_contiguous(memory_format=torch.channels_last) and y2.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y1, y2)


class TinyNet(nn.Module):
    """Two fused units with a fused residual, a shortcut and a head: the model's patterns, small."""

    def __init__(self):
        super().__init__()
        self.a = SeparableConvBN2d(4, 8, stride=2, pre_relu=False, post_relu=True)
        self.b = SeparableConvBN2d(8, 8, pre_relu=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.a(x)
        x = self.b(x, residual=x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_model_compiles_fullgraph_and_matches_eager(train):
    torch._dynamo.reset()
    eager = randomize_batchnorm_(TinyNet()).train(train)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(3, 4, 9, 9)
    y_e, gx_e, grads_e = _step(eager, x, torch.ones(3, 3))
    y_c, gx_c, grads_c = _step(compiled, x, torch.ones(3, 3))
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c["_orig_mod." + name] if "_orig_mod." + name in grads_c else grads_c[name],
                                   g, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, msg=name)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_whole_xception_captures_in_one_graph(train):
    """fullgraph=True on the whole fused model: no graph breaks anywhere (aot_eager: the capture and
    the autograd graphs are what this checks; inductor's code generation is checked on TinyNet)."""
    torch._dynamo.reset()
    eager = randomize_batchnorm_(xception_fast.xception(num_classes=5)).train(train)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 71, 71)
    y_e, gx_e, _ = _step(eager, x, torch.ones(2, 5))
    y_c, gx_c, _ = _step(compiled, x, torch.ones(2, 5))
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(gx_c, gx_e)
    torch.testing.assert_close(compiled_model.conv1.weight.grad, eager.conv1.weight.grad)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, msg=name)
