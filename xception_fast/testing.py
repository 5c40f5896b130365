"""Checking a provider against the truth: the tolerance table and the float64 comparison rule.

The truth is the unfused PyTorch modules (`nn.Conv2d(groups=C)`, `nn.Conv2d(1x1)`,
`nn.BatchNorm2d`) run in float64. A provider in a given dtype passes when its error against that
truth is at most `ERROR_RATIO` times the error of the `reference` provider in the same dtype, plus a
floor relative to the values' magnitude (so an exactly-rounded reference does not demand zero).
Every test uses this table; none invents its own tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    floor: float  # relative to the largest magnitude of the true values
    atol: float  # for direct assert_close comparisons in this dtype
    rtol: float


TOLERANCES = {
    torch.float64: Tolerance(floor=1e-12, atol=1e-10, rtol=1e-9),
    torch.float32: Tolerance(floor=2e-6, atol=2e-5, rtol=2e-5),
    torch.float16: Tolerance(floor=2e-3, atol=2e-2, rtol=2e-2),
    torch.bfloat16: Tolerance(floor=1.6e-2, atol=8e-2, rtol=8e-2),
}
ERROR_RATIO = 2.0
# BatchNorm statistics of a mean-1e4, std-1e-2 input against their float64 values (a naive float32
# sum of squares is off by 1e4x there): relative tolerances of the algorithm, not of a dtype.
STATISTICS_RTOL = {"mean": 2e-7, "var": 1e-4}
# Set, the providers fill freshly allocated outputs with NaN (a debugging aid that the tests turn on).
POISON_ENV_VAR = "XCEPTION_FAST_POISON_OUTPUTS"


def max_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute difference, with NaN/Inf required to sit at the same places."""
    actual, truth = actual.double(), truth.double()
    finite = torch.isfinite(truth)
    if not torch.equal(torch.isnan(actual), torch.isnan(truth)) or \
            not torch.equal(actual[torch.isinf(truth)], truth[torch.isinf(truth)]):
        return float("inf")
    if not finite.any():
        return 0.0
    return (actual[finite] - truth[finite]).abs().max().item()


def error_and_allowance(actual: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor,
                        dtype: torch.dtype) -> tuple[float, float]:
    """(`actual`'s error against `truth`, the most it may be): ERROR_RATIO x `baseline`'s error plus
    the dtype's floor relative to the truth's magnitude."""
    scale = truth.double()[torch.isfinite(truth)].abs().max().item() if truth.numel() and \
        torch.isfinite(truth).any() else 1.0
    error, base = max_error(actual, truth), max_error(baseline, truth)
    return error, ERROR_RATIO * base + TOLERANCES[dtype].floor * max(scale, 1e-30)


def check_against_truth(name: str, actual: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor,
                        dtype: torch.dtype) -> None:
    """Raise AssertionError unless `actual`'s error is at most ERROR_RATIO x `baseline`'s plus the floor."""
    if actual.shape != truth.shape:
        raise AssertionError(f"{name}: shape {list(actual.shape)} != {list(truth.shape)}")
    error, allowed = error_and_allowance(actual, baseline, truth, dtype)
    if not error <= allowed:
        raise AssertionError(f"{name}: error {error:.3e} > allowed {allowed:.3e} "
                             f"(reference provider's error {max_error(baseline, truth):.3e}, {dtype})")


def randomize_batchnorm_(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (the defaults, 0 and 1, are too
    kind), so that none can be ignored unnoticed by a comparison. The one randomiser of the tests and
    benchmarks."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


# --- running a provider in a test --------------------------------------------------------------------

def provider_skip_reason(name: str, device: torch.device | str) -> str | None:
    """Why the tests of provider `name` cannot run on `device` here, or None when they can."""
    from xception_fast import backends

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    found = backends.availability(name, device)
    return None if found.available else f"the {name} provider cannot run on {device.type} tensors: {found.reason}"


def require_provider(name: str, device: torch.device | str, monkeypatch=None) -> None:
    """Skip the calling test (with the reason) unless provider `name` runs on `device`.

    With pytest's `monkeypatch`, first set up for the test's duration what a provider test wants:
    the provider's CPU test environment (Triton's interpreter) on CPU tensors and NaN-filled fresh
    outputs, so an element no kernel writes fails the comparison."""
    import pytest

    from xception_fast import backends

    if monkeypatch is not None:
        monkeypatch.setenv(POISON_ENV_VAR, "1")
        entry = backends.PROVIDERS.get(name)
        if torch.device(device).type == "cpu" and entry is not None:
            for key, value in (entry.cpu_test_env or {}).items():
                monkeypatch.setenv(key, value)
    reason = provider_skip_reason(name, device)
    if reason is not None:
        pytest.skip(reason)


def provider_target(case: tuple[str, str], monkeypatch) -> tuple[str, torch.device]:
    """(provider, device) of a `conformance_cases` case, set up by `require_provider` (which skips
    the test with the reason when the provider cannot run there)."""
    name, device = case
    require_provider(name, device, monkeypatch)
    return name, torch.device(device)


def conformance_cases() -> list[tuple[str, str]]:
    """(provider, device) for each fused provider in the registry: on the GPU when there is one or
    when the provider has no CPU test environment (then the test skips with the reason), else on CPU
    tensors."""
    from xception_fast import backends

    gpu = torch.cuda.is_available()
    return [(name, "cuda" if gpu or entry.cpu_test_env is None else "cpu")
            for name, entry in backends.PROVIDERS.items() if entry.fused]


# --- the fused unit as plain modules, and random inputs ----------------------------------------------

def unfused_unit(module: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """post(bn(pointwise(depthwise(pre(x))))) + residual run by the plain modules a fused module holds
    (`depthwise`, `pointwise`, `bn` when it has one, `pre_relu`, `post_relu`): the truth it is held to."""
    y = module.pointwise(module.depthwise(torch.relu(x) if module.pre_relu else x))
    if getattr(module, "bn", None) is not None:
        y = module.bn(y)
    if module.post_relu:
        y = torch.relu(y)
    return y if residual is None else y + residual


def rounded(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` rounded to `dtype`, back in float64: the common input of every run (None stays None)."""
    return None if t is None else t.to(dtype).double()


def unit_tensors(cin: int, cout: int, k, n: int, h: int, w: int, device) -> tuple[torch.Tensor, ...]:
    """x [n, cin, h, w], dw_weight [cin, 1, kh, kw], pw_weight [cout, cin, 1, 1], float64, scaled so
    that outputs stay of order one."""
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, dtype=torch.float64, device=device)
    dw = torch.randn(cin, 1, kh, kw, dtype=torch.float64, device=device) / (kh * kw) ** 0.5
    pw = torch.randn(cout, cin, 1, 1, dtype=torch.float64, device=device) / max(cin, 1) ** 0.5
    return x, dw, pw


def away_from_kink(grad_y: torch.Tensor, pre_activation: torch.Tensor, post_relu: bool) -> torch.Tensor:
    """grad_y, zero where the post-ReLU input is within rounding distance of 0: there the float64 and
    the low-precision paths may disagree on the ReLU's mask, and a zero gradient makes that moot."""
    if not post_relu:
        return grad_y
    band = 0.02 * pre_activation.abs().max()
    return torch.where(pre_activation.abs() > band, grad_y, torch.zeros_like(grad_y))


def check_output(name: str, got: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """A provider's output `got` against the reference provider's in the same dtype (`low`: same dtype,
    shape, device and strides) and in float64 (`exact`: values, by `check_against_truth`)."""
    assert got.dtype == low.dtype and got.shape == low.shape, \
        f"{name}: {got.dtype}{list(got.shape)} vs {low.dtype}{list(low.shape)}"
    assert got.device == low.device, f"{name}: on {got.device}, the reference's on {low.device}"
    assert got.stride() == low.stride() or got.numel() <= 1, f"{name}: strides {got.stride()} vs {low.stride()}"
    if got.numel():
        check_against_truth(name, got.detach(), low.detach(), exact.detach(), dtype)


def run_fused_and_plain(fused: torch.nn.Module, unfused, x: torch.Tensor, residual=None, steps: int = 3):
    """`steps` forward/backward passes through the fused module and through a deep copy run as
    `unfused(module, x, residual)`, with the same random grad_y; yields (outputs, gradients of
    x, the residual and every parameter, fused, plain) per step, fused first in each pair."""
    import copy

    plain = copy.deepcopy(fused)
    for _ in range(steps):
        outs, grads, grad_y = [], [], None
        for module, fn in ((fused, lambda m, a, r: m(a, residual=r)), (plain, unfused)):
            a = x.clone().requires_grad_(True)
            r = None if residual is None else residual.clone().requires_grad_(True)
            module.zero_grad(set_to_none=True)
            y = fn(module, a, r)
            grad_y = torch.randn_like(y) if grad_y is None else grad_y
            y.backward(grad_y)
            outs.append(y)
            grads.append([a.grad] + ([r.grad] if r is not None else []) + [p.grad for p in module.parameters()])
        yield outs, grads, fused, plain


# --- one op run by a provider and by the reference, in a dtype and in float64 ------------------------

def run_op(op, tensors, rest, backend, dtype, grad_y):
    """Forward + backward of a public op with the differentiable `tensors` cast to `dtype`."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]
    outs = op(*leaves, *rest, backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs[0].backward(grad_y.to(outs[0].dtype))
    if outs[0].device.type == "cuda":
        torch.cuda.synchronize()
    return list(outs), [None if t is None else t.grad for t in leaves]


def compare_runs(names, results, provider, dtype, seed, zero=frozenset()):
    """Every output by `check_output`, but those in `zero`: exactly zero in exact arithmetic, so their
    values are rounding noise on both sides; for those, the layout and finiteness only."""
    got, low, exact = (results[key][0] + results[key][1] for key in
                       ((provider, dtype), ("reference", dtype), ("reference", torch.float64)))
    assert len(got) == len(names)
    for name, g, lo, ex in zip(names, got, low, exact):
        if ex is None:
            assert g is None and lo is None, name
        elif name in zero:
            assert g.dtype == lo.dtype and g.shape == lo.shape and g.stride() == lo.stride(), name
            assert torch.isfinite(g).all(), f"{name} (seed {seed}): not finite"
        else:
            check_output(f"{name} (seed {seed})", g, lo, ex, dtype)
