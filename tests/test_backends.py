"""Provider selection: auto, explicit requests, the context manager and the environment variable."""

import pytest
import torch

import xception_fast
from xception_fast import backends


def test_reference_is_always_available_and_auto_picks_it_on_cpu():
    assert "reference" in xception_fast.available_backends("cpu")
    assert backends.resolve("auto", "cpu") == "reference"
    report = xception_fast.backend_report("cpu")
    assert set(report) == {"cuda", "triton", "reference"}
    for name, found in report.items():
        assert found.reason, f"{name} gives no reason"


@pytest.mark.parametrize("cuda_ok, triton_ok, expected", [(True, True, "cuda"), (False, True, "triton"),
                                                          (False, False, "reference")])
def test_auto_order_for_gpu_tensors(monkeypatch, cuda_ok, triton_ok, expected):
    """On CUDA tensors `auto` takes cuda, then triton, then reference, by availability (faked here:
    no GPU is needed to resolve a name)."""
    fake = {"cuda": lambda d: backends.Availability(cuda_ok, "test"),
            "triton": lambda d: backends.Availability(triton_ok, "test"),
            "reference": lambda d: backends.Availability(True, "test")}
    monkeypatch.setattr(backends, "_AVAILABILITY", fake)
    assert backends.resolve("auto", "cuda") == expected
    assert backends.resolve("auto", "cuda", torch.bfloat16) == expected
    assert backends.resolve("auto", "cuda", torch.float64) == "reference"  # no fused float64 kernels
    assert backends.resolve("auto", "cpu") == "reference"  # the interpreter is never picked by auto


def test_ops_resolve_with_the_input_dtype(monkeypatch):
    seen = []
    resolve = backends.resolve

    def spy(backend, device, dtype=None):
        seen.append(dtype)
        return resolve(backend, device, dtype)

    monkeypatch.setattr(backends, "resolve", spy)
    module = xception_fast.SeparableConvBN2d(3, 4).double().train()
    module(torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert seen and all(dtype == torch.float64 for dtype in seen)


def test_unavailable_providers_say_why():
    report = xception_fast.backend_report("cpu")
    assert not report["cuda"].available  # the cuda provider never runs on CPU tensors
    for name in ("cuda", "triton"):
        if not report[name].available:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not available for cpu tensors"):
                backends.resolve(name, "cpu")


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="one of"):
        backends.resolve("cudnn", "cpu")
    with pytest.raises(ValueError, match="use_backend"):
        with xception_fast.use_backend("fast"):
            pass


def test_context_manager_overrides_auto_and_nests(monkeypatch):
    monkeypatch.setattr(backends, "_AVAILABILITY", {**backends._AVAILABILITY,
                                                    "triton": lambda d: backends.Availability(True, "test")})
    with xception_fast.use_backend("triton"):
        assert backends.requested_backend("auto") == "triton"
        assert backends.resolve("auto", "cpu") == "triton"
        with xception_fast.use_backend("reference"):
            assert backends.requested_backend("auto") == "reference"
        assert backends.requested_backend("auto") == "triton"
        assert backends.requested_backend("reference") == "reference"  # explicit beats the context
    assert backends.requested_backend("auto") == "auto"


def test_environment_variable_is_the_default(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.requested_backend("auto") == "reference"
    with xception_fast.use_backend("cuda"):
        assert backends.requested_backend("auto") == "cuda"  # the context beats the environment
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.requested_backend("auto")


def test_explicit_unavailable_request_is_an_error_not_a_fallback():
    module = xception_fast.SeparableConvBN2d(3, 4).eval()
    x = torch.randn(2, 3, 5, 5)
    module(x)  # auto works
    with xception_fast.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' is not available"):
        module(x)


def test_op_runs_the_selected_provider(monkeypatch):
    calls = []

    class Spy:
        def __getattr__(self, name):
            def run(*args):
                calls.append(name)
                return getattr(xception_fast.reference, name)(*args)
            return run

    monkeypatch.setattr(backends, "_AVAILABILITY", {**backends._AVAILABILITY,
                                                    "triton": lambda d: backends.Availability(True, "spy")})
    monkeypatch.setattr(backends, "_MODULES", {**backends._MODULES, "triton": Spy})
    module = xception_fast.SeparableConvBN2d(3, 4, backend="triton").train()
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    module(x).sum().backward()
    assert calls == ["sepconv_bn_train", "bn_backward_reduce", "sepconv_bn_train_backward"]
