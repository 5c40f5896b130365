"""SASS of a cubin: disassembly with the cuobjdump Triton ships, loops, dynamic instruction counts.

`disassemble(cubin)` returns each function's instructions in address order. A loop is the range
[target, branch] of a backward branch (a `BRA` whose target is at or before it); loops nest by
address range, and `find_loops` lists them in SASS order (by start address, an outer loop before
the loops inside it). `dynamic_counts(function, loops, trips)` multiplies each instruction by the
trip counts of the loops around it: the number of times one warp issues it, per CTA.

Straight-line code outside loops is counted once, both sides of a forward branch included: a
slight over-count of the code around the loops (a kernel's prologue and epilogue), never of a loop.
Where a loop body holds branches that matter (code taken once per output tile, copies of the code
for run-time flags), `shortest_path` finds the path through the body a given iteration takes, named
by the instructions it must contain (its signature), and the model weights each path by the share
of iterations that take it instead of counting the whole body.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_PREDICATE_OPERAND = re.compile(r"^!?U?P[T0-9]+\s*,")


class SassError(RuntimeError):
    """The SASS could not be produced or does not have the structure a launch plan declares."""


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # with its modifiers, e.g. "HGMMA.64x128x16.F32.BF16"
    operands: str
    predicate: str = ""

    @property
    def base(self) -> str:
        """The opcode without modifiers: "HGMMA", "FFMA", "BAR"."""
        return self.opcode.split(".", 1)[0]

    def branch_target(self) -> Optional[int]:
        if self.base not in ("BRA", "BRX"):
            return None
        found = _BRANCH_TARGET.search(self.operands)
        return int(found.group(1), 16) if found else None


@dataclass
class Loop:
    start: int  # address of the first instruction of the body (the backward branch's target)
    end: int  # address of the backward branch
    depth: int = 0  # 0 for an outermost loop
    parent: Optional[int] = None  # index of the enclosing loop in the `find_loops` list
    size: int = 0  # instructions in the body, inner loops included

    def contains(self, addr: int) -> bool:
        return self.start <= addr <= self.end


@dataclass(eq=False)  # hashed by identity: `disassemble` caches one object per function
class Function:
    name: str
    instrs: list[Instr] = field(default_factory=list)


def tool(name: str) -> str:
    """Path of `cuobjdump` / `nvdisasm`: the copy Triton ships (any CUDA toolkit's otherwise)."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    found = shutil.which(name)
    if found:
        return found
    raise SassError(f"no {name}: install triton (it ships {name} in triton/backends/nvidia/bin) or a CUDA toolkit")


def parse(text: str) -> dict[str, Function]:
    """cuobjdump -sass output -> {function name: Function}."""
    functions: dict[str, Function] = {}
    current: Optional[Function] = None
    for line in text.splitlines():
        head = _FUNCTION.match(line)
        if head:
            current = functions.setdefault(head.group(1), Function(head.group(1)))
            continue
        found = _INSTR.match(line)
        if found and current is not None:
            addr, pred, opcode, operands = found.groups()
            current.instrs.append(Instr(int(addr, 16), opcode, operands.strip(), (pred or "").strip()))
    return functions


@functools.lru_cache(maxsize=256)
def disassemble(cubin: bytes) -> dict[str, Function]:
    """Every function of a cubin, disassembled with cuobjdump."""
    functions = parse(_cuobjdump(cubin, "-sass"))
    if not functions:
        raise SassError("cuobjdump printed no function")
    return functions


def find_loops(function: Function) -> list[Loop]:
    """The loops of a function (backward branches), in SASS order, with their nesting."""
    loops = []
    ends = set()
    for ins in function.instrs:
        target = ins.branch_target()
        # `BRA self` after the last EXIT is padding, not a loop.
        if target is not None and target < ins.addr and ins.addr not in ends:
            loops.append(Loop(start=target, end=ins.addr))
            ends.add(ins.addr)
    # Two back edges to one target (a `continue`) make one loop: keep the outermost range.
    merged: dict[int, Loop] = {}
    for loop in loops:
        if loop.start not in merged or loop.end > merged[loop.start].end:
            merged[loop.start] = loop
    loops = sorted(merged.values(), key=lambda l: (l.start, -l.end))

    # A back edge into the middle of a loop (Triton's pipelined K loops jump back from the wait after
    # the last wgmma group) closes a range that crosses real loops instead of nesting: not a loop.
    # Drop the range crossing the most others until none cross.
    def crosses(a, b):
        return a.start < b.start <= a.end < b.end or b.start < a.start <= b.end < a.end

    while loops:
        counts = [sum(crosses(a, b) for b in loops) for a in loops]
        if max(counts) == 0:
            break
        loops.pop(counts.index(max(counts)))
    for i, loop in enumerate(loops):
        for j in range(i - 1, -1, -1):
            outer = loops[j]
            if outer.contains(loop.start) and outer.contains(loop.end):
                loop.parent, loop.depth = j, outer.depth + 1
                break
            if outer.contains(loop.start) != outer.contains(loop.end):
                raise SassError(f"{function.name}: loops at {outer.start:#x}-{outer.end:#x} and "
                                f"{loop.start:#x}-{loop.end:#x} overlap without nesting (irreducible)")
        loop.size = sum(1 for ins in function.instrs if loop.contains(ins.addr))
    return loops


def multipliers(function: Function, loops: Sequence[Loop], trips: Sequence[float],
                weights: Optional[dict] = None) -> list[float]:
    """Per instruction, how many times a warp executes it: the product of the trip counts of the
    loops around it (`trips[i]`: iterations of loop i each time it is entered), times
    `weights[addr]` where given (the share of iterations whose path holds the instruction)."""
    if len(trips) != len(loops):
        raise ValueError(f"{len(trips)} trip counts for {len(loops)} loops")
    out = []
    for ins in function.instrs:
        m = 1.0
        for loop, trip in zip(loops, trips):
            if loop.contains(ins.addr):
                m *= trip
        if weights is not None:
            m *= weights.get(ins.addr, 1.0)
        out.append(m)
    return out


def dynamic_counts(function: Function, loops: Sequence[Loop], trips: Sequence[float],
                   weights: Optional[dict] = None) -> Counter:
    """{opcode with modifiers: dynamic count per warp}; the key "" holds the total."""
    counts: Counter = Counter()
    for ins, m in zip(function.instrs, multipliers(function, loops, trips, weights)):
        counts[ins.opcode] += m
        counts[""] += m
    return counts


def loop_body(function: Function, loop: Loop, exclude_inner: bool = True,
              loops: Sequence[Loop] = ()) -> list[Instr]:
    """The instructions of one iteration of `loop` (without those of its inner loops by default)."""
    inner = [l for l in loops if l is not loop and loop.contains(l.start)] if exclude_inner else []
    return [ins for ins in function.instrs
            if loop.contains(ins.addr) and not any(l.contains(ins.addr) for l in inner)]


def matches(ins: Instr, key: str) -> bool:
    """Whether `key` names the instruction: a base ("STG": every store) or, with modifiers, exactly
    that opcode ("STG.E.U16": 16-bit stores only)."""
    return ins.opcode == key if "." in key else ins.base == key


def _conditional(ins: Instr) -> bool:
    """A branch that may fall through: predicated (@P0 BRA) or on a predicate operand (BRA P4, ...)."""
    return bool(ins.predicate) and ins.predicate not in ("@PT",) or bool(_PREDICATE_OPERAND.match(ins.operands))


def shortest_path(function: Function, loop: Loop, signature: dict, loops: Sequence[Loop] = ()) -> list[Instr]:
    """The shortest path through one iteration of `loop` (from its first instruction to its back
    branch, along fall-throughs and forward branches) that holds exactly `signature[key]`
    instructions matching each key (see `matches`): the loop's own instructions on it, those of its
    inner loops left out (they count by their own trip counts). Raises SassError when no path does,
    or on an indirect branch; an unconditional branch out of the loop is a dead end."""
    return list(_shortest_path(function, loop.start, loop.end, tuple(sorted(signature.items())),
                               tuple((l.start, l.end) for l in loops)))


@functools.lru_cache(maxsize=1024)
def _shortest_path(function: Function, start: int, end: int, signature: tuple, loops: tuple) -> tuple:
    where = f"{function.name}: the loop at {start:#x}-{end:#x}"
    # Inner loops are single nodes of the path (their instructions count by their own trip counts):
    # entered at their first instruction, left after their back branch or by a branch out of them.
    inner = [(s, e) for s, e in loops if start <= s and e <= end and (s, e) != (start, end)]
    inner = [(s, e) for s, e in inner if not any(o != (s, e) and o[0] <= s and e <= o[1] for o in inner)]
    inner_of = {}
    for s, e in inner:
        for ins in function.instrs:
            if s <= ins.addr <= e:
                inner_of[ins.addr] = (s, e)
    body = [ins for ins in function.instrs if start <= ins.addr <= end]
    keys = [k for k, _ in signature]
    want = tuple(int(n) for _, n in signature)
    # Basic blocks: a block starts at a branch target and after a branch or an EXIT.
    leaders = {start} | {s for s, _ in inner}
    leaders |= {ins.addr for k, ins in enumerate(body[1:], 1) if inner_of.get(body[k - 1].addr) and
                inner_of.get(ins.addr) != inner_of.get(body[k - 1].addr)}
    exits: dict = {}  # inner loop -> forward targets of its branches out of it
    for k, ins in enumerate(body):
        target = ins.branch_target()
        if ins.base == "BRX" or (ins.base == "BRA" and target is None):
            raise SassError(f"{where}: indirect branch at {ins.addr:#x}")
        # An unconditional branch out of the loop ends its block with no successor: no path through one
        # iteration takes it (nvcc's out-of-line WARPSYNC.COLLECTIVE fallbacks of a shuffle sit inside
        # the loop's address range and branch back to where they came from).
        loop_here = inner_of.get(ins.addr)
        if loop_here:
            if target is not None and target > loop_here[1] and target <= end:
                exits.setdefault(loop_here, set()).add(target)
                leaders.add(target)
            continue
        if target is not None and start <= target <= end:
            if target in inner_of and inner_of[target][0] != target:
                raise SassError(f"{where}: branch at {ins.addr:#x} into the middle of an inner loop")
            leaders.add(target)
        if (target is not None or ins.base == "EXIT") and k + 1 < len(body):
            leaders.add(body[k + 1].addr)
    blocks: list[list[Instr]] = []
    for ins in body:
        if ins.addr in leaders:
            blocks.append([])
        blocks[-1].append(ins)
    first = {b[0].addr: i for i, b in enumerate(blocks)}
    is_loop = [b[0].addr in inner_of for b in blocks]
    hits = [tuple(0 if is_loop[i] else sum(matches(ins, k) for ins in b) for k in keys) for i, b in enumerate(blocks)]
    sizes = [0 if is_loop[i] else len(b) for i, b in enumerate(blocks)]

    def successors(i):
        if is_loop[i]:
            loop_here = inner_of[blocks[i][0].addr]
            return sorted({first[t] for t in exits.get(loop_here, ())} | ({i + 1} if i + 1 < len(blocks) else set()))
        last = blocks[i][-1]
        target = last.branch_target()
        out = []
        if target is not None and target > last.addr and target <= end:
            out.append(first[target])
        falls = not ((last.base == "BRA" or last.base == "EXIT") and not _conditional(last))
        if falls and i + 1 < len(blocks):
            out.append(i + 1)
        return out

    # states[i]: {counts before block i: (path length before it, previous block, its counts)}
    states: list[dict] = [dict() for _ in blocks]
    states[0][tuple(0 for _ in keys)] = (0, -1, None)
    final = {}
    for i, block in enumerate(blocks):
        for counts, (length, _, _) in states[i].items():
            new = tuple(c + h for c, h in zip(counts, hits[i]))
            if any(c > w for c, w in zip(new, want)):
                continue
            if i == len(blocks) - 1:
                final[new] = (length + sizes[i], counts)
                continue
            for j in successors(i):
                best = states[j].get(new)
                if best is None or length + sizes[i] < best[0]:
                    states[j][new] = (length + sizes[i], i, counts)
    if want not in final:
        raise SassError(f"{where}: no path through one iteration holds {dict(zip(keys, want))} "
                        f"({len(final)} other signatures reach the back branch)")
    path, i, counts = [], len(blocks) - 1, final[want][1]
    while i >= 0:
        path = ([] if is_loop[i] else blocks[i]) + path
        _, i, counts = states[i][counts]
    return tuple(path)


_RESOURCES = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)")


@functools.lru_cache(maxsize=256)
def resources(cubin: bytes) -> dict[str, dict[str, int]]:
    """{function: {"regs", "stack", "shared"}} from `cuobjdump -res-usage` (stack: bytes per thread of
    local memory, i.e. spills; shared: static shared memory)."""
    return {m.group(1): {"regs": int(m.group(2)), "stack": int(m.group(3)), "shared": int(m.group(4))}
            for m in _RESOURCES.finditer(_cuobjdump(cubin, "-res-usage"))}


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """`cuobjdump <flag>` of a cubin (it reads files only): its output, or SassError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        run = subprocess.run([tool("cuobjdump"), flag, path], capture_output=True, text=True)
    if run.returncode != 0:
        raise SassError(f"cuobjdump {flag} failed: {run.stderr.strip()}")
    return run.stdout
