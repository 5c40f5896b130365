"""Layer benchmarks: every distinct separable-unit shape of Xception at 299x299, per competitor
(cuda, triton, reference, eager cuDNN, torch.compile), inference and training. See conftest.py."""

import pytest
import torch

from xception_fast.bench.common import NO_GPU_REASON, BenchSettings
from xception_fast.bench.layers import layer_cases

GPU_SETTINGS = BenchSettings.from_env("cuda")
GPU_CASES = layer_cases(GPU_SETTINGS) if GPU_SETTINGS.run_layers else []
CPU_CASES = layer_cases(BenchSettings.cpu_smoke())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU_REASON)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.id)
def test_layer(case, gpu_runner, measure):
    row = measure(gpu_runner, case)
    assert row["median_ms"] > 0 and row["method"] == "do_bench"


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: case.id)
def test_layer_cpu_smoke(case, cpu_runner, measure):
    row = measure(cpu_runner, case)
    assert row["median_ms"] > 0 and row["tflops"] > 0 and row["gbps"] > 0
    assert 0 < row["roofline_fraction"] and row["bound"] in ("compute", "memory")
