"""Fake providers for the tests of the self-check and of `auto`'s choice: modules with the
reference's functions, some replaced (wrong, unwritten, slow), registered for CPU tensors."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from xception_fast import backends, dispatch, reference, verify
from xception_fast.testing import POISON_ENV_VAR


def make_provider(name: str, **functions) -> types.ModuleType:
    """A provider module: the reference's functions, with some replaced."""
    module = types.ModuleType(name)
    for fn in backends.PROVIDER_FUNCTIONS:
        setattr(module, fn, functions.get(fn, getattr(reference, fn)))
    return module


def register(monkeypatch, name: str, module: types.ModuleType, **fields) -> None:
    """Register `module` as fused provider `name`, which `auto` considers on CPU tensors."""
    monkeypatch.setitem(sys.modules, f"fake_{name}", module)
    entry = backends.Provider(name, f"fake_{name}", lambda d: backends.Availability(True, "fake"),
                              auto_devices=("cpu",), cpu_test_env={}, **fields)
    monkeypatch.setitem(backends.PROVIDERS, name, entry)


def wrong_train_backward(*args):
    grad_x, grad_dw, grad_pw = reference.sepconv_bn_train_backward(*args)
    return grad_x, grad_dw * 1.01, grad_pw  # 1% off, in one output of one op


def unwritten_infer(*args):
    """Writes every element but the last column, into an output allocated as the kernels do."""
    y = reference.sepconv_bn_infer(*args)
    out = torch.empty_like(y)
    if os.environ.get(POISON_ENV_VAR, "0") == "1":
        out.fill_(float("nan"))
    else:
        out.copy_(y)  # what stale memory may happen to hold: the right values from an earlier call
    out[..., :-1] = y[..., :-1]
    return out


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch, tmp_path):
    """An empty cache directory, no results or decisions from other tests, default modes."""
    monkeypatch.setenv(verify.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(verify.MODE_ENV_VAR, raising=False)
    monkeypatch.delenv(dispatch.AUTOTUNE_ENV_VAR, raising=False)
    verify.clear()
    dispatch.clear()
    yield
    verify.clear()
    dispatch.clear()


# A virtual clock for `dispatch.measure`: the machines tests run on are shared and noisy, so a
# provider is "slow" by the virtual milliseconds it adds, not by sleeping (`test_measure_is_real`
# checks the real clock separately).
CLOCK = [0.0]


def slowed(fn, ms: float = 20.0):
    """`fn`, taking `ms` more virtual milliseconds."""
    def run(*args):
        CLOCK[0] += ms
        return fn(*args)
    return run


@pytest.fixture(autouse=True)
def virtual_clock(monkeypatch):
    def measure(fn, device):
        fn()  # the untimed first call
        start = CLOCK[0]
        fn()
        return CLOCK[0] - start + 1e-3  # every call costs something

    monkeypatch.setattr(dispatch, "measure", measure)
