"""Run the static model over providers, layers and modes: flat records, unit and model totals.

`static_records(...)` returns the list of records the JSON holds, one per (provider, kernel, layer,
mode): for each kernel the launch the model estimates fastest among its autotune configs, then a
`unit_total` per (provider, layer, mode) (kernels run one after another: their estimates add up) and,
when every Xception layer was modelled, a `model_total` (each layer's unit total times the number of
units of that shape, 34 in all). Beside the fused providers: `roofline` (the unit's floor:
max(FLOPs at the MMA peak, compulsory bytes at DRAM bandwidth)) and `unfused` (eager cuDNN's
separate kernels, each at its own roofline; an optimistic estimate of the baseline, never measured).
On sm_90 every kernel record and total also has `calibrated_us` (`calibration`: the calibrated static
estimate, in the config the calibrated model picks, `calibrated_config` where that is another one).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Sequence

from xception_fast import backends
from xception_fast.bench.shapes import UnitShape, aligned_unit_shapes, unit_shapes
from xception_fast.bench.static import calibration, model, triton_plans
from xception_fast.bench.static.geometry import Unit
from xception_fast.bench.static.machine import Machine, machine as machine_for
from xception_fast.spec import UnitSpec

MODES = ("infer", "train")
PROVIDERS = ("triton", "cuda")
DEFAULT_BATCH, DEFAULT_IMAGE = 256, 299
FIELDS = ("provider", "kernel", "layer", "mode", "dtype", "arch", "issue_us", "mma_us", "dram_us", "estimate_us",
          "floor_us", "regs", "spill_bytes", "smem_bytes", "ctas_per_sm", "tensor_op")


# Units of the aligned Xception65 (the mid variant) modelled beside Xception's: its middle unit (33 of
# them: ReLU -> dw -> BN -> pw -> BN) and an exit unit (dw -> BN -> ReLU -> pw -> BN -> ReLU).
ALIGNED_LAYERS = {"aligned-728x728-19-midbn": "xception65_middle",
                  "aligned-1536x1536-10-nopre-post-midbn_relu": "xception65_exit"}


def layer_name(shape: UnitShape) -> str:
    """"middle" for the 728->728 19x19 unit, "middle_residual" for the one with the residual add,
    `ALIGNED_LAYERS`' names, else the first module with that shape (timm-style: block1.rep.0, conv3)."""
    if shape.slug == "middle-728x728-19":
        return "middle"
    if shape.slug == "middle-728x728-19-res":
        return "middle_residual"
    return ALIGNED_LAYERS.get(shape.slug) or shape.first_module or shape.slug


def modelled_shapes(image_size: int = DEFAULT_IMAGE) -> list[UnitShape]:
    """Xception's distinct units, then `ALIGNED_LAYERS` (not part of Xception's model total)."""
    return unit_shapes(image_size) + [s for s in aligned_unit_shapes(image_size) if s.slug in ALIGNED_LAYERS]


def select_layers(shapes: Sequence[UnitShape], patterns: Optional[Iterable[str]]) -> list[UnitShape]:
    """Shapes named by `patterns`: a layer name or slug exactly ("middle" is the 728->728 unit without
    the residual), else every shape whose slug or name contains the pattern."""
    if not patterns:
        return list(shapes)
    chosen = set()
    for p in patterns:
        exact = [s for s in shapes if p in (layer_name(s), s.slug)]
        chosen.update(s.slug for s in exact or [s for s in shapes if p in s.slug or p in layer_name(s)])
    return [s for s in shapes if s.slug in chosen]


def plan_modules() -> dict:
    from xception_fast.bench.static import cuda_plans
    return {"triton": triton_plans, "cuda": cuda_plans}


def _base(provider: str, kernel: str, layer: str, mode: str, dtype: str, m: Machine, shape: UnitShape,
          batch: int) -> dict:
    return dict(provider=provider, kernel=kernel, layer=layer, mode=mode, dtype=dtype, arch=m.arch,
                label=m.label, machine=m.name, batch=batch, unit=shape.slug, count=shape.count)


def with_calibrated(record: dict) -> dict:
    """`calibrated_us`: the calibrated static estimate (`calibration.FITTED`, fitted on sm_90
    measurements; None on other architectures), beside the raw lower bound `estimate_us`."""
    record["calibrated_us"] = calibration.calibrated_us(record) if record.get("arch") == 90 else None
    return record


def kernel_record(est: model.Estimate, base: dict, candidates: int) -> dict:
    return with_calibrated({**base, "issue_us": est.issue_us, "mma_us": est.mma_us, "dram_us": est.dram_us,
            "estimate_us": est.estimate_us, "floor_us": None, "regs": est.regs, "spill_bytes": est.spill_bytes,
            "smem_bytes": est.smem_bytes, "ctas_per_sm": est.ctas_per_sm, "warps": est.warps, "tensor_op": est.tensor_op,
            "bound": est.bound, "config": est.config, "configs_modelled": candidates, "grid": est.grid,
            "waves": est.waves, "warp_instr_per_cta": est.warp_instr_per_cta, "dram_bytes": est.dram_bytes,
            "mma_flops": est.mma_flops, "dw_dup": est.dw_dup, "bar_per_iter": est.bar_per_iter,
            "mma_wait": est.mma_wait, "loop_trips": est.loop_trips, "phases": est.phases or None,
            "phases_in_sequence": est.phases_in_sequence if est.phases else None, "overlapped_us": est.overlapped_us})


def best_launch(candidates: Sequence[model.Launch], m: Machine) -> tuple[model.Estimate, list[model.Estimate]]:
    """(the candidate (autotune config) with the smallest estimate, every candidate's estimate);
    configs that do not fit the SM (shared memory) are left out, as the autotuner would drop them."""
    # A plan may give a ready Estimate: a library kernel (cuBLAS) at its own roofline, `model.library_gemm`.
    estimates = [c if isinstance(c, model.Estimate) else model.estimate(c, m) for c in candidates]
    fitting = [e for e in estimates if e.ctas_per_sm > 0] or estimates
    return min(fitting, key=lambda e: e.estimate_us), estimates


def calibrated_choice(estimates: Sequence[model.Estimate], base: dict) -> dict:
    """The calibrated model's own pick among the configs: {"calibrated_us": its calibrated estimate,
    "calibrated_config": its config}. The raw pick (the record's config) is the fastest under the bound;
    under the calibrated rates another config can win (e.g. 8 warps per CTA over 4, at one CTA per SM),
    and the unit's calibrated total should be what an autotuner would reach, so it sums these. Configs that
    spill are left out where one does not: the model counts a spill's instructions, not its local-memory
    latency, and rates the extra CTA a register cap buys at full value; on the 2026-11-29 H200 run the
    autotuner rejected the spilling `maxnreg=128` config on all three shapes the calibration prefers it on."""
    fitting = [e for e in estimates if e.ctas_per_sm > 0] or list(estimates)
    fitting = [e for e in fitting if not e.spill_bytes] or fitting
    scored = [(with_calibrated(kernel_record(e, base, len(estimates)))["calibrated_us"], e.config) for e in fitting]
    if any(v is None for v, _ in scored):
        return {}
    value, config = min(scored, key=lambda t: t[0])
    return {"calibrated_us": value, "calibrated_config": config}


def _total(records: list[dict], base: dict, floor_us: Optional[float]) -> dict:
    out = {**base, "kernel": "unit_total", "floor_us": floor_us, "regs": None, "spill_bytes": None,
           "smem_bytes": None, "ctas_per_sm": None, "tensor_op": None}
    for key in ("issue_us", "mma_us", "dram_us", "estimate_us", "calibrated_us"):
        values = [r.get(key) for r in records]
        out[key] = None if any(v is None for v in values) else sum(values)
    out["kernels"] = len(records)
    return out


def roofline_floor_us(shape: UnitShape, batch: int, mode: str, dtype: str, m: Machine) -> float:
    """max(unit FLOPs at the best tensor rate, compulsory bytes at DRAM bandwidth), in us."""
    from xception_fast.bench.roofline import unit_bytes, unit_flops

    rates = m.mma_flops_per_clock.get("HGMMA") or m.mma_flops_per_clock["HMMA"]
    per_clock = rates.get("tf32" if dtype == "fp32" else dtype)
    flops_s = unit_flops(shape, batch, mode) / (m.sms * m.clock_ghz * 1e9 * per_clock)
    bytes_s = unit_bytes(shape, batch, mode, dtype) / m.dram_rate()
    return max(flops_s, bytes_s) * 1e6


def unfused_kernels(unit: Unit, mode: str, m: Machine) -> list[tuple[str, float, float]]:
    """(kernel, MMA-peak us, DRAM us) of eager cuDNN's separate kernels for one unit."""
    rates = m.mma_flops_per_clock.get("HGMMA") or m.mma_flops_per_clock["HMMA"]
    mma = m.sms * m.clock_ghz * 1e9 * rates.get("tf32" if unit.dtype == "fp32" else unit.dtype)
    bw = m.dram_rate()
    x, d, y, w = unit.x_bytes(), unit.d_bytes(), unit.y_bytes(), unit.weight_bytes()
    gemm = 2.0 * unit.P * unit.C * unit.Cout
    s = unit.shape
    fwd = []
    if s.pre_relu:
        fwd.append(("relu", 0.0, 2 * x / bw))
    fwd.append(("depthwise", 0.0, (x + d) / bw))
    mid = UnitSpec((3, 3), mid=s.mid or None)
    if mid.mid_norm:
        fwd.append(("mid_batchnorm", 0.0, 2 * d / bw))
    if mid.mid_act:
        fwd.append(("mid_activation", 0.0, 2 * d / bw))
    fwd += [("pointwise", gemm / mma, (d + w + y) / bw), ("batchnorm", 0.0, 2 * y / bw)]
    if s.post_relu:
        fwd.append(("relu_after", 0.0, 2 * y / bw))
    if s.residual:
        fwd.append(("residual_add", 0.0, 3 * y / bw))
    if mode == "infer":
        return [(k, a * 1e6, b * 1e6) for k, a, b in fwd]
    bwd = [("batchnorm_backward", 0.0, 4 * y / bw), ("pointwise_grad_input", gemm / mma, (y + w + d) / bw),
           ("pointwise_grad_weight", gemm / mma, (y + d) / bw), ("depthwise_grad_input", 0.0, (d + x) / bw),
           ("depthwise_grad_weight", 0.0, (d + x) / bw)]
    if mid.mid_act:
        bwd.append(("mid_activation_backward", 0.0, 3 * d / bw))
    if mid.mid_norm:
        bwd.append(("mid_batchnorm_backward", 0.0, 4 * d / bw))
    if s.pre_relu:
        bwd.append(("relu_backward", 0.0, 3 * x / bw))
    return [(k, a * 1e6, b * 1e6) for k, a, b in fwd + bwd]


def static_records(arch: int = 90, dtypes: Sequence[str] = ("bf16",), layers: Optional[Iterable[str]] = None,
                   modes: Sequence[str] = MODES, providers: Sequence[str] = PROVIDERS, batch: int = DEFAULT_BATCH,
                   image_size: int = DEFAULT_IMAGE, progress: Optional[Callable[[str], None]] = None,
                   errors: Optional[list] = None, all_configs: bool = False) -> list[dict]:
    """Records for every (provider, kernel, layer, mode, dtype) asked for; see the module docstring.

    `all_configs`: also a record for every other autotune config of each kernel (`"chosen": false`;
    the chosen one has `"chosen": true`; totals use the chosen ones).
    `layers`: substrings of a layer's name or slug (e.g. "middle", "block1", "exit-1024"); all when None.
    A provider whose plans fail (no nvcc for the CUDA provider, a plan that no longer matches its
    kernel) raises, unless `errors` is a list: then each failure is appended to it as a message, and
    that (provider, layer, mode) has no records (nor a model total)."""
    m = machine_for(arch)
    all_shapes = modelled_shapes(image_size)
    xception_slugs = {s.slug for s in unit_shapes(image_size)}
    shapes = select_layers(all_shapes, layers)
    if not shapes:
        raise ValueError(f"no layer matches {list(layers or [])}: layers are "
                         + ", ".join(f"{layer_name(s)} ({s.slug})" for s in all_shapes))
    plans = plan_modules()
    say = progress or (lambda message: None)
    records: list[dict] = []
    for dtype in dtypes:
        for mode in modes:
            unit_totals: dict[str, list[dict]] = {}
            for shape in shapes:
                unit = Unit(shape, batch, dtype)
                layer = layer_name(shape)
                floor = roofline_floor_us(shape, batch, mode, dtype, m)
                base = _base("roofline", "unit_total", layer, mode, dtype, m, shape, batch)
                records.append({**base, "issue_us": None, "mma_us": None, "dram_us": None, "estimate_us": floor,
                                "floor_us": floor, "regs": None, "spill_bytes": None, "smem_bytes": None,
                                "ctas_per_sm": None, "tensor_op": None})
                totals_of = unit_totals if shape.slug in xception_slugs else {}  # the model total: Xception's
                totals_of.setdefault("roofline", []).append(records[-1])
                rows = []
                for kernel, mma_us, dram_us in unfused_kernels(unit, mode, m):
                    rows.append(with_calibrated({
                        **_base("unfused", kernel, layer, mode, dtype, m, shape, batch), "issue_us": None,
                        "mma_us": mma_us, "dram_us": dram_us, "estimate_us": max(mma_us, dram_us), "floor_us": None,
                        "regs": None, "spill_bytes": None, "smem_bytes": None, "ctas_per_sm": None,
                        "tensor_op": "HGMMA" if mma_us and arch >= 90 else None}))
                total = _total(rows, _base("unfused", "unit_total", layer, mode, dtype, m, shape, batch), floor)
                records += rows + [total]
                totals_of.setdefault("unfused", []).append(total)
                for provider in providers:
                    if shape.mid and f"mid_{shape.mid}" not in backends.PROVIDERS[provider].variants:
                        say(f"{provider} {layer}: the provider does not compute the mid variant (not modelled)")
                        continue
                    if mode not in plans[provider].MODES:
                        say(f"{provider} {mode}: no launch plan yet (not modelled)")
                        continue
                    start = time.time()
                    rows, others = [], []
                    try:
                        launches = plans[provider].MODES[mode](unit, arch, m.sms)
                        if launches is None:  # the plan module has no plan for this dtype
                            say(f"{provider} {mode} {dtype}: no launch plan for this dtype (not modelled)")
                            continue
                        for candidates in launches:
                            est, every = best_launch(candidates, m)
                            base = _base(provider, est.kernel, layer, mode, dtype, m, shape, batch)
                            rows.append({**kernel_record(est, base, len(every)), "chosen": True,
                                         **calibrated_choice(every, base)})
                            if all_configs:  # the other configs, beside the totals (which use the chosen one)
                                others += [{**kernel_record(e, base, len(every)), "chosen": False}
                                           for e in every if e is not est]
                    except Exception as exc:  # noqa: BLE001  (recorded for the caller, see the docstring)
                        if errors is None:
                            raise
                        errors.append(f"{provider} {mode} {dtype} {layer}: {type(exc).__name__}: {exc}")
                        say(errors[-1])
                        continue
                    total = _total(rows, _base(provider, "unit_total", layer, mode, dtype, m, shape, batch), floor)
                    records += rows + others + [total]
                    totals_of.setdefault(provider, []).append(total)
                    say(f"{provider} {mode} {dtype} {layer}: {total['estimate_us']:.0f} us "
                        f"({len(rows)} kernels, {time.time() - start:.0f} s)")
            if xception_slugs <= {s.slug for s in shapes}:
                for provider, totals in unit_totals.items():
                    if len(totals) != len(xception_slugs):
                        continue  # a layer failed: no model total
                    out = {**_base(provider, "model_total", "all", mode, dtype, m, shapes[0], batch),
                           "unit": "all", "count": sum(t["count"] for t in totals),
                           "regs": None, "spill_bytes": None, "smem_bytes": None, "ctas_per_sm": None,
                           "tensor_op": None}
                    for key in ("issue_us", "mma_us", "dram_us", "estimate_us", "floor_us", "calibrated_us"):
                        values = [t.get(key) for t in totals]
                        out[key] = None if any(v is None for v in values) else \
                            sum(v * t["count"] for v, t in zip(values, totals))
                    records.append(out)
    return records
