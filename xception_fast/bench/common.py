"""Shared pieces of the benchmark suite: devices, dtypes, competitors, inputs and run settings."""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Optional, Sequence

import torch

from xception_fast import backends

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
                  "f32": "fp32", "f16": "fp16"}
MODES = ("infer", "train")

# Fused providers of xception_fast (see xception_fast.backends), then the plain-PyTorch competitors.
FUSED_PROVIDERS = backends.provider_names()
EAGER = "eager"      # plain nn.Conv2d/BatchNorm2d modules, channels_last, cudnn.benchmark=True
COMPILE = "compile"  # the same plain modules under torch.compile(mode=<compile_mode>)
LAYER_PROVIDERS = FUSED_PROVIDERS + (EAGER, COMPILE)

NO_GPU_REASON = "no CUDA GPU here (torch.cuda.is_available() is False): GPU rows run on a machine with one"
CPU_COMPILE_REASON = ("torch.compile rows run on a GPU only: the CPU smoke skips them so the suite stays fast "
                      "and needs no C++ compiler")

ENV_PREFIX = "XCEPTION_FAST_BENCH_"


@dataclass(frozen=True)
class BenchCase:
    """What every benchmark row is run for (layers and models add what they time)."""

    kind: ClassVar[str]  # "layer" or "model"
    provider: str
    mode: str
    dtype: str
    batch: int

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def id(self) -> str:
        return f"{self.name}-{self.mode}-{self.dtype}-b{self.batch}-{self.provider}"

    def describe(self) -> str:
        return f"{self.kind} {self.name} {self.mode} {self.dtype} b{self.batch} {self.provider}"

    def row_fields(self) -> dict:
        return {}

    def base_row(self, device) -> dict:
        """The row's description, before anything is measured."""
        return {"kind": self.kind, "name": self.name, "provider": self.provider, "mode": self.mode,
                "dtype": self.dtype, "batch": self.batch, "device": str(torch.device(device).type),
                **self.row_fields()}


def dtype_name(dtype) -> str:
    """Canonical short name ("bf16", "fp16", "fp32") of a dtype or a name for one."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"benchmarks run bf16, fp16 or fp32, not {dtype}")
    name = str(dtype).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or bfloat16/float16/float32), got {dtype!r}")
    return name


def torch_dtype(name) -> torch.dtype:
    return DTYPES[dtype_name(name)]


def element_size(dtype) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def fused_provider_status(name: str, device) -> tuple[bool, str]:
    """(available, reason) of an xception_fast provider on `device`, never raising: a provider
    that fails its own availability check is reported as unavailable with the error."""
    try:
        found = backends.availability(name, torch.device(device))
    except Exception as exc:  # a provider still being written must not take the suite down
        return False, f"availability check failed: {type(exc).__name__}: {exc}"
    return bool(found.available), str(found.reason)


def compile_status(device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, CPU_COMPILE_REASON
    try:
        from torch.utils._triton import has_triton
        ok = has_triton()
    except Exception as exc:  # noqa: BLE001
        return False, f"cannot tell whether torch.compile can run: {exc}"
    if not ok:
        return False, "torch.compile's GPU code generation needs triton, which is not installed"
    return True, "torch.compile"


def provider_status(provider: str, device, compile_mode: str = "max-autotune") -> tuple[bool, str]:
    """(available, reason) for any competitor name: a fused provider, "eager" or "compile"."""
    if provider in backends.PROVIDERS and backends.PROVIDERS[provider].fused and torch.device(device).type == "cpu":
        # On the CPU a fused provider runs, if at all, for tests (Triton's interpreter): not a benchmark.
        return False, f"the {provider} provider is benchmarked on GPUs only"
    if provider in FUSED_PROVIDERS:
        return fused_provider_status(provider, device)
    if provider == EAGER:
        return True, "plain PyTorch modules"
    if provider == COMPILE:
        if compile_mode == "none":
            return False, "compile rows disabled (compile mode 'none')"
        return compile_status(device)
    raise ValueError(f"unknown provider {provider!r}; expected one of {LAYER_PROVIDERS}")


def random_tensor(shape: Sequence[int], dtype, device, channels_last: bool = False,
                  requires_grad: bool = False) -> torch.Tensor:
    """Standard normal values with no exact zeros, so no kernel can take a shortcut on them."""
    t = torch.randn(tuple(shape), dtype=torch_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype,
                    device=device)
    t = torch.where(t == 0, torch.ones_like(t), t)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def configure_torch(device) -> dict:
    """Set the flags every competitor runs under (cuDNN autotuning on) and return them for the record."""
    flags = {}
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        flags["cudnn_benchmark"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flags["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    flags["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    flags["memory_format"] = "channels_last"
    return flags


def _env_list(name: str) -> Optional[list[str]]:
    value = os.environ.get(ENV_PREFIX + name, "").strip()
    if not value:
        return None
    return [v.strip() for v in value.replace(" ", ",").split(",") if v.strip()]


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(ENV_PREFIX + name, "").strip()
    return int(value) if value else None


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run covers. `for_device` gives the defaults: the full grid of the issue
    (bf16; models at batch 1, 32 and 256; layers at batch 256; 299x299) on a GPU, a seconds-long
    smoke (fp32, small batch and images) on the CPU."""

    device: str
    modes: tuple[str, ...] = MODES
    dtypes: tuple[str, ...] = ("bf16",)
    batches: tuple[int, ...] = (1, 32, 256)   # model batch sizes
    layer_batch: int = 256
    image_size: int = 299                     # model input size
    layer_image_size: int = 299               # the input size the layer shapes are derived at
    models: Optional[tuple[str, ...]] = None  # None: every model
    providers: Optional[tuple[str, ...]] = None  # None: every provider
    shapes: Optional[tuple[str, ...]] = None  # slug substrings; None: every distinct shape
    compile_mode: str = "max-autotune"        # "none" drops the compile rows
    run_layers: bool = True
    run_models: bool = True
    timing: str = "full"                      # "full" or "quick" (fewer repetitions)
    cpu_threads: int = 1                      # torch threads for CPU rows (a smoke: 1 is steady on shared cores)

    @classmethod
    def for_device(cls, device=None, **overrides) -> "BenchSettings":
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cuda":
            base = cls(device="cuda")
        else:
            # Seconds, not minutes: fp32, batch 2 at 75x75 (the smallest input Inception V3 and
            # Xception both take; batch 2 so BatchNorm sees more than one value), layers at batch 1
            # with the shapes of a 71x71 input. Compile rows are listed and skip with a reason.
            base = cls(device=str(device), dtypes=("fp32",), batches=(2,), layer_batch=1, image_size=75,
                       layer_image_size=71, timing="quick")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **overrides)

    @classmethod
    def cpu_smoke(cls) -> "BenchSettings":
        """The pytest CPU smoke: four representative unit shapes (no ReLU first, the largest
        entry-flow growth, residual, ReLU after), reference and eager, and the three models."""
        return cls.for_device("cpu", shapes=("entry-64x128", "entry-256x728", "middle-728x728-5-res",
                                             "exit-1024x1536"), providers=("reference", EAGER))

    @classmethod
    def from_env(cls, device=None) -> "BenchSettings":
        """`for_device` overridden by XCEPTION_FAST_BENCH_{DTYPES,MODES,BATCHES,LAYER_BATCH,IMAGE_SIZE,
        MODELS,PROVIDERS,SHAPES,COMPILE_MODE,TIMING}: comma-separated lists where plural."""
        lists = {name: _env_list(name.upper()) for name in ("dtypes", "modes", "batches", "models", "providers",
                                                            "shapes")}
        overrides = {
            "dtypes": tuple(dtype_name(d) for d in lists["dtypes"]) if lists["dtypes"] else None,
            "modes": tuple(lists["modes"]) if lists["modes"] else None,
            "batches": tuple(int(b) for b in lists["batches"]) if lists["batches"] else None,
            "models": tuple(lists["models"]) if lists["models"] else None,
            "providers": tuple(lists["providers"]) if lists["providers"] else None,
            "shapes": tuple(lists["shapes"]) if lists["shapes"] else None,
            "layer_batch": _env_int("LAYER_BATCH"),
            "image_size": _env_int("IMAGE_SIZE"),
            "compile_mode": os.environ.get(ENV_PREFIX + "COMPILE_MODE") or None,
            "timing": os.environ.get(ENV_PREFIX + "TIMING") or None,
        }
        settings = cls.for_device(device, **overrides)
        settings.validate()
        return settings

    def validate(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes must be among {MODES}, got {bad}")
        for d in self.dtypes:
            dtype_name(d)
        if self.providers:
            bad = [p for p in self.providers if p not in LAYER_PROVIDERS]
            if bad:
                raise ValueError(f"providers must be among {LAYER_PROVIDERS}, got {bad}")
        if self.timing not in ("full", "quick"):
            raise ValueError(f"timing must be 'full' or 'quick', got {self.timing!r}")
        if any(b < 1 for b in self.batches) or self.layer_batch < 1:
            raise ValueError("batch sizes must be >= 1")

    def wants_provider(self, provider: str) -> bool:
        if provider == COMPILE and self.compile_mode == "none":
            return False
        return not self.providers or provider in self.providers

    def as_dict(self) -> dict:
        return asdict(self)
