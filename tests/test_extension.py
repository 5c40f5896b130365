"""The compiled CUDA extension xception_fast._C: build, loading, op registration, input checks.

On a machine without a GPU (CI) the library still builds and loads, so registration, the CPU-tensor
errors and the input checks are tested there: the checks run on FakeTensors that claim a CUDA
device, redispatched straight to the CUDA kernel (checks read only metadata). GPU tests repeat the
checks on real CUDA tensors.

Without a built extension these tests skip with the reason, except under CI (`CI` set), where a
missing extension is a failure: CI must build it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from xception_fast import _extension

TENSOR_OPS = _extension.TENSOR_OPS
SCHEMAS = {
    "sepconv_bn_infer": "sepconv_bn_infer(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? scale, "
    "Tensor? shift, Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, bool pre_relu, "
    "bool post_relu) -> Tensor",
    "sepconv_bn_infer_backward": "sepconv_bn_infer_backward(Tensor grad_y, Tensor x, Tensor dw_weight, "
    "Tensor pw_weight, Tensor? scale, Tensor? shift, int[2] stride, int[2] padding, int[2] dilation, "
    "bool pre_relu, bool post_relu) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "sepconv_bn_train": "sepconv_bn_train(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, bool pre_relu, "
    "bool post_relu, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    "bn_backward_reduce": "bn_backward_reduce(Tensor grad_y, Tensor z, Tensor mean, Tensor invstd, "
    "Tensor? bn_weight, Tensor? bn_bias, bool post_relu) -> (Tensor, Tensor)",
    "sepconv_bn_train_backward": "sepconv_bn_train_backward(Tensor grad_y, Tensor x, Tensor z, Tensor dw_weight, "
    "Tensor pw_weight, Tensor mean, Tensor invstd, Tensor? bn_weight, Tensor? bn_bias, Tensor mean_dy, "
    "Tensor mean_dy_xhat, int[2] stride, int[2] padding, int[2] dilation, bool pre_relu, bool post_relu) "
    "-> (Tensor, Tensor, Tensor)",
    "build_info": "build_info() -> str",
}
NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False)"


def _require_extension() -> _extension.ExtensionStatus:
    status = _extension.status()
    if not status.loaded:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build and load the CUDA extension, but it is not loaded: {status.reason}")
        pytest.skip(f"CUDA extension not loaded: {status.reason}")
    return status


@pytest.fixture
def cuda_ops():
    _require_extension()
    return _extension.ops()


@pytest.fixture
def fresh_status():
    """Forget the memoised status before and after a test that fakes what status() sees."""
    _extension.status.cache_clear()
    yield
    _extension.status.cache_clear()


# --- inputs -------------------------------------------------------------------------------------------

# N, C, H, W, Cout, 3x3 kernel, stride 1, padding 1: output [2, 6, 5, 5].
N, C, H, W, COUT, K = 2, 4, 5, 5, 6, 3


def make_args(op: str, new=torch.empty, dtype=torch.float32, **override) -> list:
    """Valid arguments of `op` in schema order; `new(*shape, dtype=...)` makes the tensors."""
    x = lambda: new(N, C, H, W, dtype=dtype)  # noqa: E731
    out = lambda: new(N, COUT, H, W, dtype=dtype)  # noqa: E731
    vec = lambda: new(COUT, dtype=torch.float32)  # noqa: E731
    dw = lambda: new(C, 1, K, K, dtype=dtype)  # noqa: E731
    pw = lambda: new(COUT, C, 1, 1, dtype=dtype)  # noqa: E731
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}
    if op == "sepconv_bn_infer":
        args = {"x": x(), "dw_weight": dw(), "pw_weight": pw(), "scale": vec(), "shift": vec(), "residual": out(),
                **conv, "pre_relu": True, "post_relu": False}
    elif op == "sepconv_bn_infer_backward":
        args = {"grad_y": out(), "x": x(), "dw_weight": dw(), "pw_weight": pw(), "scale": vec(), "shift": vec(),
                **conv, "pre_relu": True, "post_relu": True}
    elif op == "sepconv_bn_train":
        args = {"x": x(), "dw_weight": dw(), "pw_weight": pw(), "bn_weight": vec(), "bn_bias": vec(),
                "residual": out(), **conv, "pre_relu": True, "post_relu": False, "eps": 1e-5}
    elif op == "bn_backward_reduce":
        args = {"grad_y": out(), "z": out(), "mean": vec(), "invstd": vec(), "bn_weight": vec(), "bn_bias": vec(),
                "post_relu": True}
    elif op == "sepconv_bn_train_backward":
        args = {"grad_y": out(), "x": x(), "z": out(), "dw_weight": dw(), "pw_weight": pw(), "mean": vec(),
                "invstd": vec(), "bn_weight": vec(), "bn_bias": vec(), "mean_dy": vec(), "mean_dy_xhat": vec(),
                **conv, "pre_relu": False, "post_relu": True}
    else:
        raise ValueError(op)
    unknown = set(override) - set(args)
    assert not unknown, f"{op} has no argument {unknown}"
    args.update(override)
    return list(args.values())


def _wrong(new, dtype=torch.float32):
    """(op, argument overrides, expected message fragment): inputs the checks must refuse."""
    f16 = torch.float16
    return [
        ("sepconv_bn_infer", {"x": new(N, C, H, dtype=dtype)}, "x must be a 4-D [N, C, H, W] tensor, got 3-D"),
        ("sepconv_bn_infer", {"x": new(N, C, H, W, dtype=torch.float64),
                              "dw_weight": new(C, 1, K, K, dtype=torch.float64),
                              "pw_weight": new(COUT, C, 1, 1, dtype=torch.float64),
                              "residual": new(N, COUT, H, W, dtype=torch.float64)},
         "x must be float32, float16 or bfloat16"),
        ("sepconv_bn_infer", {"dw_weight": new(C, 2, K, K, dtype=dtype)}, "dw_weight must have shape [4, 1, 3, 3]"),
        ("sepconv_bn_infer", {"dw_weight": new(C, 1, K, K, dtype=f16)}, "dw_weight must have x's dtype"),
        ("sepconv_bn_infer", {"pw_weight": new(COUT, C + 1, 1, 1, dtype=dtype)},
         "pw_weight must have shape [6, 4, 1, 1]"),
        ("sepconv_bn_infer", {"scale": new(COUT + 1, dtype=torch.float32)}, "scale must have shape [6]"),
        ("sepconv_bn_infer", {"residual": new(N, COUT, H + 1, W, dtype=dtype)},
         "residual must have shape [2, 6, 5, 5]"),
        ("sepconv_bn_infer", {"stride": [0, 1]}, "stride must be two integers >= 1"),
        ("sepconv_bn_infer", {"padding": [0, 0], "dw_weight": new(C, 1, 7, 7, dtype=dtype), "residual": None},
         "too small"),
        ("sepconv_bn_infer_backward", {"grad_y": new(N, COUT, H, W, dtype=f16)}, "grad_y must have x's dtype"),
        ("sepconv_bn_train", {"bn_bias": new(COUT, dtype=torch.int32)}, "bn_bias must be float32 or x's dtype"),
        ("bn_backward_reduce", {"mean": new(COUT, dtype=f16)}, "mean must have the statistics' dtype Float"),
        ("bn_backward_reduce", {"grad_y": new(N, COUT, H, W + 1, dtype=dtype)}, "grad_y must have shape"),
        ("sepconv_bn_train_backward", {"z": new(N, COUT + 1, H, W, dtype=dtype)}, "z must have shape [2, 6, 5, 5]"),
        ("sepconv_bn_train_backward", {"mean_dy_xhat": new(COUT + 2, dtype=torch.float32)},
         "mean_dy_xhat must have shape [6]"),
    ]


def _fake_cuda_new():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()

    def new(*shape, dtype):
        with mode:
            return torch.empty(*shape, dtype=dtype, device="cuda")

    return new


# --- loading ------------------------------------------------------------------------------------------

def test_status_never_raises():
    status = _extension.status()
    assert isinstance(status, _extension.ExtensionStatus)
    assert isinstance(status.reason, str) and status.reason
    assert _extension.status() is status  # memoised
    if not status.loaded:
        with pytest.raises(RuntimeError, match="not available"):
            _extension.ops()


def test_extension_loads():
    status = _require_extension()
    assert status.path is not None and Path(status.path).is_file()
    assert Path(status.path).name.startswith("_C")
    assert status.build_info.get("cuda_extension") == "built"
    assert _extension.ops() is torch.ops.xception_fast_cuda


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_registered_with_schema(cuda_ops, name):
    assert hasattr(cuda_ops, name)
    assert str(getattr(cuda_ops, name).default._schema) == f"xception_fast_cuda::{SCHEMAS[name]}"


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_tensor_op_has_cuda_and_cpu_kernels(cuda_ops, name):
    for key in ("CUDA", "CPU"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"xception_fast_cuda::{name}", key), key


def test_build_info_matches_running_torch(cuda_ops):
    info = json.loads(cuda_ops.build_info())
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    built = _extension.status().build_info
    assert built["torch_version"] == torch.__version__
    assert info["cuda_archs"] == ",".join(built["cuda_archs"])


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_cpu_tensors_give_our_error(cuda_ops, name):
    first = "grad_y" if name in ("sepconv_bn_infer_backward", "bn_backward_reduce", "sepconv_bn_train_backward") \
        else "x"
    with pytest.raises(RuntimeError) as info:
        getattr(cuda_ops, name)(*make_args(name, new=torch.zeros))
    message = str(info.value)
    assert f"xception_fast cuda provider: {first} must be a CUDA tensor, got a tensor on cpu" in message
    assert "backend='reference'" in message
    assert "Could not run" not in message


# --- loading decisions on a faked install -------------------------------------------------------------

def test_torch_version_mismatch_is_not_loaded(fresh_status, monkeypatch):
    """The real library with a different running torch: not loaded, a warning, a rebuild hint."""
    status = _extension.status()
    if status.path is None:
        _require_extension()
    _extension.status.cache_clear()
    monkeypatch.setattr(torch, "__version__", "2.99.0+fake")
    with pytest.warns(UserWarning, match="rebuild"):
        mismatched = _extension.status()
    assert not mismatched.loaded
    assert "rebuild" in mismatched.reason
    assert "running torch 2.99.0+fake" in mismatched.reason
    assert mismatched.path == status.path
    with pytest.raises(RuntimeError, match="rebuild"):
        _extension.ops()


def _fake_install(tmp_path, monkeypatch, library: bytes | None, info: dict | None):
    lib = tmp_path / "_C.cpython-fake.so"
    if library is not None:
        lib.write_bytes(library)
    if info is not None:
        (tmp_path / "_build_info.json").write_text(json.dumps(info))
    monkeypatch.setattr(_extension, "_package_dir", lambda: tmp_path)
    monkeypatch.setattr(_extension, "_installed_files", lambda: [])
    monkeypatch.setenv("XCEPTION_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    return lib


def test_fake_mismatch_is_not_loaded(fresh_status, tmp_path, monkeypatch):
    lib = _fake_install(tmp_path, monkeypatch, b"not a library", {"cuda_extension": "built", "torch_version": "0.1"})
    with pytest.warns(UserWarning, match="rebuild"):
        status = _extension.status()
    assert not status.loaded and status.path == str(lib)
    assert f"built against torch 0.1, running torch {torch.__version__}" in status.reason
    assert "pip install --no-build-isolation --no-deps ." in status.reason


def test_fake_skipped_build_says_why(fresh_status, tmp_path, monkeypatch):
    _fake_install(tmp_path, monkeypatch, None, {"cuda_extension": "skipped: XCEPTION_FAST_BUILD_CUDA=0"})
    status = _extension.status()
    assert not status.loaded and status.path is None
    assert "XCEPTION_FAST_BUILD_CUDA=0" in status.reason


def test_fake_skipped_build_ignores_a_stale_library(fresh_status, tmp_path, monkeypatch):
    lib = _fake_install(tmp_path, monkeypatch, b"not a library", {"cuda_extension": "skipped: no nvcc"})
    status = _extension.status()
    assert not status.loaded and status.path == str(lib)
    assert "skipped: no nvcc" in status.reason and "stale" in status.reason


def test_fake_broken_library_does_not_raise(fresh_status, tmp_path, monkeypatch):
    _fake_install(tmp_path, monkeypatch, b"not a library",
                  {"cuda_extension": "built", "torch_version": str(torch.__version__)})
    status = _extension.status()
    assert not status.loaded
    assert "failed" in status.reason


def test_library_crashing_on_first_use_is_not_loaded(fresh_status, tmp_path, monkeypatch):
    """A library that kills the process that loads it (as one linked with its own libstdc++ did on
    its first call) kills the probe's child process only: not loaded, the signal in the reason."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("needs a C compiler to build the crashing library")
    source = tmp_path / "crash.c"
    source.write_text("#include <signal.h>\n__attribute__((constructor)) static void crash(void) { raise(SIGSEGV); }\n")
    lib = _fake_install(tmp_path, monkeypatch, None, {"cuda_extension": "built", "torch_version": str(torch.__version__)})
    subprocess.run([gcc, "-shared", "-fPIC", str(source), "-o", str(lib)], check=True, timeout=120)
    status = _extension.status()
    assert not status.loaded and status.path == str(lib)
    assert "failed in a child process, which was killed by SIGSEGV" in status.reason
    assert "rebuild" in status.reason
    assert not list((tmp_path / "cache").glob("probe-ok-*"))  # a failure is not cached


def test_probe_passes_once_then_is_cached(fresh_status, tmp_path, monkeypatch):
    """The built library passes the child-process probe; the next load skips the child."""
    monkeypatch.setenv("XCEPTION_FAST_CACHE_DIR", str(tmp_path))
    status = _require_extension()
    assert len(list(tmp_path.glob("probe-ok-*"))) == 1
    _extension.status.cache_clear()

    def no_child(*args, **kwargs):
        raise AssertionError("probed again despite a cached pass")

    monkeypatch.setattr(_extension.subprocess, "run", no_child)
    assert _extension.status().loaded and _extension.status().path == status.path


def test_library_uses_the_shared_libstdcxx():
    """The installed library needs libstdc++.so.6 and defines none of libstdc++'s own symbols: a
    library with a copy of its own broke on its first ostream use (setup.py's LINK_ARGS)."""
    status = _extension.status()
    if status.path is None:
        _require_extension()
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("needs readelf (binutils)")
    dynamic = subprocess.run([readelf, "-d", status.path], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, dynamic
    symbols = subprocess.run([readelf, "--dyn-syms", "-W", status.path], capture_output=True, text=True,
                             check=True).stdout
    own = [line.split()[-1] for line in symbols.splitlines()
           if len(line.split()) >= 8 and line.split()[6] != "UND"
           and line.split()[-1].startswith(("_ZNSt6locale", "_ZNSt8ios_base"))]
    assert not own, f"the library defines libstdc++ symbols: {own[:5]}"


def test_fake_no_library(fresh_status, tmp_path, monkeypatch):
    _fake_install(tmp_path, monkeypatch, None, None)
    status = _extension.status()
    assert not status.loaded and "no compiled library" in status.reason


def test_library_found_in_second_distribution(fresh_status, tmp_path, monkeypatch):
    """Run from a source checkout, an in-tree xception_fast.egg-info (sources only) comes first on
    sys.path; the installed .dist-info that has the library must still be found."""

    class FakeDist:
        def __init__(self, root: Path, files: list[str]):
            self.root, self.files = root, files

        def locate_file(self, file):
            return self.root / file

    source, site = tmp_path / "src", tmp_path / "site"
    (source / "xception_fast").mkdir(parents=True)
    (source / "xception_fast" / "__init__.py").write_text("")
    (site / "xception_fast").mkdir(parents=True)
    (site / "xception_fast" / "_C.cpython-fake.so").write_bytes(b"x")
    (site / "xception_fast" / "_build_info.json").write_text("{}")
    dists = [FakeDist(source, ["xception_fast/__init__.py"]),
             FakeDist(site, ["xception_fast/_C.cpython-fake.so", "xception_fast/_build_info.json"])]
    monkeypatch.setattr(_extension, "_package_dir", lambda: source / "xception_fast")
    monkeypatch.setattr(_extension.importlib.metadata, "distributions", lambda **kwargs: iter(dists))
    library, info = _extension._locate()
    assert library == (site / "xception_fast" / "_C.cpython-fake.so").resolve()
    assert info == library.parent / "_build_info.json"


def test_cpu_only_torch(fresh_status, tmp_path, monkeypatch):
    _fake_install(tmp_path, monkeypatch, b"not a library",
                  {"cuda_extension": "built", "torch_version": str(torch.__version__)})
    monkeypatch.setattr(torch.version, "cuda", None)
    status = _extension.status()
    assert not status.loaded and "CPU-only build" in status.reason


# --- input checks ---------------------------------------------------------------------------------------

CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


@pytest.mark.parametrize("case", range(len(_wrong(torch.empty))))
def test_checks_on_fake_cuda_tensors(cuda_ops, case):
    """Each CUDA kernel's checks, run on metadata only: FakeTensors on 'cuda', sent to the CUDA kernel."""
    new = _fake_cuda_new()
    name, override, message = _wrong(new)[case]
    args = make_args(name, new=new, **override)
    with pytest.raises(RuntimeError, match="xception_fast: ") as info:
        getattr(cuda_ops, name).default.redispatch(CUDA_KEY, *args)
    assert message in str(info.value)


@pytest.mark.parametrize("name", TENSOR_OPS)
def test_mixed_devices_on_fake_cuda_tensors(cuda_ops, name):
    new = _fake_cuda_new()
    args = make_args(name, new=new)
    args[2] = torch.empty(args[2].shape, dtype=args[2].dtype)  # the third argument on the CPU
    with pytest.raises(RuntimeError, match="must be a CUDA tensor, got a tensor on cpu"):
        getattr(cuda_ops, name).default.redispatch(CUDA_KEY, *args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("case", range(len(_wrong(torch.empty))))
def test_checks_on_gpu(cuda_ops, case):
    new = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device="cuda")  # noqa: E731
    name, override, message = _wrong(new)[case]
    with pytest.raises(RuntimeError) as info:
        getattr(cuda_ops, name)(*make_args(name, new=new, **override))
    assert message in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("name", TENSOR_OPS)
def test_mixed_devices_on_gpu(cuda_ops, name):
    new = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device="cuda")  # noqa: E731
    args = make_args(name, new=new)
    args[2] = args[2].cpu()
    with pytest.raises(RuntimeError, match="must be a CUDA tensor, got a tensor on cpu"):
        getattr(cuda_ops, name)(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", TENSOR_OPS)
def test_valid_inputs_pass_the_checks_on_gpu(cuda_ops, name, dtype):
    """Valid inputs get past every check, to the kernel."""
    new = lambda *shape, dtype: torch.randn(*shape, dtype=dtype, device="cuda")  # noqa: E731
    args = make_args(name, new=new, dtype=dtype)
    x_first = args[0].to(memory_format=torch.channels_last)  # any memory format is accepted
    args[0] = x_first
    getattr(cuda_ops, name)(*args)
    torch.cuda.synchronize()
