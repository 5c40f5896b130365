"""Never silently wrong: bad inputs, edge shapes, numerics, determinism and a seeded shape fuzzer.

Providers are checked against the unfused float64 modules with the rule of
`xception_fast.testing` (error at most 2x the reference provider's in the same dtype).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from xception_fast import SeparableConvBN2d, backends, ops
from xception_fast.testing import (TOLERANCES, check_against_truth, max_error, randomize_batchnorm_,
                                   require_provider, unfused_unit)


def cpu_providers() -> list[str]:
    """Providers tested on CPU tensors: those with a CPU test environment in the registry (Triton's
    interpreter for triton)."""
    return [name for name, entry in backends.PROVIDERS.items() if entry.cpu_test_env is not None]


@pytest.fixture(autouse=True)
def _cpu_provider(request, monkeypatch):
    """CPU runs of a provider: its test environment set, or a skip with the reason it cannot run."""
    params = getattr(request.node, "callspec", None)
    provider = params.params.get("provider") if params is not None else None
    if provider is not None and "gpu" not in request.keywords and not torch.cuda.is_available():
        require_provider(provider, "cpu", monkeypatch)


def _run(module, x, residual, grad_y, fused: bool):
    m = copy.deepcopy(module)
    x = x.clone().requires_grad_(True)
    r = None if residual is None else residual.clone().requires_grad_(True)
    y = m(x, residual=r) if fused else unfused_unit(m, x, r)
    y.backward(grad_y.to(y.dtype))
    grads = {"x": x.grad, **({"residual": r.grad} if r is not None else {}),
             **{n: p.grad for n, p in m.named_parameters()}}
    return y, grads, dict(m.named_buffers())


# --- 1. bad inputs -------------------------------------------------------------------------------

def test_tensors_on_different_devices_are_rejected_before_any_kernel():
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="pw_weight is on meta but x is on cpu"):
        ops.sepconv_bn_infer(x, torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1, device="meta"), None, None, None,
                             [1, 1], [1, 1], [1, 1], False, False, "reference")


@pytest.mark.parametrize("shape", [(3, 5, 5), (1, 2, 3, 5, 5)], ids=["3d", "5d"])
def test_inputs_of_the_wrong_rank_are_rejected(shape):
    with pytest.raises(ValueError, match="x must be a 4-D"):
        SeparableConvBN2d(3, 4, backend="reference").eval()(torch.randn(shape))


def test_bn_vector_and_residual_shapes_are_checked():
    x, dw, pw = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1)
    conv = ([1, 1], [1, 1], [1, 1], False, False)
    with pytest.raises(ValueError, match=r"bn_weight must be a \[Cout=4\] vector"):
        ops.sepconv_bn_train(x, dw, pw, torch.randn(3), None, None, *conv, 1e-5, "reference")
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.sepconv_bn_train(x, dw, pw, None, None, torch.randn(2, 4, 5, 4), *conv, 1e-5, "reference")


# --- 2. edge shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", cpu_providers())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_one_by_one_spatial_and_non_contiguous_inputs(provider, train):
    module = randomize_batchnorm_(SeparableConvBN2d(5, 3, pre_relu=True, backend=provider)).train(train)
    base = torch.randn(4, 10, 3, 1)
    x = base[:, ::2]  # a channel slice: non-contiguous in every memory format
    grad_y = torch.randn(1).expand(4, 3, 3, 1)  # stride-0 grad_output, as from y.sum()
    y, grads, _ = _run(module, x, None, grad_y, fused=True)
    y_ref, grads_ref, _ = _run(module, x, None, grad_y, fused=False)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, y_ref, atol=tol.atol, rtol=tol.rtol)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=tol.atol, rtol=tol.rtol, msg=name)


def test_empty_batch_leaves_running_statistics_alone():
    module = randomize_batchnorm_(SeparableConvBN2d(4, 6, backend="reference")).train()
    before = {k: v.clone() for k, v in module.bn.named_buffers()}
    y = module(torch.randn(0, 4, 5, 5))
    assert y.shape == (0, 6, 5, 5)
    assert torch.equal(module.bn.running_mean, before["running_mean"])
    assert torch.equal(module.bn.running_var, before["running_var"])
    assert module.bn.num_batches_tracked.item() == 1  # as nn.BatchNorm2d counts an empty batch


# --- 3. numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", cpu_providers())
def test_batchnorm_statistics_are_stable_for_large_means(provider):
    cin = cout = 4
    x = 1e4 + 1e-2 * torch.randn(3, cin, 9, 9, dtype=torch.float64)
    dw = torch.zeros(cin, 1, 3, 3, dtype=torch.float64)
    dw[:, :, 1, 1] = 1  # identity depthwise: the pre-BN output is x itself
    pw = torch.eye(cout, dtype=torch.float64).view(cout, cin, 1, 1)
    args = ([1, 1], [1, 1], [1, 1], False, False, 1e-5, provider)
    x = x.float()
    _, _, mean, var = ops.sepconv_bn_train(x, dw.float(), pw.float(), None, None, None, *args)
    var64, mean64 = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)  # of the same float32 values
    assert torch.isfinite(var).all() and (var >= 0).all()
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-3, atol=0)  # a naive E[x^2]-E[x]^2 is off by 1e4x


@pytest.mark.parametrize("provider", cpu_providers())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nan_and_inf_propagate_as_in_eager(provider, train):
    module = randomize_batchnorm_(SeparableConvBN2d(3, 4, pre_relu=True, post_relu=True, backend=provider)).train(train)
    x = torch.randn(2, 3, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 4, 4] = float("inf")
    x[1, 2, 0, 0] = -float("inf")
    with torch.no_grad():
        y = copy.deepcopy(module)(x)
        y_ref = unfused_unit(copy.deepcopy(module), x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert max_error(y, y_ref) < 1e-4


# --- 4. determinism ------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", cpu_providers())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bitwise_deterministic_over_20_repeats(provider, train):
    module = randomize_batchnorm_(SeparableConvBN2d(6, 5, stride=2, pre_relu=True, backend=provider)).train(train)
    x, grad_y = torch.randn(2, 6, 9, 7), torch.randn(2, 5, 5, 4)
    first = _run(module, x, None, grad_y, fused=True)
    for _ in range(19):
        again = _run(module, x, None, grad_y, fused=True)
        assert torch.equal(again[0], first[0])
        for name, g in first[1].items():
            assert torch.equal(again[1][name], g), name
        for name, b in first[2].items():
            assert torch.equal(again[2][name], b), name


# --- 5. seeded shape fuzzer ----------------------------------------------------------------------

def random_case(rng: random.Random) -> dict:
    while True:
        k, stride, dilation = rng.choice([1, 3, 3, 5]), rng.choice([1, 2]), rng.choice([1, 1, 2])
        case = dict(n=rng.choice([0, 1, 2, 3]), cin=rng.randint(1, 9), cout=rng.randint(1, 9),
                    h=rng.randint(1, 12), w=rng.randint(1, 12), k=k, stride=stride, dilation=dilation,
                    padding=rng.randint(0, dilation * (k // 2)), pre_relu=rng.random() < 0.5,
                    post_relu=rng.random() < 0.5, residual=rng.random() < 0.3, train=rng.random() < 0.5)
        ho = ops.output_size(case["h"], k, stride, case["padding"], dilation)
        wo = ops.output_size(case["w"], k, stride, case["padding"], dilation)
        if ho > 0 and wo > 0 and not (case["train"] and case["n"] * ho * wo == 1):
            return case


def run_case(case: dict, provider: str, dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    module = SeparableConvBN2d(case["cin"], case["cout"], case["k"], case["stride"], case["padding"], case["dilation"],
                               case["pre_relu"], case["post_relu"], backend=provider)
    module = randomize_batchnorm_(module).train(case["train"])
    x = torch.randn(case["n"], case["cin"], case["h"], case["w"])
    out_shape = [case["cout"]] + [ops.output_size(size, case["k"], case["stride"], case["padding"],
                                                  case["dilation"]) for size in (case["h"], case["w"])]
    residual = torch.randn(case["n"], *out_shape) if case["residual"] else None
    grad_y = torch.randn(case["n"], *out_shape)
    if case["post_relu"] and dtype != torch.float64:
        # Near the ReLU's kink a low-precision path may round to the other side than the float64
        # truth, changing a gradient by its full size; keep gradients away from it.
        with torch.no_grad():
            pre_activation = unfused_unit(copy.deepcopy(module).double(), x.double(),
                                     None if residual is None else torch.zeros_like(residual, dtype=torch.float64))
        grad_y = grad_y * (pre_activation > 0.1)
    cast = (lambda t: None if t is None else t.to(dtype))
    y, grads, buffers = _run(module.to(dtype), cast(x), cast(residual), grad_y, fused=True)
    truth = _run(copy.deepcopy(module).double(), x.double(), None if residual is None else residual.double(),
                 grad_y.double(), fused=False)
    base_module = copy.deepcopy(module)
    base_module.backend = "reference"
    baseline = _run(base_module, cast(x), cast(residual), grad_y, fused=True)
    check_against_truth("y", y, baseline[0], truth[0], dtype)
    for name in truth[1]:
        check_against_truth(f"grad {name}", grads[name], baseline[1][name], truth[1][name], dtype)
    for name in truth[2]:
        check_against_truth(f"buffer {name}", buffers[name].to(truth[2][name].dtype), baseline[2][name].to(
            truth[2][name].dtype), truth[2][name], dtype)
    if provider == "reference":  # the baseline is itself: hold it to the table directly
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(y.double(), truth[0], atol=tol.atol, rtol=tol.rtol)


FUZZ_CASES = 40


@pytest.mark.parametrize("provider", cpu_providers())
def test_fuzz_shapes_against_float64(provider):
    rng = random.Random(20261123)
    cases = FUZZ_CASES if provider == "reference" else 16  # the Triton interpreter is slow
    for i in range(cases):
        case = random_case(rng)
        try:
            run_case(case, provider, torch.float32, seed=i)
        except AssertionError as exc:
            pytest.fail(f"{exc}\nrepro: run_case({case!r}, {provider!r}, torch.float32, seed={i})")


# --- 6. GPU-only ---------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("provider", backends.provider_names())
def test_cuda_graph_capture_and_replay(provider, monkeypatch):
    require_provider(provider, "cuda", monkeypatch)
    module = randomize_batchnorm_(SeparableConvBN2d(32, 48, pre_relu=True, backend=provider)).cuda().eval()
    x = torch.randn(4, 32, 17, 17, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            module(x)  # warm-up (Triton compilation, cuDNN autotuning) off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        y = module(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        torch.testing.assert_close(y, module(x))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("provider", backends.provider_names())
def test_compile_reduce_overhead(provider, monkeypatch):
    require_provider(provider, "cuda", monkeypatch)
    module = randomize_batchnorm_(SeparableConvBN2d(16, 24, stride=2, backend=provider)).cuda().eval()
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(2, 16, 15, 15, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            y = compiled(x)
        torch.testing.assert_close(y, module(x))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("provider", backends.provider_names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fuzz_on_gpu(provider, dtype, monkeypatch):
    require_provider(provider, "cuda", monkeypatch)
    rng = random.Random(7)
    for i in range(20):
        case = random_case(rng)
        with torch.device("cuda"):
            try:
                run_case(case, provider, dtype, seed=i)
            except AssertionError as exc:
                pytest.fail(f"{exc}\nrepro: run_case({case!r}, {provider!r}, {dtype}, seed={i})")


@gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck"])
@pytest.mark.parametrize("provider", backends.provider_names(fused_only=True))
def test_compute_sanitizer_is_clean(provider, tool, monkeypatch):
    import os
    import shutil
    import subprocess
    import sys

    require_provider(provider, "cuda", monkeypatch)
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    run = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20", sys.executable,
                          "-m", "xception_fast.bench.sanitize", "--backend", provider, "--dtypes", "fp32", "bf16"],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


@gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("provider", backends.provider_names())
def test_more_than_2_31_elements_is_right_or_a_clear_error(provider, monkeypatch):
    """64-bit indexing: an input of 2^31 + elements (4.3 GB in bf16) gives the right values at its far
    end, checked against the reference on the last rows alone, or raises; never garbage."""
    require_provider(provider, "cuda", monkeypatch)
    module = randomize_batchnorm_(SeparableConvBN2d(64, 64, backend=provider)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(1, 64, 5800, 5800, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    try:
        with torch.no_grad():
            y = module(x)
    except (RuntimeError, ValueError) as exc:  # a clear refusal is acceptable
        assert "2^" in str(exc) or "large" in str(exc) or "elements" in str(exc) or "positions" in str(exc), exc
        return
    tail = x[:, :, -4:, :]
    reference_module = copy.deepcopy(module)
    reference_module.backend = "reference"
    with torch.no_grad():
        expected = reference_module(tail)[:, :, 1:, :]  # its top row saw zero padding instead of row -5
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y[:, :, -3:, :], expected, atol=tol.atol, rtol=tol.rtol)
