"""The benchmark suite (see conftest.py).

Layers: every distinct separable-unit shape of Xception at 299x299, per competitor (cuda, triton,
reference, eager cuDNN, torch.compile), inference and training. Models: images/s and peak memory of
Xception per fused provider, timm's legacy_xception eager and compiled, torchvision's inception_v3
eager and compiled, at 299x299, inference and a full training step. GPU rows skip with the reason
without a GPU; the CPU smoke rows check that the suite runs."""

import pytest
import torch

from xception_fast.bench.common import NO_GPU_REASON, BenchSettings
from xception_fast.bench.layers import layer_cases
from xception_fast.bench.models import model_cases

GPU_SETTINGS = BenchSettings.from_env("cuda")
CPU_SETTINGS = BenchSettings.cpu_smoke()
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU_REASON)]


def params(cases, marks=()):
    return [pytest.param(case, marks=list(marks), id=case.id) for case in cases]


@pytest.mark.parametrize("case", params(layer_cases(GPU_SETTINGS) if GPU_SETTINGS.run_layers else [], GPU_ONLY))
def test_layer(case, gpu_runner, measure):
    assert measure(gpu_runner, case)["median_ms"] > 0


@pytest.mark.parametrize("case", params(layer_cases(CPU_SETTINGS)))
def test_layer_cpu_smoke(case, cpu_runner, measure):
    row = measure(cpu_runner, case)
    assert row["median_ms"] > 0 and row["tflops"] > 0 and row["gbps"] > 0
    assert 0 < row["roofline_fraction"] and row["bound"] in ("compute", "memory")


@pytest.mark.parametrize("case", params(model_cases(GPU_SETTINGS) if GPU_SETTINGS.run_models else [], GPU_ONLY))
def test_model(case, gpu_runner, measure):
    row = measure(gpu_runner, case)
    assert row["images_per_s"] > 0 and row["peak_mem_bytes"] > 0 and row["method"] == "do_bench"


@pytest.mark.parametrize("case", params(model_cases(CPU_SETTINGS)))
def test_model_cpu_smoke(case, cpu_runner, measure):
    row = measure(cpu_runner, case)
    assert row["images_per_s"] > 0 and row["parameters"] > 20_000_000
