"""Static estimate (sm_90 model) of the CUDA provider's tiled inference kernel (csrc/sepconv_infer.cu).

No GPU needed: compiles the kernel with nvcc for one architecture with XF_STATIC_COUNT (one path:
full tiles, 16-byte halo loads, pre-ReLU, residual / post-ReLU as asked), disassembles it with the
cuobjdump that Triton bundles, finds the two loops (the depthwise chunk loop and the pointwise stage
loop) and multiplies their bodies by the trip counts of a layer, warp by warp. Then:

  issue time = warp-instructions / (132 SMs x 4 schedulers x 1.83 GHz)
  MMA time   = padded MMA FLOPs / (60% of 989 TFLOP/s)  (mma.sync; fp32: FFMA at 67 TFLOP/s)
  DRAM time  = (x + y + residual bytes) / 3.35 TB/s

and the static estimate is the largest of them, or, since one CTA per SM runs its two phases one
after the other, the depthwise phase's issue time plus the larger of the pointwise phase's issue
and MMA times ("phases in sequence"). Estimates, never measurements.

    python benchmarks/cuda_infer_static.py                 # middle-flow unit, bf16, sm_90a
    python benchmarks/cuda_infer_static.py --arch 80 --residual
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

SMS, SCHEDULERS, CLOCK = 132, 4, 1.83e9
MMA_PEAK, MMA_FRACTION, FFMA_PEAK, DRAM = 989e12, 0.60, 67e12, 3.35e12
THREADS, BN, BK = 256, 128, 32


def cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        sys.exit(f"no cuobjdump at {path}")
    return str(path)


def compile_sass(arch: str, residual: bool, post_relu: bool) -> tuple[str, str]:
    """(SASS text, ptxas -v report) of sepconv_infer.cu in counting mode."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "infer.cubin")
        gencode = f"arch=compute_{arch},code=sm_{arch}"
        cmd = ["nvcc", "-std=c++17", "-O3", "-cubin", "-gencode", gencode, "-Xptxas", "-v", "-DXF_STATIC_COUNT",
               f"-DXF_STATIC_COUNT_RESIDUAL={int(residual)}", f"-DXF_STATIC_COUNT_POST_RELU={int(post_relu)}",
               f"-I{CSRC}", str(CSRC / "sepconv_infer.cu"), "-o", cubin]
        build = subprocess.run(cmd, capture_output=True, text=True)
        if build.returncode != 0:
            sys.exit(build.stderr)
        sass = subprocess.run([cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return sass, build.stderr


def kernel_name(dtype: str, bm: int, k3: bool) -> str:
    t = {"bf16": "13__nv_bfloat16", "fp16": "6__half", "fp32": "f"}[dtype]
    k = "Li3ELi3E" if k3 else "Li0ELi0E"
    return f"sepconv_infer_tiled_kernelI{t}Li{bm}E{k}"


def ptxas_line(report: str, name: str) -> str:
    lines = report.splitlines()
    for i, line in enumerate(lines):
        if "Compiling entry function" in line and name in line:
            block = " ".join(lines[i:i + 4])
            regs = re.search(r"Used (\d+) registers", block)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
            return f"{regs.group(1)} registers, spills {spill.group(1)}/{spill.group(2)} bytes (store/load)"
    return "?"


def instructions(sass: str, name: str) -> list[tuple[int, str]]:
    for function in sass.split("Function : ")[1:]:
        if name in function.split("\n", 1)[0]:
            return [(int(m.group(1), 16), m.group(2).strip())
                    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", function)]
    sys.exit(f"kernel {name} not in the SASS")


def opcode(text: str) -> str:
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def loops(ins):
    """(first index, last index) of each loop: a branch back to an earlier address."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    found = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) <= a and int(m.group(1), 16) in index:
            found.append((index[int(m.group(1), 16)], i))
    return found


def inner(span, all_loops):
    s, e = span
    return [(a, b) for a, b in all_loops if s <= a and b <= e and (a, b) != (s, e)]


class Layer:
    """One unit: the same tiling as csrc/sepconv_infer_tiling.h (stride 1, 3x3, padding 1): tiles and
    the pixel count of each tile's halo box."""

    def __init__(self, n, c, h, w, c_out, bm, elem_bytes, segments):
        self.n, self.c, self.h, self.w, self.c_out, self.bm = n, c, h, w, c_out, bm
        self.kp = max(1, math.ceil(c / BK)) * BK
        self.cout_pad = math.ceil(c_out / BN) * BN
        self.vp = BK // (16 // elem_bytes)  # vectors per pixel
        self.slots = THREADS // self.vp
        hw = h * w
        self.tiles = []  # (count, box pixels)
        if segments and w >= bm:
            for _ in range(h):
                for wo0 in range(0, w, bm):
                    count = min(bm, w - wo0)
                    self.tiles.append((count, 3 * (count + 2)))
        else:
            for q0 in range(0, hw, bm):
                count = min(bm, hw - q0)
                rows = (q0 + count - 1) // w - q0 // w + 1
                cols = count + 2 if rows == 1 else w + 2
                self.tiles.append((count, (rows + 2) * cols))

    def warp_trips(self, pixels, warp):
        """Trips of a warp through a loop over its slots' pixels (pixel = slot + k * slots)."""
        first = warp * 32 // self.vp
        return max(0 if s >= pixels else math.ceil((pixels - s) / self.slots) for s in range(first, first + 32 // self.vp))


def count(ins, layer: Layer, mma: bool):
    all_loops = loops(ins)
    ffma = lambda s, e: sum(opcode(t) == "FFMA" for _, t in ins[s:e + 1])
    hmma = lambda s, e: sum(opcode(t) == "HMMA" for _, t in ins[s:e + 1])
    outer = [span for span in all_loops if not any(o[0] <= span[0] and span[1] <= o[1] and o != span for o in all_loops)]
    # The depthwise chunk loop: the first outer loop with FFMA; the pointwise loop: the last outer loop.
    dw_loop = next(span for span in outer if ffma(*span))
    pw_loop = max(outer, key=lambda span: span[1] - span[0] if span[0] > dw_loop[1] else -1)
    # Inner loops of the chunk loop: halo staging (LDS + LDGSTS), weight staging (LDGSTS only), ReLU.
    kinds = {}
    for a, b in inner(dw_loop, all_loops):
        ops = collections.Counter(opcode(t) for _, t in ins[a:b + 1] if not t.startswith("@!PT"))
        kind = "halo" if ops["LDGSTS"] and ops["LDS"] else "weights" if ops["LDGSTS"] else "relu"
        kinds[kind] = b - a + 1
    if len(kinds) != len(inner(dw_loop, all_loops)):
        sys.exit(f"unexpected inner loops in the chunk loop: {inner(dw_loop, all_loops)}")
    dw_straight = (dw_loop[1] - dw_loop[0] + 1) - sum(kinds.values())
    # Pointwise loop: the main part ends at the first branch after the last tensor / FMA instruction.
    s, e = pw_loop
    last = max(i for i in range(s, e + 1) if opcode(ins[i][1]) in ("HMMA", "FFMA"))
    split = next(i for i in range(last, e + 1) if opcode(ins[i][1]) == "BRA")
    main, epilogue = split - s + 1, e - split
    once = len(ins) - (dw_loop[1] - dw_loop[0] + 1) - (pw_loop[1] - pw_loop[0] + 1)

    chunks, stages = layer.kp // BK, layer.cout_pad // BN * (layer.kp // BK)
    dw_total = pw_total = 0
    for _, pixels in layer.tiles:
        for warp in range(THREADS // 32):
            trips = layer.warp_trips(pixels, warp)
            w_trips = 1 if warp * 32 < 9 * (BK // 4) else 0
            dw_total += chunks * (dw_straight + trips * (kinds.get("halo", 0) + kinds.get("relu", 0))
                                  + w_trips * kinds.get("weights", 0)) + once
            pw_total += stages * main + layer.cout_pad // BN * epilogue
    per = {"chunk loop straight": dw_straight, **{f"{k} loop body": v for k, v in kinds.items()},
           "stage (main) body": main, "epilogue": epilogue, "outside both loops": once,
           "HMMA per stage": hmma(s, split), "FFMA per chunk": ffma(*dw_loop)}
    return dw_total * layer.n, pw_total * layer.n, per


def estimate(layer: Layer, sass: str, report: str, args, name: str, verbose: bool) -> None:
    elem = 4 if args.dtype == "fp32" else 2
    ins = instructions(sass, name)
    dw_warp, pw_warp, per = count(ins, layer, elem == 2)
    rate = SMS * SCHEDULERS * CLOCK
    n, c, h, w, c_out, bm = layer.n, layer.c, layer.h, layer.w, layer.c_out, layer.bm
    tiles = len(layer.tiles) * n
    # mma.sync: warps whose 32 columns lie past Cout skip their products; FFMA: all of the padded tile.
    columns = math.ceil(c_out / 32) * 32 if elem == 2 else layer.cout_pad
    flops = 2 * tiles * bm * columns * layer.kp
    mma_time = flops / (MMA_PEAK * MMA_FRACTION if elem == 2 else FFMA_PEAK)
    p = n * h * w
    bytes_moved = p * c * elem + p * c_out * elem * (2 if args.residual else 1)
    t_dw, t_pw, t_dram = dw_warp / rate, pw_warp / rate, bytes_moved / DRAM
    element_taps = p * c * 9
    overlapped = max(t_dw + t_pw, mma_time, t_dram)
    serial = max(t_dw + max(t_pw, mma_time), t_dram)
    if not verbose:
        print(f"| {c} -> {c_out} @ {h}x{w} | {bm} | {dw_warp * 32 / element_taps:.2f} | {1e3 * t_dw:.3f} | "
              f"{1e3 * t_pw:.3f} | {1e3 * mma_time:.3f} | {1e3 * t_dram:.3f} | {1e3 * overlapped:.3f} | "
              f"{1e3 * serial:.3f} |")
        return
    print(f"{name} on sm_{args.arch}: {ptxas_line(report, name)}")
    print(f"layer N={n} C={c} {h}x{w} Cout={c_out} {args.dtype}, residual={args.residual}, "
          f"post_relu={args.post_relu}: {tiles} tiles of {bm} rows, {math.ceil(tiles / SMS)} waves of {SMS}")
    for key, value in per.items():
        print(f"  {key}: {value}")
    print(f"  depthwise phase: {dw_warp / 1e6:.1f} M warp-instructions, "
          f"{dw_warp * 32 / element_taps:.2f} thread-instructions per useful element-tap")
    print(f"  pointwise phase: {pw_warp / 1e6:.1f} M warp-instructions")
    print("static estimate (sm_90 model):")
    print(f"  issue {1e3 * (t_dw + t_pw):.3f} ms (depthwise {1e3 * t_dw:.3f} + pointwise {1e3 * t_pw:.3f}), "
          f"MMA {1e3 * mma_time:.3f} ms ({flops / 1e9:.0f} padded GFLOP), DRAM {1e3 * t_dram:.3f} ms")
    print(f"  largest of the three: {1e3 * overlapped:.3f} ms; phases in sequence: {1e3 * serial:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90a")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--bm", type=int, default=0, help="tile rows (default: 128 for 16-bit, 32 for fp32)")
    parser.add_argument("--shape", nargs="+", default=["256,728,19,19,728"],
                        help="N,C,H,W,Cout (3x3, stride 1, padding 1); several: one table row each; "
                             "N,C,H,W,Cout,bm sets the tile rows of that shape")
    parser.add_argument("--segments", action="store_true",
                        help="row-segment tiles (the launcher's choice only where full-width halo boxes do not fit;"
                             " never for Xception's units)")
    parser.add_argument("--residual", action="store_true")
    parser.add_argument("--post-relu", action="store_true")
    args = parser.parse_args()
    elem = 4 if args.dtype == "fp32" else 2
    sass, report = compile_sass(args.arch, args.residual, args.post_relu)
    verbose = len(args.shape) == 1
    if not verbose:
        print(f"static estimate (sm_90 model), {args.dtype}, sm_{args.arch}, residual={args.residual}; times in ms")
        print("| unit | bm | instr / element-tap (dw phase) | dw issue | pw issue | MMA | DRAM | largest | "
              "phases in sequence |")
        print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shape:
        values = [int(v) for v in shape.split(",")]
        n, c, h, w, c_out = values[:5]
        bm = values[5] if len(values) > 5 else args.bm or (32 if elem == 4 else 128)
        layer = Layer(n, c, h, w, c_out, bm, elem, args.segments)
        estimate(layer, sass, report, args, kernel_name(args.dtype, bm, True), verbose)


if __name__ == "__main__":
    main()
