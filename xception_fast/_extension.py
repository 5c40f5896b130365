"""Loading of the compiled CUDA extension `xception_fast._C` (the `cuda` provider's library).

The library registers its ops with `TORCH_LIBRARY(xception_fast_cuda, ...)` and is loaded with
`torch.ops.load_library`; it has no Python module of its own. Nothing here raises at import or in
`status()`: a missing, skipped, stale or broken build gives `loaded=False` and a reason that says
what to do, which `xception_fast.backends` reports for the `cuda` provider.

Where the library is looked for, in order:
1. `_C*.so` in this package's directory (an installed package, or an in-place build);
2. the installed distribution's files (`importlib.metadata`): `python -m xception_fast` run from a
   source checkout imports the source folder, which has no built library, while the installed
   copy of the same package has one.

`_build_info.json`, written by setup.py next to the library, is read before loading: a library
built against another torch than the running one is not loaded (the C++ ABI differs and loading
it could crash the process), and the reason says how to rebuild.

Before the library is loaded here, a child process loads it and makes the first calls (build_info,
a tensor op given CPU tensors): a library that crashes on its first call (one built by a compiler
that linked its own libstdc++, see setup.py's LINK_ARGS) then kills the child, not this process,
and the cuda provider is reported unavailable with the reason. A passed probe is remembered in the
self-check's cache directory (`verify.cache_dir()`), keyed by the library file and the torch build,
so it costs one child per build.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import json
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

NAMESPACE = "xception_fast_cuda"
DISTRIBUTION = "xception_fast"
BUILD_INFO_FILE = "_build_info.json"
REBUILD = "rebuild with `pip install --no-build-isolation --no-deps .` (or `pip install .`)"
TENSOR_OPS = ("sepconv_bn_infer", "sepconv_bn_infer_backward", "sepconv_bn_train", "bn_backward_reduce",
              "sepconv_bn_train_backward")


PROBE_TIMEOUT_S = 300
# Run by a child process: load the library and make the calls that first format text in it.
PROBE = """
import json, sys
import torch
torch.ops.load_library(sys.argv[1])
ops = torch.ops.xception_fast_cuda
info = ops.build_info()
try:
    json.loads(info)
except ValueError:
    sys.exit(f"build_info() returned malformed JSON: {info!r}")
grad = torch.zeros(1, 2, 3, 3)
vec = torch.zeros(2)
try:
    ops.bn_backward_reduce(grad, grad, vec, vec, vec, vec, True)
except RuntimeError as exc:
    if "must be a CUDA tensor" not in str(exc):
        sys.exit(f"a tensor op given CPU tensors raised an unexpected error: {exc}")
else:
    sys.exit("a tensor op given CPU tensors did not raise")
"""


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    """Whether the compiled library is loaded; if not, why. `build_info` is `_build_info.json`
    (plus, once loaded, the library's own `build_info()` under the key "library")."""

    loaded: bool
    reason: str
    path: Optional[str] = None
    build_info: dict = dataclasses.field(default_factory=dict)


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def _library_rank(path: Path) -> tuple[int, str]:
    # Prefer the file named for this interpreter (_C.cpython-311-x86_64-linux-gnu.so), then any _C*.so.
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    exact = [i for i, suffix in enumerate(suffixes) if path.name == "_C" + suffix]
    return (exact[0] if exact else len(suffixes), path.name)


def _installed_files() -> list[Path]:
    """xception_fast/* files of every installed distribution of the package. All of them, not just
    the first: a source checkout's xception_fast.egg-info (left by an in-tree build) comes first on
    sys.path when running from the checkout, and lists sources, not the built library."""
    found = []
    try:
        dists = list(importlib.metadata.distributions(name=DISTRIBUTION))
    except Exception:  # noqa: BLE001 (broken metadata must not break loading)
        return []
    for dist in dists:
        for file in dist.files or ():
            parts = Path(str(file)).parts
            if len(parts) == 2 and parts[0] == "xception_fast":
                path = Path(dist.locate_file(file)).resolve()
                if path not in found:
                    found.append(path)
    return found


def _locate() -> tuple[Optional[Path], Optional[Path]]:
    """(the library, its _build_info.json), each None when not found. A library anywhere beats a
    lone _build_info.json (the source folder may hold one from a skipped in-place build)."""
    places = []
    for files in (lambda: list(_package_dir().iterdir()), _installed_files):
        try:
            places.append(files())
        except OSError:
            continue
    for candidates in places:
        libraries = sorted((p for p in candidates if p.name.startswith("_C") and p.suffix in (".so", ".pyd")
                            and p.is_file()), key=_library_rank)
        if libraries:
            info = libraries[0].parent / BUILD_INFO_FILE
            return libraries[0], info if info.is_file() else None
    for candidates in places:
        infos = [p for p in candidates if p.name == BUILD_INFO_FILE and p.is_file()]
        if infos:
            return None, infos[0]
    return None, None


def _read_build_info(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"could not read {path}: {exc}"}
    return info if isinstance(info, dict) else {"error": f"{path} does not hold a JSON object"}


def _base_version(version: str) -> str:
    return str(version).split("+")[0]


def _mismatch(built: str, running: str, path: Path) -> str:
    reason = f"{path.name} was built against torch {built}, running torch {running}: {REBUILD}"
    warnings.warn(f"xception_fast: the CUDA extension is not loaded: {reason}", stacklevel=3)
    return reason


def _probe_marker(library: Path) -> Path:
    stat = library.stat()
    key = f"{library.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{torch.__version__}|{torch.__file__}"
    from xception_fast.verify import cache_dir  # the self-check's cache (verify imports the providers)

    return cache_dir() / f"probe-ok-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _probe(library: Path) -> Optional[str]:
    """None when a child process loaded the library and its first calls worked (or did so before,
    per the cache); otherwise why not."""
    marker = _probe_marker(library)
    if marker.is_file():
        return None
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, str(library)], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"a child process that loaded {library} did not finish in {PROBE_TIMEOUT_S} s"
    except OSError:
        return None  # no interpreter to start (an embedded Python): load it here, unprobed
    if done.returncode != 0:
        how = f"exited with status {done.returncode}"
        if done.returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-done.returncode).name}"
            except ValueError:
                how = f"was killed by signal {-done.returncode}"
        tail = done.stderr.strip()[-800:] or "no output"
        return (f"the first calls into {library} failed in a child process, which {how} ({tail}); a library "
                f"linked with its own copy of libstdc++ does this: {REBUILD}")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{library}\n")
    except OSError:
        pass  # no writable cache: probe again next time
    return None


def _load() -> ExtensionStatus:
    library, info_path = _locate()
    info = _read_build_info(info_path)
    built = str(info.get("cuda_extension", ""))
    path = str(library) if library is not None else None
    if library is None:
        if built.startswith("skipped"):
            return ExtensionStatus(False, f"the CUDA extension was not built at install time ({built}); "
                                          f"reinstall with `pip install .` where nvcc and a CUDA build of torch are "
                                          f"present (and XCEPTION_FAST_BUILD_CUDA is not 0)", None, info)
        return ExtensionStatus(False, f"no compiled library xception_fast/_C*.so found (looked in "
                                      f"{_package_dir()} and the installed distribution); build it with "
                                      f"`pip install .`", None, info)
    if built.startswith("skipped"):
        return ExtensionStatus(False, f"the CUDA extension was not built ({built}); {library.name} beside it is "
                                      f"stale and is ignored: {REBUILD}", path, info)
    if not torch.version.cuda:
        return ExtensionStatus(False, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is "
                                      f"None): the cuda provider needs a CUDA build of torch", path, info)
    running = str(torch.__version__)
    built_against = info.get("torch_version")
    if built_against and str(built_against) != running:
        return ExtensionStatus(False, _mismatch(str(built_against), running, library), path, info)
    failed = _probe(library)
    if failed is not None:
        return ExtensionStatus(False, failed, path, info)
    try:
        torch.ops.load_library(str(library))
    except Exception as exc:  # noqa: BLE001 (OSError, RuntimeError: any failure is a reason, not a crash)
        return ExtensionStatus(False, f"loading {library} failed: {type(exc).__name__}: {exc}", path, info)
    try:
        library_info = json.loads(getattr(torch.ops, NAMESPACE).build_info())
    except Exception as exc:  # noqa: BLE001
        return ExtensionStatus(False, f"{library} loaded but does not register the {NAMESPACE} ops "
                                      f"({type(exc).__name__}: {exc}): {REBUILD}", path, info)
    info = {**info, "library": library_info}
    compiled = str(library_info.get("torch_version", ""))
    if not built_against and compiled and compiled != _base_version(running):
        # No _build_info.json: the library's own record is the only check left.
        return ExtensionStatus(False, _mismatch(compiled, running, library), path, info)
    return ExtensionStatus(True, f"loaded {library}", path, info)


@functools.lru_cache(maxsize=None)
def status() -> ExtensionStatus:
    """Load the library once per process (memoised; `status.cache_clear()` forgets the result)."""
    try:
        return _load()
    except Exception as exc:  # noqa: BLE001 (never raise: the cuda provider is then unavailable)
        return ExtensionStatus(False, f"unexpected error while loading the CUDA extension: "
                                      f"{type(exc).__name__}: {exc}")


def ops():
    """`torch.ops.xception_fast_cuda`, or RuntimeError with the reason the library is not loaded."""
    current = status()
    if not current.loaded:
        raise RuntimeError(f"xception_fast: the CUDA extension is not available: {current.reason}")
    return getattr(torch.ops, NAMESPACE)



# --- the cuda provider: the functions of `xception_fast.reference`, run by the library's ops --------------

def sepconv_bn_infer(x, dw_weight, pw_weight, scale, shift, residual, spec):
    return ops().sepconv_bn_infer(x, dw_weight, pw_weight, scale, shift, residual, *spec.op_args())


def sepconv_bn_infer_backward(grad_y, x, dw_weight, pw_weight, scale, shift, spec):
    return ops().sepconv_bn_infer_backward(grad_y, x, dw_weight, pw_weight, scale, shift, *spec.op_args())


def sepconv_bn_train(x, dw_weight, pw_weight, bn_weight, bn_bias, residual, spec, eps):
    return ops().sepconv_bn_train(x, dw_weight, pw_weight, bn_weight, bn_bias, residual, *spec.op_args(), eps)


def bn_backward_reduce(grad_y, z, mean, invstd, bn_weight, bn_bias, post_relu):
    return ops().bn_backward_reduce(grad_y, z, mean, invstd, bn_weight, bn_bias, post_relu)


def sepconv_bn_train_backward(grad_y, x, z, dw_weight, pw_weight, mean, invstd, bn_weight, bn_bias, mean_dy,
                              mean_dy_xhat, spec):
    return ops().sepconv_bn_train_backward(grad_y, x, z, dw_weight, pw_weight, mean, invstd, bn_weight, bn_bias,
                                           mean_dy, mean_dy_xhat, *spec.op_args())
