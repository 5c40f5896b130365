"""Conformance of the fused providers that compute the mid variant (dw -> BN -> act -> pw -> BN).

The same rule as test_providers.py (`xception_fast.testing.check_against_truth`): every output,
statistic and gradient of a provider in a dtype is within `ERROR_RATIO` x the `reference` provider's
error in that dtype (plus the dtype's floor) of the reference run in float64 on the same inputs.
Outputs are NaN-poisoned when allocated. Each case pairs one mid variant (every activation, identity
with the BatchNorm, activations without it) with one shape (stride 2, dilation 2, k=5, odd channel
counts, the TMA weight path) and one dtype, in training and in inference: a modest number of
interpreter runs that together cover every path. On a GPU every case runs in bfloat16 too.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from xception_fast import SeparableConvBN2d, backends, mid_ops, reference
from xception_fast.spec import UnitSpec
from xception_fast.testing import (STATISTICS_RTOL, TOLERANCES, away_from_kink, compare_runs, conformance_cases,
                                   provider_target, randomize_batchnorm_, rounded, run_op, unit_tensors)

# (cin, cout, k, stride, padding, dilation, n, h, w)
SHAPES = {
    "c6_s2": (6, 6, 3, (2, 2), (1, 1), (1, 1), 2, 9, 9),  # aligned Xception's strided unit
    "c19to9_d2": (19, 9, 3, (1, 1), (2, 2), (2, 2), 1, 9, 8),  # output_stride 16/8: dilated
    "c5to7_s21_d12": (5, 7, 3, (2, 1), (1, 2), (1, 2), 2, 7, 6),
    "c16to24": (16, 24, 3, (1, 1), (1, 1), (1, 1), 2, 6, 7),  # 16-byte weight rows: the TMA path
    "c33to19_k5_s2_d2": (33, 19, 5, (2, 2), (3, 3), (2, 2), 2, 9, 8),
}
FLAGS = {"pre": (True, False, False), "pre_post_res": (True, True, True), "post": (False, True, False),
         "plain": (False, False, False)}
F32, F16 = torch.float32, torch.float16
CASES = [  # mid, shape, flags, dtype
    ("bn_relu", "c6_s2", "pre", F32),
    ("bn_relu", "c19to9_d2", "pre_post_res", F16),
    ("bn_relu6", "c5to7_s21_d12", "post", F16),
    ("bn_silu", "c16to24", "plain", F32),
    ("bn_gelu", "c33to19_k5_s2_d2", "pre_post_res", F32),
    ("bn_hardswish", "c5to7_s21_d12", "pre", F16),
    ("bn", "c19to9_d2", "plain", F32),
    ("gelu", "c5to7_s21_d12", "pre_post_res", F16),
    ("relu", "c6_s2", "pre", F32),
]


def mid_cases() -> list[tuple[str, str]]:
    return [(name, device) for name, device in conformance_cases()
            if backends.MID_VARIANTS <= backends.PROVIDERS[name].variants]


@pytest.fixture(params=mid_cases(), ids=lambda case: f"{case[0]}-{case[1]}")
def target(request, monkeypatch) -> tuple[str, torch.device]:
    return provider_target(request.param, monkeypatch)


def _vectors(n: int, device, dtype, affine: bool = True):
    """(weight, bias): weight in [0.5, 1.5), bias N(0, 1), rounded to dtype; None without affine."""
    if not affine:
        return None, None
    return (rounded(torch.rand(n, device=device, dtype=torch.float64) + 0.5, dtype),
            rounded(torch.randn(n, device=device, dtype=torch.float64), dtype))


def _unit(target, case):
    (provider, device), (mid, shape, flags, dtype) = target, case
    cin, cout, k, stride, padding, dilation, n, h, w = SHAPES[shape]
    pre, post, with_residual = FLAGS[flags]
    x, dw, pw = unit_tensors(cin, cout, k, n, h, w, device)
    x, dw, pw = rounded(x + 0.5, dtype), rounded(dw, dtype), rounded(pw, dtype)  # x + 0.5: a non-zero mean
    spec = UnitSpec.of(dw, stride, padding, dilation, pre, post, mid=mid)
    shape_out = spec.output_shape(x, cout)
    residual = rounded(torch.randn(shape_out, dtype=torch.float64, device=device), dtype) if with_residual else None
    return spec, x, dw, pw, residual, shape_out


IDS = [f"{m}-{s}-{f}-{str(d)[6:]}" for m, s, f, d in CASES]


def _in_dtype(target, case, bf16: bool):
    """The case as listed, or in bfloat16: GPU runs only (the interpreter has no bfloat16 tl.dot)."""
    if not bf16:
        return case
    if target[1].type != "cuda":
        pytest.skip("bfloat16: GPU runs only (CPU runs are an interpreter without bfloat16 tl.dot)")
    return (*case[:3], torch.bfloat16)


@pytest.mark.parametrize("bf16", [False, True], ids=["as_listed", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_op_outputs_statistics_and_gradients(target, case, bf16, seed):
    case = _in_dtype(target, case, bf16)
    provider, device = target
    spec, x, dw, pw, residual, shape_out = _unit(target, case)
    dtype, flags = case[3], case[2]
    cin, cout = x.shape[1], pw.shape[0]
    mid_weight, mid_bias = _vectors(cin, device, dtype, spec.mid_norm)
    weight, bias = _vectors(cout, device, dtype, flags != "plain")  # plain: affine=False
    rest = (*spec.op_args(), spec.mid, 1e-3, 1e-5)
    pre_act = reference.sepconv_mid_train(x, dw, pw, mid_weight, mid_bias, weight, bias, None,
                                          replace(spec, post_relu=False), 1e-3, 1e-5)[0]
    grad_y = rounded(away_from_kink(torch.randn(shape_out, dtype=torch.float64, device=device), pre_act,
                                    spec.post_relu), dtype)
    results = {}
    for backend, dt in ((provider, dtype), ("reference", dtype), ("reference", torch.float64)):
        outs, grads = run_op(mid_ops.sepconv_mid_train, [x, dw, pw, mid_weight, mid_bias, weight, bias, residual],
                             rest, backend, dt, grad_y)
        if dt == torch.float64:  # float32 statistics for float32/16 inputs, float64 for float64
            outs = outs[:2] + [o.float() for o in outs[2:]]
        results[backend, dt] = (outs, grads)
    y, z, mid_mean, mid_var, mean, var = results[provider, dtype][0]
    assert y.stride() == z.stride() == reference.channels_last_strides(shape_out)
    assert mid_mean.shape == mid_var.shape == ((cin,) if spec.mid_norm else (0,))
    # The outer BatchNorm's input gradient sums to zero over the positions, and so does its image through
    # the pointwise conv: without an activation between them, grad_mid_bias is exactly zero (rounding noise).
    zero = {"grad_mid_bias"} if spec.mid_act is None else set()
    compare_runs(["y", "z", "mid_mean", "mid_var", "mean", "var", "grad_x", "grad_dw", "grad_pw", "grad_mid_weight",
                  "grad_mid_bias", "grad_weight", "grad_bias", "grad_residual"], results, provider, dtype, seed, zero)


@pytest.mark.parametrize("bf16", [False, True], ids=["as_listed", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_infer_op_output_and_gradients(target, case, bf16, seed):
    """The inference op takes the mid BatchNorm folded (dw_bias); the outer one as scale and shift
    (shift only for `plain`: a SeparableConv2d with a bias)."""
    case = _in_dtype(target, case, bf16)
    provider, device = target
    spec, x, dw, pw, residual, shape_out = _unit(target, case)
    dtype, flags = case[3], case[2]
    dw_bias = _vectors(x.shape[1], device, dtype)[1] if spec.mid_norm else None
    scale, shift = _vectors(pw.shape[0], device, dtype)
    if flags == "plain":
        scale = None
    pre_act = reference.sepconv_mid_infer(x, dw, dw_bias, pw, scale, shift, None, replace(spec, post_relu=False))
    grad_y = rounded(away_from_kink(torch.randn(shape_out, dtype=torch.float64, device=device), pre_act,
                                    spec.post_relu), dtype)
    results = {}
    for backend, dt in ((provider, dtype), ("reference", dtype), ("reference", torch.float64)):
        results[backend, dt] = run_op(mid_ops.sepconv_mid_infer, [x, dw, dw_bias, pw, scale, shift, residual],
                                      (*spec.op_args(), spec.mid), backend, dt, grad_y)
    assert results[provider, dtype][0][0].stride() == reference.channels_last_strides(shape_out)
    compare_runs(["y", "grad_x", "grad_dw", "grad_dw_bias", "grad_pw", "grad_scale", "grad_shift", "grad_residual"],
                 results, provider, dtype, seed)


def test_module_running_statistics_of_both_batchnorms(target, seed):
    """`SeparableConvBN2d(mid_norm=True)` on the provider: after training steps with momentum, the
    running statistics of both BatchNorms (unbiased running variance) and num_batches_tracked are
    those of the module on `reference`; then the eval output (the mid BatchNorm folded)."""
    provider, device = target
    module = SeparableConvBN2d(7, 9, 3, 2, pre_relu=True, mid_norm=True, mid_act="silu", momentum=0.3,
                               backend="reference").to(device)
    randomize_batchnorm_(module).train()
    fused = copy.deepcopy(module)
    fused.backend = provider
    tol = TOLERANCES[torch.float32]
    x = torch.randn(2, 7, 9, 8, device=device) + 0.5
    for _ in range(2):
        for m in (module, fused):
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        for (name, got), (_, want) in zip(fused.named_buffers(), module.named_buffers()):
            torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol, msg=f"{name} (seed {seed})")
        for (name, got), (_, want) in zip(fused.named_parameters(), module.named_parameters()):
            torch.testing.assert_close(got.grad, want.grad, atol=tol.atol, rtol=tol.rtol,
                                       msg=f"grad of {name} (seed {seed})")
    assert fused.bn_dw.num_batches_tracked.item() == fused.bn.num_batches_tracked.item() == 2
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), module.eval()(x), atol=tol.atol, rtol=tol.rtol)


def test_empty_batch(target):
    """N=0: empty outputs, zero gradients, mid and outer statistics 0 / 1, as the reference."""
    provider, device = target
    spec = UnitSpec((3, 3), (2, 2), (1, 1), pre_relu=True, post_relu=True, mid="bn_relu")
    x, dw, pw = unit_tensors(4, 6, 3, 0, 9, 9, device)
    mid_vec = [torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)]
    vec = [torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)]
    grad_y = torch.randn(0, 6, 5, 5, device=device)
    results = {}
    for backend in (provider, "reference"):
        train = run_op(mid_ops.sepconv_mid_train, [x, dw, pw, *mid_vec, *vec, None],
                       (*spec.op_args(), spec.mid, 1e-3, 1e-5), backend, torch.float32, grad_y)
        infer = run_op(mid_ops.sepconv_mid_infer, [x, dw, mid_vec[1], pw, *vec, None], (*spec.op_args(), spec.mid),
                       backend, torch.float32, grad_y)
        results[backend] = [t for t in train[0] + train[1] + infer[0] + infer[1] if t is not None]
    for i, (g, r) in enumerate(zip(results[provider], results["reference"], strict=True)):
        assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride(), i
        torch.testing.assert_close(g, r, atol=0, rtol=0, msg=f"output {i}")


def test_mid_statistics_are_stable_for_a_large_mean(target, seed):
    """The statistics pass over the depthwise output with mean 1e4, std 1e-2 (a naive float32 sum of
    squares loses every digit there): dw is a 1x1 identity, so the exact statistics are x's."""
    provider, device = target
    c, n, h, w = 3, 2, 12, 13  # several tiles and splits
    x = (1e4 + 1e-2 * torch.randn(n, c, h, w, device=device, dtype=torch.float64)).float()
    dw = torch.ones(c, 1, 1, 1, device=device)
    pw = torch.eye(c, device=device).view(c, c, 1, 1)
    spec = UnitSpec((1, 1), mid="bn")
    outs = mid_ops.sepconv_mid_train(x, dw, pw, None, None, None, None, None, *spec.op_args(), spec.mid, 1e-5, 1e-5,
                                     provider)
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(outs[2].double(), exact_mean, atol=0, rtol=STATISTICS_RTOL["mean"], msg=f"seed {seed}")
    torch.testing.assert_close(outs[3].double(), exact_var, atol=1e-12, rtol=STATISTICS_RTOL["var"], msg=f"seed {seed}")
