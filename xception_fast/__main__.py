"""`python -m xception_fast`: the environment, the providers, and one Xception forward pass checked
against the reference provider.

`python -m xception_fast verify` runs the providers' self-check (`--help` for its options);
`python -m xception_fast bench --help` runs the benchmarks; `python -m xception_fast report` turns
result files into the Markdown table and plot."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter

import torch

import xception_fast
from xception_fast import backends, dispatch


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def print_environment(device: torch.device) -> None:
    print(f"xception_fast {xception_fast.__version__} ({xception_fast.__file__})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, triton {_triton_version()}")
    cuda = torch.version.cuda or "none (CPU build of torch)"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"CUDA {cuda}; GPU: {gpu}")
    print(f"providers for {device.type} tensors (self-check: `python -m xception_fast verify`):")
    for name, found in backends.backend_report(device).items():
        print(f"  {name:<10} {'available' if found.available else 'unavailable':<12} {found.reason}")
        print(f"  {'':<10} {'verified:':<12} {found.verification}")


def _timed_forward(model: torch.nn.Module, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, float]:
    with torch.no_grad(), xception_fast.use_backend(backend):
        model(x)  # warm-up: cuDNN autotuning, Triton compilation
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        y = model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return y, time.perf_counter() - start


def main_job(batch: int, size: int) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print_environment(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = xception_fast.xception().to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    print(f"\nXception: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"input {list(x.shape)} {str(dtype).replace('torch.', '')} channels_last on {device.type}")
    y_auto, t_auto = _timed_forward(model, x, "auto")
    y_ref, t_ref = _timed_forward(model, x, "reference")
    chosen = Counter(dispatch.decisions().values())
    print(f"output shape {list(y_auto.shape)}")
    print(f"  {'auto':<10} {t_auto * 1e3:9.1f} ms")
    print(f"  {'reference':<10} {t_ref * 1e3:9.1f} ms")
    if not chosen or set(chosen) == {"reference"}:
        print("auto ran the reference provider everywhere: no fused kernel is verified and faster here")
    else:
        diff = ((y_auto.float() - y_ref.float()).abs().max() / y_ref.float().abs().max().clamp_min(1e-12)).item()
        print("auto's choices per unit signature: " + ", ".join(f"{n} x{c}" for n, c in chosen.most_common()))
        print(f"max relative difference auto vs reference: {diff:.3e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["bench"], ["report"]):
        from xception_fast.bench import cli

        return cli.main(argv)
    if argv[:1] == ["verify"]:
        from xception_fast import verify_cli

        return verify_cli.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m xception_fast", description=__doc__)
    parser.add_argument("--batch", type=int, default=2, help="batch size of the check (default 2)")
    parser.add_argument("--size", type=int, default=299, help="input height and width (default 299)")
    args = parser.parse_args(argv)
    return main_job(args.batch, args.size)


if __name__ == "__main__":
    sys.exit(main())
