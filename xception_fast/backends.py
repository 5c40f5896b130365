"""Which kernel provider runs an op: the registry, `auto`, and the global selection.

`PROVIDERS` is the registry: each `Provider` names the module implementing the same five functions
(see `PROVIDER_FUNCTIONS`), its availability, dtypes and unit variants; every other list of
providers in the package is derived from it. Today: ``cuda`` (the compiled extension, csrc/),
``triton`` (triton_kernels/) and ``reference`` (plain PyTorch; on a GPU exactly the cuDNN path).

Precedence when an op runs: an explicit ``backend=`` on the module or call, then the innermost
``use_backend(...)`` context, then the ``XCEPTION_FAST_BACKEND`` environment variable, then
``auto``. ``auto`` considers the fused providers that are available for the tensors' device type
(`Provider.auto_devices`), compute their dtype (float64 goes to ``reference``) and the unit's
variants, and keeps those that passed the self-check on that device (`xception_fast.verify`); per
call signature it then runs whichever of them or ``reference`` measured fastest
(`xception_fast.dispatch`). On the CPU ``auto`` always means ``reference``: the Triton interpreter
(``TRITON_INTERPRET=1``) is a testing tool and runs only when ``triton`` is asked for by name.
An explicit request for a provider that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch

from xception_fast.spec import MID_ACTIVATIONS, mid_name

# What the fused providers compute in (the Triton provider checks against this too); `auto` gives
# any other dtype (float64) to `reference`.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = FUSED_DTYPES + (torch.float64,)
ENV_VAR = "XCEPTION_FAST_BACKEND"

# Every provider module exposes these, with the signatures of `xception_fast.reference`.
PROVIDER_FUNCTIONS = (
    "sepconv_bn_infer",
    "sepconv_bn_infer_backward",
    "sepconv_bn_train",
    "bn_backward_reduce",
    "sepconv_bn_train_backward",
)
# The features of a unit beyond depthwise -> pointwise -> BN (`UnitSpec.variants()`); a provider
# lists those it computes, and `auto` passes over one that lacks a unit's.
BASE_VARIANTS = frozenset({"pre_relu", "post_relu", "residual"})
# A BatchNorm and/or an activation between dw and pw (`UnitSpec.mid`, the `xception_fast.mid_ops` ops);
# a provider listing any of them also exposes these, with the signatures of `xception_fast.reference`.
MID_PROVIDER_FUNCTIONS = (
    "sepconv_mid_infer",
    "sepconv_mid_infer_backward",
    "sepconv_mid_train",
    "sepconv_mid_train_backward",
)
MID_VARIANTS = frozenset(f"mid_{mid_name(norm, act)}" for norm in (False, True) for act in (None, *MID_ACTIVATIONS)
                         if norm or act)


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not, or what runs when available
    verification: str = ""  # the self-check's state on the device (`backend_report` fills it in)


@dataclass(frozen=True)
class Provider:
    """One kernel provider: everything the rest of the package (ops, `auto`, the CLIs, the
    benchmarks, the report, the tests) knows about it. Adding a provider is one entry in
    `PROVIDERS` plus the module named here."""

    name: str
    module: str  # import path of the module exposing PROVIDER_FUNCTIONS
    availability: Callable[[torch.device], Availability]
    dtypes: tuple[torch.dtype, ...] = FUSED_DTYPES
    variants: frozenset[str] = BASE_VARIANTS
    fused: bool = True  # `auto` considers fused providers on CUDA tensors only
    # Environment under which the tests run it on CPU tensors (None: GPU only).
    cpu_test_env: Optional[dict[str, str]] = None
    # Device types on which `auto` considers it (after the self-check has passed there).
    auto_devices: tuple[str, ...] = ("cuda",)
    # The files its kernels come from: their hash is part of the self-check's cache key.
    # Default: the module's source file(s) (the whole folder for a package).
    sources: Optional[Callable[[], list[Path]]] = None

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def source_files(self) -> list[Path]:
        if self.sources is not None:
            return self.sources()
        try:
            spec = importlib.util.find_spec(self.module)
            origin = spec.origin if spec is not None else None
        except (ImportError, ValueError, AttributeError):  # e.g. a module object made in memory
            return []
        if not isinstance(origin, str):
            return []
        if spec.submodule_search_locations:
            folder = Path(origin).parent
            return sorted(p for p in folder.rglob("*") if p.suffix in (".py", ".cu", ".cuh", ".h", ".cpp"))
        return [Path(origin)]


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _reference_availability(device: torch.device) -> Availability:
    return Availability(True, "plain PyTorch (F.conv2d + F.batch_norm math), any device")


@functools.lru_cache(maxsize=None)
def _triton_module() -> tuple[ModuleType | None, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc})"
    try:
        module = importlib.import_module("xception_fast.triton_kernels")
    except ImportError as exc:
        package = Path(__file__).resolve().parent
        if not (package / "triton_kernels").is_dir() and (package.parent / "triton_kernels").is_dir():
            # triton_kernels/ is installed inside the package (setup.py's package_dir), so the source
            # folder alone lacks it: Python imported the checkout instead of the installed package.
            return None, (f"xception_fast was imported from the source checkout {package}, which has no "
                          f"triton_kernels inside: run from outside the checkout, or `pip install -e .`")
        return None, f"xception_fast.triton_kernels failed to import: {exc}"
    return module, f"Triton {triton.__version__}"


def _triton_availability(device: torch.device) -> Availability:
    module, reason = _triton_module()
    if module is None:
        return Availability(False, reason)
    if device.type == "cuda":
        return Availability(True, reason)
    if device.type == "cpu" and _triton_interpreting():
        import triton.language as tl

        # The interpreter replaces triton's functions when triton is first imported: too late now?
        if type(tl.cdiv).__name__ != "InterpretedFunction":
            return Availability(False, "TRITON_INTERPRET=1 was set after triton was imported in this process; "
                                       "set it before the first import")
        return Availability(True, reason + " interpreter (TRITON_INTERPRET=1)")
    return Availability(False, f"runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device.type}")


def _cuda_availability(device: torch.device) -> Availability:
    from xception_fast import _extension

    status = _extension.status()
    if not status.loaded:
        return Availability(False, status.reason)
    if device.type != "cuda":
        return Availability(False, f"runs on CUDA tensors, not {device.type}")
    return Availability(True, f"compiled extension {status.path}")


def _cuda_sources() -> list[Path]:
    # The built extension itself: what runs is the binary, whatever the sources say.
    from xception_fast import _extension

    status = _extension.status()
    return [Path(status.path)] if status.loaded and status.path else []


@contextlib.contextmanager
def poison_env() -> Iterator[None]:
    """XCEPTION_FAST_POISON_OUTPUTS=1 for the block (both providers read it at every call)."""
    from xception_fast.testing import POISON_ENV_VAR

    saved = os.environ.get(POISON_ENV_VAR)
    os.environ[POISON_ENV_VAR] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(POISON_ENV_VAR, None)
        else:
            os.environ[POISON_ENV_VAR] = saved


# In `auto`'s order of preference.
PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("cuda", "xception_fast._extension", _cuda_availability, sources=_cuda_sources),
    Provider("triton", "xception_fast.triton_kernels", _triton_availability, variants=BASE_VARIANTS | MID_VARIANTS,
             cpu_test_env={"TRITON_INTERPRET": "1"}),
    Provider("reference", "xception_fast.reference", _reference_availability, dtypes=ALL_DTYPES,
             variants=BASE_VARIANTS | MID_VARIANTS, fused=False, cpu_test_env={}, auto_devices=()),
)}


def provider_names(fused_only: bool = False) -> tuple[str, ...]:
    """The registered providers, in `auto`'s order of preference."""
    return tuple(name for name, p in PROVIDERS.items() if p.fused or not fused_only)


def _check_name(name: str, what: str) -> str:
    if name != "auto" and name not in PROVIDERS:
        raise ValueError(f"{what} must be 'auto' or one of {provider_names()}, got {name!r}")
    return name


_local = threading.local()


def _context_stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select the provider for ops whose own ``backend`` is ``"auto"``, within this block."""
    stack = _context_stack()
    stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        stack.pop()


def requested_backend(backend: str = "auto") -> str:
    """The provider name asked for, after applying the context and environment defaults."""
    _check_name(backend, "backend")
    if backend != "auto":
        return backend
    stack = _context_stack()
    if stack and stack[-1] != "auto":
        return stack[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")


def availability(name: str, device: torch.device | str) -> Availability:
    return PROVIDERS[_check_name(name, "backend")].availability(torch.device(device))


def resolve(backend: str, device: torch.device | str, dtype: torch.dtype | None = None,
            variants: frozenset[str] = frozenset()) -> str:
    """The provider that will run for tensors on `device` (of `dtype`, for a unit using `variants`,
    when given); raises if an explicit one can't run on that device. An explicit provider given a
    dtype it does not compute in raises its own error when called. For `auto` this is its choice
    before any timing: the first fused provider verified on the device (`dispatch.preferred`),
    else `reference`."""
    device = torch.device(device)
    name = requested_backend(backend)
    if name == "auto":
        from xception_fast import dispatch

        return dispatch.preferred(device, dtype, variants)
    found = availability(name, device)
    if not found.available:
        raise RuntimeError(f"xception_fast backend {name!r} is not available for {device} tensors: {found.reason}")
    missing = variants - PROVIDERS[name].variants
    if missing:
        able = [p.name for p in PROVIDERS.values() if variants <= p.variants]
        raise NotImplementedError(f"xception_fast backend {name!r} does not compute the unit variant(s) "
                                  f"{sorted(missing)}; {able} do (backend='auto' picks one)")
    return name


def provider(backend: str, device: torch.device | str, dtype: torch.dtype | None = None,
             variants: frozenset[str] = frozenset()):
    """The module `resolve` picks (for ops outside `dispatch`'s per-signature timing: the mid-variant
    ops, which `reference` and `triton` compute; `cuda` does not list the variants, so `auto` passes
    over it and naming it is an error that says which providers do)."""
    return PROVIDERS[resolve(backend, device, dtype, variants)].load()


def auto_candidates(device: torch.device | str, dtype: torch.dtype | None = None,
                    variants: frozenset[str] = frozenset(), probe: bool = True) -> list[str]:
    """The fused providers `auto` may consider for these tensors, in registry order, before the
    self-check: available on the device (not asked when `probe` is False), computing `dtype` and
    `variants`."""
    device = torch.device(device)
    return [p.name for p in PROVIDERS.values()
            if p.fused and device.type in p.auto_devices and (dtype is None or dtype in p.dtypes)
            and variants <= p.variants and (not probe or p.availability(device).available)]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Providers that can run on `device` (default: CUDA when a GPU is present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in PROVIDERS if availability(name, device).available]


def backend_report(device: torch.device | str | None = None) -> dict[str, Availability]:
    """Every provider with whether it runs on `device` and why (not), and its verification state
    there (read from the self-check's cache; nothing is run)."""
    from xception_fast import verify

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: replace(availability(name, device), verification=verify.describe(name, device))
            for name in PROVIDERS}
