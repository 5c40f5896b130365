"""The cost model: a kernel's launch plan + its SASS -> issue, MMA and DRAM times.

For one launch (a compiled kernel, its grid and the trip counts of its loops):
- dynamic warp-instructions per CTA = sum over SASS instructions of the product of the trip counts
  of the loops around it (`sass.dynamic_counts`), times the CTA's warps;
- CTAs per SM from registers (allocated per warp in units of 256), shared memory (plus the
  per-CTA reservation), threads and the CTA limit; waves = grid / (SMs x CTAs per SM);
- issue time = ceil(grid / SMs) x warp-instructions per CTA / (4 schedulers x clock): some SM must
  run that many CTAs, and it issues at most one warp-instruction per scheduler per clock;
- MMA time = ceil(grid / SMs) x the CTA's tensor-instruction FLOPs / the SM's peak for the
  instruction class the SASS actually holds (HGMMA, HMMA; FFMA where no tensor instruction is
  emitted, as for an fp32 `tl.dot(input_precision="ieee")`);
- DRAM time = the bytes the kernel must move (its plan says which) / DRAM bandwidth;
- the static estimate is the largest of the three: a lower bound under the model, never a measurement.
  A kernel whose plan names phases (`LoopPlan.phase`: e.g. a depthwise into shared memory, then a GEMM
  over it, with a barrier between) gets issue and MMA time per phase; where one CTA per SM runs them,
  one after the other with nothing to fill the gaps, the estimate is max(sum over phases of
  max(issue, MMA), DRAM): the phases in sequence. With more CTAs per SM the phases of different CTAs
  may overlap and the estimate stays the largest of the three. `overlapped_us` keeps max(issue,
  MMA, DRAM) beside it.

Paths: where a loop body holds branches that matter (an epilogue taken once per output tile, copies
of the code for run-time flags), its plan lists `Path`s (a signature: how many instructions of each
kind the path holds, and the share of iterations that take it); each path is found in the SASS
(`sass.shortest_path`: the shortest one holding the signature, a lower bound like the rest of the
model; the run fails when none does) and its instructions are weighted by its share, instead of
counting the whole body every iteration.

Flags: `dw_dup` (FFMAs issued / FFMAs the depthwise needs, where the plan says how many it needs:
2.0 means every depthwise FMA is computed twice, e.g. once per warpgroup), `bar_per_iter`
(BAR.SYNC per iteration of the innermost loop: layout conversions through shared memory),
`mma_wait` (the smallest N of `WARPGROUP.DEPBAR.LE gsb0, N` in a loop that issues HGMMA: 0 means
each wgmma is waited for right after it is issued, nothing overlaps it; 1, the wait is one group
behind; see `mma_wait_depth`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from xception_fast.bench.static import sass
from xception_fast.bench.static.machine import Machine

_HGMMA_SHAPE = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"HMMA\.(\d+)")
_HMMA_MNK = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}  # mma.sync shapes
_WAIT = re.compile(r"gsb0,\s*0x([0-9a-f]+)")
# The tensor-instruction class of a SASS opcode, by its base.
TENSOR_OPS = ("HGMMA", "HMMA")


class PlanMismatch(sass.SassError):
    """The SASS loop structure of a kernel is not the one its launch plan declares."""


@dataclass(frozen=True)
class Path:
    """One way through a flat loop body: `share` of the iterations (per warp, averaged over the CTAs)
    take the shortest path holding exactly `signature[key]` instructions of each key (an opcode base,
    "STG", or an exact opcode, "STG.E.U16"; see `sass.matches`)."""

    what: str
    share: float
    signature: tuple  # ((key, count), ...): a dict's sorted items, hashable

    @classmethod
    def make(cls, what: str, share: float, signature: dict) -> "Path":
        return cls(what, share, tuple(sorted(signature.items())))


@dataclass
class LoopPlan:
    """One loop of a kernel as its plan declares it, in SASS order (outer before inner).

    `trips`: iterations each time the loop is entered, averaged over the CTAs (a float where CTAs
    differ, e.g. the last position split). `pipelined`: the loop Triton software-pipelines (it holds
    the `tl.dot`); with num_stages > 1 the compiler may peel iterations out of it, which the model
    detects from the tensor instructions after the loop and subtracts.
    """

    what: str
    trips: float
    pipelined: bool = False
    # Instructions per iteration the plan assumes, by opcode base (inner loops excluded): pins an
    # unroll factor, checked against the SASS.
    expect: Optional[dict] = None
    # The ways through the body and their shares (summing to 1); None: every instruction every
    # iteration. A path holds the loop's own instructions; inner loops count by their own trips.
    paths: Optional[Sequence[Path]] = None
    # The phase of the kernel the loop belongs to (see the module docstring); "" for none.
    phase: str = ""


@dataclass
class Compiled:
    """What the compiler produced for one kernel variant."""

    cubin: bytes
    function: str  # the SASS function name
    regs: int
    spill_bytes: int  # stack per thread (local memory: spills, or arrays the compiler could not keep)
    smem_bytes: int  # static + dynamic shared memory per CTA
    num_warps: int
    num_stages: int = 1
    operand: str = "bf16"  # element type of the tensor-instruction operands

    def sass(self) -> sass.Function:
        functions = sass.disassemble(self.cubin)
        if self.function not in functions:
            raise sass.SassError(f"no function {self.function} in the cubin (has {sorted(functions)})")
        return functions[self.function]


@dataclass
class Launch:
    """One kernel launch of a provider for one layer: the plan the model multiplies out."""

    kernel: str
    config: str  # e.g. "64x256x16 w8 s1": the block sizes, warps and stages it was compiled with
    compile: Callable[[], Compiled]
    grid: int  # CTAs
    loops: Sequence[LoopPlan]
    dram_bytes: float
    useful_ffma: float = 0.0  # thread-FMAs per CTA the algorithm needs on the CUDA cores (0: not declared)
    threads: Optional[int] = None  # per CTA when it is not num_warps x 32 (CUDA launches)


@dataclass
class Estimate:
    """The model's figures for one launch. Every time is a static estimate (sm_XX model)."""

    kernel: str
    config: str
    grid: int
    issue_us: float
    mma_us: float
    dram_us: float
    tensor_op: str
    regs: int
    spill_bytes: int
    smem_bytes: int
    ctas_per_sm: int
    waves: float
    warp_instr_per_cta: float
    dram_bytes: float
    mma_flops: float
    dw_dup: Optional[float] = None
    bar_per_iter: Optional[float] = None
    mma_wait: Optional[int] = None
    loop_trips: list = field(default_factory=list)
    # {phase: {"issue_us", "mma_us"}} where the plan names phases (else empty); they run in sequence
    # where one CTA per SM runs them (another CTA's phase could fill the gaps otherwise).
    phases: dict = field(default_factory=dict)
    warps: int = 0  # per CTA: with ctas_per_sm, the warps each scheduler can switch between (calibration)

    @property
    def phases_in_sequence(self) -> bool:
        return bool(self.phases) and self.ctas_per_sm <= 1

    @property
    def overlapped_us(self) -> float:
        return max(self.issue_us, self.mma_us, self.dram_us)

    @property
    def estimate_us(self) -> float:
        if self.phases_in_sequence:
            serial = sum(max(p["issue_us"], p["mma_us"]) for p in self.phases.values())
            return max(serial, self.dram_us)
        return self.overlapped_us

    @property
    def bound(self) -> str:
        if self.phases_in_sequence and self.estimate_us > self.dram_us:
            return " + ".join(f"{name} {'mma' if p['mma_us'] > p['issue_us'] else 'issue'}"
                              for name, p in self.phases.items())
        times = {"issue": self.issue_us, "mma": self.mma_us, "dram": self.dram_us}
        return max(times, key=times.get)


def ctas_per_sm(machine: Machine, regs: int, threads: int, smem: int) -> int:
    """Occupancy limit from registers, shared memory, threads and the CTA limit (0: does not fit)."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = machine.regs_per_sm // (regs_per_warp * warps)
    by_threads = machine.max_threads_per_sm // (warps * 32)
    if smem > machine.smem_per_block:
        return 0
    by_smem = machine.smem_per_sm // (smem + machine.smem_reserved_per_block)
    return max(0, min(by_regs, by_threads, by_smem, machine.max_ctas_per_sm))


def _mma_flops(opcode: str) -> float:
    """FLOPs of one warp's tensor instruction (HGMMA: the warpgroup's share, a quarter of it)."""
    found = _HGMMA_SHAPE.match(opcode)
    if found:
        m, n, k = map(int, found.groups())
        return 2.0 * m * n * k / 4
    found = _HMMA_SHAPE.match(opcode)
    if found:
        if found.group(1) not in _HMMA_MNK:
            raise sass.SassError(f"unknown HMMA shape in {opcode}")
        m, n, k = _HMMA_MNK[found.group(1)]
        return 2.0 * m * n * k
    return 0.0


def check_loops(kernel: str, function: sass.Function, found: Sequence[sass.Loop], plan: Sequence[LoopPlan]) -> None:
    """Fail loudly, naming the kernel, when the SASS loops are not the plan's."""
    def describe(loops):
        return "; ".join(f"{'  ' * l.depth}[{l.start:#x}-{l.end:#x}] depth {l.depth}, {l.size} instructions"
                         for l in loops) or "none"

    if len(found) != len(plan):
        raise PlanMismatch(
            f"{kernel}: the launch plan declares {len(plan)} loop(s) ({', '.join(p.what for p in plan) or 'none'}) "
            f"but the SASS of {function.name} has {len(found)}: {describe(found)}. The kernel changed: update its "
            f"plan in the provider's plan module (see xception_fast.bench.static).")
    for i, (loop, p) in enumerate(zip(found, plan)):
        if not p.expect:
            continue
        body = sass.loop_body(function, loop, loops=found)
        for base, n in p.expect.items():
            got = sum(1 for ins in body if ins.base == base)
            if got != n:
                raise PlanMismatch(
                    f"{kernel}: loop {i} ({p.what}) at [{loop.start:#x}-{loop.end:#x}] has {got} {base} per "
                    f"iteration in the SASS of {function.name}, the plan assumes {n} (an unroll factor or the loop "
                    f"body changed): update its plan in the provider's plan module.")


def _peeled(function: sass.Function, loops: Sequence[sass.Loop], index: int) -> int:
    """Iterations of loop `index` the compiler peeled after it: tensor instructions between its end
    and the next loop (or the end of the function), over those of one iteration."""
    loop = loops[index]
    per_iter = sum(1 for ins in sass.loop_body(function, loop, exclude_inner=False) if ins.base in TENSOR_OPS)
    if per_iter == 0:
        return 0
    later = [l.start for l in loops if l.start > loop.end]
    stop = min(later) if later else float("inf")
    after = sum(1 for ins in function.instrs if loop.end < ins.addr < stop and ins.base in TENSOR_OPS)
    return int(round(after / per_iter))


def path_weights(kernel: str, function: sass.Function, found: Sequence[sass.Loop],
                 plan: Sequence[LoopPlan]) -> dict:
    """{address: share of its loop's iterations that execute it} for the loops whose plan lists paths."""
    weights: dict = {}
    for i, (loop, p) in enumerate(zip(found, plan)):
        if not p.paths:
            continue
        total = sum(path.share for path in p.paths)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"{kernel}: the shares of loop {i} ({p.what}) sum to {total}, not 1")
        for ins in sass.loop_body(function, loop, loops=found):  # its own instructions: inner loops have trips
            weights[ins.addr] = 0.0
        for path in p.paths:
            if path.share == 0:
                continue
            try:
                instrs = sass.shortest_path(function, loop, dict(path.signature), found)
            except sass.SassError as exc:
                raise PlanMismatch(f"{kernel}: loop {i} ({p.what}), path {path.what!r}: {exc}. The kernel changed: "
                                   f"update its plan in the provider's plan module.") from None
            for ins in instrs:
                weights[ins.addr] += path.share
    return weights


def _phase_of(loops: Sequence[sass.Loop], plan: Sequence[LoopPlan], addr: int) -> str:
    """The phase of an instruction: that of the first loop ending at or after it (code before a loop
    sets it up), else of the last loop."""
    for loop, p in zip(loops, plan):
        if loop.end >= addr and loop.depth == 0:
            return p.phase
    return plan[-1].phase if plan else ""


def _tensor_work(counts, warps: int) -> tuple[str, float, float]:
    """(tensor instruction class, its FLOPs, thread-FFMAs) of dynamic counts for `warps` warps."""
    tensor_op, flops, ffma = "FFMA", 0.0, 0.0
    for opcode, n in counts.items():
        f = _mma_flops(opcode)
        if f:
            tensor_op = opcode.split(".", 1)[0]
            flops += f * n * warps
        if opcode.startswith("FFMA"):
            ffma += n * warps * 32
    return tensor_op, flops, ffma


def mma_wait_depth(function: sass.Function, loops: Sequence[sass.Loop]) -> Optional[int]:
    """The wgmma groups left in flight by the waits of the MMA loops (those whose own body issues an
    HGMMA): the smallest N of their `WARPGROUP.DEPBAR.LE gsb0, N`. The `gsb0, 0` that drains the
    pipeline after such a loop lies in the enclosing loop's body, not the MMA loop's, and does not
    count. None: no wgmma wait inside an MMA loop."""
    waits = []
    for loop in loops:
        body = sass.loop_body(function, loop, loops=loops)
        if any(ins.base == "HGMMA" for ins in body):
            waits += [int(m.group(1), 16) for ins in body if ins.opcode.startswith("WARPGROUP.DEPBAR")
                      for m in [_WAIT.search(ins.operands)] if m]
    return min(waits) if waits else None


def estimate(launch: Launch, machine: Machine) -> Estimate:
    compiled = launch.compile()
    function = compiled.sass()
    loops = sass.find_loops(function)
    check_loops(launch.kernel, function, loops, launch.loops)
    trips = []
    for i, (loop, plan) in enumerate(zip(loops, launch.loops)):
        t = float(plan.trips)
        if plan.pipelined and compiled.num_stages > 1:
            t = max(t - _peeled(function, loops, i), 0.0)
        trips.append(t)
    weights = path_weights(launch.kernel, function, loops, launch.loops)
    counts = sass.dynamic_counts(function, loops, trips, weights)
    warps = compiled.num_warps if launch.threads is None else math.ceil(launch.threads / 32)
    threads = launch.threads or warps * 32
    per_cta = counts[""] * warps

    tensor_op, flops, ffma = _tensor_work(counts, warps)
    ctas = ctas_per_sm(machine, compiled.regs, threads, compiled.smem_bytes)
    per_sm = math.ceil(launch.grid / machine.sms)  # CTAs the busiest SM must run
    clock = machine.clock_ghz * 1e9
    issue_us = per_sm * per_cta / (machine.schedulers * clock) * 1e6

    def mma_time(flops_, ffma_, op):
        if flops_:
            return per_sm * flops_ / (machine.mma_rate(op, compiled.operand) / machine.sms) * 1e6
        if ffma_:  # no tensor instruction: the products run as FFMA (fp32 `tl.dot(ieee)`, CUDA fp32)
            return per_sm * 2 * ffma_ / (machine.mma_rate("FFMA", "*") / machine.sms) * 1e6
        return 0.0

    mma_us = mma_time(flops, 0.0, tensor_op)
    phases: dict = {}
    if any(p.phase for p in launch.loops):
        by_phase: dict = {}
        for ins, m in zip(function.instrs, sass.multipliers(function, loops, trips, weights)):
            c = by_phase.setdefault(_phase_of(loops, launch.loops, ins.addr), Counter())
            c[ins.opcode] += m
            c[""] += m
        for name, c in by_phase.items():
            op, f, ff = _tensor_work(c, warps)
            phases[name] = {"issue_us": per_sm * c[""] * warps / (machine.schedulers * clock) * 1e6,
                            "mma_us": mma_time(f, ff if not flops else 0.0, op)}
    dram_us = launch.dram_bytes / machine.dram_rate() * 1e6

    bar = wait = None
    if loops:
        innermost = max(range(len(loops)), key=lambda i: (loops[i].depth, trips[i]))
        body = sass.loop_body(function, loops[innermost], loops=loops)
        bar = float(sum(1 for ins in body if ins.opcode.startswith("BAR.SYNC")))
        wait = mma_wait_depth(function, loops)
    if not flops and ffma:
        mma_us = mma_time(0.0, ffma, tensor_op)
    return Estimate(
        kernel=launch.kernel, config=launch.config, grid=launch.grid, issue_us=issue_us, mma_us=mma_us,
        dram_us=dram_us, tensor_op=tensor_op if flops else ("FFMA" if ffma else "none"), regs=compiled.regs,
        spill_bytes=compiled.spill_bytes, smem_bytes=compiled.smem_bytes, ctas_per_sm=ctas,
        waves=launch.grid / max(machine.sms * max(ctas, 1), 1), warp_instr_per_cta=per_cta,
        dram_bytes=launch.dram_bytes, mma_flops=flops * launch.grid,
        # Without tensor instructions the products are FFMAs too: the ratio would not be the depthwise's.
        dw_dup=(ffma / launch.useful_ffma) if launch.useful_ffma and flops else None, bar_per_iter=bar, mma_wait=wait,
        loop_trips=trips, phases=phases, warps=warps)


def library_gemm(kernel: str, machine: Machine, m: int, n: int, k: int, operand: str, dram_bytes: float) -> Estimate:
    """A GEMM a provider hands to a library (cuBLAS: torch.matmul) as an Estimate at its roofline:
    max(2 m n k FLOPs at the tensor peak, its bytes at DRAM bandwidth). No SASS is counted: the most
    optimistic figure for that launch, labelled by its config "library (roofline)"."""
    tensor_op = "HGMMA" if "HGMMA" in machine.mma_flops_per_clock else "HMMA"
    flops = 2.0 * m * n * k
    return Estimate(kernel=kernel, config="library (roofline)", grid=0, issue_us=0.0,
                    mma_us=flops / machine.mma_rate(tensor_op, operand) * 1e6,
                    dram_us=dram_bytes / machine.dram_rate() * 1e6, tensor_op=tensor_op, regs=0, spill_bytes=0,
                    smem_bytes=0, ctas_per_sm=1, waves=0.0, warp_instr_per_cta=0.0, dram_bytes=dram_bytes,
                    mma_flops=flops)
