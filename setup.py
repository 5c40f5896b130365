"""Build of xception_fast: the Python package, plus the CUDA extension `xception_fast._C` (csrc/)
when a CUDA toolkit and a CUDA build of torch are present.

Metadata lives in pyproject.toml; this file decides whether and how the extension is built.

Environment switches:
  XCEPTION_FAST_BUILD_CUDA=auto|0|1  build when possible (default), never, always (fail if impossible)
  XCEPTION_FAST_CUDA_ARCHS="80;90a"  target architectures: SASS for each, PTX for the highest plain one
  MAX_JOBS=N                         parallel compile jobs (default: cores, limited by free memory)
  DEBUG=1                            -O0 -g (-lineinfo for device code)
  CUDA_HOME / CUDA_PATH              the CUDA toolkit, when it cannot be found from `nvcc` on PATH

Two things that break a CUDA build on our machines are fixed here rather than in a wrapper script:
- torch guesses CUDA_HOME as the grandparent of the first `nvcc` on PATH; when that `nvcc` is a
  symlink or a shell script that execs the real one, the guess has no lib64/libcudart.so and the
  link fails. `find_cuda_home` follows the wrapper and sets CUDA_HOME before torch reads it.
- `ATen/cuda/CUDAContext.h` includes cusparse.h and cublas_v2.h, which a minimal toolkit lacks;
  the nvidia-* wheels torch depends on ship them (site-packages/nvidia/*/include).
- A C++ compiler that links libstdc++ statically (a `g++` wrapper adding `-static-libstdc++`, seen
  on a GPU machine through CC/CXX) gives a library that builds but breaks at its first ostream use:
  see LINK_ARGS.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py as _setuptools_build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = "xception_fast"
EXTENSION = f"{PACKAGE}._C"
BUILD_INFO_FILE = "_build_info.json"
DEFAULT_ARCHS = "80;90a"
# The library must use the process's libstdc++.so.6 (the one torch uses), never a copy of its own.
# With a static copy linked in, its functions run against the shared library's data: Python's
# -Wl,-Bsymbolic-functions (Ubuntu's LDSHARED) binds the copy's functions inside our library, while
# data symbols such as the locale facet ids resolve to the libstdc++.so.6 already loaded by torch.
# Facets are then looked up with the other copy's indices: the first number written to an ostream
# (build_info(), any c10::str in a TORCH_CHECK) segfaulted on the GPU machine and silently stopped the
# stream here. An explicit -lstdc++ among our arguments comes before the driver's static one, so
# every libstdc++ symbol resolves against libstdc++.so.6 and nothing is taken from libstdc++.a;
# --exclude-libs,ALL keeps whatever a static archive might still add private to our library
# (data included), should a compiler wrapper force static linking in another way.
LINK_ARGS = ["-lstdc++", "-Wl,--exclude-libs,ALL"]


def log(message: str) -> None:
    print(f"xception_fast setup: {message}", flush=True)


# --- the CUDA toolkit -----------------------------------------------------------------------------

def _is_toolkit(home: str | os.PathLike | None) -> bool:
    """A CUDA toolkit directory: bin/nvcc and the CUDA runtime library to link against."""
    if not home:
        return False
    home = Path(home)
    return (home / "bin" / "nvcc").is_file() and any(
        (home / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))


_EXEC_NVCC = re.compile(r"""exec\s+(?:"([^"]*nvcc)"|'([^']*nvcc)'|(\S*nvcc))(?=\s|$)""")


def _real_nvcc(nvcc: str, depth: int = 0) -> str:
    """`nvcc` with symlinks resolved and shell wrappers (`exec /path/to/nvcc "$@"`) followed."""
    path = os.path.realpath(nvcc)
    if depth >= 8:
        return path
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return path
    if not head.startswith(b"#!"):
        return path  # a binary: the real compiler
    match = _EXEC_NVCC.search(head.decode("utf-8", "replace"))
    if match is None:
        return path
    target = next(group for group in match.groups() if group)
    if not os.path.isabs(target):
        found = _which(target)
        if found is None or os.path.realpath(found) == path:
            return path
        target = found
    return _real_nvcc(target, depth + 1)


def _which(program: str) -> str | None:
    import shutil

    return shutil.which(program)


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", os.path.basename(path)))


def find_cuda_home() -> tuple[str | None, list[str]]:
    """(the CUDA toolkit directory or None, notes on rejected candidates)."""
    notes: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit(value):
                return os.path.realpath(value), notes
            notes.append(f"{var}={value} has no bin/nvcc with lib64/libcudart.so; ignored")
    nvcc = _which("nvcc")
    if nvcc is not None:
        real = _real_nvcc(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(home):
            return home, notes
        notes.append(f"nvcc on PATH ({nvcc} -> {real}) is not inside a toolkit with lib64/libcudart.so")
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True):
        if _is_toolkit(home):
            return os.path.realpath(home), notes
    return None, notes


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def nvidia_wheel_include_dirs() -> list[str]:
    """site-packages/nvidia/*/include directories that hold cusparse.h or cublas_v2.h."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels that torch depends on
    except ImportError:
        return []
    found = []
    for base in list(getattr(nvidia, "__path__", [])):
        for include in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if any(os.path.isfile(os.path.join(include, h)) for h in ("cusparse.h", "cublas_v2.h")):
                if include not in found:
                    found.append(include)
    return found


# --- build switches --------------------------------------------------------------------------------

def parse_archs(spec: str) -> list[str]:
    """"80;90a" (also "8.0 9.0a", "sm_80,sm_90a") -> ["80", "90a"]."""
    archs = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        arch = token.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise SystemExit(f"xception_fast setup: XCEPTION_FAST_CUDA_ARCHS: cannot read {token!r} "
                             f"(expected a list like '80;90a')")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SystemExit("xception_fast setup: XCEPTION_FAST_CUDA_ARCHS is empty")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch; PTX for the highest arch without an a/f suffix, so newer GPUs can JIT."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    plain = [a for a in archs if a.isdigit()]
    if plain:
        ptx = max(plain, key=int)
        flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def default_max_jobs() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:  # about 3 GiB per nvcc/g++ job on torch's headers
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1))
        cores = min(cores, max(1, kib // (3 * 1024 * 1024)))
    except (OSError, AttributeError, ValueError):
        pass
    return max(1, cores)


def installed_torch_version() -> str | None:
    """The torch version of the environment being installed into, or None when it has none yet.

    Under pip's build isolation, this process imports the torch of the isolated build environment
    (pyproject's build requirement); a fresh interpreter without pip's PYTHONPATH sees the target's."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    code = ("import importlib.util\n"
            "if importlib.util.find_spec('torch'):\n    import torch\n    print(torch.__version__)")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def plan_cuda_build() -> dict:
    """Decide whether to build the extension. Returns the build plan; sets CUDA_HOME."""
    mode = os.environ.get("XCEPTION_FAST_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"xception_fast setup: XCEPTION_FAST_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    archs = parse_archs(os.environ.get("XCEPTION_FAST_CUDA_ARCHS", DEFAULT_ARCHS))
    plan = {"build": False, "reason": "", "archs": archs, "cuda_home": None, "nvcc_version": None,
            "torch_version": None, "torch_cuda_version": None}

    def skip(reason: str) -> dict:
        if mode == "1":
            raise SystemExit(f"xception_fast setup: XCEPTION_FAST_BUILD_CUDA=1 but the CUDA extension "
                             f"cannot be built: {reason}")
        plan["reason"] = reason
        return plan

    if mode == "0":
        return skip("XCEPTION_FAST_BUILD_CUDA=0")
    try:
        import torch
    except ImportError as exc:
        return skip(f"torch is not importable in the build environment ({exc})")
    plan["torch_version"] = str(torch.__version__)
    plan["torch_cuda_version"] = torch.version.cuda
    if not torch.version.cuda:
        return skip(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    cuda_home, notes = find_cuda_home()
    for note in notes:
        log(note)
    if cuda_home is None:
        return skip("no CUDA toolkit found: no nvcc on PATH inside a toolkit with lib64/libcudart.so, "
                    "and CUDA_HOME is unset or invalid")
    version = nvcc_version(cuda_home)
    if version is None:
        return skip(f"{cuda_home}/bin/nvcc --version failed")
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return skip(f"nvcc {version} ({cuda_home}) and torch's CUDA {torch.version.cuda} differ in major "
                    f"version")
    installed = installed_torch_version()
    if installed is not None and installed != str(torch.__version__):
        # An extension built against this torch would not load into the installed one: the cuda
        # provider would be silently missing. Say so now, with the way out.
        raise SystemExit(f"xception_fast setup: the CUDA extension would be built against torch {torch.__version__} "
                         f"(pip's isolated build environment), but this environment has torch {installed}, which "
                         f"cannot load it. Build against the installed torch with `pip install "
                         f"--no-build-isolation --no-deps .` (needs setuptools, wheel and ninja), or install "
                         f"torch=={torch.__version__} first, or set XCEPTION_FAST_BUILD_CUDA=0 for the package "
                         f"without the cuda provider.")
    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported: set it before that.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension = sys.modules.get("torch.utils.cpp_extension")
    if cpp_extension is not None:
        cpp_extension.CUDA_HOME = cuda_home
    plan.update(build=True, cuda_home=cuda_home, nvcc_version=version)
    return plan


def build_info(plan: dict) -> dict:
    """Contents of xception_fast/_build_info.json (read by xception_fast._extension before loading)."""
    return {
        "cuda_extension": "built" if plan["build"] else f"skipped: {plan['reason']}",
        "torch_version": plan["torch_version"],
        "torch_cuda_version": plan["torch_cuda_version"],
        "nvcc_version": plan["nvcc_version"],
        "cuda_home": plan["cuda_home"],
        "cuda_archs": plan["archs"],
        "link_args": LINK_ARGS,
        "debug": os.environ.get("DEBUG", "0") == "1",
        "python": sys.version.split()[0],
    }


def write_build_info(directory: Path, plan: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BUILD_INFO_FILE).write_text(json.dumps(build_info(plan), indent=2) + "\n")


# --- setup ------------------------------------------------------------------------------------------

PLAN = plan_cuda_build()


class BuildPy(_setuptools_build_py):
    """Writes _build_info.json into the built package, also when the extension is skipped."""

    def run(self):
        super().run()
        if not PLAN["build"]:
            log(f"the CUDA provider (xception_fast._C) was NOT built: {PLAN['reason']}. Installing the "
                f"pure-Python package; the reference and triton providers work without it.")
        if not self.dry_run:
            target = Path(self.build_lib) / PACKAGE
            if not PLAN["build"]:  # a library left in the build tree by an earlier CUDA build
                for stale in target.glob("_C*.so"):
                    stale.unlink()
            write_build_info(target, PLAN)


def _with_build_info(base):
    class BuildExt(base):
        """Writes _build_info.json next to the built library (`--inplace` too)."""

        def run(self):
            if PLAN.get("message"):
                log(PLAN["message"])
            super().run()
            if self.dry_run:
                return
            if self.inplace:
                target = Path(self.get_finalized_command("build_py").get_package_dir(PACKAGE))
            else:
                target = Path(self.build_lib) / PACKAGE
            write_build_info(target, PLAN)

    return BuildExt


def _packages() -> tuple[list[str], dict[str, str]]:
    # triton_kernels/ installs as xception_fast.triton_kernels, never as a top-level package: PyPI
    # and the Triton repository both ship a `triton_kernels`, which ours must not shadow.
    packages = find_packages(include=[PACKAGE, f"{PACKAGE}.*"])
    inner = f"{PACKAGE}.triton_kernels"
    packages += [inner] + [f"{inner}.{sub}" for sub in find_packages("triton_kernels")]
    return packages, {inner: "triton_kernels"}


def _extensions() -> tuple[list, dict]:
    if not PLAN["build"]:
        return [], {"build_py": BuildPy, "build_ext": _with_build_info(_setuptools_build_ext)}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(default_max_jobs())
    debug = os.environ.get("DEBUG", "0") == "1"
    archs = PLAN["archs"]
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx.append(f"-DXCEPTION_FAST_CUDA_ARCHS={','.join(archs)}")
    nvcc = (["-O0", "-g", "-lineinfo"] if debug else ["-O3"]) + gencode_flags(archs)
    # The toolkit's own headers first; the wheels' include dirs only fill in what it lacks (cusparse.h,
    # cublas_v2.h), so a wheel of another CUDA minor version never shadows the compiler's runtime headers.
    include_dirs = [str(ROOT / "csrc"), os.path.join(PLAN["cuda_home"], "include")] + nvidia_wheel_include_dirs()
    files = sorted(p.relative_to(ROOT) for p in (ROOT / "csrc").iterdir() if p.is_file())
    sources = [str(p) for p in files if p.suffix in (".cpp", ".cu")]
    # Everything else in csrc/ (.h, .cuh) is a header: a rebuild input, and part of the sdist.
    depends = [str(p) for p in files if p.suffix not in (".cpp", ".cu")]
    PLAN["message"] = (f"building {EXTENSION} with nvcc {PLAN['nvcc_version']} ({PLAN['cuda_home']}) against "
                       f"torch {PLAN['torch_version']} (CUDA {PLAN['torch_cuda_version']}), archs "
                       f"{';'.join(archs)}, MAX_JOBS={os.environ['MAX_JOBS']}{', DEBUG' if debug else ''}")
    extension = CUDAExtension(
        name=EXTENSION,
        sources=sources,
        depends=depends,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=LINK_ARGS,
    )
    build_ext = _with_build_info(BuildExtension).with_options(use_ninja=True)
    return [extension], {"build_py": BuildPy, "build_ext": build_ext}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
