"""The static cost model in the benchmark suite: ``pytest --benchmark`` (``--static``: these rows only).

No GPU needed. CI's quick mode: the middle-flow unit (728 -> 728 at 19x19, batch 256), bf16,
inference and training, the Triton provider, and the CUDA provider when nvcc and csrc/ are present.
Wider: ``--bench-shapes`` / ``--bench-dtype`` (XCEPTION_FAST_BENCH_SHAPES / _DTYPES), or
XCEPTION_FAST_STATIC_LAYERS ("all" for every layer) / XCEPTION_FAST_STATIC_DTYPES, comma-separated. Every figure is a static estimate (sm_90 model), not a
measurement; the unit totals go into ``benchmark.extra_info`` and the Markdown table is printed.
The compilation runs in a worker process: the test session may have Triton's interpreter on.
"""

import json
import os
import shutil
import subprocess
import sys

from xception_fast.bench.common import dtype_name

LAYERS = os.environ.get("XCEPTION_FAST_STATIC_LAYERS") or os.environ.get("XCEPTION_FAST_BENCH_SHAPES") or "middle"
DTYPES = ",".join(dtype_name(d) for d in (os.environ.get("XCEPTION_FAST_STATIC_DTYPES")
                                           or os.environ.get("XCEPTION_FAST_BENCH_DTYPES") or "bf16").split(","))
SCRIPT = """
import json, sys
from xception_fast.bench.static import report, run
layers = None if sys.argv[1] == "all" else sys.argv[1].split(",")
records = run.static_records(90, sys.argv[2].split(","), layers, ("infer", "train"), tuple(sys.argv[3].split(",")))
print(report.markdown(records))
print(json.dumps(records))
"""


def _providers() -> str:
    """The CUDA provider too where its cubins can be built (nvcc and the csrc/ sources)."""
    from xception_fast.bench.static.cuda_plans import csrc_dir

    nvcc = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    return "triton,cuda" if nvcc and csrc_dir() is not None else "triton"


def test_static_estimates(benchmark, tmp_path):
    from xception_fast.bench.static.cuda_plans import csrc_dir

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("XCEPTION_FAST_STATIC_CACHE", str(tmp_path / "cubins"))
    if csrc_dir() is not None:
        env.setdefault("XCEPTION_FAST_CSRC", str(csrc_dir()))

    def model():
        # Run outside the checkout: `python -c` puts the working directory first on sys.path, and the
        # source folder is not an importable package (triton_kernels is installed inside it).
        done = subprocess.run([sys.executable, "-c", SCRIPT, LAYERS, DTYPES, _providers()], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    out = benchmark.pedantic(model, rounds=1, iterations=1)
    table, line = out.rsplit("\n", 2)[0], out.strip().splitlines()[-1]
    records = json.loads(line)
    print(table)
    totals = [r for r in records if r["kernel"] == "unit_total"]
    assert {r["provider"] for r in totals} >= {"roofline", "unfused", "triton"}
    assert {r["mode"] for r in totals if r["provider"] == "triton"} == {"infer", "train"}
    for r in records:
        assert r["label"] == "static estimate (sm_90 model)"
        assert r["estimate_us"] > 0
        for key in ("provider", "kernel", "layer", "mode", "dtype", "arch", "issue_us", "mma_us", "dram_us",
                    "estimate_us", "floor_us", "regs", "spill_bytes", "smem_bytes", "ctas_per_sm", "tensor_op"):
            assert key in r, key
    for r in totals:
        benchmark.extra_info[f"{r['provider']}/{r['layer']}/{r['mode']}/{r['dtype']} static estimate us"] = \
            r["estimate_us"]
