"""The static model beside per-kernel GPU device times: which kernels it gets wrong, and by how much.

    python -m xception_fast.bench.static.compare MEASURED_KERNEL_TIMES.json [--static sm90-bf16.json ...]
        [--markdown FILE] [--fit]

MEASURED_KERNEL_TIMES.json is what a GPU run's kernel-times step writes (`benchmarks/gpu_lease.sh`:
torch.profiler device time per kernel name, per unit shape, provider and mode, plus the Triton
autotuner's pick per kernel and key). The static records must hold every autotune config
(`python -m xception_fast bench --static --all-configs --layers ... --out FILE.json`): a Triton kernel
is compared in the config the autotuner picked on the GPU, not the one the model would pick.

Pairing: a measured row's shape ("middle 728->728 @19x19, ReLU first, +residual (x8)") names the
unit; a measured kernel name is reduced to its function name (CUDA: the demangled name without
namespaces and template arguments; one template variant is told apart by `_VARIANTS`); all launches
of one kernel in one unit are summed on both sides (the profiler sums calls). Eager (cuDNN/ATen)
kernels are paired with the `unfused` records (each at its own roofline) by `_EAGER`. Kernels the
model has no record for (torch's small host-side ops: weight folding, copies) are left out.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from xception_fast.bench.static import calibration, report
from xception_fast.bench.static.machine import machine

# Template variants of one CUDA kernel that the model plans as separate launches: (a pattern on the
# demangled name, a substring of the model record's config). The kernel named here no longer exists;
# the entry stays because `FITTED` is refitted from that kernel's rows in the 2026-11-29 run
# (benchmarks/results/h200-20261129 with the static records of its commit).
_VARIANTS = {
    "sepconv_infer_tiled_kernel": [(re.compile(r", 1, 1, false>"), "grad_d GEMM"),
                                   (re.compile(r", true>"), "training")],
}
# A fused provider's GEMMs handed to cuBLAS (`model.library_gemm` records, named "cublas_..."): the
# profiler names cuBLAS's kernels by algorithm, not by the call, so they are paired as one group per unit.
LIBRARY = "cublas (every GEMM)"
_LIBRARY_PREFIX = "cublas_"
_LIBRARY_KERNEL = re.compile(r"nvjet|xmma_gemm|gemm|splitKreduce|cutlass")
# Eager kernels -> the unfused model's kernel names (the first of several that the unit has).
_EAGER = [
    (re.compile(r"batch_norm_(transform_input|collect_statistics)"), ("batchnorm",)),
    (re.compile(r"batch_norm_backward_(reduce|elemt)"), ("batchnorm_backward",)),
    (re.compile(r"^conv2d_c1_k1"), ("depthwise",)),
    (re.compile(r"xmma_fprop"), ("pointwise",)),
    (re.compile(r"xmma_dgrad"), ("pointwise_grad_input",)),
    (re.compile(r"nvjet|splitKreduce"), ("pointwise_grad_weight",)),
    (re.compile(r"^dgrad2d_c1_k1"), ("depthwise_grad_input",)),
    (re.compile(r"^wgrad2d_c1_k1"), ("depthwise_grad_weight",)),
    (re.compile(r"launch_clamp_scalar"), ("relu", "relu_after")),
    (re.compile(r"CUDAFunctor_add<c10"), ("residual_add",)),
]
# Autotuner entries of kernels that share a function name with the plain unit's but belong to another
# unit (the mid variant): the measured rows are Xception's plain units.
_OTHER_UNIT_MODULES = ("mid_unit",)
_SHAPE = re.compile(r"(\d+)->(\d+) @(\d+)x(\d+)")
_SLUG = re.compile(r"-(\d+)x(\d+)-(\d+)(-.*)?$")


def shape_key(text: str) -> tuple:
    """(C, Cout, H, pre-ReLU, residual, post-ReLU) of a measured row's shape description."""
    found = _SHAPE.search(text)
    if not found:
        raise ValueError(f"cannot read a unit shape from {text!r}")
    c, cout, h, _ = map(int, found.groups())
    return c, cout, h, "ReLU first" in text, "+residual" in text, "ReLU after" in text


def slug_key(slug: str) -> Optional[tuple]:
    """The same key from a static record's unit slug ("middle-728x728-19-res"); None for mid variants."""
    found = _SLUG.search(slug)
    if not found:
        return None
    flags = (found.group(4) or "").strip("-").split("-")
    if any(f.startswith("mid") for f in flags):
        return None
    c, cout, h = map(int, found.groups()[:3])
    return c, cout, h, "nopre" not in flags, "res" in flags, "post" in flags


def short_name(full: str) -> str:
    """The function name of a profiler kernel name: no `void`, namespaces, template arguments, signature."""
    name = full.replace("(anonymous namespace)", "")
    name = re.split(r"[<(]", name, maxsplit=1)[0].strip()
    name = name.rsplit("::", 1)[-1]
    return name.split()[-1] if name else full


def variant_of_measured(short: str, full: str) -> str:
    for pattern, tag in _VARIANTS.get(short, ()):
        if pattern.search(full):
            return tag
    return ""


def variant_of_record(record: dict) -> str:
    for _, tag in _VARIANTS.get(record["kernel"], ()):
        if tag in (record.get("config") or ""):
            return tag
    return ""


def config_label(pick: str) -> str:
    """An autotuner pick ("BLOCK_P: 128, BLOCK_N: 256, ..., num_warps: 8, num_ctas: 1, num_stages: 3,
    maxnreg: None") as the static model labels its configs ("128x256x... w8 s3", triton_plans._label)."""
    fields = dict(part.split(": ", 1) for part in pick.split(", "))
    blocks = [v for k, v in fields.items() if k not in ("num_warps", "num_ctas", "num_stages", "maxnreg")]
    cap = f" r{fields['maxnreg']}" if fields.get("maxnreg", "None") != "None" else ""
    return f"{'x'.join(blocks)} w{fields['num_warps']} s{fields['num_stages']}{cap}"


def autotuner_config(picks: dict, kernel: str, c: int, cout: int) -> Optional[str]:
    """The config label the GPU's autotuner picked for `kernel` on a unit with C -> Cout channels: the
    pick whose key starts with (C, Cout), else with C or Cout (kernels keyed on one channel count)."""
    found = {}
    for name, by_key in picks.items():
        module, _, function = name.rpartition(".")
        if function != kernel or module in _OTHER_UNIT_MODULES:
            continue
        for key, pick in by_key.items():
            lead = [int(v) for v in re.findall(r"-?\d+", key.split("'")[0])[:2]]
            if lead[:2] == [c, cout]:
                found.setdefault(2, config_label(pick))
            elif lead and lead[0] in (c, cout):
                found.setdefault(1, config_label(pick))
    return found.get(2) or found.get(1)


def pair(records: list[dict], measured: dict) -> list[dict]:
    """One row per (provider, layer, mode, kernel[, variant]) that both sides have: the model's launches
    (in the autotuner's config where it has one) and the measured device time, summed over calls."""
    picks = measured.get("autotuner_picks") or {}
    units = {}
    for r in records:
        key = slug_key(r.get("unit", ""))
        if key is not None:
            units.setdefault(key, r["layer"])
    rows = []
    for m in measured.get("rows", []):
        key = shape_key(m["shape"])
        layer = units.get(key)
        if layer is None:
            continue
        provider = "unfused" if m["provider"] == "eager" else m["provider"]
        mine = [r for r in records if r["layer"] == layer and r["provider"] == provider and r["mode"] == m["mode"]
                and r.get("dtype") == m.get("dtype") and r.get("batch") == m.get("batch")
                and r["kernel"] not in ("unit_total", "model_total")]
        if not mine:
            continue
        present = {r["kernel"] for r in mine}
        groups: dict = defaultdict(lambda: {"us": 0.0, "calls": 0.0})
        for full, t in m["kernels"].items():
            if provider == "unfused":
                short = next((n for pattern, names in _EAGER if pattern.search(full) for n in names if n in present),
                             None)
                tag = ""
            else:
                short = short_name(full)
                tag = variant_of_measured(short, full)
                if short not in present and _LIBRARY_KERNEL.search(full) and \
                        any(k.startswith(_LIBRARY_PREFIX) for k in present):
                    short, tag = LIBRARY, ""
            if short is None or (short not in present and short != LIBRARY):
                continue
            g = groups[(short, tag)]
            g["us"] += t["us"]
            g["calls"] += t["calls"]
        for (kernel, tag), g in groups.items():
            library = kernel == LIBRARY
            launches = [r for r in mine if (r["kernel"].startswith(_LIBRARY_PREFIX) if library else r["kernel"] == kernel)
                        and variant_of_record(r) == tag]
            chosen = [r for r in launches if r.get("chosen", True)]
            picked = autotuner_config(picks, kernel, key[0], key[1]) if provider == "triton" else None
            config_from = "model"
            if picked:
                by_pick = [r for r in launches if r.get("config") == picked]
                if by_pick:
                    chosen, config_from = by_pick, "autotuner"
                else:
                    config_from = "model: no record of the autotuner's pick, run --all-configs"
            if not chosen:
                continue
            top = max(chosen, key=lambda r: r["estimate_us"])
            estimate = sum(r["estimate_us"] for r in chosen)
            rows.append({"provider": provider, "layer": layer, "unit": m["shape"], "mode": m["mode"],
                         "kernel": kernel + (f" ({tag})" if tag else ""), "config": top.get("config", ""),
                         "config_from": config_from if provider == "triton" else "",
                         "launches": len(chosen), "calls": g["calls"], "bound": top.get("bound")
                         or ("mma" if top["mma_us"] > top["dram_us"] else "dram"),
                         "estimate_us": estimate, "measured_us": g["us"], "ratio": g["us"] / estimate
                         if estimate else math.inf, "records": chosen, "library": library})
    return rows


def markdown(rows: list[dict], cal: Optional[calibration.Calibration] = None, source: str = "",
             fixed: Optional[dict] = None) -> str:
    """The per-kernel table: static estimate (the raw lower bound), its bound, the measured time, the
    ratio; with `cal`, the calibrated static estimate and its leave-one-out prediction beside them."""
    arch_label = "static estimate (sm_90 model)"
    head = ["| provider | unit | mode | kernel | config | launches | bound | " + arch_label + " us | measured us | "
            "measured / estimate |" + (" calibrated us | measured / calibrated | leave-one-out us |" if cal else "")]
    head.append("|---|---|---|---|---|---:|---|---:|---:|---:|" + ("---:|---:|---:|" if cal else ""))
    loo = calibration.leave_one_out(rows, fixed) if cal else {}
    lines = []
    for i, r in enumerate(sorted(rows, key=lambda r: (r["provider"] == "unfused", r["provider"], r["mode"],
                                                       r["layer"], -r["measured_us"]))):
        config = r["config"] + (" (autotuner)" if r["config_from"] == "autotuner" else
                                f" ({r['config_from']})" if r["config_from"] else "")
        cells = [r["provider"], r["layer"], r["mode"], r["kernel"], config, f"{r['launches']}", r["bound"],
                 report._us(r["estimate_us"]), report._us(r["measured_us"]), f"{r['ratio']:.2f}"]
        if cal:
            c = calibration.group_us(r["records"], cal)
            cells += [report._us(c), f"{r['measured_us'] / c:.2f}",
                      report._us(loo[id(r)]) if id(r) in loo else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    intro = (f"Per kernel: the {arch_label} (a lower bound) beside the device time the GPU measured"
             f"{' (' + source + ')' if source else ''}; every launch of a kernel in a unit summed on both "
             "sides. measured / estimate above 1: the model is optimistic by that factor.")
    if cal:
        intro += (f" Calibrated: the {cal.label}; leave-one-out: the same fit without that row, then its "
                  "prediction (the fused rows fit the fused constants, the eager rows the library ones).")
    return "\n".join([intro, ""] + head + lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m xception_fast.bench.static.compare", description=__doc__.split("\n")[0])
    p.add_argument("measured", help="kernel_times.json of a GPU run")
    p.add_argument("--static", nargs="+", default=[str(report.DEFAULT_DIR)],
                   help="static records (files or folders; --all-configs runs, so the autotuner's picks are there)")
    p.add_argument("--fit", action="store_true",
                   help="fit the calibration on these rows and print its constants (else use calibration.FITTED)")
    p.add_argument("--copy-gbps", type=float, default=None,
                   help="hold DRAM at this measured copy bandwidth (the run's `rates.copy_gbps`) instead of fitting it")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    measured = json.loads(Path(args.measured).read_text())
    rows = pair(report.load(args.static), measured)
    if not rows:
        print("error: no measured kernel pairs with a static record (same unit, provider, mode, dtype, batch)",
              file=sys.stderr)
        return 1
    fixed = {"dram_eff": args.copy_gbps / (machine(90).dram_tbps * 1e3)} if args.copy_gbps else None
    cal = calibration.fit(rows, fixed=fixed) if args.fit else calibration.FITTED
    text = markdown(rows, cal, source=f"{measured.get('device', 'GPU')}, {Path(args.measured).name}", fixed=fixed)
    if args.fit:
        text += "\n" + calibration.describe(cal, rows, fixed) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
