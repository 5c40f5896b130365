"""Running an op: the explicit provider, or `auto`'s choice per call signature.

`auto`, like `cudnn.benchmark`, measures instead of guessing. The candidates are the fused
providers that can run on the tensors' device, compute their dtype and the unit's variants
(`backends.auto_candidates`) and passed the self-check there (`xception_fast.verify`). With none,
`reference` runs and nothing is timed (always so on the CPU). Otherwise, the first time an op meets
a call signature (the op, the shapes with the batch dimension bucketed to a power of two, dtypes,
strides, padding, dilation, the ReLUs, which optional tensors are present: inference and training
are different ops, as are forward and backward, so each may choose differently), every candidate
and `reference` are timed on the call's own inputs and the fastest is kept for the process. During
CUDA-graph capture or torch.compile tracing nothing is timed: a signature not yet decided runs
`reference` there, a decided one its decision.

``XCEPTION_FAST_AUTOTUNE=0`` (or `set_autotune(False)`) turns the timing off: `auto` then takes the
first verified fused provider in registry order. The decisions of a process are in `decisions()`.
With ``XCEPTION_FAST_AUTOTUNE_CACHE=1`` they are also kept on disk, beside the self-check's results
(``autotune/`` in `verify.cache_dir()`, one file per device and software/kernel stamp), so a later
process, or a capture that meets a signature first, finds them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from xception_fast import backends, reference, verify

AUTOTUNE_ENV_VAR = "XCEPTION_FAST_AUTOTUNE"
DISK_CACHE_ENV_VAR = "XCEPTION_FAST_AUTOTUNE_CACHE"
# Inputs whose first dimension is the batch (bucketed in the signature); the rest are weights and
# per-channel vectors.
_BATCHED = frozenset({"x", "residual", "grad_y", "z"})

_decisions: dict[tuple, str] = {}
_on_disk: dict[str, dict[str, str]] = {}  # device -> {repr(signature): provider}, read once per process
_lock = threading.Lock()
_autotune_override: Optional[bool] = None


def autotune_enabled() -> bool:
    if _autotune_override is not None:
        return _autotune_override
    value = os.environ.get(AUTOTUNE_ENV_VAR, "1") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV_VAR} must be 0 or 1, got {value!r}")
    return value == "1"


def set_autotune(enabled: Optional[bool]) -> Optional[bool]:
    """Override XCEPTION_FAST_AUTOTUNE for this process (None: back to the environment); returns the
    previous override."""
    global _autotune_override
    previous, _autotune_override = _autotune_override, enabled
    return previous


def eligible(device: torch.device | str, dtype: Optional[torch.dtype] = None,
             variants: frozenset[str] = frozenset()) -> list[str]:
    """The fused providers `auto` may run here: candidates that passed the self-check on the device
    (run now if needed; a dtype of None means float32)."""
    dtype = dtype or torch.float32
    return [name for name in backends.auto_candidates(device, dtype, variants)
            if verify.verified(name, device, dtype)]


def preferred(device: torch.device | str, dtype: Optional[torch.dtype] = None,
              variants: frozenset[str] = frozenset()) -> str:
    """`auto`'s choice before any timing: the first eligible fused provider, else `reference`."""
    found = eligible(device, dtype, variants)
    return found[0] if found else _reference(device, dtype, variants)


def _reference(device, dtype, variants: frozenset[str]) -> str:
    if not variants <= backends.PROVIDERS["reference"].variants:
        raise RuntimeError(f"no xception_fast backend computes a unit with {sorted(variants)} on {device} tensors "
                           f"of {dtype}")
    return "reference"


def runs_reference(device: torch.device, dtype: torch.dtype, pre_relu: bool, post_relu: bool, residual: bool,
                   backend: str = "auto") -> bool:
    """True when `backend` means `auto` and no fused provider is eligible for these tensors: the
    unit then runs as the plain modules would (`xception_fast.functional`)."""
    if backends.requested_backend(backend) != "auto":
        return False
    variants = frozenset(n for n, on in (("pre_relu", pre_relu), ("post_relu", post_relu), ("residual", residual))
                         if on)
    if torch.compiler.is_compiling():
        # Traced, decide from the registry alone (no availability probe, no self-check): where a
        # fused provider might run, the graph holds the op, which decides when it runs.
        return not backends.auto_candidates(device, dtype, variants, probe=False)
    return not eligible(device, dtype, variants)


def bucket(n: int) -> int:
    """The batch size's bucket: the next power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


# Every provider function's parameter names: those of the reference's signatures (the contract).
_PARAMETERS = {op: tuple(inspect.signature(getattr(reference, op)).parameters) for op in backends.PROVIDER_FUNCTIONS}


def _named(op: str, args: tuple) -> dict:
    return dict(zip(_PARAMETERS[op], args))


def signature(op: str, args: tuple) -> tuple:
    """The call signature `auto` decides per: everything but the values, the batch bucketed."""
    parts: list = [op]
    for name, value in _named(op, args).items():
        if isinstance(value, torch.Tensor):
            shape = list(value.shape)
            if name in _BATCHED and shape:
                shape[0] = bucket(shape[0])
            parts.append((name, tuple(shape), str(value.dtype).replace("torch.", ""), str(value.device)))
        elif isinstance(value, (list, tuple)):
            parts.append((name, tuple(value)))
        else:
            parts.append((name, value))
    return tuple(parts)


def _variants(named: dict) -> frozenset[str]:
    spec = named.get("spec")
    if spec is not None:
        return spec.variants()
    return frozenset({"post_relu"} if named.get("post_relu") else ())  # bn_backward_reduce


def _function(name: str, op: str):
    return getattr(backends.PROVIDERS[name].load(), op)


def measure(fn, device: torch.device) -> float:
    """Median milliseconds of `fn()` on `device` (`triton.testing.do_bench` on a GPU), after one
    untimed call (compilation, cuDNN's own autotuning). Short: this runs inside the user's first step."""
    from xception_fast.bench.timing import TimingConfig, time_fn

    fn()
    return time_fn(fn, device, TimingConfig(warmup_ms=5.0, rep_ms=25.0)).median_ms


def _time(op: str, names: list[str], args: tuple, device: torch.device) -> str:
    """The fastest of `names` on these inputs (a provider that raises drops out, reported once)."""
    best, best_ms = "reference", float("inf")
    for name in names:
        fn = _function(name, op)
        try:
            ms = measure(lambda: fn(*args), device)
        except Exception as exc:  # noqa: BLE001 (a verified provider may still reject a shape)
            warnings.warn(f"xception_fast: auto passed over the {name} provider for {op}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", RuntimeWarning, stacklevel=4)
            continue
        if ms < best_ms:
            best, best_ms = name, ms
    return best


def _disk_file(device: torch.device) -> Path:
    st = {**verify.device_description(device), "torch": torch.__version__, "triton": verify._triton_version(),
          "kernels": {name: verify.kernel_hash(name) for name in backends.provider_names(fused_only=True)}}
    key = hashlib.sha256(json.dumps(st, sort_keys=True).encode()).hexdigest()[:20]
    return verify.cache_dir() / "autotune" / f"{key}.json"


def _disk_decisions(device: torch.device) -> dict[str, str]:
    if os.environ.get(DISK_CACHE_ENV_VAR, "0") in ("", "0"):
        return {}
    device = verify.normalize_device(device)
    if str(device) not in _on_disk:
        data = verify.read_json(_disk_file(device)) or {}
        _on_disk[str(device)] = {k: v for k, v in data.items() if isinstance(v, str)}
    return _on_disk[str(device)]


def _save(device: torch.device, key: tuple, name: str) -> None:
    if os.environ.get(DISK_CACHE_ENV_VAR, "0") in ("", "0"):
        return
    device = verify.normalize_device(device)
    path = _disk_file(device)
    data = verify.read_json(path) or {}  # another process's decisions too
    data[repr(key)] = name
    _on_disk.setdefault(str(device), {})[repr(key)] = name
    verify.write_json_atomic(path, data)


def choose(op: str, args: tuple) -> str:
    """The provider `auto` runs for this call (timing the candidates the first time it meets its
    signature, when allowed)."""
    named = _named(op, args)
    anchor = named.get("x", named.get("z"))
    device, dtype = anchor.device, anchor.dtype
    variants = _variants(named)
    candidates = eligible(device, dtype, variants)
    if not candidates:
        return _reference(device, dtype, variants)
    if not autotune_enabled():
        return candidates[0]
    key = signature(op, args)
    decided = _decisions.get(key)
    if decided is not None:
        return decided
    stored = _disk_decisions(device).get(repr(key))
    if stored in candidates + ["reference"]:  # a provider since failed or gone is not reused
        _decisions[key] = stored
        return stored
    if verify.no_checks_now():
        return "reference"
    with _lock:
        decided = _decisions.get(key)
        if decided is None:
            decided = _decisions[key] = _time(op, candidates + ["reference"], args, device)
            _save(device, key, decided)
    return decided


def call(op: str, backend: str, *args):
    """Run provider function `op` (one of `backends.PROVIDER_FUNCTIONS`) with the arguments of its
    `reference` signature, on the provider `backend` selects."""
    requested = backends.requested_backend(backend)
    if requested == "auto":
        name = choose(op, args)
    else:
        named = _named(op, args)
        anchor = named.get("x", named.get("z"))
        name = backends.resolve(requested, anchor.device, anchor.dtype, _variants(named))
        verify.explicit_request(name, anchor.device, anchor.dtype)
    return _function(name, op)(*args)


def decisions() -> dict[tuple, str]:
    """This process's decisions: call signature -> provider."""
    return dict(_decisions)


def clear() -> None:
    """Forget this process's decisions (the next call of each signature is timed again, unless the
    disk cache has it)."""
    with _lock:
        _decisions.clear()
        _on_disk.clear()
