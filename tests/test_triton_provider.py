"""The `triton` provider against the float64 `reference`, through the public ops and the module.

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors; this module arranges
that itself (see `_load_provider`), so a plain `pytest` on a GPU-less CI machine runs it.

The rule for every output and gradient (flash-attention's): the error of the triton provider
against the reference computed in float64 from the same inputs is at most twice the error of the
reference provider in the same dtype, plus a tiny floor relative to the result's magnitude.
Outputs are allocated NaN-filled (`utils.POISON`), so an element no program writes fails the test.
Inputs are fresh random values on every run (the seed is in each failure message).
Interpreter cost is about 0.03 s per channel block per program instance: shapes are small and the
pinned interpreter config (32 positions x 16 channels) still gives several programs, several
channel blocks and partial blocks per case.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import subprocess
import sys

from dataclasses import replace

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton provider needs the triton package", allow_module_level=True)

GPU = torch.cuda.is_available()


def _interpreter_wanted() -> bool:
    return not GPU or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_provider():
    """Import the provider, built for the CPU interpreter when there is no GPU; None if impossible.

    TRITON_INTERPRET must be set when triton itself is imported (its standard library, `tl.sum`,
    `tl.cdiv`, is decorated then) and when the kernel modules are (their @triton.jit). Nothing
    imports triton while pytest collects the other test modules, so this module, collected after
    them, can set it first. It is set for the imports only and restored afterwards, so other test
    modules see the environment they were started with; `_interpreter_env` sets it again for the
    tests here (the provider registry reads it at call time). If triton was imported earlier in
    this process without it, the interpreter cannot run here: the tests then run in a subprocess.
    """
    interpret = _interpreter_wanted()
    if interpret and "triton" in sys.modules:
        import triton.language as tl
        if type(tl.cdiv).__name__ != "InterpretedFunction":
            return None, True
    saved = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import xception_fast.triton_kernels as provider
        from xception_fast.triton_kernels import depthwise_pointwise
        built_for_interpreter = type(depthwise_pointwise._sepconv_infer_kernel.fn).__name__ == "InterpretedFunction"
        if built_for_interpreter != interpret:  # imported earlier under the other setting
            for name in ("autotune", "utils", "batchnorm", "depthwise_pointwise", "backward"):
                importlib.reload(sys.modules[f"xception_fast.triton_kernels.{name}"])
            provider = importlib.reload(provider)
        from xception_fast import backends
        backends._triton_module.cache_clear()
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return provider, interpret


provider, INTERPRET = _load_provider()
IN_SUBPROCESS = provider is None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_parent() -> str:
    """The directory holding the xception_fast this process imported (checkout or site-packages)."""
    import xception_fast
    return os.path.dirname(os.path.dirname(os.path.abspath(xception_fast.__file__)))


def _subprocess_env(**extra) -> dict:
    """This environment, minus TRITON_INTERPRET, plus `extra`, importing the same xception_fast."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([_package_parent()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return {**env, **extra}


def test_interpreter_suite_in_a_subprocess():
    """Only when triton was imported in this process before the interpreter could be switched on."""
    if not IN_SUBPROCESS:
        pytest.skip("the tests of this module run in this process")
    env = _subprocess_env(TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider"],
                          env=env, cwd=_package_parent(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]


from xception_fast import SeparableConvBN2d, ops, reference  # noqa: E402
from xception_fast.spec import UnitSpec  # noqa: E402
from xception_fast.triton_kernels import utils as provider_utils  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
GPU_ONLY = pytest.mark.skipif(INTERPRET, reason="bfloat16 needs a GPU: the interpreter has no bf16 tl.dot")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)]
# Floors relative to max|exact|: what the provider may add beyond twice the reference's error.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def _interpreter_env(request, monkeypatch):
    if IN_SUBPROCESS and request.node.originalname != "test_interpreter_suite_in_a_subprocess":
        pytest.skip("run by test_interpreter_suite_in_a_subprocess")
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(provider_utils, "POISON", True)


@pytest.fixture
def seed():
    value = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(value)
    return value


# --- helpers ------------------------------------------------------------------------------------------

def check(name, got, low, exact, floor, seed):
    """`got` (triton) and `low` (reference, same dtype) against `exact` (reference, float64)."""
    msg = f"{name} (seed {seed})"
    assert got.dtype == low.dtype and got.shape == low.shape, f"{msg}: {got.dtype}{list(got.shape)} " \
                                                              f"vs {low.dtype}{list(low.shape)}"
    assert got.stride() == low.stride() or got.numel() <= 1, f"{msg}: strides {got.stride()} vs {low.stride()}"
    assert got.device == low.device
    if got.numel() == 0:
        return
    got, low, exact = got.detach().cpu().double(), low.detach().cpu().double(), exact.detach().cpu().double()
    assert torch.isfinite(got).all(), f"{msg}: non-finite values (unwritten output?)"
    err = (got - exact).abs().max().item()
    ref_err = (low - exact).abs().max().item()
    bound = 2 * ref_err + floor * exact.abs().max().item()
    assert err <= bound, f"{msg}: error {err:.3g} > 2 x reference error {ref_err:.3g} + floor"


def unit(cin, cout, k, n, h, w, dtype):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, dtype=dtype, device=DEVICE)
    dw = torch.randn(cin, 1, kh, kw, dtype=dtype, device=DEVICE) / (kh * kw) ** 0.5
    pw = torch.randn(cout, cin, 1, 1, dtype=dtype, device=DEVICE) / cin ** 0.5
    return x, dw, pw


def away_from_kink(grad_y, pre_activation, post_relu):
    """grad_y, zero where the post-ReLU input is within rounding distance of 0. There the float64
    and the low-precision paths may disagree on the ReLU's mask; a zero gradient makes that moot."""
    if not post_relu:
        return grad_y
    band = 0.02 * pre_activation.abs().max()
    return torch.where(pre_activation.abs().to(grad_y.device) > band, grad_y, torch.zeros_like(grad_y))


def run_op(op, tensors, rest, backend, dtype, grad_y):
    """Forward + backward of `op` with the differentiable `tensors` cast to `dtype` (None stays None)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]
    outs = op(*leaves, *rest, backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs[0].backward(grad_y.to(outs[0].dtype))
    return list(outs), [None if t is None else t.grad for t in leaves]


# Shapes: (cin, cout, k, stride, padding, dilation, n, h, w). Channels not multiples of 16 (one and
# two interpreter channel blocks, partial ones), odd and even sizes, N=1, stride 2, dilation 2,
# k=5, an even rectangular kernel.
SHAPES = {
    "c5to7_k3": (5, 7, 3, (1, 1), (1, 1), (1, 1), 2, 7, 9),
    "c19_stride21_dil12": (19, 19, 3, (2, 1), (1, 2), (1, 2), 1, 11, 10),
    "k5_stride2_dil2": (7, 5, 5, (2, 2), (3, 3), (2, 2), 2, 9, 8),
    "k2x4_even": (6, 17, (2, 4), (1, 1), (0, 1), (1, 1), 2, 5, 6),
}
FLAGS = {"pre_post_res": (True, True, True), "plain": (False, False, False), "pre_only": (True, False, False),
         "post_res": (False, True, True)}
CASES = [("c5to7_k3", "pre_post_res"), ("c19_stride21_dil12", "pre_only"), ("k5_stride2_dil2", "post_res"),
         ("k2x4_even", "plain"), ("c19_stride21_dil12", "pre_post_res")]


# --- the public ops -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,flags", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_infer_op_forward_and_gradients(shape, flags, dtype, seed):
    cin, cout, k, stride, padding, dilation, n, h, w = SHAPES[shape]
    pre, post, with_residual = FLAGS[flags]
    x, dw, pw = unit(cin, cout, k, n, h, w, torch.float64)
    scale, shift = torch.rand(cout, device=DEVICE, dtype=torch.float64) + 0.5, torch.randn(cout, device=DEVICE,
                                                                                        dtype=torch.float64)
    if flags == "plain":
        scale = None  # the SeparableConv2d-with-bias case: shift only
    shape_out = ops.output_shape(x, dw, pw, stride, padding, dilation)
    residual = torch.randn(shape_out, dtype=torch.float64, device=DEVICE) if with_residual else None
    conv = (stride, padding, dilation, pre, post)
    pre_act = reference.sepconv_bn_infer(x, dw, pw, scale, shift, None, UnitSpec.of(dw, stride, padding, dilation, pre,
                                                                                   False))
    grad_y = away_from_kink(torch.randn(shape_out, dtype=torch.float64, device=DEVICE), pre_act, post)

    tensors = [x, dw, pw, scale, shift, residual]
    results = {}
    for backend, dt in (("triton", dtype), ("reference", dtype), ("reference", torch.float64)):
        results[backend, dt] = run_op(ops.sepconv_bn_infer, tensors, conv, backend, dt, grad_y)
    names = ["y", "grad_x", "grad_dw", "grad_pw", "grad_scale", "grad_shift", "grad_residual"]
    got = results["triton", dtype][0] + results["triton", dtype][1]
    low = results["reference", dtype][0] + results["reference", dtype][1]
    exact = results["reference", torch.float64][0] + results["reference", torch.float64][1]
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for name, g, lo, ex in zip(names, got, low, exact):
        if ex is None:
            assert g is None and lo is None, name
            continue
        check(name, g, lo, ex, FLOOR[dtype], seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,flags", CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_train_op_forward_statistics_and_gradients(shape, flags, dtype, seed):
    cin, cout, k, stride, padding, dilation, n, h, w = SHAPES[shape]
    pre, post, with_residual = FLAGS[flags]
    x, dw, pw = unit(cin, cout, k, n, h, w, torch.float64)
    x = x + 0.5  # a non-zero mean for the statistics
    weight, bias = torch.rand(cout, device=DEVICE, dtype=torch.float64) + 0.5, torch.randn(cout, device=DEVICE,
                                                                                        dtype=torch.float64)
    if flags == "plain":
        weight = bias = None  # affine=False
    shape_out = ops.output_shape(x, dw, pw, stride, padding, dilation)
    residual = torch.randn(shape_out, dtype=torch.float64, device=DEVICE) if with_residual else None
    rest = (stride, padding, dilation, pre, post, 1e-5)
    pre_act = reference.sepconv_bn_train(x, dw, pw, weight, bias, None, UnitSpec.of(dw, stride, padding, dilation,
                                                                                    pre, False), 1e-5)[0]
    grad_y = away_from_kink(torch.randn(shape_out, dtype=torch.float64, device=DEVICE), pre_act, post)

    tensors = [x, dw, pw, weight, bias, residual]
    results = {}
    for backend, dt in (("triton", dtype), ("reference", dtype), ("reference", torch.float64)):
        results[backend, dt] = run_op(ops.sepconv_bn_train, tensors, rest, backend, dt, grad_y)
    names = ["y", "z", "mean", "var", "grad_x", "grad_dw", "grad_pw", "grad_weight", "grad_bias", "grad_residual"]
    got = results["triton", dtype][0] + results["triton", dtype][1]
    low = results["reference", dtype][0] + results["reference", dtype][1]
    exact = results["reference", torch.float64][0] + results["reference", torch.float64][1]
    for name, g, lo, ex in zip(names, got, low, exact):
        if ex is None:
            assert g is None and lo is None, name
            continue
        if name in ("mean", "var"):  # float32 statistics, float64 for the float64 reference
            ex = ex.float()
        check(name, g, lo, ex, FLOOR[dtype], seed)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch(train, seed):
    x, dw, pw = unit(4, 6, 3, 0, 9, 9, torch.float32)
    conv = ([2, 2], [1, 1], [1, 1], True, True)
    vec = [torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)]
    grad_y = torch.randn(0, 6, 5, 5, device=DEVICE)
    for backend in ("triton", "reference"):
        tensors = [x, dw, pw, *vec, None]
        if train:
            outs, grads = run_op(ops.sepconv_bn_train, tensors, (*conv, 1e-5), backend, torch.float32, grad_y)
        else:
            outs, grads = run_op(ops.sepconv_bn_infer, tensors, conv, backend, torch.float32, grad_y)
        if backend == "triton":
            got = outs + grads
        else:
            for g, r in zip(got, outs + grads):
                if r is None:
                    assert g is None
                    continue
                assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride()
                torch.testing.assert_close(g, r, atol=0, rtol=0)  # empty, zeros, or mean 0 / var 1
    assert got[0].shape == (0, 6, 5, 5)


def test_statistics_are_stable_for_a_large_mean(seed):
    """mean 1e4, std 1e-2 in float32: a naive sum of squares loses every digit; the provider's
    shifted Chan merge must stay close to float64 (z is an identity map of x here, so the exact
    statistics of the values the kernel saw are known). Enough positions for several programs,
    several tiles each."""
    c, n, h, w = 3, 2, 12, 13
    x = (1e4 + 1e-2 * torch.randn(n, c, h, w, device=DEVICE)).float()
    dw = torch.ones(c, 1, 1, 1, device=DEVICE)
    pw = torch.eye(c, device=DEVICE).view(c, c, 1, 1)
    y, z, mean, var = provider.sepconv_bn_train(x, dw, pw, None, None, None, UnitSpec((1, 1)), 1e-5)
    torch.testing.assert_close(z, x, atol=0, rtol=0)
    exact_var, exact_mean = torch.var_mean(z.double(), dim=(0, 2, 3), correction=0)
    assert torch.isfinite(var).all() and (var >= 0).all(), f"seed {seed}"
    torch.testing.assert_close(mean.double(), exact_mean, atol=0, rtol=1e-7, msg=f"seed {seed}")
    torch.testing.assert_close(var.double(), exact_var, atol=0, rtol=1e-4, msg=f"seed {seed}")
    assert torch.isfinite(y).all()


# --- provider functions directly ----------------------------------------------------------------------

def test_backward_functions_match_reference_outputs_and_layouts(seed):
    """The two backward functions and the dy reduction called directly with non-contiguous inputs
    and a float16 BN weight beside float32 activations: dtypes and strides as the reference's in
    float32, values as the reference's in float64 (the float32 reference on a GPU is TF32)."""
    x, dw, pw = unit(7, 9, 3, 2, 8, 7, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).transpose(2, 3)  # neither NCHW nor NHWC
    spec = UnitSpec((3, 3), (1, 2), (1, 1), pre_relu=True, post_relu=True)
    weight = (torch.rand(9, device=DEVICE) + 0.5).half()
    y, z, mean, var = reference.sepconv_bn_train(x, dw, pw, weight, None, None, spec, 1e-5)
    grad_y = torch.randn(y.shape, device=DEVICE)  # NCHW
    invstd = torch.rsqrt(var + 1e-5)
    count = z.numel() // z.shape[1]

    def compare(fn, args):
        exact = getattr(reference, fn)(*[a.double() if torch.is_tensor(a) else a for a in args])
        for i, (g, r, e) in enumerate(zip(getattr(provider, fn)(*args), getattr(reference, fn)(*args), exact)):
            assert g.dtype == r.dtype and g.shape == r.shape and g.stride() == r.stride(), f"{fn} output {i}"
            if e.numel():
                rtol = 1e-4 if g.dtype == torch.float32 else 2e-3  # grad_scale comes back in float16
                torch.testing.assert_close(g.double(), e, atol=rtol * 0.1 * e.abs().max().item(), rtol=rtol,
                                           msg=lambda m: f"{fn} output {i} (seed {seed}): {m}")

    sums = reference.bn_backward_reduce(grad_y, z, mean, invstd, weight, None, True)
    compare("bn_backward_reduce", (grad_y, z, mean, invstd, weight, None, True))
    compare("sepconv_bn_train_backward", (grad_y, x, z, dw, pw, mean, invstd, weight, None, sums[0] / count,
                                          sums[1] / count, spec))
    for scale, shift in ((weight, None), (None, None)):
        compare("sepconv_bn_infer_backward", (grad_y, x, dw, pw, scale, shift, replace(spec, pre_relu=False)))


def test_results_are_deterministic(seed):
    x, dw, pw = unit(19, 7, 3, 2, 9, 8, torch.float32)
    spec = UnitSpec((3, 3), padding=(1, 1), pre_relu=True, post_relu=True)
    args = (x, dw, pw, torch.rand(7, device=DEVICE) + 0.5, torch.randn(7, device=DEVICE), None, spec, 1e-5)
    first = provider.sepconv_bn_train(*args)
    grad_y = torch.randn_like(first[0])
    sums = provider.bn_backward_reduce(grad_y, first[1], first[2], torch.rsqrt(first[3] + 1e-5), args[3], args[4],
                                       True)
    bwd = (grad_y, x, first[1], dw, pw, first[2], torch.rsqrt(first[3] + 1e-5), args[3], args[4], sums[0] / 144,
           sums[1] / 144, spec)
    for a, b in zip((*first, *provider.sepconv_bn_train_backward(*bwd)),
                    (*provider.sepconv_bn_train(*args), *provider.sepconv_bn_train_backward(*bwd))):
        assert torch.equal(a, b)


def test_kernels_compile_for_a_gpu_without_one():
    """Every kernel compiled to an sm_90 cubin in bfloat16 (the configs' first entries), in a fresh
    process without the interpreter: the GPU compiler's rules (dot shapes and dtypes, constexpr
    control flow, shared memory) are what the interpreter does not check. See triton_helpers.py."""
    if GPU:
        pytest.skip("with a GPU the other tests compile and run the kernels for real")
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"triton's CUDA backend has no ptxas at {ptxas}")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_helpers.py"), "90", "bf16"],
                          env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]


def test_float64_is_a_clear_type_error():
    x, dw, pw = unit(3, 4, 3, 1, 5, 5, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        provider.sepconv_bn_infer(x, dw, pw, None, None, None, UnitSpec((3, 3), padding=(1, 1)))


# --- the module -----------------------------------------------------------------------------------------

def _randomized_module(dtype, **kwargs):
    module = SeparableConvBN2d(**kwargs)
    with torch.no_grad():
        module.bn.weight.copy_(torch.rand_like(module.bn.weight) + 0.5)
        module.bn.bias.copy_(torch.randn_like(module.bn.bias) * 0.2)
        module.bn.running_mean.copy_(torch.randn_like(module.bn.running_mean))
        module.bn.running_var.copy_(torch.rand_like(module.bn.running_var) + 0.5)
    return module.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_module_training_steps_and_eval_match_reference(dtype, seed):
    """Two training steps (running statistics, num_batches_tracked) then an eval step, every output,
    parameter gradient and buffer compared with the reference module in dtype and in float64."""
    kwargs = dict(in_channels=6, out_channels=17, kernel_size=3, stride=2, pre_relu=True, post_relu=False,
                  momentum=0.3)
    base = _randomized_module(torch.float32, **kwargs)
    modules = {}
    for backend, dt in (("triton", dtype), ("reference", dtype), ("reference", torch.float64)):
        m = copy.deepcopy(base).to(dt)
        m.backend = backend
        modules[backend, dt] = m
    x = torch.randn(3, 6, 9, 11, device=DEVICE)
    residual = torch.randn(3, 17, 5, 6, device=DEVICE)
    grad_y = torch.randn(3, 17, 5, 6, device=DEVICE)
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
        names = ["y", "grad_x", "grad_residual"] + [n for n, _ in base.named_parameters()] + \
                [n for n, _ in base.named_buffers()]
        for name, g, lo, ex in zip(names, results["triton", dtype], results["reference", dtype],
                                   results["reference", torch.float64]):
            if name.endswith("num_batches_tracked"):
                assert g.item() == lo.item() == ex.item() == min(step + 1, 2)
                continue
            check(f"step {step} {name}", g, lo, ex, FLOOR[dtype], seed)


@GPU_ONLY
def test_gpu_larger_layer_bf16(seed):
    """A middle-flow-like layer on the GPU (728 channels: not a multiple of 16) in bfloat16."""
    x, dw, pw = unit(728, 728, 3, 2, 19, 19, torch.float64)
    scale, shift = torch.rand(728, device=DEVICE, dtype=torch.float64) + 0.5, torch.randn(
        728, device=DEVICE, dtype=torch.float64)
    residual = torch.randn(2, 728, 19, 19, device=DEVICE, dtype=torch.float64)
    conv = ([1, 1], [1, 1], [1, 1], True, False)
    grad_y = torch.randn(2, 728, 19, 19, device=DEVICE, dtype=torch.float64)
    results = {}
    for backend, dt in (("triton", torch.bfloat16), ("reference", torch.bfloat16), ("reference", torch.float64)):
        results[backend, dt] = run_op(ops.sepconv_bn_infer, [x, dw, pw, scale, shift, residual], conv, backend, dt,
                                      grad_y)
    for i, (g, lo, ex) in enumerate(zip(*(results[k][0] + results[k][1] for k in results))):
        check(f"output {i}", g, lo, ex, FLOOR[torch.bfloat16], seed)
