"""Conformance suite: every fused provider of the registry against the `reference` provider.

Parametrised over `xception_fast.testing.conformance_cases()`: each fused provider on the GPU when
there is one (a provider that cannot run there skips with the reason), else on CPU tensors where the
provider has a CPU test environment (Triton's interpreter). Outputs are NaN-filled when allocated
(`require_provider` turns that on), so an element no kernel writes fails the comparison.

The rule for every output, gradient and statistic (`xception_fast.testing.check_against_truth`):
the provider's error against the reference provider run in float64 on the same inputs is at most
`ERROR_RATIO` times the error of the reference provider in the same dtype, plus the dtype's floor
from `TOLERANCES`. Inputs are rounded to the dtype first, so the float64 truth sees exactly the values
the kernels see. Fresh random values on every run; the seed is in each failure.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from xception_fast import SeparableConvBN2d, backends, ops, reference
from xception_fast.spec import UnitSpec
from xception_fast.testing import (STATISTICS_RTOL, away_from_kink, check_output, compare_runs, conformance_cases,
                                   provider_target, randomize_batchnorm_, rounded, run_op, unit_tensors)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Shapes: (cin, cout, k, stride, padding, dilation, n, h, w). Channels not multiples of 16 (5, 19, 33),
# several 32-channel K chunks and 64-channel output tiles (70 -> 130), odd and even sizes, N=1,
# stride 2, dilation 2, k=5, an even rectangular kernel, a 1x1 depthwise kernel, a single channel.
SHAPES = {
    "c5to7_k3": (5, 7, 3, (1, 1), (1, 1), (1, 1), 2, 7, 9),
    "c19_s21_d12_n1": (19, 19, 3, (2, 1), (1, 2), (1, 2), 1, 11, 10),
    "c33to19_k5_s2_d2": (33, 19, 5, (2, 2), (3, 3), (2, 2), 2, 9, 8),
    "c19to33_k2x4": (19, 33, (2, 4), (1, 1), (0, 1), (1, 1), 2, 5, 6),
    "c70to130_k3": (70, 130, 3, (1, 1), (1, 1), (1, 1), 3, 13, 11),
    "c1to5_k1_s2": (1, 5, 1, (2, 2), (0, 0), (1, 1), 2, 7, 7),
    # The CUDA d store's other paths: C a multiple of 8 (16-byte halo loads and d stores), tiles
    # spanning two output rows of a wide image; Cout a multiple of 8 (the forward's epilogue and
    # statistics on 16-byte vectors); a row so wide (stride 2, 300 outputs) that full-width halo
    # boxes do not fit in shared memory and the tiles are row segments (a partial last one).
    "c24to264_w150": (24, 264, 3, (1, 1), (1, 1), (1, 1), 2, 3, 150),
    "c16to40_s2_w600": (16, 40, 3, (2, 2), (1, 1), (1, 1), 1, 5, 600),
    # 16 input channels: 16-byte weight rows, so the Triton provider reads the pointwise weight
    # through a TMA tensor descriptor (the interpreter runs that path too).
    "c16to24_k3": (16, 24, 3, (1, 1), (1, 1), (1, 1), 2, 6, 7),
    # Cout past 768 (7 Cout tiles of 128, the last partial) on few input channels: the cuBLAS products
    # of the CUDA backward on a tall-thin shape.
    "c8to776_k3": (8, 776, 3, (1, 1), (1, 1), (1, 1), 2, 5, 6),
    # The CUDA d store's runs of adjacent outputs (3x3, stride 1) on row segments in every dtype (400
    # outputs a row: segments of 135 in 16-bit, 81 in fp32, the last shorter and not a multiple of 3).
    "c16to24_w400": (16, 24, 3, (1, 1), (1, 1), (1, 1), 1, 3, 400),
    # The CUDA backward's tiled grad_x / grad_dw on 16-byte vectors with dilation 2 (its instance with
    # run-time tap offsets; Xception's dilation 1 takes constant ones) and padding 2.
    "c16to24_k3_d2": (16, 24, 3, (1, 1), (2, 2), (2, 2), 2, 9, 8),
    # Valid padding (Ho < H, Wo < W: input pixels past the outputs) and padding past the dilation (Ho > H:
    # outputs that are no input pixel), through the CUDA backward's tiled kernel and its d store.
    "c16to24_k3_p0": (16, 24, 3, (1, 1), (0, 0), (1, 1), 2, 7, 9),
    "c16to24_k3_p2x1": (16, 24, 3, (1, 1), (2, 1), (1, 1), 2, 6, 7),
}
# GPU only: an interpreter spends minutes on them, or (the last two) they exercise CUDA paths only.
LARGE = {"c70to130_k3", "c24to264_w150", "c16to40_s2_w600", "c8to776_k3", "c16to24_w400", "c16to24_k3_p0",
         "c16to24_k3_p2x1"}
FLAGS = {"pre_post_res": (True, True, True), "plain": (False, False, False), "pre_only": (True, False, False),
         "post_res": (False, True, True)}
CASES = [("c5to7_k3", "pre_post_res"), ("c19_s21_d12_n1", "pre_only"), ("c33to19_k5_s2_d2", "post_res"),
         ("c19to33_k2x4", "plain"), ("c70to130_k3", "pre_post_res"), ("c1to5_k1_s2", "post_res"),
         ("c19_s21_d12_n1", "pre_post_res"), ("c24to264_w150", "pre_post_res"), ("c16to40_s2_w600", "pre_only"),
         ("c16to24_k3", "pre_post_res"), ("c8to776_k3", "pre_only"), ("c16to24_w400", "pre_post_res"),
         ("c16to24_k3_d2", "pre_only"), ("c16to24_k3_p0", "pre_post_res"), ("c16to24_k3_p2x1", "pre_only")]


@pytest.fixture(params=conformance_cases(), ids=lambda case: f"{case[0]}-{case[1]}")
def target(request, monkeypatch) -> tuple[str, torch.device]:
    """(provider, device) of this run; skips with the reason when the provider cannot run there."""
    return provider_target(request.param, monkeypatch)


def on_gpu_only(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        pytest.skip(f"{what}: GPU runs only (CPU runs are an interpreter: no bfloat16 tl.dot, and slow)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the public ops, every output and gradient ---------------------------------------------------------

def _infer_case(target, spec_tuple, flags, dtype, seed):
    (provider, device), (cin, cout, k, stride, padding, dilation, n, h, w) = target, spec_tuple
    pre, post, with_residual = FLAGS[flags]
    x, dw, pw = (rounded(t, dtype) for t in unit_tensors(cin, cout, k, n, h, w, device))
    scale = rounded(torch.rand(cout, device=device, dtype=torch.float64) + 0.5, dtype)
    shift = rounded(torch.randn(cout, device=device, dtype=torch.float64), dtype)
    if flags == "plain":
        scale = None  # the SeparableConv2d-with-bias case: shift only
    spec = UnitSpec.of(dw, stride, padding, dilation, pre, post)
    shape_out = spec.output_shape(x, cout)
    residual = rounded(torch.randn(shape_out, dtype=torch.float64, device=device), dtype) if with_residual else None
    pre_act = reference.sepconv_bn_infer(x, dw, pw, scale, shift, None, replace(spec, post_relu=False))
    grad_y = rounded(away_from_kink(torch.randn(shape_out, dtype=torch.float64, device=device), pre_act, post), dtype)
    results = {}
    for backend, dt in ((provider, dtype), ("reference", dtype), ("reference", torch.float64)):
        results[backend, dt] = run_op(ops.sepconv_bn_infer, [x, dw, pw, scale, shift, residual], spec.op_args(),
                                      backend, dt, grad_y)
    assert results[provider, dtype][0][0].stride() == reference.channels_last_strides(shape_out)
    compare_runs(["y", "grad_x", "grad_dw", "grad_pw", "grad_scale", "grad_shift", "grad_residual"], results,
                 provider, dtype, seed)


def _train_case(target, spec_tuple, flags, dtype, seed):
    (provider, device), (cin, cout, k, stride, padding, dilation, n, h, w) = target, spec_tuple
    pre, post, with_residual = FLAGS[flags]
    x, dw, pw = unit_tensors(cin, cout, k, n, h, w, device)
    x, dw, pw = rounded(x + 0.5, dtype), rounded(dw, dtype), rounded(pw, dtype)  # x + 0.5: a non-zero mean
    weight = rounded(torch.rand(cout, device=device, dtype=torch.float64) + 0.5, dtype)
    bias = rounded(torch.randn(cout, device=device, dtype=torch.float64), dtype)
    if flags == "plain":
        weight = bias = None  # affine=False
    spec = UnitSpec.of(dw, stride, padding, dilation, pre, post)
    shape_out = spec.output_shape(x, cout)
    residual = rounded(torch.randn(shape_out, dtype=torch.float64, device=device), dtype) if with_residual else None
    pre_act = reference.sepconv_bn_train(x, dw, pw, weight, bias, None, replace(spec, post_relu=False), 1e-5)[0]
    grad_y = rounded(away_from_kink(torch.randn(shape_out, dtype=torch.float64, device=device), pre_act, post), dtype)
    results = {}
    for backend, dt in ((provider, dtype), ("reference", dtype), ("reference", torch.float64)):
        outs, grads = run_op(ops.sepconv_bn_train, [x, dw, pw, weight, bias, residual], (*spec.op_args(), 1e-5),
                             backend, dt, grad_y)
        if dt == torch.float64:  # float32 statistics for float32/16 inputs, float64 for float64
            outs = outs[:2] + [outs[2].float(), outs[3].float()]
        results[backend, dt] = (outs, grads)
    y, z, mean, var = results[provider, dtype][0]
    assert y.stride() == z.stride() == reference.channels_last_strides(shape_out)
    assert mean.dtype == var.dtype == torch.float32
    # BatchNorm makes y invariant to scaling z per channel. With one input channel every z channel is
    # a multiple of the same depthwise output, so grad_pw is exactly zero, and so is grad_dw when the
    # depthwise kernel is a single weight: both are rounding noise here.
    zero = ({"grad_pw"} | ({"grad_dw"} if dw[0].numel() == 1 else set())) if cin == 1 else set()
    compare_runs(["y", "z", "mean", "var", "grad_x", "grad_dw", "grad_pw", "grad_weight", "grad_bias",
                  "grad_residual"], results, provider, dtype, seed, zero)


def _skip_unless_runnable(target, dtype, shape=None):
    if dtype == torch.bfloat16 or shape in LARGE:
        on_gpu_only(target[1], f"{dtype} {shape or ''}".strip())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,flags", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_infer_op_forward_and_gradients(target, shape, flags, dtype, seed):
    _skip_unless_runnable(target, dtype, shape)
    _infer_case(target, SHAPES[shape], flags, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,flags", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_train_op_forward_statistics_and_gradients(target, shape, flags, dtype, seed):
    _skip_unless_runnable(target, dtype, shape)
    _train_case(target, SHAPES[shape], flags, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_larger_layer_many_blocks(target, train, dtype, seed):
    """A middle-flow layer (728 -> 728 at 19x19, N=8): 2888 positions, many output tiles, 23 input
    channel chunks, split-K weight gradients, many partial-statistics tiles."""
    on_gpu_only(target[1], "a middle-flow layer")
    middle_flow = (728, 728, 3, (1, 1), (1, 1), (1, 1), 8, 19, 19)
    (_train_case if train else _infer_case)(target, middle_flow, "pre_post_res", dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_train_statistics_over_many_row_blocks(target, dtype, seed):
    """20,000 positions: the CUDA training forward's statistics take 79 row blocks of 256, so the
    moments merge runs a pass before its final one; Cout 24 (16-byte vectors in every dtype) and the
    shape again with Cout 21 (one element per step)."""
    on_gpu_only(target[1], "20,000 positions")
    for cout in (24, 21):
        _train_case(target, (8, cout, 3, (1, 1), (1, 1), (1, 1), 2, 100, 100), "pre_post_res", dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cuda_int64_kernels_on_a_window_no_tile_fits(target, train, dtype, seed):
    """A 41 x 41 window: no tiled kernel's halo box fits in shared memory, so the CUDA provider runs its
    int64 kernels (the d store of the forward and the backward, grad_x and grad_dw) around the cuBLAS
    products; 9 input channels (element-wise stores), 16 output channels."""
    provider, device = target
    if provider != "cuda":
        pytest.skip("the CUDA provider's int64 kernels")
    on_gpu_only(device, "the CUDA provider")
    large_window = (9, 16, 41, (1, 1), (20, 20), (1, 1), 1, 24, 24)
    (_train_case if train else _infer_case)(target, large_window, "pre_post_res", dtype, seed)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch(target, train, seed):
    """N=0: empty activations and grad_x, zero weight gradients, mean 0 / var 1 (as the reference)."""
    provider, device = target
    x, dw, pw = unit_tensors(4, 6, 3, 0, 9, 9, device)
    spec = UnitSpec((3, 3), (2, 2), (1, 1), pre_relu=True, post_relu=True)
    vec = [torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)]
    grad_y = torch.randn(0, 6, 5, 5, device=device)
    results = {}
    for backend in (provider, "reference"):
        tensors = [x, dw, pw, *vec, None]
        if train:
            outs, grads = run_op(ops.sepconv_bn_train, tensors, (*spec.op_args(), 1e-5), backend, torch.float32, grad_y)
        else:
            outs, grads = run_op(ops.sepconv_bn_infer, tensors, spec.op_args(), backend, torch.float32, grad_y)
        results[backend] = outs + grads
    for i, (g, r) in enumerate(zip(results[provider], results["reference"])):
        if r is None:
            assert g is None, i
            continue
        assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride(), i
        torch.testing.assert_close(g, r, atol=0, rtol=0, msg=f"output {i} (seed {seed})")  # empty, 0, or 0/1
    assert results[provider][0].shape == (0, 6, 5, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_are_stable_for_a_large_mean(target, dtype, seed):
    """mean 1e4, std 1e-2: a naive sum of squares in float32 loses every digit; the provider's merge
    must stay close to float64. z is an identity map of x here (1x1 depthwise weight 1, identity
    pointwise weight), so the exact statistics of the values the kernel saw are known."""
    provider, device = target
    if dtype != torch.float32:
        on_gpu_only(device, str(dtype))
    c, n, h, w = (3, 4, 40, 40) if device.type == "cuda" else (3, 2, 12, 13)  # several statistics tiles
    x = (1e4 + 1e-2 * torch.randn(n, c, h, w, device=device, dtype=torch.float64)).to(dtype)
    dw = torch.ones(c, 1, 1, 1, device=device, dtype=dtype)
    pw = torch.eye(c, device=device, dtype=dtype).view(c, c, 1, 1)
    y, z, mean, var = ops.sepconv_bn_train(x, dw, pw, None, None, None, *UnitSpec((1, 1)).op_args(), 1e-5, provider)
    torch.testing.assert_close(z, x, atol=0, rtol=0)
    exact_var, exact_mean = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
    assert torch.isfinite(var).all() and (var >= 0).all(), f"seed {seed}"
    torch.testing.assert_close(mean.double(), exact_mean, atol=0, rtol=STATISTICS_RTOL["mean"], msg=f"seed {seed}")
    if exact_var.min() > 0:  # bf16 / fp16 at 1e4 may round every value to one or two levels
        torch.testing.assert_close(var.double(), exact_var, atol=1e-12, rtol=STATISTICS_RTOL["var"],
                                   msg=f"seed {seed}")
    assert torch.isfinite(y).all()


# --- the provider functions directly: layouts, dtypes, mixed-dtype vectors --------------------------------

def _neither_format(a: torch.Tensor) -> torch.Tensor:
    """NCHW-like strides with H/W swapped in memory: neither contiguous nor channels_last."""
    if a.dim() == 4 and a.shape[1] > 1 and a.shape[2] > 1:
        return a.contiguous(memory_format=torch.channels_last).transpose(2, 3).contiguous().transpose(2, 3)
    return a


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_provider_functions_layouts_and_values(target, dtype, seed):
    """Each of the five functions called directly with inputs in neither memory format, float32
    vectors beside low-precision activations, absent scale/shift: dtypes, shapes and exact strides
    as the reference's, values by the float64 rule."""
    provider, device = target
    _skip_unless_runnable(target, dtype)
    fused = backends.PROVIDERS[provider].load()
    x, dw, pw = (rounded(t, dtype) for t in unit_tensors(7, 9, 3, 2, 8, 7, device))
    spec = UnitSpec((3, 3), (1, 2), (1, 1), pre_relu=True, post_relu=True)
    weight = torch.rand(9, device=device, dtype=torch.float64) + 0.5
    bias = torch.randn(9, device=device, dtype=torch.float64)

    def cast(args, low_dtype):
        """Activations and weights to low_dtype, vectors to float32 (float64 for the truth)."""
        vector_dtype = torch.float64 if low_dtype == torch.float64 else torch.float32
        return [a.to(vector_dtype) if isinstance(a, torch.Tensor) and a.dim() == 1 else
                _neither_format(a.to(low_dtype)) if isinstance(a, torch.Tensor) else a for a in args]

    def compare(name, *args):
        runs = [getattr(module, name)(*cast(args, dt)) for module, dt in
                ((fused, dtype), (reference, dtype), (reference, torch.float64))]
        _sync(device)
        got, low, exact = [list(t) if isinstance(t, (tuple, list)) else [t] for t in runs]
        for i, (g, lo, ex) in enumerate(zip(got, low, exact)):
            check_output(f"{name}[{i}] (seed {seed})", g, lo, ex, dtype)
        return got

    y, z, mean, var = reference.sepconv_bn_train(*cast((x, dw, pw, weight, bias, None), torch.float64), spec, 1e-5)
    compare("sepconv_bn_train", x, dw, pw, weight, bias, None, spec, 1e-5)
    compare("sepconv_bn_infer", x, dw, pw, weight, bias, z, spec)
    # Backward functions on common inputs: statistics of the float64 forward, grad_y away from the kink.
    invstd = torch.rsqrt(var + 1e-5)
    pre_act = reference.bn_act(z, mean, invstd, weight, bias, None, False)
    grad_y = rounded(away_from_kink(torch.randn_like(y), pre_act, True), dtype)
    z = rounded(z, dtype)
    sums = compare("bn_backward_reduce", grad_y, z, mean, invstd, weight, bias, True)
    count = z.numel() // z.shape[1]
    mean_dy, mean_dy_xhat = sums[0].double() / count, sums[1].double() / count
    compare("sepconv_bn_train_backward", grad_y, x, z, dw, pw, mean, invstd, weight, bias, mean_dy, mean_dy_xhat, spec)
    infer_pre = reference.sepconv_bn_infer(x, dw, pw, weight, bias, None, replace(spec, post_relu=False))
    grad_y = rounded(away_from_kink(torch.randn_like(y), infer_pre, True), dtype)
    for scale, shift in ((weight, bias), (weight, None), (None, None)):
        got = compare("sepconv_bn_infer_backward", grad_y, x, dw, pw, scale, shift, replace(spec, pre_relu=False))
        if scale is None:
            assert got[3].shape == (0,) and got[3].dtype == dtype
        if shift is None:
            assert got[4].shape == (0,) and got[4].dtype == dtype


def test_results_are_deterministic(target, seed):
    """No atomics: two runs of every function give bitwise equal results."""
    provider, device = target
    fused = backends.PROVIDERS[provider].load()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cin, cout, n, h, w = (70, 130, 3, 13, 11) if device.type == "cuda" else (19, 7, 2, 9, 8)
    x, dw, pw = (t.to(dtype) for t in unit_tensors(cin, cout, 3, n, h, w, device))
    wt, b = torch.rand(cout, device=device) + 0.5, torch.randn(cout, device=device)
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True, post_relu=True)

    def once():
        y, z, mean, var = fused.sepconv_bn_train(x, dw, pw, wt, b, None, spec, 1e-5)
        grad_y = torch.ones_like(y)
        invstd = torch.rsqrt(var + 1e-5)
        s1, s2 = fused.bn_backward_reduce(grad_y, z, mean, invstd, wt, b, True)
        count = z.numel() // z.shape[1]
        train = fused.sepconv_bn_train_backward(grad_y, x, z, dw, pw, mean, invstd, wt, b, s1 / count, s2 / count,
                                                spec)
        infer = fused.sepconv_bn_infer_backward(grad_y, x, dw, pw, wt, b, spec)
        return (y, z, mean, var, s1, s2, *train, *infer, fused.sepconv_bn_infer(x, dw, pw, wt, b, y, spec))

    for i, (a, c) in enumerate(zip(once(), once())):
        assert torch.equal(a, c), f"output {i} differs between two runs (seed {seed})"


def test_float64_is_a_clear_type_error(target):
    provider, device = target
    fused = backends.PROVIDERS[provider].load()
    if torch.float64 in backends.PROVIDERS[provider].dtypes:
        pytest.skip(f"{provider} computes float64")
    x, dw, pw = unit_tensors(3, 4, 3, 1, 5, 5, device)
    with pytest.raises((TypeError, RuntimeError), match="float32, float16 (or|and) bfloat16"):
        fused.sepconv_bn_infer(x, dw, pw, None, None, None, UnitSpec((3, 3), padding=(1, 1)))


# --- the module -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_module_training_steps_and_eval_match_reference(target, dtype, seed):
    """Two training steps (running statistics, num_batches_tracked) then an eval step, every output,
    parameter gradient and buffer compared with the reference module in dtype and in float64."""
    provider, device = target
    base = randomize_batchnorm_(SeparableConvBN2d(6, 17, 3, stride=2, pre_relu=True, momentum=0.3)).to(device)
    modules = {}
    for backend, dt in ((provider, dtype), ("reference", dtype), ("reference", torch.float64)):
        m = copy.deepcopy(base).to(dt)
        m.backend = backend
        modules[backend, dt] = m
    x = torch.randn(3, 6, 9, 11, device=device)
    residual = torch.randn(3, 17, 5, 6, device=device)
    grad_y = torch.randn(3, 17, 5, 6, device=device)
    names = ["y", "grad_x", "grad_residual"] + [n for n, _ in base.named_parameters()] + \
        [n for n, _ in base.named_buffers()]
    for step, train in enumerate((True, True, False)):
        results = {}
        for key, m in modules.items():
            m.train(train)
            m.zero_grad(set_to_none=True)
            a = x.to(key[1]).clone().requires_grad_(True)
            r = residual.to(key[1]).clone().requires_grad_(True)
            y = m(a, residual=r)
            y.backward(grad_y.to(y.dtype))
            results[key] = [y, a.grad, r.grad] + [p.grad for p in m.parameters()] + list(m.buffers())
        for name, g, lo, ex in zip(names, results[provider, dtype], results["reference", dtype],
                                   results["reference", torch.float64]):
            if name.endswith("num_batches_tracked"):
                assert g.item() == lo.item() == ex.item() == min(step + 1, 2)
                continue
            check_output(f"step {step} {name} (seed {seed})", g, lo, ex, dtype)
