"""Per-kernel GPU times of one layer row, and the Triton autotuner's picks, for setting the static
model's estimates beside measurements kernel by kernel.

    python -m xception_fast.bench.kernel_times --shapes middle-728x728-19-res --providers triton cuda \\
        --out kernel_times.json

Each (shape, provider, mode) row is prepared as the layer benchmark prepares it (`prepare_layer`),
warmed up (which runs the autotuner), then run `--reps` times under `torch.profiler`; every CUDA
kernel's device time is summed and divided by the repetitions. The autotuner's choices are read from
every `triton.autotune` kernel of the package after the rows ran: tuning key -> config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from xception_fast.bench.common import FUSED_PROVIDERS
from xception_fast.bench.layers import LayerCase, prepare_layer
from xception_fast.bench.shapes import select_shapes, unit_shapes


def kernel_times(case: LayerCase, reps: int, device) -> dict[str, dict]:
    """{kernel name: {"calls": per repetition, "us": device microseconds per repetition}}."""
    prepared = prepare_layer(case, device)
    for _ in range(3):
        prepared.fn()
        for t in prepared.grad_to_none:
            t.grad = None
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            prepared.fn()
            for t in prepared.grad_to_none:
                t.grad = None
        torch.cuda.synchronize()
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name]
            entry[0] += 1
            entry[1] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    return {name: {"calls": calls / reps, "us": us / reps}
            for name, (calls, us) in sorted(totals.items(), key=lambda item: -item[1][1])}


def autotuner_picks() -> dict[str, dict[str, str]]:
    """{kernel: {tuning key: chosen config}} for every autotuned Triton kernel that ran."""
    try:
        from triton.runtime.autotuner import Autotuner

        from xception_fast import triton_kernels
    except ImportError:
        return {}
    picks = {}
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(triton_kernels.__name__):
            continue
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner) and obj.cache:
                picks[f"{module_name.rsplit('.', 1)[-1]}.{name}"] = {str(k): str(v) for k, v in obj.cache.items()}
    return picks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", required=True, help="layer slugs (substrings), as the benchmark takes")
    p.add_argument("--providers", nargs="+", default=list(FUSED_PROVIDERS), choices=list(FUSED_PROVIDERS) + ["eager"])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: kernel times need one", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    rows = []
    for shape in select_shapes(unit_shapes(args.image_size), tuple(args.shapes)):
        for provider in args.providers:
            for mode in args.modes:
                case = LayerCase(provider=provider, mode=mode, dtype=args.dtype, batch=args.batch, shape=shape)
                row = {"shape": shape.label, "provider": provider, "mode": mode, "dtype": args.dtype,
                       "batch": args.batch}
                try:
                    row["kernels"] = kernel_times(case, args.reps, device)
                    row["total_us"] = sum(k["us"] for k in row["kernels"].values())
                except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
                for name, k in list(row.get("kernels", {}).items())[:12]:
                    print(f"    {k['us']:9.1f} us  x{k['calls']:<4g} {name[:110]}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "rows": rows, "autotuner_picks": autotuner_picks()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
