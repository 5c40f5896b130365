"""Command line of the benchmark suite: ``bench`` (measure, save, print the table) and ``report``.

    python -m xception_fast bench [--mode infer train] [--dtype bf16] [--batch 1 32 256] [--models ...]
    python -m xception_fast bench --static [--arch 90] [--dtype bf16] [--layers middle ...]  (no GPU needed)
    python -m xception_fast report [benchmarks/results ...] [--markdown FILE] [--plot FILE]

`main(argv)` takes the arguments after ``python -m xception_fast`` (the first being ``bench`` or
``report``) and returns an exit status. ``python -m xception_fast.bench.cli ...`` works the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from xception_fast.bench.common import LAYER_PROVIDERS, MODES, BenchSettings, dtype_name

DEFAULT_RESULTS_DIR = Path("benchmarks") / "results"
COMPILE_MODES = ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default", "none")


def _dtype_arg(value: str) -> str:
    try:
        return dtype_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from xception_fast.bench.models import MODELS

    p.add_argument("--mode", nargs="+", choices=MODES + ("both",), default=["both"],
                   help="inference (forward) and/or training (forward, backward, SGD step); default both")
    p.add_argument("--dtype", nargs="+", type=_dtype_arg, default=None, metavar="{bf16,fp16,fp32}",
                   help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--batch", nargs="+", type=int, default=None,
                   help="model batch sizes; default 1 32 256 on a GPU, 2 on the CPU")
    p.add_argument("--layer-batch", type=int, default=None, help="layer batch size; default 256 on a GPU, 1 on the CPU")
    p.add_argument("--size", type=int, default=None, help="model input size; default 299 on a GPU, 75 on the CPU")
    p.add_argument("--layer-size", type=int, default=None,
                   help="input size the layer shapes are derived at; default 299 on a GPU, 71 on the CPU")
    p.add_argument("--models", nargs="+", choices=MODELS + ("none",), default=None,
                   help="models to run (default all; 'none' for layers only)")
    p.add_argument("--providers", nargs="+", choices=LAYER_PROVIDERS, default=None,
                   help="competitors to run (default all): fused providers, eager, compile")
    p.add_argument("--shapes", nargs="+", default=None, metavar="SUBSTRING",
                   help="layer shapes whose name contains any of these (e.g. middle exit-1536); default all")
    p.add_argument("--no-layers", action="store_true", help="skip the layer benchmarks")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode of the compile rows; default max-autotune on a GPU ('none' drops them)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a rough look, not for the record)")
    p.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                   help="start no new row after this many seconds; the rest are recorded as skipped")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="default: cuda when a GPU is present, else a CPU smoke run")
    p.add_argument("--out", default=None, metavar="DIR_OR_JSON",
                   help=f"where the results JSON goes (a directory or a .json file); default {DEFAULT_RESULTS_DIR}/ "
                        "on a GPU; CPU smoke runs are saved only when --out is given")
    p.add_argument("--no-save", action="store_true", help="do not write a results file")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the final table to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    from xception_fast.bench.static.cli import add_arguments as add_static_arguments

    add_static_arguments(p)


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", default=[str(DEFAULT_RESULTS_DIR)],
                   help=f"results files or directories of them (default {DEFAULT_RESULTS_DIR})")
    p.add_argument("--latest", action="store_true", help="only the newest results file")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="write the Markdown here (default: RESULTS.md beside the results; '-' for stdout only)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="write the PNG here (default: benchmark.png beside the results)")
    p.add_argument("--no-plot", action="store_true", help="Markdown only")
    p.add_argument("--quiet", action="store_true", help="do not print the Markdown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xception_fast",
                                     description="xception_fast benchmarks: measure, then report.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,report}")
    bench = sub.add_parser("bench", help="run the layer and model benchmarks, save a results JSON, print the table",
                           description="Time Xception's separable units and whole models per provider "
                                       "(cuda, triton, reference, eager cuDNN, torch.compile) and against "
                                       "timm legacy_xception and torchvision inception_v3. Without a GPU: a "
                                       "quick CPU smoke of the reference provider and the models; GPU rows "
                                       "are skipped with a reason.")
    _add_bench_arguments(bench)
    report = sub.add_parser("report", help="turn results JSON files into a Markdown table and a PNG plot",
                            description="Render results files as Markdown tables (and a PNG with matplotlib).")
    _add_report_arguments(report)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    modes = MODES if "both" in args.mode else tuple(m for m in MODES if m in args.mode)
    models = None
    run_models = True
    if args.models is not None:
        if "none" in args.models:
            run_models = False
        else:
            models = tuple(args.models)
    settings = BenchSettings.for_device(
        device, modes=modes, dtypes=tuple(args.dtype) if args.dtype else None,
        batches=tuple(args.batch) if args.batch else None, layer_batch=args.layer_batch, image_size=args.size,
        layer_image_size=args.layer_size, models=models, providers=tuple(args.providers) if args.providers else None,
        shapes=tuple(args.shapes) if args.shapes else None, compile_mode=args.compile_mode,
        run_layers=not args.no_layers, run_models=run_models, timing="quick" if args.quick else None)
    settings.validate()
    return settings


def bench_main(args: argparse.Namespace) -> int:
    from xception_fast.bench import report, results
    from xception_fast.bench.runner import Runner, stderr_progress

    if args.static:
        from xception_fast.bench.static.cli import static_main

        return static_main(args)
    settings = settings_from_args(args)
    device = torch.device(settings.device)
    say = (lambda message: None) if args.quiet else stderr_progress
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type != "cuda":
        say("No CUDA GPU: running the CPU smoke (reference provider, eager modules and the models, "
            f"{'/'.join(settings.dtypes)}, model batch {settings.batches} at {settings.image_size}px, "
            f"layer batch {settings.layer_batch} at shapes of a {settings.layer_image_size}px input). "
            "These are not GPU numbers.")
    out = None
    if not args.no_save and (args.out is not None or device.type == "cuda"):
        out = results.results_path(args.out or DEFAULT_RESULTS_DIR, device)
    runner = Runner(settings, progress=say, autosave=out)
    cases = runner.cases()
    say(f"{len(cases)} rows to run on {device}" + (f"; results saved to {out} after every row" if out else ""))
    rows = runner.run_all(cases, budget_s=args.budget_s)
    data = runner.results()
    if out is not None:
        runner.save(out)
    table = report.markdown([data])
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    counts = {s: sum(1 for r in rows if r.get("status") == s) for s in ("ok", "skipped", "error")}
    oom = sum(1 for r in rows if r.get("error") == "oom")
    summary = f"{counts['ok']} rows measured, {counts['skipped']} skipped, {counts['error']} errors"
    if oom:
        summary += f" ({oom} out of memory)"
    if out is not None:
        summary += f"; results in {out}"
    elif device.type != "cuda" and not args.no_save:
        summary += "; CPU smoke results not saved (pass --out to keep them)"
    print(summary, file=sys.stderr)
    return 1 if counts["error"] - oom > 0 else 0


def report_main(args: argparse.Namespace) -> int:
    from xception_fast.bench import report, results
    from xception_fast.bench.static import report as static_report

    files = results.result_files(args.paths)
    static = static_report.load([Path(p) / "static" for p in args.paths if Path(p).is_dir()])
    loaded = []
    for f in files:
        try:
            loaded.append(results.load_results(f))
        except (ValueError, OSError) as exc:
            print(f"warning: skipping {f}: {exc}", file=sys.stderr)
    if not loaded and static:
        print(static_report.markdown(static))
        return 0
    if not loaded:
        print(f"no results files in {' '.join(map(str, args.paths))}: run `python -m xception_fast bench` on a GPU "
              "machine first", file=sys.stderr)
        return 1
    if args.latest:
        loaded = loaded[-1:]
    text = report.markdown(loaded)
    if static:  # the model beside the measurements, never mixed into their tables
        text += "\n" + static_report.versus_measured(static, loaded) + "\n" + static_report.markdown(static)
    if not args.quiet:
        print(text)
    first = Path(args.paths[0]) if args.paths else DEFAULT_RESULTS_DIR
    home = first if first.is_dir() else first.parent
    if args.markdown != "-":
        md_path = Path(args.markdown) if args.markdown else home / "RESULTS.md"
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(text)
        print(f"wrote {md_path}", file=sys.stderr)
    if not args.no_plot:
        plot_path = Path(args.plot) if args.plot else home / "benchmark.png"
        try:
            written = report.plot(loaded[-1], plot_path)
            print(f"wrote {written} (from {loaded[-1].get('_path')})", file=sys.stderr)
        except report.PlotUnavailable as exc:
            print(f"no plot: {exc}", file=sys.stderr)
        except ValueError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``bench ...`` or ``report ...`` (the arguments after ``python -m xception_fast``); returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "bench":
        return bench_main(args)
    return report_main(args)


if __name__ == "__main__":
    sys.exit(main())
