"""The machine constants of the static model, in one place.

Peak rates are per SM per clock, so that every time is a count divided by (SMs x clock x rate).
H100 SXM: 132 SMs at 1.83 GHz (the clock at which NVIDIA's 989 TFLOP/s dense bf16 holds), 4 warp
schedulers per SM issuing one warp-instruction per clock each, 3.35 TB/s HBM3, 228 KB shared memory
per SM (227 KB per block), 64K 32-bit registers. A100 SXM 80GB: 108 SMs at 1.41 GHz, 312 TFLOP/s
dense bf16, 2.04 TB/s, 164 KB shared per SM (163 KB per block).

Tensor-instruction peaks (FLOPs per SM per clock, multiply-add = 2):
- HGMMA (Hopper wgmma), 16-bit inputs: 4096 (132 x 1.83e9 x 4096 = 989 TFLOP/s); tf32 half that.
- HMMA (mma.sync class): on sm_80 the full tensor rate, 2048 for 16-bit inputs; on sm_90 mma.sync
  reaches about 60% of the wgmma rate at best (PERFORMANCE.md), 2458.
- FFMA: 128 lanes x 2 (the CUDA cores; also bounded by the issue rate, which the model counts).
These are models, not measurements: correct them when a GPU measures the same kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Machine:
    name: str
    arch: int  # compute capability as Triton writes it: 90, 80
    sms: int
    clock_ghz: float
    schedulers: int  # warp-instructions issued per SM per clock
    dram_tbps: float
    smem_per_sm: int  # bytes
    smem_per_block: int  # the opt-in maximum of one CTA
    smem_reserved_per_block: int  # the driver's per-CTA reservation
    regs_per_sm: int
    max_threads_per_sm: int
    max_ctas_per_sm: int
    l2_bytes: int
    # FLOPs per SM per clock of each tensor instruction class, by operand type.
    mma_flops_per_clock: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"static estimate (sm_{self.arch} model)"

    def issue_rate(self) -> float:
        """Warp-instructions per second over the whole GPU."""
        return self.sms * self.schedulers * self.clock_ghz * 1e9

    def mma_rate(self, tensor_op: str, operand: str) -> float:
        """FLOPs per second over the whole GPU for a tensor instruction class and operand type."""
        per_clock = self.mma_flops_per_clock[tensor_op]
        rate = per_clock.get(operand, per_clock.get("*"))
        if rate is None:
            raise KeyError(f"{self.name}: no {tensor_op} rate for {operand} operands")
        return self.sms * self.clock_ghz * 1e9 * rate

    def dram_rate(self) -> float:
        return self.dram_tbps * 1e12


H100_SXM = Machine(
    name="H100 SXM", arch=90, sms=132, clock_ghz=1.83, schedulers=4, dram_tbps=3.35,
    smem_per_sm=228 * 1024, smem_per_block=227 * 1024, smem_reserved_per_block=1024, regs_per_sm=65536,
    max_threads_per_sm=2048, max_ctas_per_sm=32, l2_bytes=50 * 2 ** 20,
    mma_flops_per_clock={
        "HGMMA": {"bf16": 4096, "fp16": 4096, "tf32": 2048, "fp8": 8192},
        "HMMA": {"bf16": 2458, "fp16": 2458, "tf32": 1229},
        "FFMA": {"*": 256},
    })

A100_SXM = Machine(
    name="A100 SXM", arch=80, sms=108, clock_ghz=1.41, schedulers=4, dram_tbps=2.04,
    smem_per_sm=164 * 1024, smem_per_block=163 * 1024, smem_reserved_per_block=1024, regs_per_sm=65536,
    max_threads_per_sm=2048, max_ctas_per_sm=32, l2_bytes=40 * 2 ** 20,
    mma_flops_per_clock={
        "HMMA": {"bf16": 2048, "fp16": 2048, "tf32": 1024},
        "FFMA": {"*": 128},
    })

MACHINES = {90: H100_SXM, 80: A100_SXM}


def machine(arch: int) -> Machine:
    try:
        return MACHINES[int(arch)]
    except KeyError:
        raise ValueError(f"no machine model for sm_{arch}: known {sorted(MACHINES)}") from None
