"""Model benchmarks: images/s and peak memory of Xception per fused provider, timm's
legacy_xception eager and compiled, torchvision's inception_v3 eager and compiled, at 299x299,
inference and a full training step. See conftest.py."""

import pytest
import torch

from xception_fast.bench.common import NO_GPU_REASON, BenchSettings
from xception_fast.bench.models import model_cases

GPU_SETTINGS = BenchSettings.from_env("cuda")
GPU_CASES = model_cases(GPU_SETTINGS) if GPU_SETTINGS.run_models else []
CPU_CASES = model_cases(BenchSettings.cpu_smoke())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU_REASON)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.id)
def test_model(case, gpu_runner, measure):
    row = measure(gpu_runner, case)
    assert row["images_per_s"] > 0 and row["peak_mem_bytes"] > 0 and row["method"] == "do_bench"


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda case: case.id)
def test_model_cpu_smoke(case, cpu_runner, measure):
    row = measure(cpu_runner, case)
    assert row["images_per_s"] > 0 and row["parameters"] > 20_000_000
