"""The test helpers themselves, on the CPU: a helper that only GPU runs reach must not be able to
break unseen (a GPU-only helper once recursed into itself and killed every GPU test)."""

from __future__ import annotations

import os

import pytest
import torch

from xception_fast import backends
from xception_fast.testing import POISON_ENV_VAR, provider_skip_reason, require_provider


def _fake(monkeypatch, gpu: bool, available: bool, reason: str = "fake reason"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(backends, "availability", lambda name, device: backends.Availability(available, reason))


def test_no_gpu_skips_with_the_reason(monkeypatch):
    _fake(monkeypatch, gpu=False, available=True)
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
        require_provider("cuda", "cuda")


def test_unavailable_provider_skips_with_its_reason(monkeypatch):
    _fake(monkeypatch, gpu=True, available=False, reason="extension not built")
    with pytest.raises(pytest.skip.Exception, match="triton provider cannot run on cuda tensors: extension not built"):
        require_provider("triton", "cuda")


def test_available_provider_runs_with_poisoned_outputs(monkeypatch):
    _fake(monkeypatch, gpu=True, available=True)
    monkeypatch.delenv(POISON_ENV_VAR, raising=False)
    assert require_provider("cuda", "cuda", monkeypatch) is None
    assert os.environ[POISON_ENV_VAR] == "1"
    assert provider_skip_reason("cuda", "cuda") is None


def test_real_cpu_reference_never_skips():
    assert provider_skip_reason("reference", "cpu") is None
    require_provider("reference", "cpu")
