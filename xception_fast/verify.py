"""The self-check: a fused provider proves itself on the device before `auto` uses it there.

For one (provider, device, dtype), every op (inference forward and backward, training forward, the
BatchNorm backward reduction, the training backward; and the four ops of the mid variant for a
provider that lists it, `MID_CASES`) runs on a fixed set of small shapes covering the unit's
variants (pre/post ReLU, residual, stride, dilation, odd channel counts, BN with and without affine
parameters), with fresh outputs NaN-filled (XCEPTION_FAST_POISON_OUTPUTS=1), and each output is
compared with the `reference` provider run in float64 on the same (rounded) inputs, under the rule
of `xception_fast.testing` (`TOLERANCES`, error at most twice the reference provider's own in that
dtype). It takes seconds and runs once: the result is kept on disk, keyed by everything that could
change it (`stamp`: the provider, the GPU name and compute capability, the driver, CUDA, torch,
Triton, the package version and a hash of the provider's kernel sources or built extension).

Where: ``$XCEPTION_FAST_CACHE_DIR/verify/`` (default: the user cache directory,
``$XDG_CACHE_HOME/xception_fast`` or ``~/.cache/xception_fast``), one small JSON file per
(provider, dtype, stamp), written atomically (a temporary file renamed over the old one), so
processes writing at once leave a valid file. An unreadable or corrupt file counts as absent (the
check runs again); an unwritable directory keeps the result for this process only.

``XCEPTION_FAST_VERIFY`` (or `set_mode`):
- ``auto`` (default): `auto` runs the check the first time it needs a provider on a device and
  passes over a provider that failed (reported once, in one line); an explicit ``backend=`` runs
  the provider as asked and warns once if it has not passed on the device.
- ``require``: as ``auto``, and an explicit request runs the check first and is an error if it fails.
- ``off``: no check runs; `auto` trusts every available fused provider and explicit requests don't
  warn (for kernel development, where the conformance tests do this job).
The check never runs during CUDA-graph capture or `torch.compile` tracing: a provider with no
cached result is then passed over.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import torch

import xception_fast
from xception_fast import backends, reference
from xception_fast.spec import UnitSpec
from xception_fast.testing import error_and_allowance

MODE_ENV_VAR = "XCEPTION_FAST_VERIFY"
CACHE_ENV_VAR = "XCEPTION_FAST_CACHE_DIR"
MODES = ("auto", "off", "require")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
OPS = ("sepconv_bn_infer", "sepconv_bn_infer_backward", "sepconv_bn_train", "bn_backward_reduce",
       "sepconv_bn_train_backward")
_EPS = 1e-3


@dataclass(frozen=True)
class Case:
    """One unit geometry of the self-check: x [n, cin, h, w] -> [n, cout, ...]."""

    name: str
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    n: int
    h: int
    w: int
    pre_relu: bool
    post_relu: bool
    residual: bool
    affine: bool  # BN weight/bias (training) and scale (inference); False: shift only / no affine


# Small enough for Triton's CPU interpreter (seconds), yet several programs and partial channel
# blocks per case: odd channel counts, odd and even sizes, stride 2, dilation 2, k=5.
QUICK_CASES = (
    Case("c5to7_k3_pre_post_res", 5, 7, (3, 3), (1, 1), (1, 1), (1, 1), 2, 7, 9, True, True, True, True),
    Case("c19_s21_d12_pre", 19, 19, (3, 3), (2, 1), (1, 2), (1, 2), 1, 11, 10, True, False, False, False),
    Case("c7to5_k5_s2_d2_post_res", 7, 5, (5, 5), (2, 2), (3, 3), (2, 2), 2, 9, 8, False, True, True, True),
)
# `--full`: the conformance set, with tile-sized and larger channel counts, an even rectangular
# kernel, an empty batch and a batch of one.
FULL_CASES = QUICK_CASES + (
    Case("k2x4_even_plain", 6, 17, (2, 4), (1, 1), (0, 1), (1, 1), 2, 5, 6, False, False, False, False),
    Case("c64to128_s2_pre", 64, 128, (3, 3), (2, 2), (1, 1), (1, 1), 2, 17, 17, True, False, False, True),
    Case("c96to96_res_post", 96, 96, (3, 3), (1, 1), (1, 1), (1, 1), 1, 19, 19, True, True, True, True),
    Case("c33to65_d2", 33, 65, (3, 3), (1, 1), (2, 2), (2, 2), 3, 13, 15, False, True, False, True),
    Case("empty_batch", 8, 12, (3, 3), (1, 1), (1, 1), (1, 1), 0, 5, 5, True, True, True, True),
)


@dataclass(frozen=True)
class Comparison:
    case: str
    op: str
    output: str
    error: float
    allowed: float

    @property
    def passed(self) -> bool:
        return self.error <= self.allowed  # NaN/inf errors fail


@dataclass
class Result:
    provider: str
    device: str  # the device's name, e.g. "NVIDIA H100 80GB HBM3 (sm_90)"
    dtype: str
    passed: bool
    failure: str = ""  # the first failure, one line
    seconds: float = 0.0
    comparisons: list[Comparison] = field(default_factory=list)

    def worst(self) -> dict[str, Comparison]:
        """Per op, the comparison with the largest error relative to its allowance."""
        out: dict[str, Comparison] = {}
        for c in self.comparisons:
            ratio = c.error / c.allowed if c.allowed > 0 else float("inf")
            best = out.get(c.op)
            if best is None or ratio > (best.error / best.allowed if best.allowed > 0 else float("inf")):
                out[c.op] = c
        return out


# --- modes ----------------------------------------------------------------------------------------------

_mode_override: Optional[str] = None


def mode() -> str:
    value = _mode_override or os.environ.get(MODE_ENV_VAR, "auto") or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV_VAR} must be one of {MODES}, got {value!r}")
    return value


def set_mode(value: Optional[str]) -> Optional[str]:
    """Override XCEPTION_FAST_VERIFY for this process (None: back to the environment); returns the
    previous override."""
    global _mode_override
    if value is not None and value not in MODES:
        raise ValueError(f"verification mode must be one of {MODES}, got {value!r}")
    previous, _mode_override = _mode_override, value
    return previous


def no_checks_now() -> bool:
    """True during CUDA-graph capture or torch.compile tracing: nothing may be run or timed then."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# --- the cache key -------------------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    return Path(base) / "xception_fast" if base else Path.home() / ".cache" / "xception_fast"


def normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


@functools.lru_cache(maxsize=None)
def _driver_version() -> str:
    """The NVIDIA driver's version (NVML, e.g. "570.86.15"), else the CUDA driver API's, else "unknown"."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        buffer = ctypes.create_string_buffer(96)
        if nvml.nvmlInit_v2() == 0 and nvml.nvmlSystemGetDriverVersion(buffer, 96) == 0:
            return buffer.value.decode()
    except (OSError, AttributeError):
        pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-driver-api {version.value}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def device_description(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": props.name, "capability": f"{props.major}.{props.minor}", "driver": _driver_version(),
                "cuda": str(torch.version.cuda)}
    return {"device": f"{device.type} {platform.machine()} {platform.processor()}".strip(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}


def device_label(device: torch.device) -> str:
    d = device_description(device)
    return f"{d['device']} (sm_{d['capability'].replace('.', '')})" if "capability" in d else d["device"]


@functools.lru_cache(maxsize=None)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    # Keyed by (path, mtime, size) as well: a file rebuilt or edited in this process is hashed again.
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(os.path.basename(path).encode())
        try:
            digest.update(Path(path).read_bytes())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()[:16]


def kernel_hash(name: str) -> str:
    """A hash of what the provider's kernels are built from (sources, or the built extension)."""
    files = []
    for path in backends.PROVIDERS[name].source_files():
        try:
            info = path.stat()
            files.append((str(path), info.st_mtime_ns, info.st_size))
        except OSError:
            files.append((str(path), 0, -1))
    return _hash_files(tuple(files))


def stamp(name: str, device: torch.device | str, dtype: torch.dtype) -> dict[str, str]:
    """What the self-check's result depends on; a change to any of it means checking again."""
    device = normalize_device(device)
    return {"provider": name, "dtype": DTYPE_NAMES[dtype], **device_description(device),
            "torch": torch.__version__, "triton": _triton_version(), "xception_fast": xception_fast.__version__,
            "kernels": kernel_hash(name)}


def _stamp_file(st: dict[str, str]) -> Path:
    key = hashlib.sha256(json.dumps(st, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "verify" / f"{st['provider']}-{st['dtype']}-{key}.json"


def write_json_atomic(path: Path, data: dict) -> bool:
    """Write `data` to `path` through a temporary file in the same folder renamed over it, so a
    reader (or a second writer) never sees half a file. False if the folder is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        return False
    return True


def read_json(path: Path) -> Optional[dict]:
    """The file's object, or None if it is missing, unreadable or corrupt."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- the check -----------------------------------------------------------------------------------------

def _inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """The case's inputs rounded to `dtype` (for the provider and the reference in that dtype) and
    the same values in float64 (for the truth). A private generator: the caller's RNG is untouched."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset

    kh, kw = case.kernel
    ho = (case.h + 2 * case.padding[0] - case.dilation[0] * (kh - 1) - 1) // case.stride[0] + 1
    wo = (case.w + 2 * case.padding[1] - case.dilation[1] * (kw - 1) - 1) // case.stride[1] + 1
    out = [case.n, case.cout, ho, wo]
    t = {
        "x": rand(case.n, case.cin, case.h, case.w, offset=0.3),  # a non-zero mean for the statistics
        "dw_weight": rand(case.cin, 1, kh, kw, scale=(kh * kw) ** -0.5),
        "pw_weight": rand(case.cout, case.cin, 1, 1, scale=case.cin ** -0.5),
        "scale": rand(case.cout, scale=0.25, offset=1.0) if case.affine else None,
        "shift": rand(case.cout, scale=0.5),
        "bn_weight": rand(case.cout, scale=0.25, offset=1.0) if case.affine else None,
        "bn_bias": rand(case.cout, scale=0.5) if case.affine else None,
        "residual": rand(*out) if case.residual else None,
        "grad_y": rand(*out),
    }
    vector_dtype = reference.accumulation_dtype(dtype)
    low, exact = {}, {}
    for k, v in t.items():
        if v is None:
            low[k] = exact[k] = None
            continue
        rounded = v.to(vector_dtype if v.dim() == 1 else dtype)
        if rounded.dim() == 4 and k in ("x", "residual", "grad_y"):
            rounded = reference.to_channels_last(rounded)
        low[k] = rounded.to(device)
        exact[k] = rounded.to(torch.float64).to(device)
    return {"low": low, "exact": exact}


def _spec(case: Case, residual: bool = False, pre_relu: Optional[bool] = None,
          post_relu: Optional[bool] = None) -> UnitSpec:
    return UnitSpec(case.kernel, case.stride, case.padding, case.dilation,
                    case.pre_relu if pre_relu is None else pre_relu,
                    case.post_relu if post_relu is None else post_relu, residual)


def _away_from_kink(grad_y: torch.Tensor, pre_activation: torch.Tensor) -> torch.Tensor:
    """Zero the gradient where the post-ReLU input is within rounding distance of 0: there the float64
    and the low-precision paths may legitimately disagree on the ReLU's mask."""
    band = 0.02 * pre_activation.abs().amax() if pre_activation.numel() else 0.0
    return torch.where(pre_activation.abs() > band, grad_y, torch.zeros_like(grad_y))


def _op_calls(case: Case, t: dict, exact: dict) -> list[tuple[str, tuple[str, ...], tuple]]:
    """(op, output names, arguments) for each op, given tensors `t` (one precision) and the float64
    ones (which decide the statistics and the ReLU masks of the backward inputs, the same for all)."""
    post = case.post_relu
    spec, forward_spec, linear = _spec(case), _spec(case, case.residual), _spec(case, post_relu=False)
    grad_y = t["grad_y"]
    if post:  # mask from the float64 pre-activation
        pre_act = reference.sepconv_bn_infer(exact["x"], exact["dw_weight"], exact["pw_weight"], exact["scale"],
                                             exact["shift"], None, linear)
        grad_y = _away_from_kink(grad_y, pre_act.to(grad_y.dtype))
    # Training backward inputs: z and the statistics as the float64 training forward gives them,
    # rounded to this precision (z in the dtype, the statistics in the accumulation dtype).
    _, z64, mean64, var64 = reference.sepconv_bn_train(exact["x"], exact["dw_weight"], exact["pw_weight"],
                                                       exact["bn_weight"], exact["bn_bias"], None, linear, _EPS)
    vec = t["shift"].dtype
    z = reference.to_channels_last(z64.to(t["x"].dtype))
    mean, invstd = mean64.to(vec), torch.rsqrt(var64 + _EPS).to(vec)
    grad_yt = grad_y
    if post:
        y64 = reference.bn_act(z64, mean64, torch.rsqrt(var64 + _EPS), exact["bn_weight"], exact["bn_bias"], None,
                               False)
        grad_yt = _away_from_kink(t["grad_y"], y64.to(grad_y.dtype))
    count = max(z.numel() // max(z.shape[1], 1), 1)
    sum_dy, sum_dy_xhat = reference.bn_backward_reduce(grad_yt.to(torch.float64), z64, mean64,
                                                       torch.rsqrt(var64 + _EPS), exact["bn_weight"],
                                                       exact["bn_bias"], post)
    mean_dy, mean_dy_xhat = (sum_dy / count).to(vec), (sum_dy_xhat / count).to(vec)
    x, dw, pw = t["x"], t["dw_weight"], t["pw_weight"]
    return [
        ("sepconv_bn_infer", ("y",),
         (x, dw, pw, t["scale"], t["shift"], t["residual"], forward_spec)),
        ("sepconv_bn_infer_backward", ("grad_x", "grad_dw", "grad_pw", "grad_scale", "grad_shift"),
         (grad_y, x, dw, pw, t["scale"], t["shift"], spec)),
        ("sepconv_bn_train", ("y", "z", "mean", "var"),
         (x, dw, pw, t["bn_weight"], t["bn_bias"], t["residual"], forward_spec, _EPS)),
        ("bn_backward_reduce", ("sum_dy", "sum_dy_xhat"),
         (grad_yt, z, mean, invstd, t["bn_weight"], t["bn_bias"], post)),
        ("sepconv_bn_train_backward", ("grad_x", "grad_dw", "grad_pw"),
         (grad_yt, x, z, dw, pw, mean, invstd, t["bn_weight"], t["bn_bias"], mean_dy, mean_dy_xhat, spec)),
    ]


# The mid variant per quick case (a provider listing `backends.MID_VARIANTS` is checked on them too):
# smooth activations, whose derivative has no kink on which float64 and a 16-bit run may disagree.
MID_CASES = ("bn_silu", "bn_gelu", "silu")
MID_OPS = ("sepconv_mid_infer", "sepconv_mid_infer_backward", "sepconv_mid_train", "sepconv_mid_train_backward")


def _mid_op_calls(case: Case, mid: str, t: dict, exact: dict) -> list[tuple[str, tuple[str, ...], tuple]]:
    """`_op_calls` for the mid variant `mid`: the mid BatchNorm's vectors drawn from the case's own
    (`bn_weight`/`shift` cycled over the input channels), the backward inputs from the float64 forward."""
    def per_input(v):  # a vector over the input channels, from one over the output channels
        return None if v is None else v.repeat(-(-case.cin // max(case.cout, 1)))[:case.cin].contiguous()

    post, norm = case.post_relu, mid.startswith("bn")
    spec = replace(_spec(case), mid=mid)
    forward_spec = replace(_spec(case, case.residual), mid=mid)
    linear = replace(_spec(case, post_relu=False), mid=mid)
    mid_w, mid_b = (per_input(t["bn_weight"]), per_input(t["shift"])) if norm else (None, None)
    mid_w64, mid_b64 = (per_input(exact["bn_weight"]), per_input(exact["shift"])) if norm else (None, None)
    grad_y = t["grad_y"]
    if post:
        pre_act = reference.sepconv_mid_infer(exact["x"], exact["dw_weight"], mid_b64, exact["pw_weight"],
                                              exact["scale"], exact["shift"], None, linear)
        grad_y = _away_from_kink(grad_y, pre_act.to(grad_y.dtype))
    y64, z64, mid_mean64, mid_var64, mean64, var64 = reference.sepconv_mid_train(
        exact["x"], exact["dw_weight"], exact["pw_weight"], mid_w64, mid_b64, exact["bn_weight"], exact["bn_bias"],
        None, linear, _EPS, _EPS)
    vec = t["shift"].dtype
    z = reference.to_channels_last(z64.to(t["x"].dtype))
    grad_yt = _away_from_kink(t["grad_y"], y64.to(grad_y.dtype)) if post else t["grad_y"]
    count = max(z.numel() // max(z.shape[1], 1), 1)
    invstd64 = torch.rsqrt(var64 + _EPS)
    sum_dy, sum_dy_xhat = reference.bn_backward_reduce(grad_yt.to(torch.float64), z64, mean64, invstd64,
                                                       exact["bn_weight"], exact["bn_bias"], post)
    x, dw, pw = t["x"], t["dw_weight"], t["pw_weight"]
    dw_bias = None if mid_b is None else mid_b.to(x.dtype)  # the folded bias: a conv bias, in x's dtype
    return [
        ("sepconv_mid_infer", ("y",), (x, dw, dw_bias, pw, t["scale"], t["shift"], t["residual"], forward_spec)),
        ("sepconv_mid_infer_backward", ("grad_x", "grad_dw", "grad_dw_bias", "grad_pw", "grad_scale", "grad_shift"),
         (grad_y, x, dw, dw_bias, pw, t["scale"], t["shift"], spec)),
        ("sepconv_mid_train", ("y", "z", "mid_mean", "mid_var", "mean", "var"),
         (x, dw, pw, mid_w, mid_b, t["bn_weight"], t["bn_bias"], t["residual"], forward_spec, _EPS, _EPS)),
        ("sepconv_mid_train_backward", ("grad_x", "grad_dw", "grad_pw", "grad_mid_weight", "grad_mid_bias"),
         (grad_yt, x, z, dw, pw, mid_mean64.to(vec), torch.rsqrt(mid_var64 + _EPS).to(vec), mid_w, mid_b,
          mean64.to(vec), invstd64.to(vec), t["bn_weight"], t["bn_bias"], (sum_dy / count).to(vec),
          (sum_dy_xhat / count).to(vec), spec)),
    ]


def _contract_violation(got: torch.Tensor, like: torch.Tensor) -> str:
    """What differs from the reference's output besides the values (shape, dtype, layout), or ""."""
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}, not a tensor"
    if got.shape != like.shape or got.dtype != like.dtype or got.device != like.device:
        return f"{got.dtype}{list(got.shape)} on {got.device}, expected {like.dtype}{list(like.shape)} on {like.device}"
    if got.numel() > 1 and got.stride() != like.stride():
        return f"strides {got.stride()}, expected {like.stride()}"
    return ""


def _as_exact(args: tuple) -> tuple:
    return tuple(a.to(torch.float64) if isinstance(a, torch.Tensor) else a for a in args)


def _outputs(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


@contextlib.contextmanager
def _check_context() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for device_type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        stack.enter_context(backends.poison_env())  # every provider NaN-fills fresh outputs under it
        yield


def _check_op(result: Result, case: Case, module, op: str, names: tuple[str, ...], args: tuple,
              dtype: torch.dtype) -> None:
    """Run `op` of the provider `module` and record each output's comparison (or the failure) in `result`."""
    def fail(message: str) -> None:
        result.passed = False
        result.failure = result.failure or f"{case.name} {op} {message}"

    try:
        got = _outputs(getattr(module, op)(*args))
    except Exception as exc:  # noqa: BLE001 (a provider that raises fails its check)
        return fail(f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    if len(got) != len(names):
        return fail(f"returned {len(got)} outputs, expected {len(names)}")
    with reference.composed_batchnorm():
        low = _outputs(getattr(reference, op)(*args))
        exact = _outputs(getattr(reference, op)(*_as_exact(args)))
    for out, g, lo, ex in zip(names, got, low, exact):
        contract = _contract_violation(g, lo)
        error, allowed = (float("inf"), 0.0) if contract else error_and_allowance(g, lo, ex, dtype)
        comparison = Comparison(case.name, op, out, error, allowed)
        result.comparisons.append(comparison)
        if not comparison.passed:
            fail(f"{out}: " + (contract or f"error {error:.3g} > allowed {allowed:.3g}"))


def check(name: str, device: torch.device | str, dtype: torch.dtype, full: bool = False, seed: int = 0) -> Result:
    """Run the self-check of provider `name` on `device` in `dtype` (nothing is read or written on disk)."""
    device = normalize_device(device)
    result = Result(name, device_label(device), DTYPE_NAMES[dtype], passed=True)
    start = time.perf_counter()
    module = backends.PROVIDERS[name].load()
    mid = bool(backends.PROVIDERS[name].variants & backends.MID_VARIANTS)
    try:
        with _check_context():
            for i, case in enumerate(FULL_CASES if full else QUICK_CASES):
                data = _inputs(case, device, dtype, seed + i)
                calls = _op_calls(case, data["low"], data["exact"])
                if mid and i < len(MID_CASES) and case.n > 0:
                    calls += _mid_op_calls(case, MID_CASES[i], data["low"], data["exact"])
                for op, names, args in calls:
                    _check_op(result, case, module, op, names, args, dtype)
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.seconds = time.perf_counter() - start
    return result


# --- the cache and the verdict used by `auto` ----------------------------------------------------------

_results: dict[tuple, Result] = {}  # (provider, device, dtype) -> result
_reported: set[tuple] = set()
_lock = threading.RLock()


def _key(name: str, device: torch.device, dtype: torch.dtype) -> tuple:
    return name, str(device), dtype


def _from_json(data: dict) -> Result:
    comparisons = [Comparison(**c) for c in data.get("comparisons", [])]
    return Result(data["provider"], data["device"], data["dtype"], bool(data["passed"]), data.get("failure", ""),
                  float(data.get("seconds", 0.0)), comparisons)


def cached(name: str, device: torch.device | str, dtype: torch.dtype) -> Optional[Result]:
    """The self-check's result, from this process or the disk (for the current stamp), without
    running it. Within a process the loaded kernels cannot change, so a result found once stands."""
    device = normalize_device(device)
    key = _key(name, device, dtype)
    if key in _results:
        return _results[key]
    st = stamp(name, device, dtype)
    data = read_json(_stamp_file(st))
    if data is None or data.get("stamp") != st:
        return None
    try:
        result = _from_json(data["result"])
    except (KeyError, TypeError, ValueError):
        return None
    _results[key] = result
    return result


def run_and_record(name: str, device: torch.device | str, dtype: torch.dtype, full: bool = False) -> Result:
    """Run the self-check and keep its result (in this process, and on disk when possible)."""
    device = normalize_device(device)
    with _lock:
        st = stamp(name, device, dtype)
        result = check(name, device, dtype, full=full)
        _results[_key(name, device, dtype)] = result
        write_json_atomic(_stamp_file(st), {"stamp": st, "result": asdict(result), "full": full})
    return result


def _report_failure(result: Result) -> None:
    key = (result.provider, result.device, result.dtype)
    if key in _reported:
        return
    _reported.add(key)
    warnings.warn(f"xception_fast: the {result.provider} provider failed its self-check on {result.device} in "
                  f"{result.dtype} ({result.failure}); `auto` will not use it there", RuntimeWarning, stacklevel=3)


def verified(name: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `auto` may use fused provider `name` on `device` in `dtype`: its self-check has
    passed there (running it now if needed and allowed), or verification is off."""
    if mode() == "off":
        return True
    device = normalize_device(device)
    with _lock:
        result = cached(name, device, dtype)
        if result is None:
            if no_checks_now():
                return False
            result = run_and_record(name, device, dtype)
    if not result.passed:
        _report_failure(result)
    return result.passed


def explicit_request(name: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """An explicit ``backend=name`` for a fused provider: warn once if it has not passed on the
    device (mode auto), or check it now and raise if it fails (mode require)."""
    current = mode()
    entry = backends.PROVIDERS[name]
    if current == "off" or not entry.fused or dtype not in entry.dtypes:
        return
    device = normalize_device(device)
    with _lock:
        result = cached(name, device, dtype)
        if current == "require":
            if result is None and not no_checks_now():
                result = run_and_record(name, device, dtype)
            if result is None or not result.passed:
                why = "not checked (capture or tracing)" if result is None else result.failure
                raise RuntimeError(f"xception_fast backend {name!r} has not passed its self-check on "
                                   f"{device_label(device)} in {DTYPE_NAMES[dtype]} ({why}) and "
                                   f"{MODE_ENV_VAR}=require")
            return
    if result is None or not result.passed:
        key = ("explicit", name, str(device), dtype)
        if key not in _reported:
            _reported.add(key)
            state = "has not been verified" if result is None else f"failed its self-check ({result.failure})"
            warnings.warn(f"xception_fast: running backend {name!r} as asked, but it {state} on "
                          f"{device_label(device)} in {DTYPE_NAMES[dtype]}; run `python -m xception_fast verify`",
                          RuntimeWarning, stacklevel=4)


def describe(name: str, device: torch.device | str) -> str:
    """The verification state of provider `name` on `device`, for reports (reads the cache only)."""
    entry = backends.PROVIDERS[name]
    if not entry.fused:
        return "the truth the others are checked against"
    if mode() == "off":
        return f"not checked ({MODE_ENV_VAR}=off: trusted)"
    if not entry.availability(torch.device(device)).available:
        return "n/a (unavailable)"
    device = normalize_device(device)
    states = []
    for dtype in entry.dtypes:
        result = cached(name, device, dtype)
        states.append(f"{DTYPE_NAMES[dtype]} " + ("unchecked" if result is None else
                                                   "passed" if result.passed else "FAILED"))
    return ", ".join(states) + f" on {device_label(device)}"


def clear() -> None:
    """Forget this process's results and reports (the disk cache stays)."""
    with _lock:
        _results.clear()
        _reported.clear()
