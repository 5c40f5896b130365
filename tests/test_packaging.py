"""The source distribution carries every file the CUDA build compiles (a missing header makes the
extension unbuildable from an sdist; CI also builds and installs from one) and the host-side C++
checks the tests build; setup.py refuses a build that could not load; its link arguments keep the
library on the process's libstdc++ under a compiler that links libstdc++ statically."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _manifest_files(monkeypatch) -> set[str]:
    """The files MANIFEST.in puts in the sdist, as setuptools reads it."""
    if not (ROOT / "MANIFEST.in").is_file() or not (ROOT / "csrc").is_dir():
        pytest.skip("not a source checkout")
    from setuptools.command.egg_info import FileList

    monkeypatch.chdir(ROOT)
    files = FileList()
    files.findall()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    return {Path(f).as_posix() for f in files.files}


@pytest.mark.parametrize("folder", ["csrc", "tests/cpp"])
def test_manifest_includes_every_file_of(monkeypatch, folder):
    """csrc/: what setup.py compiles. tests/cpp/: the host-side checks tests/test_infer_tiling.py
    builds, and the header they share."""
    included = _manifest_files(monkeypatch)
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).iterdir() if p.is_file()}
    assert wanted and wanted <= included, f"MANIFEST.in leaves out {sorted(wanted - included)}"


FAKE_TORCH = '''__version__ = "2.99.0+fake"


class version:
    cuda = "13.0"
'''


def test_build_against_another_torch_than_the_installed_one_fails_loudly(tmp_path):
    """An isolated build importing one torch while the target environment holds another would give
    an extension that cannot load (a silently missing cuda provider): setup.py must refuse, saying
    how to build instead. The build environment's torch is faked by a module on PYTHONPATH, which
    setup.py's look at the installed environment does not see."""
    import os
    import shutil
    import subprocess
    import sys
    import torch

    if not (ROOT / "setup.py").is_file():
        pytest.skip("not a source checkout")
    installed = torch.__version__
    if shutil.which("nvcc") is None:
        pytest.skip("the check runs where the CUDA build would proceed: nvcc is not on PATH")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "XCEPTION_FAST_BUILD_CUDA": "auto"}
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    assert f"this environment has torch {installed}" in done.stderr and "--no-build-isolation" in done.stderr, \
        done.stderr[-3000:]


# Writes a long and a double through an ostream, as build_info() and c10::str do.
OSTREAM_LIBRARY = """
#include <cstring>
#include <sstream>
extern "C" void xf_format(char* out, int size) {
  std::ostringstream s;
  s << "n=" << 1234567L << " x=" << 2.5;
  std::strncpy(out, s.str().c_str(), size);
}
"""
# Loads it into a process that already holds torch's libstdc++.so.6, as torch.ops.load_library does.
LOAD_AND_FORMAT = """
import ctypes, sys
import torch
out = ctypes.create_string_buffer(64)
ctypes.CDLL(sys.argv[1]).xf_format(out, 64)
print(out.value.decode())
"""


def _setup_link_args() -> list[str]:
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LINK_ARGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no LINK_ARGS")


def test_link_args_keep_libstdcxx_shared_under_a_static_compiler(tmp_path):
    """A g++ that links libstdc++ statically (a wrapper adding -static-libstdc++ after our arguments)
    with Python's -Wl,-Bsymbolic-functions gave a library whose first ostream number crashed or came
    out empty. The same link with setup.py's LINK_ARGS must format correctly; without them it must
    not (else this toolchain cannot show the fault and the check proves nothing: skip)."""
    import shutil
    import subprocess
    import sys

    if not (ROOT / "setup.py").is_file():
        pytest.skip("not a source checkout")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    static = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not Path(static).is_file():
        pytest.skip("this g++ has no libstdc++.a, so it cannot link libstdc++ statically")
    (tmp_path / "format.cpp").write_text(OSTREAM_LIBRARY)
    obj = tmp_path / "format.o"
    subprocess.run([gxx, "-O2", "-fPIC", "-c", str(tmp_path / "format.cpp"), "-o", str(obj)], check=True, timeout=120)
    results = {}
    for name, extra in (("without", []), ("with", _setup_link_args())):
        lib = tmp_path / f"{name}.so"
        subprocess.run([gxx, "-shared", "-Wl,-O1", "-Wl,-Bsymbolic-functions", str(obj), "-o", str(lib), *extra,
                        "-static-libstdc++"], check=True, timeout=120)
        done = subprocess.run([sys.executable, "-c", LOAD_AND_FORMAT, str(lib)], capture_output=True, text=True,
                              timeout=300)
        results[name] = (done.returncode, done.stdout.strip(), done.stderr[-1000:])
    assert results["with"][:2] == (0, "n=1234567 x=2.5"), results["with"]
    if results["without"][:2] == (0, "n=1234567 x=2.5"):
        pytest.skip("this toolchain links a working static libstdc++ copy even without LINK_ARGS")
