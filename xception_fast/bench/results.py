"""Results files: every row of a run with the environment it ran in, as JSON.

A results file is one JSON object::

    {"schema": "xception_fast.bench/1",
     "created": "2026-01-01T12:00:00+00:00", "finished": ..., "duration_s": ...,
     "environment": {"device": "cuda", "gpu_name": ..., "driver": ..., "torch": ..., "torch_cuda": ...,
                     "cudnn": ..., "triton": ..., "commit": ..., "commit_dirty": ..., "backends": {...}, ...},
     "settings": {...}, "flags": {"cudnn_benchmark": true, ...},
     "rates": {"bf16": {"matmul_tflops": ..., "copy_gbps": ..., ...}},
     "rows": [{"kind": "layer" | "model", "name": ..., "provider": ..., "status": "ok", ...}, ...]}

(see `xception_fast.bench.runner` for the fields of a row). Files are written atomically and are
rewritten after every row during a run, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional

import torch

SCHEMA = "xception_fast.bench/1"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_commit(start: Optional[Path] = None) -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the git work tree holding the package source, else of the current directory.
    XCEPTION_FAST_COMMIT overrides (for installs without a .git)."""
    if os.environ.get("XCEPTION_FAST_COMMIT"):
        return os.environ["XCEPTION_FAST_COMMIT"], None
    candidates = [start] if start else []
    candidates += [Path(__file__).resolve().parents[2], Path.cwd()]
    for directory in candidates:
        if directory is None or not directory.is_dir():
            continue
        sha = _run(["git", "rev-parse", "HEAD"], cwd=directory)
        if sha:
            status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory)
            return sha, bool(status)
    return None, None


def _nvidia_driver() -> Optional[str]:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _cuda_driver_api() -> Optional[str]:
    """The CUDA version the installed driver supports (cuDriverGetVersion), e.g. "13.0"."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int()
        try:
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
                return f"{version.value // 1000}.{(version.value % 1000) // 10}"
        except AttributeError:
            return None
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """The software and hardware a run measures: GPU, driver, versions, commit."""
    device = torch.device(device)
    import xception_fast

    commit, dirty = git_commit()
    env = {
        "device": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": None,
        "triton": _version("triton") or _version("pytorch-triton"),
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "xception_fast": getattr(xception_fast, "__version__", None),
        "commit": commit,
        "commit_dirty": dirty,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    try:
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001
        pass
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(gpu_name=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_bytes=int(props.total_memory), gpu_sm_count=int(props.multi_processor_count),
                   gpu_count=torch.cuda.device_count(), driver=_nvidia_driver(), cuda_driver_api=_cuda_driver_api())
    else:
        env.update(gpu_name=None, driver=None)
    from xception_fast.bench.common import FUSED_PROVIDERS, fused_provider_status

    env["backends"] = {}
    for name in FUSED_PROVIDERS:
        ok, reason = fused_provider_status(name, device)
        env["backends"][name] = {"available": ok, "reason": reason}
    return env


def make_results(device, settings: dict, flags: dict, rates: dict, rows: list[dict],
                 started: Optional[float] = None, env: Optional[dict] = None) -> dict:
    finished = _now()
    created = _dt.datetime.fromtimestamp(started, _dt.timezone.utc).replace(microsecond=0) if started else finished
    return {
        "schema": SCHEMA,
        "created": created.isoformat(),
        "finished": finished.isoformat(),
        "duration_s": round((finished - created).total_seconds(), 1),
        "environment": env if env is not None else _cached_environment(str(device)),
        "settings": settings,
        "flags": flags,
        "rates": rates,
        "rows": rows,
    }


_ENV_CACHE: dict[str, dict] = {}


def _cached_environment(device: str) -> dict:
    if device not in _ENV_CACHE:
        _ENV_CACHE[device] = environment(device)
    return _ENV_CACHE[device]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def default_filename(env: dict, when: Optional[_dt.datetime] = None) -> str:
    """e.g. ``20260101-120000_nvidia-h100-80gb-hbm3_1a2b3c4.json``."""
    when = when or _now()
    machine = env.get("gpu_name") or f"cpu-{env.get('cpu') or 'unknown'}"
    commit = (env.get("commit") or "nocommit")[:7] + ("-dirty" if env.get("commit_dirty") else "")
    return f"{when:%Y%m%d-%H%M%S}_{_slug(machine)[:40]}_{commit}.json"


def results_path(target, device) -> Path:
    """`target` itself if it names a .json file, else a new file name in the directory `target`."""
    target = Path(target)
    if target.suffix == ".json":
        return target
    return target / default_filename(_cached_environment(str(torch.device(device))))


def _default(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    return repr(obj)


def save_results(data: dict, path) -> Path:
    """Write `data` to `path` (a .json file, or a directory for a new default-named file) atomically."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / default_filename(data.get("environment", {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_default, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return path


def load_results(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("xception_fast.bench/") \
            or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not an xception_fast benchmark results file (no schema/rows)")
    data.setdefault("environment", {})
    data["_path"] = str(path)
    return data


def result_files(paths: Iterable) -> list[Path]:
    """The .json files named by `paths`, directories expanded (sorted by name: oldest first)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(q for q in p.glob("*.json") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            print(f"warning: {p} does not exist", file=sys.stderr)
    return files
