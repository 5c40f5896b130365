"""Model benchmarks: images/s of whole networks at 299x299, inference and a full training step.

Rows (model, provider):
- ``xception_fast`` with each fused provider (``cuda``, ``triton``, ``reference``): our Xception,
  `xception_fast.xception(backend=...)`. With ``reference`` on a GPU its units are eager cuDNN calls
  behind the custom-op boundary: a second eager row.
- ``legacy_xception`` ``eager`` / ``compile``: timm's Xception, the same architecture with plain
  PyTorch layers (22,855,952 parameters), eager and under ``torch.compile(mode=compile_mode)``.
- ``inception_v3`` ``eager`` / ``compile``: torchvision's Inception V3 (no auxiliary classifier,
  23.8M parameters; the paper's comparison), eager and compiled.
- ``xception65_fast`` with each provider that computes the mid variant (``triton``, ``reference``; the
  ``cuda`` provider declines it): the aligned Xception65 of DeepLab v3+,
  `xception_fast.models.xception_aligned.xception65(backend=...)`, whose units are
  ``dw -> BN [-> ReLU] -> pw -> BN``; ``xception65`` ``eager`` / ``compile``: timm's `xception65`, the
  same network in plain layers (39.9M parameters). Its speed-ups are taken against timm's eager row.
Every model runs in the row's dtype (parameters and activations; no autocast) and channels_last,
with cudnn.benchmark on. Inference: eval mode under `torch.inference_mode`. Training step: forward,
cross-entropy on random labels, backward, SGD (momentum 0.9) step, `zero_grad(set_to_none=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from xception_fast import backends
from xception_fast.bench.common import (COMPILE, EAGER, FUSED_PROVIDERS, BenchCase, BenchSettings, provider_status,
                                        random_tensor, torch_dtype)
from xception_fast.testing import randomize_batchnorm_

# The providers that compute the aligned Xception's unit (the mid variant), from the registry.
MID_PROVIDERS = tuple(p for p in FUSED_PROVIDERS if backends.MID_VARIANTS <= backends.PROVIDERS[p].variants)
MODEL_PROVIDERS: dict[str, tuple[str, ...]] = {
    "xception_fast": FUSED_PROVIDERS,
    "legacy_xception": (EAGER, COMPILE),
    "inception_v3": (EAGER, COMPILE),
    "xception65_fast": MID_PROVIDERS,
    "xception65": (EAGER, COMPILE),
}
MODELS = tuple(MODEL_PROVIDERS)
BASELINE = ("legacy_xception", EAGER)  # speed-ups in the report are taken against this row
# ... except for the aligned Xception65, compared with timm's own eager run of it.
BASELINES = {"xception65_fast": ("xception65", EAGER), "xception65": ("xception65", EAGER)}
NUM_CLASSES = 1000


@dataclass(frozen=True)
class ModelCase(BenchCase):
    kind: ClassVar[str] = "model"
    model: str
    image_size: int = 299

    @property
    def name(self) -> str:
        return self.model

    def row_fields(self) -> dict:
        return {"image_size": self.image_size}


def model_cases(settings: BenchSettings) -> list[ModelCase]:
    models = settings.models or MODELS
    unknown = [m for m in models if m not in MODEL_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {MODELS}")
    return [ModelCase(provider, mode, dtype, batch, model, settings.image_size)
            for dtype in settings.dtypes for mode in settings.modes for batch in settings.batches
            for model in MODELS if model in models
            for provider in MODEL_PROVIDERS[model] if settings.wants_provider(provider)]


def model_skip_reason(case: ModelCase, device, compile_mode: str) -> Optional[str]:
    ok, reason = provider_status(case.provider, device, compile_mode)
    if not ok:
        return f"{case.provider}: {reason}"
    try:
        if case.model in ("legacy_xception", "xception65"):
            import timm

            if not timm.is_model(case.model):
                return f"timm {timm.__version__} has no {case.model} model"
        elif case.model == "inception_v3":
            import torchvision  # noqa: F401
    except ImportError as exc:
        return f"{case.model} needs a package that is not installed: {exc}"
    return None


def build_model(name: str, provider: str) -> nn.Module:
    """The network on the CPU in float32, randomly initialised (no weights are downloaded)."""
    if name == "xception_fast":
        from xception_fast.models.xception import xception

        return xception(num_classes=NUM_CLASSES, backend=provider)
    if name == "xception65_fast":
        from xception_fast.models.xception_aligned import xception65

        return xception65(num_classes=NUM_CLASSES, backend=provider)
    if name in ("legacy_xception", "xception65"):
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    if name == "inception_v3":
        import torchvision

        return torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                               num_classes=NUM_CLASSES)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


@dataclass
class PreparedModel:
    fn: Callable[[], object]
    model: nn.Module
    parameters: int
    compiled: bool


def prepare_model(case: ModelCase, device, compile_mode: str = "max-autotune") -> PreparedModel:
    """Build the model, its inputs (and optimizer) on `device`; `fn()` runs one inference or step."""
    device = torch.device(device)
    dtype = torch_dtype(case.dtype)
    model = build_model(case.model, case.provider)
    randomize_batchnorm_(model)
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    training = case.mode == "train"
    model.train(training)
    x = random_tensor((case.batch, 3, case.image_size, case.image_size), dtype, device, channels_last=True)
    compiled = case.provider == COMPILE
    call = torch.compile(model, mode=compile_mode) if compiled else model
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if compiled and device.type == "cuda" \
        else None

    if not training:
        def fn():
            if mark_step is not None:
                mark_step()
            with torch.inference_mode():
                return call(x)
        return PreparedModel(fn, model, n_params, compiled)

    target = torch.randint(0, NUM_CLASSES, (case.batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def fn():
        if mark_step is not None:
            mark_step()
        loss = F.cross_entropy(call(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return PreparedModel(fn, model, n_params, compiled)
