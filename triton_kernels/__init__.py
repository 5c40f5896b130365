"""Triton kernels of xception_fast, installed as xception_fast.triton_kernels.

The `triton` provider: the functions of `xception_fast.reference` (five, and four of the mid variant),
with its signatures, semantics, output dtypes and strides, run as fused Triton kernels on CUDA tensors
(or on CPU tensors under the interpreter, TRITON_INTERPRET=1, set before triton is imported).

- depthwise_pointwise.py: the forward: the depthwise kernel, then the pointwise GEMM kernels with their epilogues.
- batchnorm.py: statistics merge, normalisation, the dy reductions, deterministic partial sums.
- backward.py: pointwise and depthwise gradients (the two pointwise products in cuBLAS; the depthwise
  output recomputed and stored once by the depthwise weight-gradient kernel, for grad_pw).
- mid_unit.py, mid_act.py: the mid variant (dw -> BN -> act -> pw -> BN; `xception_fast.mid_ops`).
- autotune.py: configs per kernel (one pinned config under the interpreter).
"""

from .backward import sepconv_bn_infer_backward, sepconv_bn_train_backward
from .batchnorm import bn_backward_reduce
from .depthwise_pointwise import sepconv_bn_infer, sepconv_bn_train
from .mid_unit import sepconv_mid_infer, sepconv_mid_infer_backward, sepconv_mid_train, sepconv_mid_train_backward

__all__ = [
    "bn_backward_reduce",
    "sepconv_bn_infer",
    "sepconv_bn_infer_backward",
    "sepconv_bn_train",
    "sepconv_bn_train_backward",
    "sepconv_mid_infer",
    "sepconv_mid_infer_backward",
    "sepconv_mid_train",
    "sepconv_mid_train_backward",
]
