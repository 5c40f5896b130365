"""Worker of tests/test_static_model.py: runs the static model on kernels whose cost is known and
prints the facts the tests assert, as one JSON object on the last line.

A separate process because the test session imports triton with TRITON_INTERPRET=1, which builds
no GPU code. Figures are static estimates (sm_90 model), never measurements.
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

from xception_fast.bench.static import model, run, sass
from xception_fast.bench.static.machine import H100_SXM
from xception_fast.bench.static.model import Launch, LoopPlan
from xception_fast.bench.static.triton_compile import compiler


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Triton's tutorial matmul (03-matrix-multiplication.py), grouped program order."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
    tl.store(c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :], acc.to(tl.bfloat16), mask=mask)


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Triton's tutorial vector add (01-vector-add.py)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def nested_loops_kernel(a_ptr, b_ptr, c_ptr, rows, steps, BLOCK: tl.constexpr):
    """Two run-time loops: `rows` output tiles, each the sum of `steps` tile products (tl.dot)."""
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    for i in range(rows):
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for j in range(steps):
            a = tl.load(a_ptr + (i * steps + j) * BLOCK * BLOCK + tile)
            b = tl.load(b_ptr + j * BLOCK * BLOCK + tile)
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + i * BLOCK * BLOCK + tile, acc)


@triton.jit
def unrolled_loop_kernel(x_ptr, y_ptr, out_ptr, rows, cols, BLOCK: tl.constexpr):
    """A small loop nest the compiler unrolls (its inner loop becomes several SASS loops)."""
    offs = tl.arange(0, BLOCK)
    for i in range(rows):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(cols):
            acc += tl.load(x_ptr + (i * cols + j) * BLOCK + offs)
        tl.store(out_ptr + i * BLOCK + offs, acc)


def _facts(est: model.Estimate) -> dict:
    return dict(tensor_op=est.tensor_op, bound=est.bound, estimate_us=est.estimate_us, issue_us=est.issue_us,
                mma_us=est.mma_us, dram_us=est.dram_us, mma_flops=est.mma_flops,
                warp_instr_per_cta=est.warp_instr_per_cta, loop_trips=est.loop_trips, mma_wait=est.mma_wait)


def matmul(n: int, stages: int) -> dict:
    bm, bn, bk = 128, 256, 64
    config = triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=8, num_stages=stages)
    ints = dict(M=n, N=n, K=n, stride_am=n, stride_ak=1, stride_bk=n, stride_bn=1, stride_cm=n, stride_cn=1)
    launch = Launch(kernel="matmul_kernel", config=f"{bm}x{bn}x{bk} s{stages}",
                    compile=compiler(matmul_kernel, config, 90, "bf16", {}, ints,
                                     dict(a_ptr="bf16", b_ptr="bf16", c_ptr="bf16")),
                    grid=math.ceil(n / bm) * math.ceil(n / bn),
                    loops=[LoopPlan("K blocks", math.ceil(n / bk), pipelined=True)], dram_bytes=3 * n * n * 2)
    return {**_facts(model.estimate(launch, H100_SXM)),
            "peak_us": 2 * n ** 3 / H100_SXM.mma_rate("HGMMA", "bf16") * 1e6}


def vector_add(n: int) -> dict:
    config = triton.Config(dict(BLOCK=1024), num_warps=4, num_stages=1)
    launch = Launch(kernel="add_kernel", config="1024", grid=n // 1024, loops=[], dram_bytes=3 * n * 4,
                    compile=compiler(add_kernel, config, 90, "fp32", {}, dict(n=n),
                                     dict(x_ptr="fp32", y_ptr="fp32", out_ptr="fp32")))
    return _facts(model.estimate(launch, H100_SXM))


ROWS, STEPS, TILE = 7, 5, 64


def _nested(loops, kernel=nested_loops_kernel) -> Launch:
    config = triton.Config(dict(BLOCK=TILE), num_warps=4, num_stages=1)
    return Launch(kernel=kernel.__name__, config=str(TILE), grid=1, loops=loops, dram_bytes=0,
                  compile=compiler(kernel, config, 90, "bf16", {}, dict(rows=ROWS, steps=STEPS, cols=STEPS),
                                   dict(a_ptr="bf16", b_ptr="bf16", c_ptr="fp32", x_ptr="fp32", out_ptr="fp32")))


def _independent_count(cubin: bytes, rows: int, cols: int) -> int:
    """The dynamic count from cuobjdump's text alone: instruction lines weighed by the two loops,
    the loops found from the backward `BRA` lines (no code of the model)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([sass.tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    addrs, back = [], []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?P\d\s+)?([A-Z]\S*)\s*([^;]*);", line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        addrs.append(addr)
        if m.group(2) == "BRA":
            target = int(re.search(r"0x([0-9a-f]+)", m.group(3)).group(1), 16)
            if target < addr:
                back.append((target, addr))
    (o0, o1), (i0, i1) = sorted(back)
    return sum((rows * (cols if i0 <= a <= i1 else 1)) if o0 <= a <= o1 else 1 for a in addrs)


def nested(rows: int = ROWS, steps: int = STEPS) -> dict:
    launch = _nested([LoopPlan("rows", rows), LoopPlan("steps", steps)])
    compiled = launch.compile()
    function = compiled.sass()
    loops = sass.find_loops(function)
    counts = sass.dynamic_counts(function, loops, [rows, steps])
    est = model.estimate(launch, H100_SXM)
    out = dict(depths=[l.depth for l in loops], total=counts[""], mma_flops=est.mma_flops,
               expected_flops=rows * steps * 2 * TILE ** 3, independent=_independent_count(compiled.cubin, rows, steps),
               per_cta=est.warp_instr_per_cta, warps=compiled.num_warps)
    errors = []
    two = [LoopPlan("rows", rows), LoopPlan("steps", steps)]
    for plan, kernel in (([LoopPlan("rows", rows)], nested_loops_kernel),
                         ([LoopPlan("rows", rows), LoopPlan("steps", steps, expect={"HGMMA": 3})], nested_loops_kernel),
                         (two, unrolled_loop_kernel)):
        try:
            model.estimate(_nested(plan, kernel), H100_SXM)
            errors.append(None)
        except model.PlanMismatch as exc:
            errors.append(str(exc))
    out["mismatch_errors"] = errors
    return out


def wait_depths() -> dict:
    """`mma_wait` of the two-loop kernel at 1 and 3 stages: with 3, Triton pipelines the inner (dot)
    loop, waits one wgmma group behind in it and drains with `gsb0, 0` in the outer loop's body."""
    out = {}
    for stages in (1, 3):
        config = triton.Config(dict(BLOCK=TILE), num_warps=4, num_stages=stages)
        launch = Launch(kernel="nested_loops_kernel", config=f"s{stages}", grid=1, dram_bytes=0,
                        loops=[LoopPlan("rows", ROWS), LoopPlan("steps", STEPS, pipelined=True)],
                        compile=compiler(nested_loops_kernel, config, 90, "bf16", {}, dict(rows=ROWS, steps=STEPS),
                                         dict(a_ptr="bf16", b_ptr="bf16", c_ptr="fp32")))
        function = launch.compile().sass()
        loops = sass.find_loops(function)
        every = [int(m.group(1), 16) for ins in function.instrs if ins.opcode.startswith("WARPGROUP.DEPBAR")
                 for m in [re.search(r"gsb0,\s*0x([0-9a-f]+)", ins.operands)] if m]
        out[f"s{stages}"] = dict(mma_wait=model.estimate(launch, H100_SXM).mma_wait, waits_anywhere=sorted(set(every)),
                                 depths=[l.depth for l in loops])
    return out


def wrong_tiled_path():
    """The middle unit's d-store plan with one 16-byte store too many on its chunk loop's path: the
    error the instrument raises (None if it raises none)."""
    import dataclasses

    from xception_fast.bench.shapes import unit_shapes
    from xception_fast.bench.static import cuda_plans
    from xception_fast.bench.static.geometry import Unit

    shape = next(s for s in unit_shapes(299) if run.layer_name(s) == "middle")
    launch = cuda_plans.infer(Unit(shape, 256, "bf16"), 90, H100_SXM.sms)[1][0]
    assert launch.kernel == "d_store_kernel", launch.kernel
    loops = list(launch.loops)
    i = next(i for i, loop in enumerate(loops) if loop.paths and any("d stores" in p.what for p in loop.paths))
    paths = [model.Path.make(p.what, p.share, {k: v + (k == "STG.E.128") for k, v in p.signature})
             if "d stores" in p.what else p for p in loops[i].paths]
    loops[i] = dataclasses.replace(loops[i], paths=paths)
    try:
        model.estimate(dataclasses.replace(launch, loops=loops), H100_SXM)
    except model.PlanMismatch as exc:
        return str(exc)
    return None


def finding(provider: str, modes=("infer",)) -> dict:
    records = run.static_records(90, ["bf16"], ["middle"], modes, (provider,))
    return dict(records=records)


def main(which: list[str]) -> dict:
    out = {}
    if "known" in which:
        out["matmul_s1"] = matmul(4096, 1)
        out["matmul_s3"] = matmul(4096, 3)
        out["vector_add"] = vector_add(2 ** 28)
        out["nested"] = nested()
        out["wait"] = wait_depths()
    if "triton" in which:
        out["triton"] = finding("triton")
    if "cuda" in which:
        out["cuda"] = finding("cuda", ("infer", "train"))
        out["cuda"]["wrong_path"] = wrong_tiled_path()
        out["cuda"]["fp32_train"] = run.static_records(90, ["fp32"], ["middle"], ("train",), ("cuda",))
    if "cuda80" in which:
        out["cuda80"] = dict(records=run.static_records(80, ["bf16"], ["middle"], ("infer",), ("cuda",)))
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter builds no GPU code")
    print(json.dumps(main(sys.argv[1:])))
