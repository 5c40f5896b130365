"""xception_fast: Xception's depthwise + pointwise + BatchNorm units fused into single GPU kernels."""

import pathlib as _pathlib

# Installed, `triton_kernels/` lives inside this package (setup.py's package_dir); in a source
# checkout it sits beside it. Let `xception_fast.triton_kernels` resolve in both.
_here = _pathlib.Path(__file__).resolve().parent
if not (_here / "triton_kernels").is_dir() and (_here.parent / "triton_kernels" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (module attribute of a package)

from xception_fast import ops  # noqa: E402  (registers the torch.ops.xception_fast ops)
from xception_fast.backends import available_backends, backend_report, use_backend  # noqa: E402
from xception_fast.convert import load_timm_weights, to_timm_state_dict  # noqa: E402
from xception_fast.functional import separable_conv, separable_conv_bn  # noqa: E402
from xception_fast.fuse import FuseReport, fuse_model  # noqa: E402
from xception_fast.keras_weights import load_keras_weights, save_keras_weights, to_keras_weights  # noqa: E402
from xception_fast.models.xception import Xception, xception  # noqa: E402
from xception_fast.nn import SeparableConv2d, SeparableConvBN2d  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SeparableConv2d",
    "SeparableConvBN2d",
    "FuseReport",
    "Xception",
    "available_backends",
    "backend_report",
    "fuse_model",
    "load_keras_weights",
    "load_timm_weights",
    "ops",
    "save_keras_weights",
    "separable_conv",
    "separable_conv_bn",
    "to_keras_weights",
    "to_timm_state_dict",
    "use_backend",
    "xception",
]
