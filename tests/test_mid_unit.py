"""The mid variant (a BatchNorm and/or an activation between dw and pw) against plain modules.

The truth is the unfused chain `nn.Conv2d(groups=C) -> nn.BatchNorm2d -> act -> nn.Conv2d(1x1) ->
nn.BatchNorm2d (-> ReLU)` in float64, run on a deep copy of the fused module's own layers; outputs,
every gradient and every BatchNorm buffer (running statistics, num_batches_tracked) must agree after
several steps, in training and in eval mode.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xception_fast import SeparableConvBN2d, backends, mid_ops
from xception_fast.functional import fold_batchnorm
from xception_fast.reference import MID_FUNCTIONS
from xception_fast.spec import MID_ACTIVATIONS, UnitSpec, mid_name
from xception_fast.testing import randomize_batchnorm_, run_fused_and_plain


def unfused(module: SeparableConvBN2d, x, residual=None):
    h = module.depthwise(torch.relu(x) if module.pre_relu else x)
    if module.bn_dw is not None:
        h = module.bn_dw(h)
    h = module.bn(module.pointwise(MID_FUNCTIONS[module.mid_act](h)))
    if module.post_relu:
        h = torch.relu(h)
    return h if residual is None else h + residual


def make(cin=5, cout=6, k=3, stride=1, dilation=1, pre=True, post=False, mid_norm=True, mid_act="relu", **kw):
    module = SeparableConvBN2d(cin, cout, k, stride, None if stride == 1 else dilation * (k - 1) // 2, dilation,
                               pre_relu=pre, post_relu=post, mid_norm=mid_norm, mid_act=mid_act, backend="reference",
                               **kw).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and p is not module.bn.bias else 0.0))
    return randomize_batchnorm_(module)


def compare(fused, x, residual=None, steps=3, atol=1e-10, rtol=1e-9):
    results = None
    for outs, grads, fused, plain in run_fused_and_plain(fused, unfused, x, residual, steps):
        results = [[outs[0]] + grads[0], [outs[1]] + grads[1]]
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        for (name, got), (_, want) in zip(fused.named_buffers(), plain.named_buffers()):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=f"buffer {name}")
    return results


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mid_act", [None, *MID_ACTIVATIONS])
def test_each_mid_activation_matches_plain_modules(mid_act, train):
    fused = make(mid_act=mid_act).train(train)
    compare(fused, torch.randn(3, 5, 9, 7, dtype=torch.float64))
    assert fused.bn_dw.num_batches_tracked.item() == (3 if train else 0)
    assert fused.spec.mid == mid_name(True, mid_act)


CASES = [  # cin, cout, k, stride, dilation, pre, post, residual, mid_norm
    (4, 7, 3, 2, 1, True, False, False, True),  # aligned Xception's strided unit
    (6, 6, 3, 1, 2, True, False, True, True),  # dilated (output_stride 16/8), residual fused
    (3, 5, 5, 1, 1, False, True, False, True),  # the exit flow's dw-BN-ReLU-pw-BN-ReLU, a 5x5 kernel
    (5, 4, 3, 2, 2, False, True, False, False),  # activation only (the Xception paper's Fig. 10)
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_strides_dilations_residual_and_flags(case, train):
    cin, cout, k, stride, dilation, pre, post, with_residual, mid_norm = case
    fused = make(cin, cout, k, stride, dilation, pre, post, mid_norm=mid_norm, mid_act="relu6").train(train)
    assert (fused.bn_dw is not None) == mid_norm
    x = torch.randn(2, cin, 11, 10, dtype=torch.float64)
    residual = torch.randn(unfused(copy.deepcopy(fused).eval(), x).shape, dtype=torch.float64) \
        if with_residual else None
    compare(fused, x, residual)


@pytest.mark.parametrize("config", [dict(momentum=None), dict(track_running_stats=False), dict(affine=False),
                                    dict(eps=1e-3, momentum=0.3)],
                         ids=["momentum_none", "no_running_stats", "no_affine", "eps_momentum"])
def test_batchnorm_options_as_nn_batchnorm(config):
    for train in (True, False):
        compare(make(mid_act="silu", **config).train(train), torch.randn(2, 5, 6, 7, dtype=torch.float64), steps=4)


def test_fold_is_the_eval_batchnorm():
    """In inference the mid BatchNorm folds into the depthwise weight plus a per-channel bias."""
    module = make(mid_act=None).eval()
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    weight, bias = fold_batchnorm(module.depthwise.weight, module.bn_dw.running_mean, module.bn_dw.running_var,
                                  module.bn_dw.weight, module.bn_dw.bias, module.bn_dw.eps)
    folded = F.conv2d(x, weight, bias, padding=1, groups=5)
    torch.testing.assert_close(folded, module.bn_dw(module.depthwise(x)), atol=1e-12, rtol=1e-12)
    # The inference op takes the folded weights as they are; with the module's running statistics it
    # gives the module's eval output.
    direct = mid_ops.sepconv_mid_infer(x, weight, bias, module.pointwise.weight, None, None, None, [1, 1], [1, 1],
                                       [1, 1], True, False, "bn", "reference")
    expected = module.pointwise(F.conv2d(torch.relu(x), weight, bias, padding=1, groups=5))
    torch.testing.assert_close(direct, expected, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(module(x), unfused(module, x), atol=1e-12, rtol=1e-12)


def test_modes_must_agree():
    module = make()
    module.train()
    module.bn_dw.eval()
    with pytest.raises(NotImplementedError, match="both in training mode or both in eval mode"):
        module(torch.randn(2, 5, 6, 6, dtype=torch.float64))


def test_state_dict_keys_and_from_modules():
    module = SeparableConvBN2d(4, 8, mid_norm=True, mid_act="relu")
    assert [k.split(".")[0] for k in module.state_dict()] == ["depthwise"] + ["bn_dw"] * 5 + ["pointwise"] + \
        ["bn"] * 5
    dw, bn_dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
    pw, bn = nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8)
    wrapped = SeparableConvBN2d.from_modules(dw, pw, bn, bn_dw=bn_dw, mid_act="hardswish")
    assert wrapped.bn_dw is bn_dw and wrapped.spec.mid == "bn_hardswish"
    assert list(wrapped.state_dict()) == list(module.state_dict())
    with pytest.raises(ValueError, match="bn_dw"):
        SeparableConvBN2d.from_modules(dw, pw, bn, bn_dw=nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="mid_act"):
        SeparableConvBN2d(4, 8, mid_norm=True, mid_act="elu")


def test_registry_routes_the_variant():
    """`reference` and `triton` compute the variant; `cuda` declines it: `auto` passes over it and naming
    it is an error that says which providers do (no GPU is needed to ask)."""
    variants = UnitSpec((3, 3), mid="bn_relu").variants()
    assert variants == {"mid_bn_relu"}
    for name, entry in backends.PROVIDERS.items():
        assert (variants <= entry.variants) == (name in ("reference", "triton")), name
    assert backends.MID_VARIANTS <= backends.PROVIDERS["triton"].variants
    assert backends.resolve("auto", "cpu", torch.float32, variants) == "reference"
    entry = backends.PROVIDERS["cuda"]
    fake = backends.Provider("cuda", entry.module, lambda device: backends.Availability(True, "faked"))
    backends.PROVIDERS["cuda"] = fake
    try:
        with pytest.raises(NotImplementedError,
                           match=r"'cuda' does not compute the unit variant.*\['triton', 'reference'\]"):
            backends.resolve("cuda", "cuda", torch.float32, variants)
    finally:
        backends.PROVIDERS["cuda"] = entry


def test_providers_of_the_variant_expose_its_functions():
    for name, entry in backends.PROVIDERS.items():
        if entry.variants & backends.MID_VARIANTS:
            module = entry.load()
            assert all(callable(getattr(module, f, None)) for f in backends.MID_PROVIDER_FUNCTIONS), name


def test_empty_batch_and_float32():
    module = make(stride=2, mid_act="gelu")
    for train in (True, False):
        compare(module.train(train), torch.randn(0, 5, 9, 9, dtype=torch.float64), steps=1, atol=0, rtol=0)
    # float32: the same formulas, compared with the plain modules in float32.
    compare(make(mid_act="silu", post=True).float().train(), torch.randn(4, 5, 12, 12), atol=2e-5, rtol=2e-5)


def test_explicit_fused_provider_is_a_clear_error(monkeypatch):
    module = make()
    monkeypatch.setattr(module, "backend", "cuda")
    with pytest.raises((NotImplementedError, RuntimeError), match="cuda"):
        module(torch.randn(2, 5, 6, 6, dtype=torch.float64))


def _op_inputs(dtype=torch.float32):
    x = torch.randn(2, 3, 7, 6, dtype=dtype)
    dw, pw = torch.randn(3, 1, 3, 3, dtype=dtype), torch.randn(4, 3, 1, 1, dtype=dtype)
    mid = [torch.randn(3, dtype=dtype) for _ in range(2)]
    out = [torch.randn(4, dtype=dtype) for _ in range(2)]
    return x, dw, pw, mid, out


CONV = ([2, 1], [1, 2], [1, 2])


@pytest.mark.parametrize("mid", ["bn_gelu", "silu"])
def test_opcheck(mid):
    x, dw, pw, (mw, mb), (w, b) = _op_inputs()
    norm = mid.startswith("bn")
    torch.library.opcheck(mid_ops.sepconv_mid_infer, (x, dw, mb if norm else None, pw, w, b, None, *CONV, True,
                                                      True, mid, "reference"))
    torch.library.opcheck(mid_ops.sepconv_mid_train, (x, dw, pw, mw if norm else None, mb if norm else None, w, b,
                                                      None, *CONV, True, False, mid, 1e-3, 1e-5, "reference"))
    y, z, m_mean, m_var, mean, var = mid_ops.sepconv_mid_train(x, dw, pw, mw if norm else None, mb if norm else None,
                                                               w, b, None, *CONV, True, False, mid, 1e-3, 1e-5,
                                                               "reference")
    assert m_mean.shape == ((3,) if norm else (0,))
    grad_y = torch.randn_like(y)
    torch.library.opcheck(mid_ops.sepconv_mid_train_backward,
                          (grad_y, x, z, dw, pw, m_mean, torch.rsqrt(m_var + 1e-3), mw if norm else None,
                           mb if norm else None, mean, torch.rsqrt(var + 1e-5), w, b, mean.clone(), var.clone(),
                           *CONV, True, False, mid, "reference"))
    torch.library.opcheck(mid_ops.sepconv_mid_infer_backward,
                          (grad_y, x, dw, mb if norm else None, pw, w, b, *CONV, True, False, mid, "reference"))


def test_op_input_checks():
    x, dw, pw, (mw, mb), (w, b) = _op_inputs()
    with pytest.raises(ValueError, match=r"mid_weight must be a \[C=3\] vector"):
        mid_ops.sepconv_mid_train(x, dw, pw, w, mb, w, b, None, *CONV, True, False, "bn", 1e-3, 1e-5, "reference")
    with pytest.raises(ValueError, match="mid must name the variant"):
        mid_ops.sepconv_mid_infer(x, dw, None, pw, w, b, None, *CONV, True, False, "", "reference")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(train):
    """The ops' fake kernels and autograd trace without graph breaks (aot_eager: the trace, not inductor's
    code generation, is what is under test)."""
    eager = make(mid_act="relu6").float().train(train)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 9, 9)
    results = []
    for module, fn in ((eager, eager), (compiled_module, compiled)):
        a = x.clone().requires_grad_(True)
        y = fn(a)
        y.sum().backward()
        results.append([y, a.grad] + [p.grad for p in module.parameters()] + list(module.buffers()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
