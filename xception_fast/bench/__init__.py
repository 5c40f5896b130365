"""The benchmark suite of xception_fast: layer and model timings against cuDNN, torch.compile and
Inception V3, with results files and a Markdown/PNG report.

Entry points: ``python -m xception_fast bench ...`` / ``python -m xception_fast report ...`` (both
`xception_fast.bench.cli.main`), and ``pytest benchmarks --benchmark-only`` in a source checkout.
Modules: `timing` (medians by triton.testing.do_bench / torch.utils.benchmark), `roofline` (FLOPs,
bytes, measured rates),
`shapes` (Xception's distinct separable-unit shapes), `layers` and `models` (the competitors),
`runner` (rows with skip reasons, progress), `results` (JSON files with the environment), `report`
(Markdown table, PNG plot), `cli`, and `sanitize` (a small forward/backward for compute-sanitizer).
"""
