"""`python -m xception_fast verify`: run the self-check of the fused providers on this machine's
device, record it (the stamp `auto` reads), time each passing provider and `reference` on
Xception's layer shapes, and print it all, ending with a Markdown block for a bug report.

Exit status: 0 when every provider checked passed, 1 when one failed or a provider asked for by
name cannot run on the device."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

import xception_fast
from xception_fast import backends, verify
from xception_fast.spec import UnitSpec

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xception_fast verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when a GPU is present, else cpu")
    p.add_argument("--providers", nargs="+", choices=backends.provider_names(fused_only=True), default=None,
                   help="default: every fused provider available on the device")
    p.add_argument("--dtypes", nargs="+", choices=tuple(_DTYPES), default=None,
                   help="default: every dtype the provider computes in")
    p.add_argument("--full", action="store_true", help="the full conformance set of shapes (slower)")
    p.add_argument("--no-time", action="store_true", help="skip the timing on Xception's layer shapes")
    p.add_argument("--batch", type=int, default=None, help="timing batch (default 32 on a GPU, 1 on the CPU)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size the layer shapes derive from (default 299 on a GPU, 71 on the CPU)")
    return p


def _status(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def check_rows(results: list[verify.Result]) -> list[list[str]]:
    """provider | dtype | op | worst output (case) | error | allowed | status."""
    rows = []
    for r in results:
        worst = r.worst()
        for op in verify.OPS:
            c = worst.get(op)
            if c is None:
                rows.append([r.provider, r.dtype, op, "-", "-", "-", "FAIL" if not r.passed else "-"])
                continue
            rows.append([r.provider, r.dtype, op, f"{c.output} ({c.case})", f"{c.error:.2e}", f"{c.allowed:.2e}",
                         _status(c.passed)])
    return rows


def _time_layers(names: list[str], device: torch.device, dtype: torch.dtype, batch: int,
                 image_size: int) -> tuple[list[str], list[list[str]]]:
    """Inference forward time (ms, median) of each provider on each distinct Xception unit shape."""
    from xception_fast.bench.shapes import unit_shapes
    from xception_fast.bench.timing import config_for, time_fn

    config = config_for("layer", device, "quick")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in unit_shapes(image_size):
        c, co, k = shape.in_channels, shape.out_channels, shape.kernel_size

        def make(*size):
            return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

        x = make(batch, c, shape.height, shape.width).contiguous(memory_format=torch.channels_last)
        args = (x, make(c, 1, k, k) / k, make(co, c, 1, 1) / c ** 0.5, make(co).float().abs() + 0.5,
                make(co).float(), make(batch, co, shape.out_height, shape.out_width).contiguous(
                    memory_format=torch.channels_last) if shape.residual else None,
                UnitSpec((k, k), (shape.stride,) * 2, (shape.padding,) * 2, (shape.dilation,) * 2, shape.pre_relu,
                         shape.post_relu, shape.residual))
        row = [shape.label]
        for name in names:
            fn = backends.PROVIDERS[name].load().sepconv_bn_infer
            try:
                row.append(f"{time_fn(lambda: fn(*args), device, config).median_ms:.3f}")
            except Exception as exc:  # noqa: BLE001 (reported in the table, not fatal)
                row.append(f"error: {type(exc).__name__}")
        rows.append(row)
    return ["unit (inference forward)"] + [f"{n} ms" for n in names], rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*header), line.format(*["-" * w for w in widths])]
                     + [line.format(*r) for r in rows])


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    device = verify.normalize_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.providers or [n for n in backends.provider_names(fused_only=True)
                               if backends.availability(n, device).available]
    failed = False
    results: list[verify.Result] = []
    notes: list[str] = [] if names else [f"no fused provider is available on {device}"]
    stamps: dict[str, dict] = {}
    for name in names:
        found = backends.availability(name, device)
        if not found.available:
            notes.append(f"{name}: not available on {device}: {found.reason}")
            failed = failed or args.providers is not None
            continue
        entry = backends.PROVIDERS[name]
        for dtype in [_DTYPES[d] for d in args.dtypes] if args.dtypes else entry.dtypes:
            if dtype not in entry.dtypes:
                notes.append(f"{name}: does not compute {verify.DTYPE_NAMES[dtype]}")
                continue
            result = verify.run_and_record(name, device, dtype, full=args.full)
            results.append(result)
            stamps[f"{name} {result.dtype}"] = verify.stamp(name, device, dtype)
            failed = failed or not result.passed
            print(f"{name} {result.dtype}: {_status(result.passed)} in {result.seconds:.1f} s"
                  + (f" ({result.failure})" if result.failure else ""), flush=True)
    header = ["provider", "dtype", "op", "worst output (case)", "error", "allowed", "status"]
    rows = check_rows(results)
    label = verify.device_label(device)
    print(f"\nself-check on {label} ({'full' if args.full else 'quick'} set, errors against the float64 "
          f"reference; allowed = 2x the reference provider's own error + the dtype's floor)")
    print(_text_table(header, rows) if rows else "no provider was checked")
    for note in notes:
        print(note)

    timing = None
    if not args.no_time:
        # Only providers that passed in the timing dtype; interpreted kernels say nothing about
        # speed, so on the CPU only `reference` is timed.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        timed = [r.provider for r in results
                 if r.passed and r.dtype == verify.DTYPE_NAMES[dtype] and device.type == "cuda"]
        timed = list(dict.fromkeys(timed)) + ["reference"]
        batch = args.batch or (32 if device.type == "cuda" else 1)
        size = args.image_size or (299 if device.type == "cuda" else 71)
        print(f"\ntiming: inference forward, {verify.DTYPE_NAMES[dtype]}, batch {batch}, Xception at {size}x{size}, "
              f"median ms ({'do_bench' if device.type == 'cuda' else 'torch.utils.benchmark, CPU'})", flush=True)
        timing = _time_layers(timed, device, dtype, batch, size)
        print(_text_table(*timing))

    print(f"\nstamp (cache: {verify.cache_dir() / 'verify'}):")
    for key, st in stamps.items():
        print(f"  {key}: {json.dumps(st, sort_keys=True)}")

    print("\n--- Markdown (paste into a bug report) ---")
    print(f"**xception_fast {xception_fast.__version__} verify** on {label}: "
          f"{'FAILED' if failed else 'passed'}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"triton {verify._triton_version()}\n")
    if rows:
        print(_markdown_table(header, rows))
    for note in notes:
        print(f"\n- {note}")
    if timing is not None:
        print("\n" + _markdown_table(*timing))
    if stamps:
        first = next(iter(stamps.values()))
        print(f"\nstamp: `{json.dumps({k: v for k, v in first.items() if k not in ('provider', 'dtype')})}`")
    print("--- end ---")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
