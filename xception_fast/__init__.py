"""xception_fast: Xception's depthwise + pointwise + BatchNorm units fused into single GPU kernels."""

from xception_fast import ops  # noqa: F401  (registers the torch.ops.xception_fast ops)
from xception_fast.backends import available_backends, backend_report, use_backend
from xception_fast.convert import load_timm_weights, to_timm_state_dict
from xception_fast.functional import separable_conv, separable_conv_bn
from xception_fast.fuse import FuseReport, fuse_model
from xception_fast.keras_weights import load_keras_weights, save_keras_weights, to_keras_weights
from xception_fast.models.xception import Xception, xception
from xception_fast.models.xception_aligned import XceptionAligned, xception41, xception65, xception71
from xception_fast.nn import SeparableConv2d, SeparableConvBN2d

__version__ = "0.1.0"

__all__ = [
    "SeparableConv2d",
    "SeparableConvBN2d",
    "FuseReport",
    "Xception",
    "XceptionAligned",
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
    "xception41",
    "xception65",
    "xception71",
]
