"""Provider selection: auto, explicit requests, the context manager and the environment variable."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import xception_fast
from xception_fast import backends
from xception_fast.spec import UnitSpec


def fake_availability(monkeypatch, **available: bool) -> None:
    """Registry entries whose availability is faked (no GPU is needed to resolve a name)."""
    for name, ok in available.items():
        entry = replace(backends.PROVIDERS[name], availability=lambda d, ok=ok: backends.Availability(ok, "test"))
        monkeypatch.setitem(backends.PROVIDERS, name, entry)


def test_reference_is_always_available_and_auto_picks_it_on_cpu():
    assert "reference" in xception_fast.available_backends("cpu")
    assert backends.resolve("auto", "cpu") == "reference"
    report = xception_fast.backend_report("cpu")
    assert tuple(report) == backends.provider_names() == ("cuda", "triton", "reference")
    for name, found in report.items():
        assert found.reason, f"{name} gives no reason"


@pytest.mark.parametrize("cuda_ok, triton_ok, expected", [(True, True, "cuda"), (False, True, "triton"),
                                                          (False, False, "reference")])
def test_auto_order_for_gpu_tensors(monkeypatch, cuda_ok, triton_ok, expected):
    """On CUDA tensors `auto` prefers cuda, then triton, then reference, by availability (faked here:
    no GPU is needed to resolve a name; verification off, since the self-check needs the GPU)."""
    fake_availability(monkeypatch, cuda=cuda_ok, triton=triton_ok)
    monkeypatch.setenv("XCEPTION_FAST_VERIFY", "off")
    assert backends.resolve("auto", "cuda") == expected
    assert backends.resolve("auto", "cuda", torch.bfloat16) == expected
    assert backends.resolve("auto", "cuda", torch.float64) == "reference"  # no fused float64 kernels
    assert backends.resolve("auto", "cpu") == "reference"  # the interpreter is never picked by auto


def test_ops_resolve_with_the_input_dtype(monkeypatch):
    seen = []
    candidates = backends.auto_candidates

    def spy(device, dtype=None, *rest):
        seen.append(dtype)
        return candidates(device, dtype, *rest)

    monkeypatch.setattr(backends, "auto_candidates", spy)
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
    fake_availability(monkeypatch, triton=True)
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

    monkeypatch.setitem(sys.modules, "spy_provider", Spy())
    fake_availability(monkeypatch, triton=True)
    monkeypatch.setitem(backends.PROVIDERS, "triton", replace(backends.PROVIDERS["triton"], module="spy_provider"))
    module = xception_fast.SeparableConvBN2d(3, 4, backend="triton").train()
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    module(x).sum().backward()
    assert calls == ["sepconv_bn_train", "bn_backward_reduce", "sepconv_bn_train_backward"]


TOY_PROVIDER = '''"""A toy provider: the reference's functions, counted."""
from xception_fast import backends, reference

CALLS = []


def _counted(name):
    def run(*args):
        CALLS.append(name)
        return getattr(reference, name)(*args)
    return run


for _name in backends.PROVIDER_FUNCTIONS:
    globals()[_name] = _counted(_name)
'''

TOY_CHECK = '''
import torch
from xception_fast import backends
from xception_fast.spec import UnitSpec

# The registry entry: the whole of adding a provider, with its folder (toy_provider/).
backends.PROVIDERS["toy"] = backends.Provider("toy", "toy_provider", lambda d: backends.Availability(True, "toy"),
                                              cpu_test_env={})

import toy_provider
import xception_fast
from xception_fast import testing, train
from xception_fast.bench import cli, common, report, sanitize

assert train.parse_args(["--backend", "toy"]).backend == "toy"
assert cli.build_parser().parse_args(["bench", "--providers", "toy"]).providers == ["toy"]
assert "toy" in common.FUSED_PROVIDERS and common.provider_status("toy", "cuda")[0]
assert report._PROVIDER_ORDER.index("toy") < report._PROVIDER_ORDER.index("reference")
assert "toy" in xception_fast.available_backends("cpu") and "toy" in xception_fast.backend_report("cpu")
assert ("toy", "cpu") in testing.conformance_cases()
module = xception_fast.SeparableConvBN2d(3, 4, backend="toy").train()
module(torch.randn(2, 3, 5, 5, requires_grad=True)).sum().backward()
with xception_fast.use_backend("toy"):
    xception_fast.SeparableConvBN2d(3, 4).eval()(torch.randn(1, 3, 5, 5))
assert toy_provider.CALLS == ["sepconv_bn_train", "bn_backward_reduce", "sepconv_bn_train_backward",
                              "sepconv_bn_infer"], toy_provider.CALLS
print("toy provider ok")
'''


def test_adding_a_provider_is_a_registry_entry_plus_its_folder(tmp_path):
    """A toy provider registered before the rest of the package is imported (as an entry in
    `backends.PROVIDERS` would be) appears in every list of providers (train and bench CLIs, the
    bench's providers and report order, the conformance suite's cases) and runs the ops."""
    (tmp_path / "toy_provider").mkdir()
    (tmp_path / "toy_provider" / "__init__.py").write_text(TOY_PROVIDER)
    (tmp_path / "check.py").write_text(TOY_CHECK)
    done = subprocess.run([sys.executable, str(tmp_path / "check.py")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and "toy provider ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_auto_passes_over_a_provider_without_the_units_variant(monkeypatch):
    """`auto` passes over the providers that do not compute a unit's variant (a mid-activation, which
    the cuda provider declines); asking one for it by name is an error naming it, and a variant no
    provider computes is an error of `auto`'s own."""
    fake_availability(monkeypatch, cuda=True, triton=True)
    monkeypatch.setenv("XCEPTION_FAST_VERIFY", "off")  # the self-check needs the GPU
    mid = UnitSpec((3, 3), pre_relu=True, mid="relu").variants()
    assert mid == {"pre_relu", "mid_relu"}
    assert backends.resolve("auto", "cuda", torch.float32, UnitSpec((3, 3), pre_relu=True).variants()) == "cuda"
    assert backends.resolve("auto", "cuda", torch.float32, mid) == "triton"
    with pytest.raises(NotImplementedError, match=r"'cuda' does not compute the unit variant.*mid_relu.*'triton'"):
        backends.resolve("cuda", "cuda", torch.float32, mid)
    unknown = UnitSpec((3, 3), pre_relu=True, mid="elu").variants()  # no provider lists it
    with pytest.raises(RuntimeError, match=r"no xception_fast backend computes a unit with \['mid_elu', 'pre_relu'\]"):
        backends.resolve("auto", "cuda", torch.float32, unknown)
