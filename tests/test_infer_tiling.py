"""Host-side checks of the CUDA tiled kernel's index math (csrc/sepconv_infer_tiling.h).

The C++ programs in tests/cpp include the same header the kernel includes, compiled here with the
host C++ compiler. test_infer_tiling.cpp: tile coverage, halo boxes, the shared-memory layout, thread
mappings, the depthwise of every tile bit-exact against a direct loop, and the ldmatrix / mma.sync
fragment mapping against the PTX ISA layouts. test_train_stats.cpp: the training forward's BatchNorm
statistics (z_stats_partial_kernel's row-block moments of the stored z, their merge per channel)
against double precision. test_forward_elementwise.cpp: the forward's element-wise passes over
[P, Cout] (the inference epilogue, bn_apply: the vector / element split, every element written once,
the channel of each vector lane). test_d_store_tiling.cpp: the backward's d store for cuBLAS's grad_pw (the
kernel emulated against a direct depthwise, every element of d written once) and the splits of the
tiled grad_x / grad_dw. test_dw_backward_tiling.cpp:
the backward's tiled grad_x / grad_dw (the transposed plan's gathers, the kernel emulated against a
direct transposed convolution and weight gradient). They share tests/cpp/host_test.h (EXPECT, the
failure count, the summary line checked here). No GPU and no CUDA toolkit needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["test_infer_tiling.cpp", "test_train_stats.cpp", "test_d_store_tiling.cpp", "test_dw_backward_tiling.cpp",
           "test_forward_elementwise.cpp"]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def shape_rows(shapes) -> str:
    """Tuples as C++ brace rows, for a program's SHAPES placeholder."""
    return ", ".join("{" + ", ".join(map(str, s)) + "}" for s in shapes)


def header_program_lines(tmp_path: Path, name: str, source_text: str) -> list[str]:
    """Build a C++ program that includes csrc/ headers (the static model's Python copies are compared
    with its output) and return its stdout lines; skip where there is no host compiler."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler (c++, g++, clang++ or $CXX) to build the csrc/ headers")
    source, binary = tmp_path / f"{name}.cpp", tmp_path / name
    source.write_text(source_text)
    build = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("name", SOURCES)
def test_tiling_index_math(tmp_path, name):
    source = ROOT / "tests" / "cpp" / name
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler (c++, g++, clang++ or $CXX) to build the index-math checks")
    binary = tmp_path / source.stem
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}", str(source), "-o",
                            str(binary)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"building {source.name} failed:\n{build.stdout}{build.stderr}"
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"index-math checks failed:\n{run.stdout}{run.stderr}"
    assert "0 failures" in run.stdout and "plans checked" in run.stdout, run.stdout
