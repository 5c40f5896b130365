"""The custom ops themselves: opcheck, gradcheck, torch.compile, input checks."""

import pytest
import torch

import xception_fast
from xception_fast import SeparableConvBN2d, ops
from xception_fast.testing import TOLERANCES

CONV = dict(stride=[2, 1], padding=[1, 2], dilation=[1, 2])


def unit_inputs(dtype=torch.float64, n=2, cin=3, cout=4, h=7, w=6, k=3, requires_grad=True):
    x = torch.randn(n, cin, h, w, dtype=dtype)
    dw = torch.randn(cin, 1, k, k, dtype=dtype)
    pw = torch.randn(cout, cin, 1, 1, dtype=dtype)
    vec = [torch.randn(cout, dtype=dtype) for _ in range(2)]
    for t in [x, dw, pw] + vec:
        t.requires_grad_(requires_grad)
    out = ops.output_shape(x, dw, pw, CONV["stride"], CONV["padding"], CONV["dilation"])
    residual = torch.randn(out, dtype=dtype, requires_grad=requires_grad)
    return x, dw, pw, vec, residual


def infer_args(pre, post, with_residual, dtype=torch.float64, requires_grad=True):
    x, dw, pw, (scale, shift), residual = unit_inputs(dtype, requires_grad=requires_grad)
    return (x, dw, pw, scale, shift, residual if with_residual else None, CONV["stride"], CONV["padding"],
            CONV["dilation"], pre, post, "reference")


def train_args(pre, post, with_residual, dtype=torch.float64, requires_grad=True):
    x, dw, pw, (weight, bias), residual = unit_inputs(dtype, requires_grad=requires_grad)
    return (x, dw, pw, weight + 1, bias, residual if with_residual else None, CONV["stride"], CONV["padding"],
            CONV["dilation"], pre, post, 1e-5, "reference")


FLAGS = [(True, True, True), (False, False, False), (True, False, True)]


@pytest.mark.parametrize("flags", FLAGS)
def test_opcheck_forward_ops(flags):
    torch.library.opcheck(ops.sepconv_bn_infer, infer_args(*flags, dtype=torch.float32))
    torch.library.opcheck(ops.sepconv_bn_train, train_args(*flags, dtype=torch.float32))


def test_opcheck_backward_ops():
    x, dw, pw, (w, b), _ = unit_inputs(torch.float32, requires_grad=False)
    grad_y = torch.randn(ops.output_shape(x, dw, pw, CONV["stride"], CONV["padding"], CONV["dilation"]))
    conv = (CONV["stride"], CONV["padding"], CONV["dilation"])
    torch.library.opcheck(ops.sepconv_bn_infer_backward, (grad_y, x, dw, pw, w, b, *conv, True, True, "reference"))
    torch.library.opcheck(ops.sepconv_bn_infer_backward,
                          (grad_y, x, dw, pw, None, None, *conv, False, True, "reference"))
    y, z, mean, var = ops.sepconv_bn_train(x, dw, pw, w, b, None, *conv, True, True, 1e-5, "reference")
    invstd = torch.rsqrt(var + 1e-5)
    torch.library.opcheck(ops.bn_backward_reduce, (grad_y, z, mean, invstd, w, b, True, "reference"))
    torch.library.opcheck(ops.sepconv_bn_train_backward,
                          (grad_y, x, z, dw, pw, mean, invstd, w, b, mean.clone(), var.clone(), *conv, True, True,
                           "reference"))


@pytest.mark.parametrize("flags", FLAGS)
def test_gradcheck_float64(flags):
    def infer(*tensors):
        return ops.sepconv_bn_infer(*tensors, *infer_args(*flags)[6:])

    def train(*tensors):
        return ops.sepconv_bn_train(*tensors, *train_args(*flags)[6:])[0]

    args = infer_args(*flags)
    assert torch.autograd.gradcheck(infer, args[:6], eps=1e-6, atol=1e-5)
    args = train_args(*flags)
    weight = args[3].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(train, (*args[:3], weight, *args[4:6]), eps=1e-6, atol=1e-5)


def test_gradcheck_without_affine_and_without_scale():
    x, dw, pw, _, _ = unit_inputs()
    conv = (CONV["stride"], CONV["padding"], CONV["dilation"])
    assert torch.autograd.gradcheck(
        lambda *t: ops.sepconv_bn_train(*t, None, None, None, *conv, True, True, 1e-3, "reference")[0], (x, dw, pw))
    assert torch.autograd.gradcheck(
        lambda *t: ops.sepconv_bn_infer(*t, None, None, None, *conv, False, True, "reference"), (x, dw, pw))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(train):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = SeparableConvBN2d(5, 6, stride=2, pre_relu=True, post_relu=True).train(train)
    compiled_module = SeparableConvBN2d(5, 6, stride=2, pre_relu=True, post_relu=True).train(train)
    compiled_module.load_state_dict(module.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)  # inductor, the default
    x = torch.randn(3, 5, 9, 8)
    results = []
    for m in (module, compiled):
        a = x.clone().requires_grad_(True)
        y = m(a)
        y.backward(torch.ones_like(y))
        results.append((y, a.grad, compiled_module.depthwise.weight.grad if m is compiled else module.depthwise.weight.grad))
    # Inductor fuses and reorders the fp32 BatchNorm reductions: equal up to fp32 reassociation, so the
    # project's fp32 tolerance, not assert_close's bit-near default.
    tol = TOLERANCES[torch.float32]
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=tol.atol, rtol=tol.rtol)
    for (name, b_eager), b_comp in zip(module.named_buffers(), compiled_module.buffers()):
        torch.testing.assert_close(b_comp, b_eager, atol=tol.atol, rtol=tol.rtol, msg=name)


def test_ops_are_registered_in_the_xception_fast_namespace():
    for name in ("sepconv_bn_infer", "sepconv_bn_infer_backward", "sepconv_bn_train", "bn_backward_reduce",
                 "sepconv_bn_train_backward"):
        assert hasattr(torch.ops.xception_fast, name)


def _infer(x, dw, pw, scale=None, shift=None, residual=None, stride=(1, 1), padding=(1, 1), dilation=(1, 1)):
    return ops.sepconv_bn_infer(x, dw, pw, scale, shift, residual, list(stride), list(padding), list(dilation),
                                False, False, "reference")


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.update(x=a["x"][0]), "4-D"),
    (lambda a: a.update(x=a["x"].int()), "float32, float16"),
    (lambda a: a.update(dw=a["dw"].reshape(3, 1, 9, 1)[:2]), "dw_weight must be"),
    (lambda a: a.update(pw=torch.randn(4, 2, 1, 1)), "pw_weight must be"),
    (lambda a: a.update(pw=torch.randn(4, 3, 3, 3)), "pw_weight must be"),
    (lambda a: a.update(scale=torch.randn(5)), "scale must be"),
    (lambda a: a.update(residual=torch.randn(2, 4, 5, 5)), "residual must have the output's shape"),
    (lambda a: a.update(pw=a["pw"].half()), "pw_weight must have x's dtype"),
    (lambda a: a.update(stride=(0, 1)), "stride"),
    (lambda a: a.update(x=torch.randn(2, 3, 1, 1), padding=(0, 0)), "too small"),
])
def test_bad_inputs_raise_clear_errors(mutate, message):
    args = dict(x=torch.randn(2, 3, 6, 6), dw=torch.randn(3, 1, 3, 3), pw=torch.randn(4, 3, 1, 1))
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=message):
        _infer(**args)


def test_outputs_are_channels_last_for_any_input_layout():
    x = torch.randn(2, 6, 5, 7).transpose(2, 3)  # non-contiguous
    y = _infer(x, torch.randn(6, 1, 3, 3), torch.randn(4, 6, 1, 1))
    assert y.shape == (2, 4, 7, 5) and y.is_contiguous(memory_format=torch.channels_last)


def test_module_with_explicit_backend_rejects_what_cannot_run():
    with pytest.raises(ValueError, match="backend"):
        SeparableConvBN2d(3, 3, backend="cudnn")
    if "cuda" not in xception_fast.available_backends("cpu"):
        with pytest.raises(RuntimeError, match="'cuda' is not available for cpu tensors"):
            SeparableConvBN2d(3, 3, backend="cuda")(torch.randn(2, 3, 4, 4))
