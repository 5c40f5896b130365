"""The static cost model: compiled SASS -> time estimates on sm_90 (or sm_80), no GPU needed.

Every figure it produces is a **static estimate (sm_90 model)**: a lower bound under a model of the
machine, never a measurement. Per kernel launch it compiles the kernel for the target (Triton:
`triton.compile` with a `GPUTarget`; CUDA: `nvcc -cubin` of csrc/), disassembles it with the
`cuobjdump` Triton ships, finds the loops (backward branches), multiplies each loop body by its trip
count from the launch plan, and divides: warp-instructions by the issue rate, tensor-instruction
FLOPs by the peak of the instruction actually emitted (HGMMA, HMMA, FFMA), compulsory bytes by DRAM
bandwidth. The largest is the estimate. See `model` for the formulas and flags, `machine` for the
constants (H100 SXM, A100), `run` for the records and totals, `report` for the JSON and Markdown.

    python -m xception_fast bench --static [--arch 90] [--dtype bf16] [--layers middle] [--mode infer]

Modules: `sass` (disassembly, loops, dynamic counts), `machine`, `model` (LoopPlan, Launch,
Compiled, estimate), `triton_compile` (compile without a GPU, as the JIT specialises), `geometry`
(a unit's sizes), `triton_plans` and `cuda_plans` (the providers' launch plans: the only modules that
know the kernels' structure), `run`, `report`, `cli`; `calibration` (the calibrated static estimate:
the same counts at the issue, tensor and DRAM rates a GPU run reached, fitted on its per-kernel
times; a separate column, the raw bound stays) and `compare` (the per-kernel model-vs-measured table
and the fit: `python -m xception_fast.bench.static.compare KERNEL_TIMES.json --static ... --fit`).

How to add (or update) a kernel's plan
--------------------------------------
A provider's plan module has one function per mode (`MODES = {"infer": infer, "train": train}`),
`f(unit, arch, sms) -> list[list[Launch]]`: the kernels the provider launches for one unit, in
order, each as a list of candidate launches (one per autotune config; the model keeps the one it
estimates fastest, as a stand-in for the autotuner). For a new Triton kernel:

1. In `triton_plans.py`, write `plan(meta) -> (grid, loops, dram_bytes, useful_ffma)`, where `meta`
   holds the config's block sizes: the grid the host launches; one `LoopPlan(what, trips)` per
   run-time loop of the kernel, in the order the SASS shows them (outer before inner; a loop the
   code places first comes first; `tl.static_range` loops are unrolled and are not listed), with
   `trips` the iterations per entry (an average over CTAs where they differ) and `pipelined=True` on
   the loop that holds the `tl.dot` (with num_stages > 1 Triton may peel iterations; the model finds
   them after the loop and subtracts); the bytes the kernel must move through DRAM; the depthwise
   thread-FMAs per CTA where it computes one (else 0).
2. Add `_launches(kernel, unit, arch, constexprs, ints, plan)` to the mode's list: `constexprs` are
   the flags the host passes, `ints` the integer arguments' values (the compile specialises them
   as Triton's JIT would: 1 becomes a constant, multiples of 16 get a divisibility hint).
3. Run `python -m xception_fast bench --static --layers middle`. If the SASS has a different number
   of loops (the compiler unrolled or split one, or the plan missed one), the run fails with an error
   naming the kernel and listing the loops it found: fix the plan (or the kernel). Where a compiler
   unroll factor is assumed, pin it with `LoopPlan(..., expect={"HGMMA": 4})` (instructions per
   iteration by opcode), which is checked too.
4. Check the result against a hand count once (e.g. `mma_flops` of a GEMM = 2 M N K exactly), then
   update benchmarks/NOTES.md.
A CUDA kernel's plan is the same in `cuda_plans.py`, with `threads=` on the `Launch` and the
`_compiler(source, kernel, arch, dtype)` of its .cu file.

Two more things a plan can say, for kernels whose loop bodies hold branches that matter or whose work
comes in phases:
- `LoopPlan(..., paths=[Path.make(what, share, signature), ...])`: code inside the loop that not every
  iteration runs (an epilogue once per output tile; copies of the code nvcc made for run-time flags,
  unmasked and masked stores). Each path is named by its signature, how many instructions of each
  kind it holds ({"STG.E": 32, "HMMA": 0}; a key with modifiers matches that opcode only), and
  `share` is the fraction of (warp, iteration) pairs that take it (shares sum to 1). The model counts
  the shortest path with that signature (inner loops count by their own trips) and fails, naming the
  kernel and the loop, when the SASS has none. Give a flag that is off no key: nvcc may keep its
  instructions predicated off instead of branching around them.
- `LoopPlan(..., phase="depthwise")`: phases that one CTA runs one after the other (a barrier between);
  straight-line code belongs to the phase of the next loop. With one CTA per SM the estimate is the
  sum over phases of max(issue, MMA) (phases in sequence), else the plain largest of the three.
"""
