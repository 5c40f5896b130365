"""A small forward/backward workload of the fused units for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python -m xception_fast.bench.sanitize --backend cuda

Runs `SeparableConvBN2d` with the given provider in inference (eval, forward + backward through the
folded BatchNorm) and training (batch statistics, forward + backward), with and without the ReLUs
and the residual, in float32/float16/bfloat16, on shapes chosen to leave partial tiles everywhere
(odd spatial sizes, channel counts that are not multiples of 16 or 64, batch 1 and 3, a strided and
a dilated case) and small enough that the sanitizer finishes in minutes. Without the caching
allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1) every tensor is its own allocation, so out-of-bounds
accesses land outside it and memcheck sees them. Outputs are checked to be finite and close to the
reference provider, so the run also fails on garbage results.
"""

from __future__ import annotations

import argparse
import sys

import torch

from xception_fast import backends

# (N, C, Cout, H, W, stride, dilation, pre_relu, post_relu, residual)
CASES = [
    (1, 24, 40, 13, 11, 1, 1, True, False, False),
    (3, 72, 136, 19, 19, 1, 1, True, False, True),
    (2, 40, 24, 10, 10, 1, 1, False, True, False),
    (2, 33, 65, 17, 9, 2, 1, True, False, False),
    (1, 16, 16, 12, 12, 1, 2, True, True, False),
]
TOLERANCE = {torch.float32: 2e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def _run_unit(backend: str, case, dtype: torch.dtype, training: bool, device) -> dict:
    from xception_fast import SeparableConvBN2d
    from xception_fast.testing import randomize_batchnorm_

    n, c, cout, h, w, stride, dilation, pre, post, res = case
    torch.manual_seed(0)
    module = SeparableConvBN2d(c, cout, 3, stride, None if stride == 1 else 1, dilation, pre_relu=pre,
                               post_relu=post, backend=backend).to(device=device, dtype=dtype)
    randomize_batchnorm_(module).train(training)
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ho, wo = module.spec.output_hw(h, w)
    residual = torch.randn(n, cout, ho, wo, device=device, dtype=dtype) if res else None
    y = module(x, residual)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.cuda.synchronize()
    return {"y": y.detach().float(), "x": x.grad.detach().float(), "dw": module.depthwise.weight.grad.float(),
            "pw": module.pointwise.weight.grad.float()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=backends.provider_names())
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"])
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with the reference provider")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to sanitize", file=sys.stderr)
        return 2
    from xception_fast.bench.common import torch_dtype

    device = torch.device("cuda")
    failures = 0
    for dtype in (torch_dtype(d) for d in args.dtypes):
        for case in CASES:
            for training in (False, True):
                what = f"{args.backend} {dtype} {'train' if training else 'infer'} {case}"
                got = _run_unit(args.backend, case, dtype, training, device)
                bad = [k for k, v in got.items() if not torch.isfinite(v).all()]
                if not bad and not args.no_compare and args.backend != "reference":
                    want = _run_unit("reference", case, dtype, training, device)
                    for k in got:
                        scale = want[k].abs().max().clamp_min(1.0)
                        if (got[k] - want[k]).abs().max() > TOLERANCE[dtype] * scale:
                            bad.append(k)
                if bad:
                    failures += 1
                    print(f"MISMATCH {what}: {bad}", flush=True)
                else:
                    print(f"ok {what}", flush=True)
    print(f"{failures} failing cases", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
