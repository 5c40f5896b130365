"""Static records -> JSON files and Markdown tables; the model beside measured GPU results.

Files: `benchmarks/results/static/sm<arch>-<dtype>.json` (a JSON list of flat records, see
`run.static_records`) and `STATIC.md` beside them. `markdown(records)` renders, per dtype, the issues'
speed targets (`targets`), then per (dtype, mode) the unit table (roofline floor, unfused estimate, each
provider's unit total, per layer and for the whole model) and the per-kernel table.
`versus_measured(records, measured)` pairs each unit total with the GPU median of the same (provider,
layer, mode, dtype) at the same batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from xception_fast.bench.static import calibration, targets
from xception_fast.bench.static.machine import machine

DEFAULT_DIR = Path("benchmarks") / "results" / "static"
_COLUMNS = ("roofline", "unfused", "triton", "cuda")
_WHAT = {"roofline": "roofline floor", "unfused": "unfused cuDNN (per-kernel roofline)",
         "triton": "triton", "cuda": "cuda"}


def label(arch: int) -> str:
    return machine(arch).label


def write_json(records: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # A JSON list, one record per line: small, and diffs of a re-run read record by record.
    tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    tmp.replace(path)
    return path


def load(paths: Iterable) -> list[dict]:
    """Records from static JSON files or directories of them."""
    records = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            data = json.loads(f.read_text())
            if isinstance(data, list) and all(isinstance(r, dict) and "estimate_us" in r for r in data):
                records += data
    return records


def _us(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _flag(r: dict) -> str:
    parts = []
    if r.get("dw_dup") and r["dw_dup"] >= 1.5:
        parts.append(f"depthwise FMAs x{r['dw_dup']:.1f}")
    if r.get("bar_per_iter"):
        parts.append(f"{r['bar_per_iter']:.0f} BAR/iter")
    if r.get("mma_wait") is not None:
        parts.append(f"wgmma wait {r['mma_wait']}")
    if r.get("spill_bytes"):
        parts.append(f"{r['spill_bytes']} B stack")
    if r.get("phases"):
        each = " then ".join(f"{name} {_us(p['issue_us'])} issue / {_us(p['mma_us'])} MMA"
                             for name, p in r["phases"].items())
        if r.get("phases_in_sequence"):
            parts.append(f"phases in sequence (1 CTA/SM): {each}; overlapped {_us(r['overlapped_us'])}")
        else:
            parts.append(f"phases may overlap ({r['ctas_per_sm']} CTAs/SM): {each}")
    return ", ".join(parts)


def _calibrated(r: dict) -> str:
    """The calibrated estimate, with the config it is for where the calibrated model picks another one."""
    other = r.get("calibrated_config")
    return _us(r.get("calibrated_us")) + (f" ({other})" if other and other != r.get("config") else "")


def markdown(records: list[dict]) -> str:
    if not records:
        return "No static records.\n"
    arch = records[0]["arch"]
    batch = records[0].get("batch")
    lines = [f"## {label(arch)}: {records[0].get('machine', '')}, batch {batch}, 299x299", "",
             f"Every figure below is a **{label(arch)}**: dynamic SASS instruction counts, tensor-instruction "
             "FLOPs and compulsory bytes divided by the model machine's peak rates, the largest of the three "
             "per kernel. A lower bound under the model, not a measurement. Times in microseconds.", ""]
    if any(r.get("calibrated_us") is not None for r in records):
        lines += [f"Columns marked *calibrated*: the **{calibration.FITTED.label}**, the same counts with the "
                  "achieved issue rate (by resident warps per scheduler), tensor rate, DRAM bandwidth and launch "
                  "cost fitted on that GPU run's per-kernel times (`xception_fast.bench.static.calibration`), each kernel "
                  "in the autotune config the calibrated model picks (named where it is not the bound's pick). An "
                  "estimate, not a bound and not a measurement. " + calibration.FITTED_SUMMARY, ""]
    for dtype in sorted({r["dtype"] for r in records}):
        table = targets.markdown(records, dtype)
        lines += [table] if table else []
    keys = sorted({(r["dtype"], r["mode"]) for r in records}, key=lambda k: (k[0], k[1] != "infer"))
    for dtype, mode in keys:
        rows = [r for r in records if r["dtype"] == dtype and r["mode"] == mode]
        totals = {(r["provider"], r["layer"]): r for r in rows if r["kernel"] in ("unit_total", "model_total")}
        providers = [p for p in _COLUMNS if any(k[0] == p for k in totals)]
        calibrated = [p for p in providers if any(r.get("calibrated_us") is not None for k, r in totals.items()
                                                  if k[0] == p)]
        layers = list(dict.fromkeys(r["layer"] for r in rows if r["kernel"] == "unit_total"))
        what = "inference" if mode == "infer" else "training forward + backward"
        lines += [f"### Units, {what}, {dtype} ({label(arch)})", "",
                  "| layer | units | " + " | ".join([_WHAT[p] for p in providers]
                                                     + [f"{p} calibrated" for p in calibrated]) + " |",
                  "|---|---:|" + "---:|" * (len(providers) + len(calibrated))]
        for layer in layers + (["all"] if any(k[1] == "all" for k in totals) else []):
            count = next((totals[(p, layer)].get("count") for p in providers if (p, layer) in totals), "")
            cells = []
            for p in providers:
                r = totals.get((p, layer))
                cells.append(_us(r["estimate_us"]) if r else "not modelled")
            for p in calibrated:
                r = totals.get((p, layer))
                cells.append(_us(r.get("calibrated_us")) if r else "not modelled")
            name = "**model (34 units, time x units)**" if layer == "all" else layer
            lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
        lines.append("")
        kernels = [r for r in rows if r["provider"] in ("triton", "cuda") and r["kernel"] not in
                   ("unit_total", "model_total") and r.get("chosen", True)]
        if kernels:
            lines += [f"### Kernels, {what}, {dtype} ({label(arch)})", "",
                      "| provider | layer | kernel | config | issue | MMA | DRAM | estimate | calibrated | bound | op | "
                      "regs | smem KB | CTAs/SM | waves | flags |",
                      "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|"]
            for r in kernels:
                lines.append(
                    f"| {r['provider']} | {r['layer']} | {r['kernel']} | {r.get('config', '')} | {_us(r['issue_us'])} | "
                    f"{_us(r['mma_us'])} | {_us(r['dram_us'])} | **{_us(r['estimate_us'])}** | "
                    f"{_calibrated(r)} | {r.get('bound', '')} | "
                    f"{r['tensor_op']} | {r['regs']} | {r['smem_bytes'] / 1024:.0f} | {r['ctas_per_sm']} | "
                    f"{r.get('waves', 0):.1f} | {_flag(r)} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def versus_measured(records: list[dict], measured: list[dict]) -> str:
    """Model vs measurement per unit: the static unit total beside the GPU median (same provider,
    layer, mode, dtype and batch); empty when nothing pairs up."""
    from xception_fast.bench.shapes import unit_shapes
    from xception_fast.bench.static.run import layer_name

    names = {s.slug: layer_name(s) for s in unit_shapes(299)}
    static = {(r["provider"], r["layer"], r["mode"], r["dtype"], r.get("batch")): r for r in records
              if r["kernel"] == "unit_total"}
    lines = []
    for data in measured:
        env = data.get("environment") or {}
        gpu = env.get("gpu_name") or "GPU"
        commit = (env.get("commit") or "unknown")[:7]
        for row in data.get("rows", []):
            if row.get("kind") != "layer" or row.get("status") != "ok":
                continue
            provider = "unfused" if row.get("provider") == "eager" else row.get("provider")
            key = (provider, names.get(row.get("name")), row.get("mode"), row.get("dtype"), row.get("batch"))
            r = static.get(key)
            if r is None:
                continue
            est, cal, got = r["estimate_us"], r.get("calibrated_us"), row["median_ms"] * 1e3
            lines.append(f"| {row['name']} | {row['provider']} | {row['mode']} | {row['dtype']} | {row['batch']} | "
                         f"{_us(est)} | {_us(got)} | {got / est:.2f} | {_us(cal)} | "
                         f"{f'{got / cal:.2f}' if cal else '-'} | {gpu} | {commit} |")
    if not lines:
        return ""
    arch = records[0]["arch"]
    return "\n".join([f"### Model vs measurement, per unit ({label(arch)} beside GPU medians)", "",
                      "measured / estimate: 1.0 would be a kernel at the model's bound; the model is a lower bound, "
                      "so values below 1 mean the model is wrong and must be corrected. Calibrated: the "
                      f"{calibration.FITTED.label}. The estimates are of the kernels in this tree; the "
                      "measurements, of the commit named in the row: where a provider's kernels changed in "
                      "between, its row sets two different versions side by side.", "",
                      "| unit | provider | mode | dtype | batch | static estimate us | measured us | measured / "
                      "estimate | calibrated us | measured / calibrated | GPU | measured at |",
                      "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"] + lines) + "\n"
