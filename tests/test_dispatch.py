"""`auto`'s choice per call signature (`xception_fast.dispatch`), on the CPU with fake providers:
verified and faster is chosen, verified but slower is not, forward and backward choose apart, and
nothing is timed during CUDA-graph capture or torch.compile tracing."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import xception_fast
from xception_fast import dispatch, reference, verify
from xception_fast.spec import UnitSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_providers import fresh_state, make_provider, register, slowed, virtual_clock  # noqa: E402,F401

ORIGINAL = {name: getattr(reference, name) for name in ("sepconv_bn_infer", "sepconv_bn_infer_backward")}


def unit():
    torch.manual_seed(0)
    return xception_fast.SeparableConvBN2d(5, 7, pre_relu=True).eval()


def choices() -> dict[str, str]:
    return {key[0]: name for key, name in dispatch.decisions().items()}


@pytest.fixture
def timed(monkeypatch):
    """Each timing of a candidate set: (op, candidates, whether torch.compile was tracing then)."""
    calls = []
    real = dispatch._time

    def spy(op, names, args, device):
        calls.append((op, tuple(names), torch.compiler.is_compiling()))
        return real(op, names, args, device)

    monkeypatch.setattr(dispatch, "_time", spy)
    return calls


def test_a_verified_but_slower_provider_is_not_chosen(monkeypatch, timed):
    slow = make_provider("slow", **{n: slowed(getattr(reference, n)) for n in ("sepconv_bn_infer",)})
    register(monkeypatch, "slow", slow)
    module = unit()
    x = torch.randn(2, 5, 6, 7)
    with torch.no_grad():
        y = module(x)
    assert verify.cached("slow", "cpu", torch.float32).passed  # verified ...
    assert choices() == {"sepconv_bn_infer": "reference"}  # ... and not chosen
    assert timed == [("sepconv_bn_infer", ("slow", "reference"), False)]
    with torch.no_grad():
        assert torch.equal(module(x), y)
    assert len(timed) == 1  # decided once per signature


def test_a_faster_provider_is_chosen_and_forward_and_backward_choose_apart(monkeypatch, timed):
    """'fast' has the reference's forward but a slow backward; the reference provider's forward is
    made slow: auto runs fast's forward and the reference's backward."""
    register(monkeypatch, "fast", make_provider("fast", sepconv_bn_infer=ORIGINAL["sepconv_bn_infer"],
                                                sepconv_bn_infer_backward=slowed(ORIGINAL["sepconv_bn_infer_backward"])))
    module = unit()
    x = torch.randn(3, 5, 6, 7, requires_grad=True)
    assert verify.verified("fast", "cpu", torch.float32)  # checked before the reference is slowed
    monkeypatch.setattr(reference, "sepconv_bn_infer", slowed(ORIGINAL["sepconv_bn_infer"]))
    module(x).sum().backward()
    assert choices() == {"sepconv_bn_infer": "fast", "sepconv_bn_infer_backward": "reference"}
    # Another batch in the same bucket (3 and 4 -> 4) reuses the decision; another bucket is timed anew.
    module(torch.randn(4, 5, 6, 7))
    assert len(timed) == 2
    module(torch.randn(5, 5, 6, 7))
    assert len(timed) == 3 and len(dispatch.decisions()) == 3


def test_autotune_off_takes_the_first_verified_provider(monkeypatch, timed):
    register(monkeypatch, "slow", make_provider("slow", sepconv_bn_infer=slowed(ORIGINAL["sepconv_bn_infer"])))
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV_VAR, "0")
    assert dispatch.choose("sepconv_bn_infer", _infer_args(torch.randn(2, 5, 6, 7))) == "slow"
    assert timed == [] and dispatch.decisions() == {}
    previous = dispatch.set_autotune(True)
    try:
        assert dispatch.choose("sepconv_bn_infer", _infer_args(torch.randn(2, 5, 6, 7))) == "reference"
    finally:
        dispatch.set_autotune(previous)


def _infer_args(x):
    module = unit()
    return (x, module.depthwise.weight.detach(), module.pointwise.weight.detach(), None, torch.zeros(7), None,
            UnitSpec((3, 3), (1, 1), (1, 1), (1, 1), pre_relu=True))


@pytest.mark.parametrize("during", ["capture", "tracing"])
def test_nothing_is_checked_or_timed_during_capture_or_tracing(monkeypatch, timed, during):
    fast = make_provider("fast", sepconv_bn_infer=ORIGINAL["sepconv_bn_infer"])
    register(monkeypatch, "fast", fast)
    checks = []
    monkeypatch.setattr(verify, "check", lambda *a, **k: checks.append(a))
    args = _infer_args(torch.randn(2, 5, 6, 7))
    if during == "capture":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.choose("sepconv_bn_infer", args) == "reference"
    assert checks == [] and timed == [] and dispatch.decisions() == {}
    # A decision made before is used as it is.
    dispatch._decisions[dispatch.signature("sepconv_bn_infer", args)] = "fast"
    verify._results[verify._key("fast", torch.device("cpu"), torch.float32)] = verify.Result(
        "fast", "cpu", "fp32", passed=True)
    assert dispatch.choose("sepconv_bn_infer", args) == "fast"
    assert checks == [] and timed == []


def test_torch_compile_traces_without_timing_and_runs_the_decision(monkeypatch, timed):
    register(monkeypatch, "fast", make_provider("fast", sepconv_bn_infer=ORIGINAL["sepconv_bn_infer"]))
    module = unit()
    x = torch.randn(2, 5, 6, 7)
    with torch.no_grad():
        expected = module(x)
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
    assert timed and all(not tracing for _, _, tracing in timed)


def test_decisions_can_be_kept_on_disk(monkeypatch, timed, tmp_path):
    register(monkeypatch, "slow", make_provider("slow", sepconv_bn_infer=slowed(ORIGINAL["sepconv_bn_infer"])))
    monkeypatch.setenv(dispatch.DISK_CACHE_ENV_VAR, "1")
    args = _infer_args(torch.randn(2, 5, 6, 7))
    assert dispatch.choose("sepconv_bn_infer", args) == "reference" and len(timed) == 1
    (path,) = (tmp_path / "cache" / "autotune").glob("*.json")
    assert list(json.loads(path.read_text()).values()) == ["reference"]
    dispatch.clear()  # as a new process would
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)  # even while tracing
        assert dispatch.choose("sepconv_bn_infer", args) == "reference" and len(timed) == 1
    path.write_text("{corrupt")
    dispatch.clear()
    assert dispatch.choose("sepconv_bn_infer", args) == "reference" and len(timed) == 2  # timed again


def test_measure_is_real(monkeypatch):
    """The real clock behind the choice (the other tests use a virtual one)."""
    import time

    monkeypatch.undo()  # the real dispatch.measure
    assert dispatch.measure(lambda: time.sleep(0.03), torch.device("cpu")) >= 30.0


def test_batch_buckets():
    assert [dispatch.bucket(n) for n in (0, 1, 2, 3, 4, 5, 255, 256, 257)] == [0, 1, 2, 4, 4, 8, 256, 256, 512]


def test_the_cpu_runs_the_plain_modules_path_by_default(monkeypatch, timed):
    """Without a fused provider for CPU tensors, eager `auto` is the plain modules' composition: no
    op, no timing; its results are the unfused modules' and its outputs channels_last."""
    calls = []
    real = dispatch.call
    monkeypatch.setattr(dispatch, "call", lambda op, *args: calls.append(op) or real(op, *args))
    module = unit().train()
    plain = torch.nn.Sequential(torch.nn.ReLU(), module.depthwise, module.pointwise, module.bn)
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    y = module(x)
    y.sum().backward()
    assert calls == [] and timed == [] and dispatch.decisions() == {}
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad = x.grad.clone()
    x.grad = None
    torch.testing.assert_close(y, plain(x))
    plain(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)
    module.backend = "reference"
    module(x)
    assert calls == ["sepconv_bn_train"]  # an explicit provider runs the op
