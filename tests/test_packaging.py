"""The source distribution carries every file the CUDA build compiles (a missing header makes the
extension unbuildable from an sdist; CI also builds and installs from one) and the host-side C++
checks the tests build."""

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
