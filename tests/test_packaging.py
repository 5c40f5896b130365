"""The source distribution carries every file the CUDA build compiles (a missing header makes the
extension unbuildable from an sdist; CI also builds and installs from one)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_manifest_includes_every_csrc_file(monkeypatch):
    if not (ROOT / "MANIFEST.in").is_file() or not (ROOT / "csrc").is_dir():
        pytest.skip("not a source checkout")
    from setuptools.command.egg_info import FileList

    monkeypatch.chdir(ROOT)
    files = FileList()
    files.findall()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    included = {Path(f).as_posix() for f in files.files}
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir() if p.is_file()}
    assert wanted and wanted <= included, f"MANIFEST.in leaves out {sorted(wanted - included)}"
