"""The speed targets of the provider issues (#12 Triton, #13 CUDA), checked against the static records.

The issues state their targets in the static estimate (sm_90 model), bf16, batch 256, 299x299: absolute
times for the middle-flow unit, and multiples of the roofline floor for every Xception unit and for the
34-unit sum. `markdown(records)` renders one row per target with each provider's raw figure and its
calibrated static estimate beside it, and whether each meets the target. The raw figure is what the
issues' targets are written against; the calibrated one (fitted on a GPU run) is the better guess of a
GPU's time, so a target met only raw is reported as such, not as met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PROVIDERS = ("triton", "cuda")
MAX_REGS = 255


@dataclass(frozen=True)
class Target:
    what: str
    mode: str  # "infer" or "train"
    limit: float  # us for a layer's unit, else a multiple of the floor
    layer: Optional[str] = None  # one layer's unit time against `limit` us
    each: bool = False  # the worst Xception unit's time / its floor against `limit`
    # neither: the 34-unit model total / its floor against `limit`


TARGETS = (
    Target("middle-flow unit (`middle`), inference", "infer", 200.0, layer="middle"),
    Target("middle-flow unit with the residual add (`middle_residual`), inference", "infer", 200.0,
           layer="middle_residual"),
    Target("every Xception unit, inference: worst time / floor", "infer", 2.0, each=True),
    Target("34 units, inference: total / floor", "infer", 2.0),
    Target("middle-flow unit (`middle`), training", "train", 1300.0, layer="middle"),
    Target("middle-flow unit with the residual add (`middle_residual`), training", "train", 1300.0,
           layer="middle_residual"),
    Target("every Xception unit, training: worst time / floor", "train", 2.5, each=True),
    Target("34 units, training: total / floor", "train", 2.5),
)


HALF_VS_BF16 = Target("fp16 within 10% of bf16", "", 1.10)


def half_vs_bf16(records: list[dict], provider: str, mode: str, key: str) -> Optional[tuple[float, str]]:
    """The 34-unit total in fp16 over the one in bf16; None unless both were modelled."""
    half = _totals(records, "fp16").get((provider, "all", mode))
    bf16 = _totals(records, "bf16").get((provider, "all", mode))
    if not half or not bf16 or half.get(key) is None or not bf16.get(key):
        return None
    return half[key] / bf16[key], ""


def _totals(records: list[dict], dtype: str) -> dict:
    return {(r["provider"], r["layer"], r["mode"]): r for r in records
            if r["dtype"] == dtype and r["kernel"] in ("unit_total", "model_total")}


def figure(target: Target, records: list[dict], provider: str, dtype: str, key: str) -> Optional[tuple[float, str]]:
    """(value, where) of a provider against a target from the `key` figure ("estimate_us" raw or
    "calibrated_us"); None where the records do not cover it."""
    totals = _totals(records, dtype)
    if target.layer:
        r = totals.get((provider, target.layer, target.mode))
        return (r[key], "") if r and r.get(key) is not None else None
    if target.each:
        from xception_fast.bench.static.run import ALIGNED_LAYERS  # not at the top: run imports the kernels

        units = [r for (p, layer, mode), r in totals.items() if p == provider and mode == target.mode
                 and r["kernel"] == "unit_total" and layer not in ALIGNED_LAYERS.values()]
        if not units or any(r.get(key) is None or not r.get("floor_us") for r in units):
            return None
        worst = max(units, key=lambda r: r[key] / r["floor_us"])
        return worst[key] / worst["floor_us"], worst["layer"]
    r = totals.get((provider, "all", target.mode))
    return (r[key] / r["floor_us"], "") if r and r.get(key) is not None and r.get("floor_us") else None


def registers(records: list[dict], provider: str, dtype: str) -> Optional[tuple[int, int]]:
    """(most registers, total spill bytes) over a provider's chosen kernels."""
    kernels = [r for r in records if r["provider"] == provider and r["dtype"] == dtype and r.get("chosen", True)
               and r["kernel"] not in ("unit_total", "model_total") and r.get("regs")]
    if not kernels:
        return None
    return max(r["regs"] for r in kernels), sum(r.get("spill_bytes") or 0 for r in kernels)


def _cell(target: Target, value: Optional[tuple[float, str]]) -> str:
    if value is None:
        return "not modelled"
    v, where = value
    text = f"{v:,.0f} us" if target.layer else f"{v:.2f}x"
    mark = "met" if v <= target.limit else "missed"
    return f"{text} {mark}" + (f" ({where})" if where else "")


def _middle_floor(records: list[dict], dtype: str) -> str:
    r = _totals(records, dtype).get(("roofline", "middle", "train"))
    return (f" (training: {r['estimate_us']:,.0f} us for the middle unit, where issue 12's table wrote 0.66 ms)"
            if r else "")


def markdown(records: list[dict], dtype: str = "bf16") -> str:
    providers = [p for p in PROVIDERS if any(r["provider"] == p and r["dtype"] == dtype for r in records)]
    if not providers:
        return ""
    lines = [f"### Issue targets, {dtype} (#12 Triton, #13 CUDA)", "",
             "The issues' targets are stated in the raw static estimate; the calibrated static estimate is "
             "the better guess of a GPU's time. \"met\" compares each figure with the target; neither column is "
             "a measurement. Floors are the roofline floors of the unit tables below" + _middle_floor(records, dtype)
             + ".", "",
             "| target | limit | " + " | ".join(f"{p} raw | {p} calibrated" for p in providers) + " |",
             "|---|---:|" + "---|---|" * len(providers)]
    for t in TARGETS:
        limit = f"{t.limit:,.0f} us" if t.layer else f"{t.limit:.1f}x floor"
        cells = []
        for p in providers:
            cells += [_cell(t, figure(t, records, p, dtype, "estimate_us")),
                      _cell(t, figure(t, records, p, dtype, "calibrated_us"))]
        lines.append(f"| {t.what} | {limit} | " + " | ".join(cells) + " |")
    cells = []
    for p in providers:
        regs = registers(records, p, dtype)
        cells += ["not modelled" if regs is None else
                  f"{regs[0]} regs, {regs[1]} B spilled {'met' if regs[0] <= MAX_REGS and not regs[1] else 'missed'}",
                  "(same kernels)"]
    lines.append(f"| registers, every chosen kernel | <= {MAX_REGS}, no spill | " + " | ".join(cells) + " |")
    for mode, what in (("infer", "inference"), ("train", "training")):
        cells = [_cell(HALF_VS_BF16, half_vs_bf16(records, p, mode, key))
                 for p in providers for key in ("estimate_us", "calibrated_us")]
        if any(c != "not modelled" for c in cells) and dtype == "bf16":
            lines.append(f"| fp16 / bf16, 34 units, {what} | <= {HALF_VS_BF16.limit:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
