"""Results files -> a Markdown report (tables) and a PNG plot.

`markdown(results)` renders one section per results file: the environment line, the model table
(images/s, ms per iteration, speed-up over timm's eager run of the same network (legacy_xception;
xception65 for the aligned model), peak memory, compile time),
one layer table per (mode, dtype, batch) with a column per competitor (time, speed-up over eager,
fraction of the roofline floor) and the Xception total (each unit's time times its count), and the
rows that were not measured with their reasons. `plot(results, path)` draws images/s per model and
provider (at the largest batch) and the per-layer speed-up over eager, one row of panels per mode;
it needs matplotlib and raises `PlotUnavailable` with an install hint when it is missing.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Optional

from xception_fast import backends
from xception_fast.bench.common import COMPILE, EAGER, MODES
from xception_fast.bench.models import BASELINE, BASELINES, MODEL_PROVIDERS

PLOT_HINT = "the PNG plot needs matplotlib: pip install matplotlib"
_DTYPE_ORDER = ("bf16", "fp16", "fp32")
# Reading order: the baselines first, then the fused providers.
_PROVIDER_ORDER = (EAGER, COMPILE) + tuple(reversed(backends.provider_names()))
_MODEL_ORDER = ("legacy_xception", "xception_fast", "inception_v3", "xception65", "xception65_fast")


class PlotUnavailable(RuntimeError):
    pass


def _order(value, order) -> int:
    return order.index(value) if value in order else len(order)


def _fmt_bytes(n) -> str:
    return "" if n is None else f"{n / 2 ** 30:.2f} GiB"


def _fmt_num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms >= 0.1 else f"{ms:.4f}"


def environment_line(data: dict) -> str:
    env = data.get("environment", {})
    machine = env.get("gpu_name") or f"CPU ({env.get('cpu', 'unknown')}, {env.get('cpu_count', '?')} cores)"
    parts = [f"**{machine}**"]
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
    sw = f"torch {env.get('torch', '?')}"
    extra = [f"CUDA {env['torch_cuda']}" if env.get("torch_cuda") else None,
             f"cuDNN {env['cudnn']}" if env.get("cudnn") else None]
    extra = [e for e in extra if e]
    if extra:
        sw += f" ({', '.join(extra)})"
    parts.append(sw)
    for key in ("triton", "torchvision", "timm"):
        if env.get(key):
            parts.append(f"{key} {env[key]}")
    commit = env.get("commit")
    parts.append(f"commit {commit[:10]}{' (dirty)' if env.get('commit_dirty') else ''}" if commit else "commit unknown")
    parts.append(str(data.get("created", "")).replace("T", " ").replace("+00:00", " UTC"))
    return "; ".join(p for p in parts if p)


def _rates_line(data: dict) -> str:
    rates = data.get("rates") or {}
    if not rates:
        return ""
    items = []
    copy = None
    for dtype in sorted(rates, key=lambda d: _order(d, _DTYPE_ORDER)):
        r = rates[dtype]
        note = " (TF32)" if r.get("float32_matmul_precision") == "high" else ""
        items.append(f"{dtype} matmul {_fmt_num(r['matmul_tflops'])} TFLOP/s{note}")
        copy = r.get("copy_gbps")
    if copy:
        items.append(f"device copy {_fmt_num(copy)} GB/s")
    return "Measured in the same run (roofline rates): " + ", ".join(items) + "."


def _models_table(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("kind") == "model" and r.get("status") == "ok"]
    if not ok:
        return []
    baseline = {(r["name"], r["provider"], r["mode"], r["dtype"], r["batch"]): r["images_per_s"] for r in ok}
    ok.sort(key=lambda r: (_order(r["mode"], MODES), _order(r["dtype"], _DTYPE_ORDER), r["batch"],
                           _order(r["name"], _MODEL_ORDER), _order(r["provider"], _PROVIDER_ORDER)))
    size = ok[0].get("image_size", 299)
    lines = [f"### Models: images/s at {size}x{size} (higher is better)", "",
             f"| model | provider | mode | dtype | batch | images/s | ms/iter | vs timm eager "
             "| peak memory | compile s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        base = baseline.get((*BASELINES.get(r["name"], BASELINE), r["mode"], r["dtype"], r["batch"]))
        speedup = f"{r['images_per_s'] / base:.2f}x" if base else ""
        compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else ""
        lines.append(f"| {r['name']} | {r['provider']} | {r['mode']} | {r['dtype']} | {r['batch']} | "
                     f"{_fmt_num(r['images_per_s'])} | {_fmt_ms(r['median_ms'])} | {speedup} | "
                     f"{_fmt_bytes(r.get('peak_mem_bytes'))} | {compile_s} |")
    return lines + [""]


def _layer_tables(rows: list[dict]) -> list[str]:
    layer_rows = [r for r in rows if r.get("kind") == "layer"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in layer_rows:
        groups[(r["mode"], r["dtype"], r["batch"])].append(r)
    lines: list[str] = []
    for key in sorted(groups, key=lambda k: (_order(k[0], MODES), _order(k[1], _DTYPE_ORDER), k[2])):
        group = groups[key]
        if not any(r.get("status") == "ok" for r in group):
            continue
        mode, dtype, batch = key
        providers = [p for p in _PROVIDER_ORDER if any(r["provider"] == p and r.get("status") == "ok" for r in group)]
        shapes: "OrderedDict[str, dict]" = OrderedDict()
        for r in group:
            shapes.setdefault(r["name"], {"label": r.get("label", r["name"]), "count": r.get("count", 1)})
            if r.get("status") == "ok":
                shapes[r["name"]][r["provider"]] = r
        what = "forward" if mode == "infer" else "forward + backward"
        lines += [f"### Layers: {mode} ({what}), {dtype}, batch {batch}", "",
                  "Time per unit in ms (speed-up over eager cuDNN, % of the roofline floor).", "",
                  "| unit | units | " + " | ".join(providers) + " |",
                  "|---|---:|" + "---:|" * len(providers)]
        totals = {p: 0.0 for p in providers}
        complete = {p: True for p in providers}
        for name, entry in shapes.items():
            eager = entry.get(EAGER)
            cells = []
            for p in providers:
                r = entry.get(p)
                if r is None:
                    cells.append("-")
                    complete[p] = False
                    continue
                totals[p] += r["median_ms"] * entry["count"]
                info = []
                if eager is not None:
                    info.append(f"{eager['median_ms'] / r['median_ms']:.2f}x")
                if r.get("roofline_fraction") is not None:
                    info.append(f"{100 * r['roofline_fraction']:.0f}%")
                cells.append(_fmt_ms(r["median_ms"]) + (f" ({', '.join(info)})" if info else ""))
            label = entry["label"].rsplit(" (x", 1)[0]
            lines.append(f"| {label} | {entry['count']} | " + " | ".join(cells) + " |")
        n_units = sum(e["count"] for e in shapes.values())
        cells = []
        for p in providers:
            if not complete[p]:
                cells.append("-")
                continue
            speed = f" ({totals[EAGER] / totals[p]:.2f}x)" if EAGER in totals and complete.get(EAGER) else ""
            cells.append(f"{_fmt_ms(totals[p])}{speed}")
        lines.append(f"| **all {n_units} units** (time x units) | {n_units} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _not_measured(rows: list[dict]) -> list[str]:
    reasons: "OrderedDict[tuple, list[str]]" = OrderedDict()
    for r in rows:
        if r.get("status") in ("skipped", "error"):
            reasons.setdefault((r["status"], r.get("reason", "")), []).append(
                f"{r.get('kind')} {r.get('name')}[{r.get('provider')}]")
    if not reasons:
        return []
    lines = ["### Not measured", ""]
    for (status, reason), items in reasons.items():
        lines.append(f"- {len(items)} row(s) {status}: {reason}")
    return lines + [""]


def markdown_section(data: dict) -> str:
    env = data.get("environment", {})
    title = env.get("gpu_name") or "CPU smoke run (not GPU results)"
    lines = [f"## {title}", "", environment_line(data) + ".", ""]
    rates = _rates_line(data)
    if rates:
        lines += [rates, ""]
    flags = data.get("flags") or {}
    settings = data.get("settings") or {}
    notes = []
    if flags.get("cudnn_benchmark"):
        notes.append("cudnn.benchmark on")
    if flags.get("memory_format"):
        notes.append(flags["memory_format"])
    if settings.get("compile_mode") and settings.get("compile_mode") != "none":
        notes.append(f"torch.compile mode {settings['compile_mode']}")
    rows = data.get("rows", [])
    methods = sorted({r.get("method") for r in rows if r.get("method")})
    if methods:
        notes.append("timed with " + ", ".join(methods) + " (medians, warm-up and compile excluded)")
    if notes:
        lines += ["Settings: " + "; ".join(notes) + ".", ""]
    body = _models_table(rows) + _layer_tables(rows)
    if not body:
        body = ["No rows were measured in this run.", ""]
    lines += body + _not_measured(rows)
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    """The Markdown report of one or more results files (one section each)."""
    if not results:
        return "No benchmark results.\n"
    sections = ["# xception_fast benchmark results", ""]
    for data in results:
        sections.append(markdown_section(data))
    return "\n".join(sections).rstrip() + "\n"


def _pick_dtype(rows: list[dict]) -> Optional[str]:
    dtypes = {r["dtype"] for r in rows if r.get("status") == "ok"}
    for d in _DTYPE_ORDER:
        if d in dtypes:
            return d
    return next(iter(dtypes), None)


def plot(data: dict, path) -> Path:
    """Draw the PNG for one results file; returns its path. Raises `PlotUnavailable` without
    matplotlib and ValueError when the file has nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(PLOT_HINT) from exc

    rows = [r for r in data.get("rows", []) if r.get("status") == "ok"]
    dtype = _pick_dtype(rows)
    rows = [r for r in rows if r["dtype"] == dtype]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    has_models = any(r["kind"] == "model" for r in rows)
    has_layers = any(r["kind"] == "layer" and r["provider"] != EAGER for r in rows) and \
        any(r["kind"] == "layer" and r["provider"] == EAGER for r in rows)
    columns = [c for c, present in (("models", has_models), ("layers", has_layers)) if present]
    if not modes or not columns:
        raise ValueError("nothing to plot: no measured model rows and no layer rows with an eager baseline")

    fig, axes = plt.subplots(len(modes), len(columns), figsize=(7.5 * len(columns), 4.2 * len(modes)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        for j, column in enumerate(columns):
            ax = axes[i][j]
            if column == "models":
                _plot_models(ax, [r for r in rows if r["kind"] == "model" and r["mode"] == mode], mode, dtype, colors)
            else:
                _plot_layers(ax, [r for r in rows if r["kind"] == "layer" and r["mode"] == mode], mode, dtype, colors)
    env = data.get("environment", {})
    machine = env.get("gpu_name") or "CPU smoke (not GPU results)"
    fig.suptitle(f"xception_fast on {machine}, {dtype}, channels_last (torch {env.get('torch', '?')})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_models(ax, rows: list[dict], mode: str, dtype: str, colors) -> None:
    if not rows:
        ax.set_visible(False)
        return
    batch = max(r["batch"] for r in rows)
    rows = sorted((r for r in rows if r["batch"] == batch),
                  key=lambda r: (_order(r["name"], _MODEL_ORDER), _order(r["provider"], _PROVIDER_ORDER)))
    labels = [f"{r['name']}\n[{r['provider']}]" for r in rows]
    values = [r["images_per_s"] for r in rows]
    model_color = {m: colors[k % len(colors)] for k, m in enumerate(MODEL_PROVIDERS)}
    bars = ax.bar(range(len(rows)), values, color=[model_color.get(r["name"], "gray") for r in rows])
    for bar, value in zip(bars, values):
        ax.annotate(_fmt_num(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("images/s")
    what = "inference" if mode == "infer" else "training step"
    ax.set_title(f"Throughput, {what}, batch {batch}")


def _plot_layers(ax, rows: list[dict], mode: str, dtype: str, colors) -> None:
    batch = max((r["batch"] for r in rows), default=None)
    rows = [r for r in rows if r["batch"] == batch]
    eager = {r["name"]: r["median_ms"] for r in rows if r["provider"] == EAGER}
    names = list(OrderedDict.fromkeys(r["name"] for r in rows if r["name"] in eager))
    providers = [p for p in _PROVIDER_ORDER if p != EAGER and any(r["provider"] == p for r in rows)]
    if not names or not providers:
        ax.set_visible(False)
        return
    width = 0.8 / len(providers)
    for k, p in enumerate(providers):
        by_name = {r["name"]: r["median_ms"] for r in rows if r["provider"] == p}
        xs = [i + (k - (len(providers) - 1) / 2) * width for i, n in enumerate(names) if n in by_name]
        ys = [eager[n] / by_name[n] for n in names if n in by_name]
        ax.bar(xs, ys, width, label=p, color=colors[(k + 1) % len(colors)] if p != COMPILE else "gray")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), [n.replace("-", "\n", 3) for n in names], fontsize=6)
    ax.set_ylabel("speed-up over eager cuDNN")
    what = "forward" if mode == "infer" else "forward + backward"
    ax.set_title(f"Separable units, {what}, batch {batch}")
    ax.legend(fontsize=7)
