"""Fast CPU tests of the benchmark code itself (xception_fast.bench): shapes, formulas, timing,
results files, report and CLI. The benchmarks proper live in benchmarks/."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xception_fast
from xception_fast import backends
from xception_fast.bench import cli, report, results
from xception_fast.bench.common import NO_GPU_REASON, BenchSettings, dtype_name, fused_provider_status
from xception_fast.bench.layers import LayerCase, PlainUnit, layer_cases, prepare_layer
from xception_fast.bench.models import BASELINE, model_cases
from xception_fast.bench.roofline import Rates, roofline_metrics, unit_bytes, unit_flops
from xception_fast.bench.runner import Runner
from xception_fast.bench.shapes import UnitShape, unit_shapes
from xception_fast.bench.timing import time_fn

# (in, out, input size, pre_relu, post_relu, residual, count): Xception at 299x299 (paper Fig. 5).
XCEPTION_299 = [
    (64, 128, 147, False, False, False, 1),
    (128, 128, 147, True, False, False, 1),
    (128, 256, 74, True, False, False, 1),
    (256, 256, 74, True, False, False, 1),
    (256, 728, 37, True, False, False, 1),
    (728, 728, 37, True, False, False, 1),
    (728, 728, 19, True, False, False, 17),  # 2 per middle block x 8, and the exit flow's first unit
    (728, 728, 19, True, False, True, 8),    # the last unit of each middle block adds the shortcut
    (728, 1024, 19, True, False, False, 1),
    (1024, 1536, 10, False, True, False, 1),
    (1536, 2048, 10, False, True, False, 1),
]


def test_unit_shapes_match_the_model():
    shapes = unit_shapes(299)
    got = [(s.in_channels, s.out_channels, s.height, s.pre_relu, s.post_relu, s.residual, s.count) for s in shapes]
    assert got == XCEPTION_299
    assert all(s.height == s.width and (s.kernel_size, s.stride, s.padding, s.dilation) == (3, 1, 1, 1) for s in shapes)
    assert all(s.out_height == s.height for s in shapes)
    # Independently of the hooks: the model's units, by channels and flags, are the shapes expanded by count.
    units = [m for m in xception_fast.xception().modules() if isinstance(m, xception_fast.SeparableConvBN2d)]
    from_model = sorted((u.depthwise.in_channels, u.pointwise.out_channels, u.pre_relu, u.post_relu) for u in units)
    expanded = sorted((s.in_channels, s.out_channels, s.pre_relu, s.post_relu) for s in shapes for _ in range(s.count))
    assert from_model == expanded and len(units) == 34
    assert len({s.slug for s in shapes}) == len(shapes)
    assert [s.flow for s in shapes[:6]] == ["entry"] * 6 and shapes[6].flow == "middle+exit"
    assert shapes[9].first_module == "conv3" and shapes[10].first_module == "conv4"


def test_unit_shapes_follow_the_input_size():
    small = unit_shapes(71)
    assert [s.height for s in small] == [33, 33, 17, 17, 9, 9, 5, 5, 5, 3, 3]
    assert [(s.in_channels, s.out_channels) for s in small] == [(a, b) for a, b, *_ in XCEPTION_299]


def test_flops_and_bytes_of_a_known_unit():
    shape = UnitShape(4, 8, 5, 5, pre_relu=False)
    # depthwise 2*N*C*Ho*Wo*9 = 3600, pointwise 2*N*Ho*Wo*C*Cout = 3200
    assert unit_flops(shape, 2, "infer") == 6800
    assert unit_flops(shape, 2, "train") == 3 * 6800
    # x = 200, y = 400, weights 4*9 + 4*8 = 68, BatchNorm vectors 16 elements; fp32
    assert unit_bytes(shape, 2, "infer", "fp32") == 4 * (200 + 68 + 16 + 400)
    assert unit_bytes(shape, 2, "train", "fp32") == 4 * ((200 + 68 + 16 + 400) + (400 + 200 + 400 + 68 + 200 + 68 + 16))
    assert unit_bytes(shape, 2, "infer", "bf16") == 2 * (200 + 68 + 16 + 400)
    with_residual = UnitShape(4, 8, 5, 5, residual=True)
    assert unit_bytes(with_residual, 2, "infer", "fp32") - unit_bytes(shape, 2, "infer", "fp32") == 4 * 400
    strided = UnitShape(4, 8, 6, 6, stride=2)
    assert (strided.out_height, strided.out_width) == (3, 3)
    assert unit_flops(strided, 1, "infer") == 2 * 4 * 9 * 9 + 2 * 9 * 4 * 8
    with pytest.raises(ValueError):
        unit_flops(shape, 1, "both")


def test_roofline_metrics():
    rates = Rates(device="cpu", dtype="bf16", matmul_tflops=100.0, copy_gbps=1000.0, matmul_n=1, copy_bytes=1)
    m = roofline_metrics(flops=10 ** 12, nbytes=10 ** 9, time_ms=1000.0, rates=rates)
    assert m["tflops"] == pytest.approx(1.0) and m["gbps"] == pytest.approx(1.0)
    assert m["floor_ms"] == pytest.approx(10.0) and m["roofline_fraction"] == pytest.approx(0.01)
    assert m["bound"] == "compute"
    m = roofline_metrics(flops=10 ** 9, nbytes=10 ** 10, time_ms=20.0, rates=rates)
    assert m["bound"] == "memory" and m["roofline_fraction"] == pytest.approx(0.5)
    assert "roofline_fraction" not in roofline_metrics(1, 1, 1.0, None)


def test_cpu_timing_and_quantiles():
    calls = []
    t = time_fn(lambda: calls.append(sum(range(2000))), "cpu")
    assert t.method == "torch.utils.benchmark" and 0 < t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms
    assert len(calls) >= 2  # a warm-up call, then the timed blocks


def test_dtype_names_and_settings(monkeypatch):
    assert dtype_name("bfloat16") == "bf16" and dtype_name(torch.float16) == "fp16" and dtype_name("fp32") == "fp32"
    with pytest.raises(ValueError):
        dtype_name("int8")
    gpu = BenchSettings.for_device("cuda")
    assert (gpu.dtypes, gpu.batches, gpu.layer_batch, gpu.image_size, gpu.compile_mode) == \
        (("bf16",), (1, 32, 256), 256, 299, "max-autotune")
    monkeypatch.setenv("XCEPTION_FAST_BENCH_DTYPES", "bf16,float32")
    monkeypatch.setenv("XCEPTION_FAST_BENCH_BATCHES", "32")
    monkeypatch.setenv("XCEPTION_FAST_BENCH_PROVIDERS", "cuda,eager")
    s = BenchSettings.from_env("cuda")
    assert s.dtypes == ("bf16", "fp32") and s.batches == (32,) and s.providers == ("cuda", "eager")
    assert {c.provider for c in layer_cases(s)} == {"cuda", "eager"}
    assert {(c.model, c.provider) for c in model_cases(s)} == {("xception_fast", "cuda"), ("legacy_xception", "eager"),
                                                                ("inception_v3", "eager"), ("xception65", "eager")}
    monkeypatch.setenv("XCEPTION_FAST_BENCH_MODES", "inference")
    with pytest.raises(ValueError, match="modes"):
        BenchSettings.from_env("cuda")


def test_gpu_grid_is_the_issues_grid():
    s = BenchSettings.for_device("cuda")
    layers = layer_cases(s)
    assert len(layers) == 11 * 5 * 2  # shapes x (cuda, triton, reference, eager, compile) x (infer, train)
    models = model_cases(s)
    # (3 fused + 2 timm + 2 inception + xception65: 2 fused (cuda declines its unit) + 2 timm) x batch x modes
    assert len(models) == 11 * 3 * 2
    assert BASELINE in {(c.model, c.provider) for c in models}
    assert {c.provider for c in models if c.model == "xception65_fast"} == {"triton", "reference"}


def test_provider_status_never_raises():
    for name in backends.provider_names():
        ok, reason = fused_provider_status(name, "cpu")
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert fused_provider_status("reference", "cpu")[0]


def test_plain_unit_matches_the_fused_module():
    shape = UnitShape(8, 16, 6, 6, residual=True, post_relu=True)
    for mode in ("infer", "train"):
        torch.manual_seed(0)
        fused = prepare_layer(LayerCase("reference", mode, "fp32", 2, shape), "cpu")
        torch.manual_seed(0)
        plain = prepare_layer(LayerCase("eager", mode, "fp32", 2, shape), "cpu")
        assert isinstance(plain.module, PlainUnit)
        for a, b in zip(fused.module.state_dict().values(), plain.module.state_dict().values()):
            torch.testing.assert_close(a, b)
        fused.fn()
        plain.fn()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_rows_skip_with_a_reason_without_a_gpu():
    runner = Runner(BenchSettings.for_device("cuda"), progress=None)
    case = layer_cases(runner.settings)[0]
    row = runner.run_layer(case)
    assert row["status"] == "skipped" and row["reason"] == NO_GPU_REASON
    row = runner.run_model(model_cases(runner.settings)[0])
    assert row["status"] == "skipped" and row["reason"] == NO_GPU_REASON


def _synthetic_results() -> dict:
    env = {"device": "cuda", "gpu_name": "Test GPU", "driver": "1.0", "torch": "2.x", "torch_cuda": "13.0",
           "triton": "3.x", "commit": "0123456789abcdef", "commit_dirty": False}
    rows = []
    for name, label, count, eager_ms in (("entry-64x128-147-nopre", "entry 64->128 @147x147 (x1)", 1, 2.0),
                                         ("middle-728x728-19", "middle 728->728 @19x19, ReLU first (x17)", 17, 1.0)):
        for provider, ms in (("eager", eager_ms), ("cuda", eager_ms / 2), ("compile", eager_ms / 1.25)):
            rows.append({"kind": "layer", "name": name, "label": label, "count": count, "provider": provider,
                         "mode": "infer", "dtype": "bf16", "batch": 256, "status": "ok", "median_ms": ms,
                         "roofline_fraction": 0.25, "method": "do_bench"})
        rows.append({"kind": "layer", "name": name, "label": label, "count": count, "provider": "triton",
                     "mode": "infer", "dtype": "bf16", "batch": 256, "status": "skipped",
                     "reason": "triton: not implemented yet"})
    for model, provider, ips in (("legacy_xception", "eager", 1000.0), ("xception_fast", "cuda", 1500.0),
                                 ("inception_v3", "compile", 2500.0)):
        rows.append({"kind": "model", "name": model, "provider": provider, "mode": "train", "dtype": "bf16",
                     "batch": 256, "image_size": 299, "status": "ok", "images_per_s": ips, "median_ms": 256e3 / ips,
                     "peak_mem_bytes": 3 * 2 ** 30, "compile_s": 61.0 if provider == "compile" else None,
                     "method": "do_bench"})
    return results.make_results("cpu", {"compile_mode": "max-autotune"}, {"cudnn_benchmark": True},
                                {"bf16": {"matmul_tflops": 800.0, "copy_gbps": 3000.0}}, rows, env=env)


def test_results_round_trip(tmp_path):
    data = _synthetic_results()
    path = results.save_results(data, tmp_path)
    assert path.parent == tmp_path and path.name.endswith("_test-gpu_0123456.json")
    loaded = results.load_results(path)
    assert loaded["rows"] == data["rows"] and loaded["environment"] == data["environment"]
    assert results.result_files([tmp_path]) == [path]
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an xception_fast benchmark results file"):
        results.load_results(tmp_path / "other.json")


def test_environment_records_versions_and_commit():
    env = results.environment("cpu")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["gpu_name"] is None
    assert set(env["backends"]) == set(backends.provider_names()) and env["backends"]["reference"]["available"]
    assert "commit" in env and "triton" in env and "torch_cuda" in env


def test_report_renders_tables():
    text = report.markdown([_synthetic_results()])
    assert "## Test GPU" in text and "driver 1.0" in text and "commit 0123456789" in text
    assert "| unit | units | eager | compile | cuda |" in text
    assert "| entry 64->128 @147x147 | 1 | 2.000 (1.00x, 25%) | 1.600 (1.25x, 25%) | 1.000 (2.00x, 25%) |" in text
    assert "| **all 18 units** (time x units) | 18 | 19.000 (1.00x) | 15.200 (1.25x) | 9.500 (2.00x) |" in text
    assert "| xception_fast | cuda | train | bf16 | 256 | 1,500 | 170.667 | 1.50x | 3.00 GiB |  |" in text
    assert "| inception_v3 | compile | train | bf16 | 256 | 2,500 |" in text and "| 61 |" in text
    assert "2 row(s) skipped: triton: not implemented yet" in text
    assert "bf16 matmul 800 TFLOP/s" in text


def test_report_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.plot(_synthetic_results(), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(report.PlotUnavailable, match="needs matplotlib"):
        report.plot(_synthetic_results(), tmp_path / "plot.png")
    results.save_results(_synthetic_results(), tmp_path)
    assert cli.main(["report", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "RESULTS.md").read_text().startswith("# xception_fast benchmark results")
    assert not (tmp_path / "benchmark.png").exists()


def test_cli_help(capsys):
    for command in ("bench", "report"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
    assert "--mode" in capsys.readouterr().out


def test_cli_module_runs():
    out = subprocess.run([sys.executable, "-m", "xception_fast.bench.cli", "bench", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=Path(xception_fast.__file__).resolve().parents[1])
    assert out.returncode == 0 and "--dtype" in out.stdout


def test_cli_tiny_cpu_run_and_report(tmp_path, capsys):
    out = tmp_path / "results"
    status = cli.main(["bench", "--device", "cpu", "--models", "xception_fast", "--mode", "infer", "--shapes",
                       "middle-728x728-5-res", "--providers", "reference", "eager", "compile", "--out", str(out),
                       "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "### Layers: infer (forward), fp32, batch 1" in printed and "| xception_fast | reference | infer |" in printed
    (path,) = out.glob("*.json")
    data = results.load_results(path)
    by_provider = {(r["kind"], r["provider"]): r for r in data["rows"]}
    assert by_provider[("layer", "reference")]["status"] == "ok"
    assert by_provider[("layer", "compile")]["status"] == "skipped"  # GPU-only rows skip with a reason
    assert by_provider[("model", "reference")]["images_per_s"] > 0
    assert data["environment"]["device"] == "cpu" and data["settings"]["cpu_threads"] == 1
    assert cli.main(["report", str(out), "--no-plot", "--quiet"]) == 0
    assert "middle 728->728 @5x5" in (out / "RESULTS.md").read_text()
