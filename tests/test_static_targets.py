"""The issues' target table (`bench.static.targets`): each target read from the right records, the worst
unit named, raw and calibrated judged apart."""

from xception_fast.bench.static import report, targets


def _total(provider, layer, mode, estimate, floor, calibrated=None, kernel="unit_total"):
    return dict(provider=provider, kernel=kernel, layer=layer, mode=mode, dtype="bf16", unit=layer, count=1,
                estimate_us=estimate, floor_us=floor, calibrated_us=calibrated, regs=None, spill_bytes=None)


def _kernel(provider, regs, spill, chosen=True):
    return dict(provider=provider, kernel="k", layer="middle", mode="infer", dtype="bf16", regs=regs,
                spill_bytes=spill, chosen=chosen)


def _records():
    return [
        _total("triton", "middle", "infer", 190.0, 100.0, calibrated=350.0),
        _total("triton", "block1.rep.0", "infer", 1900.0, 634.0, calibrated=1000.0),  # 3.0x raw: the worst
        _total("triton", "xception65_middle", "infer", 900.0, 100.0, calibrated=900.0),  # not an Xception unit
        _total("triton", "all", "infer", 1500.0, 1000.0, calibrated=2500.0, kernel="model_total"),
        _kernel("triton", 128, 0), _kernel("triton", 255, 0), _kernel("triton", 300, 64, chosen=False),
    ]


def test_each_target_reads_its_own_figure():
    records = _records()
    middle, _, each, model = targets.TARGETS[:4]
    assert targets.figure(middle, records, "triton", "bf16", "estimate_us") == (190.0, "")
    assert targets.figure(middle, records, "triton", "bf16", "calibrated_us") == (350.0, "")
    value, where = targets.figure(each, records, "triton", "bf16", "estimate_us")
    assert where == "block1.rep.0" and abs(value - 1900 / 634) < 1e-9  # the aligned unit is left out
    value, where = targets.figure(each, records, "triton", "bf16", "calibrated_us")
    assert where == "middle" and value == 3.5
    assert targets.figure(model, records, "triton", "bf16", "estimate_us") == (1.5, "")
    assert targets.figure(middle, records, "cuda", "bf16", "estimate_us") is None
    assert targets.registers(records, "triton", "bf16") == (255, 0)  # the config not chosen is left out


def test_the_table_marks_raw_and_calibrated_apart():
    text = targets.markdown(_records())
    assert "| middle-flow unit (`middle`), inference | 200 us | 190 us met | 350 us missed |" in text
    assert "| 34 units, inference: total / floor | 2.0x floor | 1.50x met | 2.50x missed |" in text
    assert "3.00x missed (block1.rep.0)" in text
    assert "| registers, every chosen kernel | <= 255, no spill | 255 regs, 0 B spilled met |" in text
    assert "not modelled" in text  # the training targets: no training records
    assert "cuda" not in text.split("\n")[4]  # no CUDA records, no CUDA columns


def test_the_static_report_starts_with_the_targets():
    text = report.markdown([{**r, "arch": 90, "label": "static estimate (sm_90 model)", "machine": "H100 SXM",
                             "batch": 256} for r in _records() if r["kernel"] != "k"])
    assert text.index("### Issue targets, bf16") < text.index("### Units, inference, bf16")


def test_fp16_is_set_against_bf16_where_both_were_modelled():
    records = _records()
    assert "fp16 / bf16" not in targets.markdown(records)
    records.append({**_total("triton", "all", "infer", 1650.0, 1000.0, calibrated=2500.0, kernel="model_total"),
                    "dtype": "fp16"})
    assert targets.half_vs_bf16(records, "triton", "infer", "estimate_us") == (1.1, "")
    text = targets.markdown(records)
    assert "| fp16 / bf16, 34 units, inference | <= 1.10x | 1.10x met | 1.00x met |" in text
    assert "fp16 / bf16, 34 units, training" not in text  # no training totals in either dtype
    assert targets.markdown(records, "fp16").count("fp16 / bf16") == 0  # once, in the bf16 table
