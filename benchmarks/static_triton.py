"""Static estimate (sm_90 model) of the Triton two-phase kernels on one layer: no GPU needed.

Compiles a kernel for sm_90 (tests/triton_helpers.py), finds its SASS loop nest (depthwise chunk
loop, pointwise K loop, Cout loop, position-tile loop), multiplies each loop body by its trip count
for the layer and config, and converts the dynamic warp-instructions into time with the H100 model
of PERFORMANCE.md: issue-bound = warp-instructions / (4 schedulers x 1.83 GHz) on the busiest SM;
MMA at HGMMA peak (989 TFLOP/s over 132 SMs) on the padded tiles; DRAM at 3.35 TB/s. The largest is
the static estimate: a lower bound and a model, never a measurement. "serial" adds the depthwise
phase to the GEMM phase, as when one program per SM runs both (nothing overlaps them).

    python benchmarks/static_triton.py [infer|train|grad_z] [N H W C COUT] [BLOCK_P,BLOCK_N,BLOCK_K,BLOCK_D,WARPS,STAGES[,MAXNREG]]
        [FLAG=VALUE ...]

Defaults: infer, the middle-flow unit (256 x 19 x 19, 728 -> 728), the first autotune config,
pre-ReLU only (FLAG=VALUE as in triton_helpers, e.g. HAS_RESIDUAL=1).
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

SMS, SCHEDULERS, CLOCK = 132, 4, 1.83e9
MMA_PEAK, DRAM = 989e12, 3.35e12


def loop_nest(loops):
    """The loops that nest properly, largest first. A range closed by a backward branch that crosses
    other ranges is a jump back into a loop (the wgmma wait, a pipeline epilogue), not a loop: the
    range crossing the most others goes first, until none cross."""
    def crosses(a, b):
        return a[0] < b[0] <= a[1] < b[1] or b[0] < a[0] <= b[1] < a[1]

    kept = [lp for lp in loops if lp[2] > 8]
    while True:
        counts = [sum(crosses(lp, other) for other in kept) for lp in kept]
        if not kept or max(counts) == 0:
            return sorted(kept, key=lambda lp: -lp[2])
        kept.pop(counts.index(max(counts)))


def estimate(kernel_name="infer", shape=(256, 19, 19, 728, 728), config=None, flags=None):
    import triton
    import triton_helpers as th
    from xception_fast.triton_kernels import autotune, depthwise_pointwise as dp

    th.FLAGS.update({"PRE_RELU": 1, "POST_RELU": 0, "HAS_RESIDUAL": 0, **(flags or {})})
    kernel = getattr(dp, f"_sepconv_{kernel_name}_kernel")
    if config is None:
        config = th.configs_for(kernel, "bf16", 90)[0]
    compiled = th.compile_kernel(kernel, {}, config, 90, "bf16")
    nest = loop_nest(th.sass_loops(compiled))
    inside = lambda inner, outer: outer[0] <= inner[0] and inner[1] <= outer[1]  # noqa: E731
    k_loop = min((lp for lp in nest if lp[3].get("HGMMA")), key=lambda lp: lp[2])
    dw_loop = min((lp for lp in nest if lp[3].get("FFMA", 0) > 100 and not lp[3].get("HGMMA")), key=lambda lp: lp[2])
    cout_loop = min((lp for lp in nest if inside(k_loop, lp) and lp is not k_loop), key=lambda lp: lp[2])
    tile_loop = nest[0]
    assert inside(dw_loop, tile_loop) and inside(cout_loop, tile_loop)

    n, h, w, c, cout = shape
    bp, bn, bk, bd = (config.kwargs[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K", "BLOCK_D"))
    warps = config.num_warps
    p = n * h * w  # stride 1, 'same' padding: the middle flow's geometry
    per_sm = 2 if kernel_name == "infer" else 1  # as the host launches them
    programs = triton.cdiv(p, triton.cdiv(triton.cdiv(p, SMS * per_sm), 128) * 128)
    chunk = triton.cdiv(triton.cdiv(p, programs), 128) * 128
    tiles_per_sm = math.ceil(programs / SMS) * (chunk // bp)
    ksteps, couts = triton.cdiv(c, bk), triton.cdiv(cout, bn)
    dw_phase = ksteps * (bk // bd) * dw_loop[2]
    gemm_phase = couts * (cout_loop[2] - k_loop[2] + ksteps * k_loop[2])
    per_tile = tile_loop[2] - dw_loop[2] - cout_loop[2] + dw_phase + gemm_phase  # per warp
    issue = lambda count: tiles_per_sm * count * warps / (SCHEDULERS * CLOCK)  # noqa: E731
    mma = tiles_per_sm * bp * (ksteps * bk) * (couts * bn) * 2 / (MMA_PEAK / SMS)
    io = {"infer": 2 + th.FLAGS["HAS_RESIDUAL"], "train": 2, "grad_z": 3}[kernel_name]  # x + outputs, P x C each
    dram = p * c * 2 * io / DRAM
    times = dict(issue=issue(per_tile), mma=mma, dram=dram)
    return dict(config=f"{bp}x{bn}x{bk} d{bd} w{warps} s{config.num_stages}"
                       f"{' maxnreg=%d' % config.maxnreg if config.maxnreg else ''}",
                usage=th.resource_usage(compiled).strip(),
                loops=dict(depthwise=dw_loop[2], k_step=k_loop[2], cout_tile=cout_loop[2] - k_loop[2],
                           tile=tile_loop[2] - dw_loop[2] - cout_loop[2]),
                element_taps_per_chunk=bp * bd * th.FLAGS["KH"] * th.FLAGS["KW"] / (warps * 32),
                estimate_ms=max(times.values()) * 1e3, serial_ms=(issue(dw_phase) + max(issue(gemm_phase), mma)) * 1e3,
                **{f"{k}_ms": v * 1e3 for k, v in times.items()})


def main(argv):
    import triton

    name = argv[0] if argv and not argv[0][0].isdigit() else "infer"
    rest = argv[1:] if argv and not argv[0][0].isdigit() else argv
    numbers = [a for a in rest if a.isdigit()]
    shape = tuple(int(a) for a in numbers[:5]) if len(numbers) >= 5 else (256, 19, 19, 728, 728)
    config = None
    for a in rest:
        if "," in a:
            v = [int(x) for x in a.split(",")]
            config = triton.Config(dict(BLOCK_P=v[0], BLOCK_N=v[1], BLOCK_K=v[2], BLOCK_D=v[3]), num_warps=v[4],
                                   num_stages=v[5], maxnreg=v[6] if len(v) > 6 else None)
    flags = {k: int(v) for k, v in (a.split("=") for a in rest if "=" in a)}
    result = estimate(name, shape, config, flags)
    print(f"static estimate (sm_90 model), {name} {shape}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float)
                                                                          else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
