"""`python -m xception_fast bench --static [--arch 90] [--dtype bf16] [--layers ...] [--mode ...]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("static cost model (no GPU needed)")
    g.add_argument("--static", action="store_true",
                   help="compile every kernel for --arch, count its SASS and print static estimates "
                        "(sm_XX model), not measurements")
    g.add_argument("--arch", type=int, choices=(90, 80), default=90, help="--static: target architecture (90)")
    g.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="--static: layers by name or slug substring (middle, block1.rep.0, exit-1024); default all")
    g.add_argument("--all-configs", action="store_true",
                   help="--static: a record for every autotune config, not only the one the model picks")


def static_main(args: argparse.Namespace) -> int:
    from xception_fast.bench.static import report, run

    dtypes = tuple(args.dtype) if args.dtype else ("bf16",)
    modes = run.MODES if "both" in args.mode else tuple(m for m in run.MODES if m in args.mode)
    providers = tuple(p for p in (args.providers or run.PROVIDERS) if p in run.PROVIDERS)
    batch = args.layer_batch or run.DEFAULT_BATCH
    size = args.layer_size or run.DEFAULT_IMAGE
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    layers = args.layers or args.shapes
    say(f"static estimates (sm_{args.arch} model) for {', '.join(providers)}; {'/'.join(dtypes)}; "
        f"{'/'.join(modes)}; batch {batch} at {size}x{size}; layers: {' '.join(layers) if layers else 'all'}")
    start = time.time()
    errors: list[str] = []
    try:
        records = run.static_records(args.arch, dtypes, layers, modes, providers, batch, size, say, errors,
                                     all_configs=args.all_configs)
    except ValueError as exc:  # no such layer
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    failed = len(errors)
    text = report.markdown(records)
    if records:
        text += "\n" + report.versus_measured(records, _measured(args))
    print(text)
    complete = not layers and set(modes) == set(run.MODES) and batch == run.DEFAULT_BATCH and size == run.DEFAULT_IMAGE
    if failed and not args.no_save and (args.out or complete):
        say("nothing saved: some kernels could not be modelled (errors above)")
    elif records and not args.no_save and (args.out or complete):
        home = Path(args.out) if args.out else report.DEFAULT_DIR
        for dtype in dtypes:
            path = home if home.suffix == ".json" else home / f"sm{args.arch}-{dtype}.json"
            report.write_json([r for r in records if r["dtype"] == dtype], path)
            say(f"wrote {path}")
        md = (home.parent if home.suffix == ".json" else home) / "STATIC.md"
        md.write_text("# Static estimates\n\n" + report.markdown(report.load([md.parent])))
        say(f"wrote {md}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    say(f"{len(records)} records in {time.time() - start:.0f} s; every figure is a static estimate "
        f"(sm_{args.arch} model), not a measurement")
    return 1 if failed or not records else 0


def _measured(args) -> list[dict]:
    """GPU results files under benchmarks/results (for the model-vs-measurement table), if any."""
    from xception_fast.bench import results

    out = []
    for f in results.result_files([Path("benchmarks") / "results"]) if (Path("benchmarks") / "results").is_dir() else []:
        try:
            data = results.load_results(f)
        except (ValueError, OSError):
            continue
        if (data.get("environment") or {}).get("gpu_name"):
            out.append(data)
    return out
