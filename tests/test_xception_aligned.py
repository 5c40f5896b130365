"""Aligned Xception 41/65/71 against timm's `xception_aligned`, layer for layer.

On the CPU, float64 depthwise convolutions take PyTorch's slow per-group path (seconds per layer at
728 channels), and in float32 a training step's gradients through 40 BatchNorms over a few values
per channel are dominated by rounding. So: the real xception41 is compared in float32 (eval
outputs, train-mode outputs and running statistics), and a narrow network built by both classes
from one block list (every block kind: strided, identity shortcut, exit flow without shortcut) is
compared in float64 through a training step, gradients included. 65 and 71 differ from 41 only in
their block lists; their parameter counts, keys and feature taps are compared with timm's.
"""

import copy
from functools import partial

import pytest
import torch
from torch import nn

from xception_fast import load_timm_weights, to_timm_state_dict
from xception_fast.models.xception_aligned import XceptionAligned, xception41, xception65, xception71
from xception_fast.testing import randomize_batchnorm_

timm = pytest.importorskip("timm")
from timm.models.xception_aligned import XceptionAligned as TimmXceptionAligned  # noqa: E402

BUILDERS = {"xception41": xception41, "xception65": xception65, "xception71": xception71}
NARROW = [(64, 16, 2), (16, 24, 2), (24, 32, 2), (32, 32, 1), (32, 32, 1), (32, (32, 40, 40), 2)]


def pair(name="xception41", dtype=torch.float64, **kwargs):
    """(timm's model with random BatchNorm statistics, ours with its weights)."""
    reference = randomize_batchnorm_(timm.create_model(name, pretrained=False, **kwargs)).to(dtype)
    ours = BUILDERS[name](backend="reference", **kwargs).to(dtype)
    load_timm_weights(ours, reference)  # strict: every key maps
    return reference, ours


def narrow_pair(**kwargs):
    last = dict(no_skip=True, start_with_relu=False)
    timm_cfg = [dict(in_chs=i, out_chs=o, stride=s) for i, o, s in NARROW] + \
        [dict(in_chs=40, out_chs=(48, 48, 56), stride=1, **last)]
    ours_cfg = [dict(in_channels=i, out_channels=o, stride=s) for i, o, s in NARROW] + \
        [dict(in_channels=40, out_channels=(48, 48, 56), stride=1, **last)]
    reference = TimmXceptionAligned(timm_cfg, norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1), **kwargs)
    reference = randomize_batchnorm_(reference).double()
    ours = XceptionAligned(ours_cfg, backend="reference", **kwargs).double()
    load_timm_weights(ours, reference)
    return reference, ours


@pytest.mark.parametrize("name", list(BUILDERS))
def test_parameter_counts_keys_and_feature_info_equal_timm(name):
    reference = timm.create_model(name, pretrained=False)
    ours = BUILDERS[name]()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    assert sorted(to_timm_state_dict(ours)) == sorted(reference.state_dict())
    assert [(f["num_chs"], f["reduction"]) for f in ours.feature_info] == \
        [(f["num_chs"], f["reduction"]) for f in reference.feature_info]


def test_xception41_equals_timm_eval_and_train_forward():
    reference, ours = pair(dtype=torch.float32, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.train()(x), reference.train()(x), rtol=1e-4, atol=1e-4)
    timm_state = reference.state_dict()
    for key, value in to_timm_state_dict(ours).items():  # running statistics after the training forward
        torch.testing.assert_close(value, timm_state[key], rtol=1e-4, atol=1e-5, msg=key)


def train_step_equal(reference, ours, x, grad):
    outputs = []
    for model in (ours.train(), reference.train()):
        a = x.clone().requires_grad_(True)
        y = model(a)
        y.backward(grad)
        outputs.append((y, a.grad))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-8, atol=1e-10)
    ours_params = dict(ours.named_parameters())
    reference_params = dict(reference.named_parameters())
    assert len(ours_params) == len(reference_params)
    for key, param in reference_params.items():
        torch.testing.assert_close(ours_params[XceptionAligned.timm_key_to_ours(key)].grad, param.grad, rtol=1e-7,
                                   atol=1e-9, msg=key)
    timm_state = reference.state_dict()
    for key, value in to_timm_state_dict(ours).items():  # running statistics after the training step
        torch.testing.assert_close(value, timm_state[key], rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize("output_stride", [32, 8])
def test_narrow_network_training_step_equals_timm_float64(output_stride):
    reference, ours = narrow_pair(num_classes=5, output_stride=output_stride)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-10, atol=1e-10)
    train_step_equal(reference, ours, x, torch.randn(2, 5, dtype=torch.float64))


@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_through_dilation(output_stride):
    reference, ours = pair(dtype=torch.float32, output_stride=output_stride, num_classes=0)
    assert [(f["num_chs"], f["reduction"]) for f in ours.feature_info] == \
        [(f["num_chs"], f["reduction"]) for f in reference.feature_info]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, taps = ours.eval().forward_intermediates(x)
        final_ref, taps_ref = reference.eval().forward_intermediates(x)
    assert final.shape[-1] == 64 // output_stride
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-6)
    assert len(taps) == len(taps_ref) == 5
    for tap, tap_ref in zip(taps, taps_ref):
        torch.testing.assert_close(tap, tap_ref, rtol=1e-5, atol=1e-6)


def test_features_only_as_timm():
    out_indices = (1, 4)  # DeepLab v3+: low-level features at stride 4, the backbone output
    reference, full = pair(dtype=torch.float32, num_classes=0)
    ours = xception41(features_only=True, out_indices=out_indices, backend="reference")
    ours.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("head.")})
    timm_features = timm.create_model("xception41", pretrained=False, features_only=True, out_indices=out_indices)
    assert ours.feature_info.channels() == timm_features.feature_info.channels() == [256, 2048]
    assert ours.feature_info.reduction() == timm_features.feature_info.reduction() == [4, 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = ours.eval()(x)
        expected = reference.eval().forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    assert [f.shape[1] for f in features] == [256, 2048]
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        xception41(features_only=True, out_indices=(5,))
    assert [f.shape for f in ours.forward_intermediates(x, indices=1, stop_early=True)[1]] == [features[1].shape]


def test_weights_go_back_to_timm_and_keys_round_trip():
    ours = randomize_batchnorm_(xception41(num_classes=7))
    reference = timm.create_model("xception41", pretrained=False, num_classes=7)
    reference.load_state_dict(to_timm_state_dict(ours))  # strict
    assert all(XceptionAligned.timm_key_to_ours(XceptionAligned.our_key_to_timm(k)) == k for k in ours.state_dict())
    copy.deepcopy(ours)  # the fused units deep-copy (training scripts do)


def test_output_stride_must_be_8_16_or_32():
    with pytest.raises(ValueError, match="output_stride"):
        xception41(output_stride=4)
