"""The self-check (`xception_fast.verify`), its disk cache and the `verify` CLI, on the CPU.

Fake providers registered for CPU tensors stand in for GPU kernels: a wrong one, one that leaves an
output element unwritten, a correct one. The real Triton provider is checked under its interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import types
import warnings
from dataclasses import replace

import pytest
import torch

import xception_fast
from xception_fast import __main__ as cli_main
from xception_fast import backends, dispatch, reference, verify
from xception_fast.testing import POISON_ENV_VAR

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_providers import (fresh_state, make_provider, register, unwritten_infer,  # noqa: E402,F401
                            virtual_clock, wrong_train_backward)


@pytest.fixture
def count_checks(monkeypatch):
    calls = []
    real = verify.check

    def counted(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(verify, "check", counted)
    return calls


def unit_module():
    torch.manual_seed(0)
    return xception_fast.SeparableConvBN2d(5, 7, pre_relu=True).eval()


# --- the check itself ----------------------------------------------------------------------------------

def test_a_wrong_provider_fails_and_auto_never_chooses_it(monkeypatch):
    register(monkeypatch, "wrong", make_provider("wrong", sepconv_bn_train_backward=wrong_train_backward))
    result = verify.check("wrong", "cpu", torch.float32)
    assert not result.passed
    assert "sepconv_bn_train_backward grad_dw" in result.failure, result.failure
    # every other op and output passes: the check pins the failure down
    assert all(c.passed for c in result.comparisons if (c.op, c.output) != ("sepconv_bn_train_backward", "grad_dw"))

    module = unit_module().train()
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="wrong provider failed its self-check .* fp32 .*grad_dw"):
        module(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once only
        module(x).sum().backward()
    assert dispatch.decisions() == {}  # nothing to time: the only fused candidate is not eligible
    assert dispatch.preferred("cpu", torch.float32) == "reference"
    assert "FAILED" in xception_fast.backend_report("cpu")["wrong"].verification


def test_outputs_are_poisoned_so_an_unwritten_element_fails(monkeypatch):
    register(monkeypatch, "lazy", make_provider("lazy", sepconv_bn_infer=unwritten_infer))
    monkeypatch.delenv(POISON_ENV_VAR, raising=False)
    result = verify.check("lazy", "cpu", torch.float32)
    assert not result.passed and "sepconv_bn_infer y: error inf" in result.failure, result.failure
    assert POISON_ENV_VAR not in os.environ  # the check's environment is restored


def test_outputs_keep_the_contracts_layout(monkeypatch):
    register(monkeypatch, "nchw", make_provider("nchw", sepconv_bn_infer=lambda *a: reference.sepconv_bn_infer(
        *a).contiguous()))
    result = verify.check("nchw", "cpu", torch.float32)
    assert not result.passed and "sepconv_bn_infer y: strides" in result.failure, result.failure


def test_a_provider_that_raises_fails_with_its_message(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image for this architecture")

    register(monkeypatch, "broken", make_provider("broken", bn_backward_reduce=broken))
    result = verify.check("broken", "cpu", torch.float16)
    assert not result.passed and "bn_backward_reduce raised RuntimeError: no kernel image" in result.failure


def test_the_reference_passes_every_op_in_every_dtype_and_the_full_set(monkeypatch):
    """The rule can be met: the reference under another name passes (what a correct kernel does)."""
    register(monkeypatch, "same", make_provider("same"))
    for dtype in backends.FUSED_DTYPES:
        result = verify.check("same", "cpu", dtype)
        assert result.passed, result.failure
        assert {c.op for c in result.comparisons} == set(verify.OPS)
    full = verify.check("same", "cpu", torch.float32, full=True)
    assert full.passed and {c.case for c in full.comparisons} == {c.name for c in verify.FULL_CASES}


def test_the_check_leaves_the_callers_rng_and_autocast_alone(monkeypatch):
    register(monkeypatch, "same", make_provider("same"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert verify.check("same", "cpu", torch.float32).passed
    assert torch.equal(torch.rand(3), expected)


# --- the cache ----------------------------------------------------------------------------------------------

def test_a_result_is_kept_on_disk_and_reused(monkeypatch, count_checks, tmp_path):
    register(monkeypatch, "same", make_provider("same"))
    assert verify.verified("same", "cpu", torch.float32)
    assert verify.verified("same", "cpu", torch.float32)
    assert count_checks == ["same"]
    files = list((tmp_path / "cache" / "verify").glob("same-fp32-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["result"]["passed"] is True
    verify.clear()  # as a new process would
    assert verify.verified("same", "cpu", torch.float32)
    assert count_checks == ["same"]
    assert "fp32 passed" in verify.describe("same", "cpu") and "fp16 unchecked" in verify.describe("same", "cpu")


def test_a_new_version_or_changed_kernels_invalidate_the_stamp(monkeypatch, count_checks, tmp_path):
    kernel = tmp_path / "kernel.py"
    kernel.write_text("# version 1\n")
    register(monkeypatch, "same", make_provider("same"), sources=lambda: [kernel])
    assert verify.verified("same", "cpu", torch.float32) and len(count_checks) == 1
    verify.clear()
    monkeypatch.setattr(xception_fast, "__version__", "99.0")
    assert verify.verified("same", "cpu", torch.float32) and len(count_checks) == 2
    verify.clear()
    kernel.write_text("# version 2, a different kernel\n")
    assert verify.verified("same", "cpu", torch.float32) and len(count_checks) == 3
    verify.clear()
    assert verify.verified("same", "cpu", torch.float32) and len(count_checks) == 3  # unchanged: cached


def test_a_corrupt_cache_file_means_checking_again(monkeypatch, count_checks, tmp_path):
    register(monkeypatch, "same", make_provider("same"))
    assert verify.verified("same", "cpu", torch.float32)
    (path,) = (tmp_path / "cache" / "verify").glob("same-fp32-*.json")
    for garbage in ("{not json", json.dumps({"stamp": "another"})):
        path.write_text(garbage)
        verify.clear()
        assert verify.verified("same", "cpu", torch.float32)
    assert len(count_checks) == 3
    assert json.loads(path.read_text())["result"]["passed"] is True  # rewritten


def test_an_unwritable_cache_directory_keeps_results_for_the_process(monkeypatch, count_checks, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(verify.CACHE_ENV_VAR, str(blocker / "cache"))  # mkdir fails, even as root
    register(monkeypatch, "same", make_provider("same"))
    assert verify.verified("same", "cpu", torch.float32)
    assert verify.verified("same", "cpu", torch.float32)
    assert count_checks == ["same"]


WRITER = textwrap.dedent('''
    import sys
    from pathlib import Path
    from xception_fast import verify
    path, tag = Path(sys.argv[1]), sys.argv[2]
    for i in range(300):
        assert verify.write_json_atomic(path, {"writer": tag, "i": i, "pad": "x" * 20000})
''')


def test_two_processes_writing_at_once_leave_a_valid_file(tmp_path):
    path = tmp_path / "cache" / "verify" / "shared.json"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writers = [subprocess.Popen([sys.executable, str(script), str(path), tag]) for tag in ("a", "b")]
    seen_invalid = 0
    while any(w.poll() is None for w in writers):
        if path.exists() and verify.read_json(path) is None:
            seen_invalid += 1
        time.sleep(0.001)
    assert [w.returncode for w in writers] == [0, 0]
    final = verify.read_json(path)
    assert final is not None and final["writer"] in ("a", "b") and final["i"] == 299
    assert seen_invalid == 0
    assert [p.name for p in path.parent.iterdir()] == ["shared.json"]  # no temporary files left


# --- modes -----------------------------------------------------------------------------------------------------

def test_mode_off_trusts_without_checking_and_require_refuses_a_failed_provider(monkeypatch, count_checks):
    register(monkeypatch, "wrong", make_provider("wrong", sepconv_bn_train_backward=wrong_train_backward))
    monkeypatch.setenv(verify.MODE_ENV_VAR, "off")
    assert verify.verified("wrong", "cpu", torch.float32) and count_checks == []
    monkeypatch.setenv(verify.MODE_ENV_VAR, "require")
    module = unit_module().train()
    with pytest.raises(RuntimeError, match="'wrong' has not passed its self-check .*XCEPTION_FAST_VERIFY=require"):
        with xception_fast.use_backend("wrong"):
            module(torch.randn(2, 5, 6, 7))
    monkeypatch.setenv(verify.MODE_ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="XCEPTION_FAST_VERIFY"):
        verify.mode()
    monkeypatch.delenv(verify.MODE_ENV_VAR)
    previous = verify.set_mode("off")
    try:
        assert verify.mode() == "off"
    finally:
        verify.set_mode(previous)


def test_an_explicit_unverified_provider_runs_and_warns_once(monkeypatch, count_checks):
    register(monkeypatch, "same", make_provider("same"))
    module = unit_module()
    x = torch.randn(1, 5, 6, 7)
    with pytest.warns(RuntimeWarning, match="running backend 'same' as asked, but it has not been verified"):
        module.backend = "same"
        module(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(x)
    assert count_checks == []  # an explicit request does not run the check (mode auto)
    verify.clear()
    assert verify.verified("same", "cpu", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(x)  # verified now: no warning


# --- the CLI -----------------------------------------------------------------------------------------------------

def test_verify_cli_prints_its_table_and_fails_on_a_wrong_provider(monkeypatch, capsys):
    register(monkeypatch, "wrong", make_provider("wrong", sepconv_bn_train_backward=wrong_train_backward))
    register(monkeypatch, "same", make_provider("same"))
    rc = cli_main.main(["verify", "--device", "cpu", "--providers", "same", "wrong", "--dtypes", "fp32",
                        "--no-time"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "wrong fp32: FAIL" in out and "same fp32: pass" in out
    assert "| wrong | fp32 | sepconv_bn_train_backward | grad_dw" in out and "| FAIL |" in out
    assert "--- Markdown (paste into a bug report) ---" in out and "stamp" in out
    rc = cli_main.main(["verify", "--device", "cpu", "--providers", "same", "--dtypes", "fp16", "--no-time"])
    assert rc == 0
    assert verify.cached("same", "cpu", torch.float16).passed  # the CLI wrote the stamp auto reads


def test_triton_passes_the_self_check_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", verify.CACHE_ENV_VAR: str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "xception_fast", "verify", "--device", "cpu", "--providers",
                           "triton", "--dtypes", "fp32", "fp16", "--no-time"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    # cwd outside the checkout: `python -m` puts the working directory first on sys.path, and the
    # source folder lacks triton_kernels (installed inside the package).
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "triton fp32: pass" in done.stdout and "triton fp16: pass" in done.stdout
    files = list((tmp_path / "cache" / "verify").glob("triton-fp*.json"))
    assert len(files) == 2
    # The provider lists the mid variant, so its self-check covers the mid ops too.
    checked = {c["op"] for c in json.loads(files[0].read_text())["result"]["comparisons"]}
    assert set(verify.OPS) | set(verify.MID_OPS) <= checked, checked


def test_backend_report_shows_the_verification_state():
    report = xception_fast.backend_report("cpu")
    assert report["reference"].verification
    assert all(found.verification for found in report.values())
