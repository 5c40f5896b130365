"""The calibrated static estimate: the raw lower bound corrected by rates a GPU actually reached.

The raw model (`model.estimate`) assumes every scheduler issues a warp-instruction every clock, the
tensor cores run at peak and DRAM streams at its nominal bandwidth. Measured on a GPU, the fused
kernels run 2-4.5x slower than that bound. The correction, per launch:

    calibrated = launch_us + max(issue_us / issue_eff + mma_us / mma_eff, dram_us / dram_eff)
    issue_eff  = min(1, resident warps per scheduler / latency_cycles)

(phases in sequence: the sum over phases of issue / issue_eff + mma / mma_eff, then the max with DRAM).
Issue and MMA time add up instead of overlapping: the same few warps issue the depthwise, the
address math and the tensor instructions, and wait for the MMA (wgmma wait 0 or 1, mma.sync
results used by the next instruction); on these measurements the sum fits better than the max
(median error 1.28x against 1.34x, and a tensor rate of 0.66-0.74 against an implausible 0.32). Library
kernels (the unfused rows) keep the max: their rooflines have no issue term. `latency_cycles` is the average number of clocks between two instructions
one warp can issue (dependent FMAs, loads, barriers): a scheduler with w resident warps issues at
most w / latency per clock. A kernel at one 8-warp CTA per SM has 2 warps per scheduler. Resident
CTAs are min(CTAs per SM, CTAs per SM the grid gives). `launch_us` is the fixed cost per launch
(start, tail, a small grid's ramp) that dominates kernels of a few microseconds.

The constants are fitted (`fit`: least squares on log(measured / calibrated), coordinate descent on
grids) on the per-kernel rows of `compare.pair`, the fused providers' kernels only; eager kernels
are shown beside them, predicted with the same constants. Every calibrated figure is labelled
`FITTED.label`: an estimate fitted on one GPU run, not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from xception_fast.bench.static.machine import machine

FUSED = ("triton", "cuda")


def is_fused_row(row: dict) -> bool:
    """A row of a fused provider's own kernel (fitted with the fused constants); the rest, eager kernels
    and a fused provider's cuBLAS GEMMs (`compare.LIBRARY`), are library kernels at their rooflines."""
    return row["provider"] in FUSED and not row.get("library")


@dataclass(frozen=True)
class Calibration:
    latency_cycles: float  # clocks between one warp's issues; the raw model is 1
    mma_eff: float  # achieved / modelled tensor rate
    dram_eff: float  # achieved / modelled DRAM bandwidth (the model's 3.35 TB/s)
    launch_us: float  # fixed time per launch
    # The unfused (library: cuDNN, cuBLAS, ATen) kernels, modelled at their rooflines, fitted apart on the
    # eager rows: they reach other fractions of the peaks than the fused kernels.
    lib_mma_eff: float = 1.0
    lib_dram_eff: float = 1.0
    fitted_on: str = ""

    @property
    def label(self) -> str:
        return f"calibrated static estimate (sm_90 model, fitted on {self.fitted_on})" if self.fitted_on else \
            "calibrated static estimate (sm_90 model)"


RAW = Calibration(latency_cycles=1.0, mma_eff=1.0, dram_eff=1.0, launch_us=0.0)
# Fitted with `python -m xception_fast.bench.static.compare benchmarks/results/h200-20261129/kernel_times.json
# --static <an --all-configs run of block1.rep.0 middle_residual conv4> --fit --copy-gbps 4270`.
# DRAM is held at that run's measured copy bandwidth (4,270 GB/s over the model's 3,350: `--copy-gbps
# 4270`), not fitted: see benchmarks/NOTES.md for why.
FITTED = Calibration(latency_cycles=6.25, mma_eff=0.66, dram_eff=1.27, launch_us=1.0, lib_mma_eff=0.70, lib_dram_eff=0.70,
                     fitted_on="the 2026-11-29 H200 run")
# What `describe` printed for that fit, for the tables' header (STATIC.md).
FITTED_SUMMARY = ("Fitted on 69 per-kernel device times of the Triton and CUDA providers (3 units, inference and "
                  "training, bf16, batch 256): one warp issues every 6.25 clocks (0.32 of the issue rate at 2 "
                  "warps per scheduler, one 8-warp CTA per SM), the tensor cores reach 0.66 of the modelled peak, "
                  "DRAM 4.27 TB/s (the run's measured copy), 1 us per launch. Measured / raw bound: median 2.7x, "
                  "worst 12x; measured vs calibrated: median 1.28x, worst 3.8x (leave-one-out: 1.29x, 3.8x). "
                  "The unfused (cuDNN/ATen) rooflines, fitted apart on 39 eager kernel times: 0.70 of the tensor "
                  "peak, 0.70 of 3.35 TB/s; median error 1.18x (raw: 1.45x). Little data: 3 shapes, one GPU.")


def warps_per_scheduler(record: dict) -> float:
    """Resident warps each scheduler can pick from; 0 where the record does not say."""
    warps, grid = record.get("warps") or 0, record.get("grid") or 0
    if not warps or not grid:
        return 0.0
    m = machine(record.get("arch", 90))
    resident = min(max(record.get("ctas_per_sm") or 1, 1), max(1, math.ceil(grid / m.sms)))
    return warps * resident / m.schedulers


def issue_eff(record: dict, cal: Calibration) -> float:
    w = warps_per_scheduler(record)
    return min(1.0, w / cal.latency_cycles) if w else 1.0


def calibrated_us(record: dict, cal: Calibration = FITTED) -> float:
    """The calibrated static estimate of one launch record (fused kernel or unfused roofline)."""
    mma, dram = (record.get("mma_us") or 0.0) / cal.mma_eff, (record.get("dram_us") or 0.0) / cal.dram_eff
    issue = record.get("issue_us")
    if issue is None:  # an unfused (library) kernel at its roofline: no SASS counted
        return cal.launch_us + max((record.get("mma_us") or 0.0) / cal.lib_mma_eff,
                                   (record.get("dram_us") or 0.0) / cal.lib_dram_eff)
    eff = issue_eff(record, cal)
    phases = record.get("phases")
    if phases and record.get("phases_in_sequence"):
        serial = sum(p["issue_us"] / eff + p["mma_us"] / cal.mma_eff for p in phases.values())
        return cal.launch_us + max(serial, dram)
    return cal.launch_us + max(issue / eff + mma, dram)


def group_us(records: list[dict], cal: Calibration = FITTED) -> float:
    return sum(calibrated_us(r, cal) for r in records)


def _loss(rows: list[dict], cal: Calibration) -> float:
    return sum(math.log(r["measured_us"] / group_us(r["records"], cal)) ** 2 for r in rows)


_GRIDS = {"latency_cycles": [1 + 0.25 * i for i in range(93)],
          "mma_eff": [0.2 + 0.02 * i for i in range(56)],
          "dram_eff": [0.3 + 0.02 * i for i in range(71)],
          "launch_us": [0.5 * i for i in range(21)]}
_LIB_GRIDS = {"lib_mma_eff": _GRIDS["mma_eff"], "lib_dram_eff": _GRIDS["dram_eff"]}


def fit(rows: list[dict], fitted_on: str = "the 2026-11-29 H200 run", fixed: Optional[dict] = None) -> Calibration:
    """Least squares on log(measured / calibrated) over the fused-provider rows: coordinate descent,
    each constant in turn over its grid, until a sweep changes nothing. `fixed`: constants held at
    a value instead of fitted (e.g. dram_eff from the run's measured copy bandwidth)."""
    data = [r for r in rows if is_fused_row(r) and r["measured_us"] > 0]
    if not data:
        raise ValueError("no fused-provider rows to fit on")
    library = [r for r in rows if not is_fused_row(r) and r["measured_us"] > 0]
    fixed = fixed or {}
    start = {"latency_cycles": 4.0, "mma_eff": 0.8, "dram_eff": 1.0, "launch_us": 1.0}
    cal = replace(RAW, fitted_on=fitted_on, **{**start, **fixed})
    for _ in range(20):
        before = cal
        for name, grid in _GRIDS.items():
            if name in fixed:
                continue
            cal = min((replace(cal, **{name: v}) for v in grid), key=lambda c: _loss(data, c))
        if cal == before:
            break
    for _ in range(20 if library else 0):  # then the library kernels' rates, with the launch cost found above
        before = cal
        for name, grid in _LIB_GRIDS.items():
            cal = min((replace(cal, **{name: v}) for v in grid), key=lambda c: _loss(library, c))
        if cal == before:
            break
    return cal


def leave_one_out(rows: list[dict], fixed: Optional[dict] = None) -> dict:
    """{id(row): its calibrated estimate under a fit on every other row}."""
    data = [r for r in rows if r["measured_us"] > 0]
    return {id(r): group_us(r["records"], fit([o for o in data if o is not r], fixed=fixed)) for r in data}


def _spread(pairs) -> str:
    """Median and worst factor between two sets of times (max(a/b, b/a))."""
    factors = sorted(max(a / b, b / a) for a, b in pairs)
    if not factors:
        return "-"
    return f"median {factors[len(factors) // 2]:.2f}x, worst {factors[-1]:.2f}x ({len(factors)} rows)"


def describe(cal: Calibration, rows: list[dict], fixed: Optional[dict] = None) -> str:
    """The fitted constants against the raw model's, and how well each predicts the rows."""
    data = [r for r in rows if is_fused_row(r)]
    others = [r for r in rows if not is_fused_row(r)]
    loo = leave_one_out(rows, fixed)
    lines = [f"Fitted on {len(data)} fused-provider kernel rows ({cal.label}):",
             f"- latency between one warp's issues: {cal.latency_cycles:.2f} clocks (raw model: 1): "
             f"{2 / cal.latency_cycles:.2f} of the issue rate at 2 warps/scheduler (one 8-warp CTA per SM)",
             f"- tensor rate: {cal.mma_eff:.2f} of the modelled peak (raw: 1.00)",
             f"- DRAM: {cal.dram_eff:.2f} of the model's {machine(90).dram_tbps} TB/s = "
             f"{cal.dram_eff * machine(90).dram_tbps:.2f} TB/s (raw: 1.00)"
             + (" (held, not fitted)" if "dram_eff" in (fixed or {}) else ""),
             f"- per launch: {cal.launch_us:.1f} us (raw: 0)",
             f"- library kernels (the unfused rows, fitted on the eager rows apart): tensor rate "
             f"{cal.lib_mma_eff:.2f}, DRAM {cal.lib_dram_eff:.2f} of the model's peaks (raw: 1.00)",
             f"Fused rows, measured vs raw estimate: {_spread((r['measured_us'], r['estimate_us']) for r in data)}; "
             f"vs calibrated: {_spread((r['measured_us'], group_us(r['records'], cal)) for r in data)}; "
             f"leave-one-out: {_spread((r['measured_us'], loo[id(r)]) for r in data)}."]
    if others:
        lines.append(f"Eager rows, measured vs raw: "
                     f"{_spread((r['measured_us'], r['estimate_us']) for r in others)}; vs calibrated: "
                     f"{_spread((r['measured_us'], group_us(r['records'], cal)) for r in others)}; leave-one-out: "
                     f"{_spread((r['measured_us'], loo[id(r)]) for r in others)}.")
    return "\n".join(lines)
