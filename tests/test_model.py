"""The Xception model: the paper's architecture exactly, its ablations, and timm's layer-for-layer match."""

import pytest
import torch
from torch import nn

import xception_fast
from xception_fast.testing import randomize_batchnorm_
from xception_fast import SeparableConvBN2d
from xception_fast.convert import load_timm_weights, our_key_to_timm, timm_key_to_ours, to_timm_state_dict
from xception_fast.models.xception import UnfusedSeparableConvBN2d

timm = pytest.importorskip("timm")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_is_the_papers():
    assert n_params(xception_fast.xception()) == 22_855_952


def test_36_conv_layers_in_14_modules():
    model = xception_fast.xception()
    # The paper counts each separable conv and each plain 3x3 conv as one layer, not the 1x1 shortcuts.
    separable = [m for m in model.modules() if isinstance(m, SeparableConvBN2d)]
    spatial = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(separable) == 34 and len(spatial) == 36
    assert set(spatial) - {u.depthwise for u in separable} == {model.conv1, model.conv2}
    blocks = [getattr(model, f"block{i}") for i in range(1, 13)]
    assert len(blocks) + 2 == 14  # 12 residual blocks, conv3 and conv4 (the stem counted with block1)


@pytest.mark.parametrize("size,features", [(299, 10), (71, 3)])
def test_output_shapes(size, features):
    model = xception_fast.xception(num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2048, features, features)
        assert model.forward_head(feats).shape == (2, 7)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 2048)


def test_matches_timm_legacy_xception_layer_for_layer():
    reference = timm.create_model("legacy_xception", pretrained=False, num_classes=10)
    randomize_batchnorm_(reference)
    ours = xception_fast.xception(num_classes=10)
    load_timm_weights(ours, reference)  # strict: every key maps
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
    # Training: float64, because a deep stack of batch-statistics BatchNorms amplifies float32 rounding.
    ours, reference = ours.double().train(), reference.double().train()
    x = x.double()
    y_ours, y_ref = ours(x), reference(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-10, atol=1e-10)
    y_ours.square().sum().backward()
    y_ref.square().sum().backward()
    ours_params = dict(ours.named_parameters())
    for timm_key, param in reference.named_parameters():
        torch.testing.assert_close(ours_params[timm_key_to_ours(timm_key)].grad, param.grad, rtol=1e-8,
                                   atol=1e-10, msg=timm_key)
    timm_state = reference.state_dict()
    for key, value in to_timm_state_dict(ours).items():  # running statistics after one training step
        torch.testing.assert_close(value, timm_state[key], rtol=1e-10, atol=1e-10, msg=key)


def test_weights_go_back_to_timm():
    ours = xception_fast.xception(num_classes=10)
    randomize_batchnorm_(ours)
    reference = timm.create_model("legacy_xception", pretrained=False, num_classes=10)
    reference.load_state_dict(to_timm_state_dict(ours))  # strict
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
    assert all(timm_key_to_ours(our_key_to_timm(k)) == k for k in ours.state_dict())


def test_no_residual_ablation_removes_every_shortcut():
    model = xception_fast.xception(residual=False)
    assert not any("skip" in name for name, _ in model.named_modules())
    with_residual = xception_fast.xception()
    skip_params = sum(p.numel() for name, p in with_residual.named_parameters() if "skip" in name)
    assert n_params(model) == 22_855_952 - skip_params
    x = torch.randn(1, 3, 71, 71)
    model.eval()
    block = model.block5
    with torch.no_grad():
        inp = torch.randn(1, 728, 5, 5)
        manual = inp
        for unit in block.rep:
            manual = unit(manual)
        torch.testing.assert_close(block(inp), manual)
        assert model(x).shape == (1, 1000)


@pytest.mark.parametrize("activation,cls", [("relu", nn.ReLU), ("elu", nn.ELU)])
def test_intermediate_activation_ablation(activation, cls):
    model = xception_fast.xception(mid_activation=activation, num_classes=5).eval()
    units = [m for m in model.modules() if isinstance(m, UnfusedSeparableConvBN2d)]
    assert len(units) == 34 and all(isinstance(u.mid, cls) for u in units)
    assert not any(isinstance(m, SeparableConvBN2d) for m in model.modules())
    assert n_params(model) == n_params(xception_fast.xception(num_classes=5))
    fused = xception_fast.xception(num_classes=5).eval()
    fused.load_state_dict(model.state_dict())  # same names, so weights move between the variants
    with torch.no_grad():
        assert model(torch.randn(1, 3, 71, 71)).shape == (1, 5)
    with pytest.raises(ValueError, match="mid_activation"):
        xception_fast.xception(mid_activation="gelu")


def test_mid_activation_changes_the_function():
    fused = SeparableConvBN2d(4, 4, pre_relu=False, backend="reference").eval()
    unfused = UnfusedSeparableConvBN2d(4, 4, "relu").eval()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert not torch.allclose(fused(x), unfused(x))
        unfused.mid = nn.Identity()
        torch.testing.assert_close(fused(x), unfused(x))


def test_jft_fully_connected_layers_and_options():
    model = xception_fast.xception(num_classes=11, in_chans=1, drop_rate=0.5, fc_layers=(64, 32))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 64), (64, 32), (32, 11)]
    assert n_params(model) - n_params(xception_fast.xception(num_classes=11, in_chans=1)) == \
        2048 * 64 + 64 + 64 * 32 + 32 + 32 * 11 - 2048 * 11
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 71, 71)).shape == (1, 11)
    assert xception_fast.xception(num_classes=0).eval()(torch.randn(1, 3, 71, 71)).shape == (1, 2048)


def test_units_run_pre_and_post_relu_where_the_paper_puts_them():
    model = xception_fast.xception()
    assert [u.pre_relu for u in model.block1.rep] == [False, True]
    assert all(u.pre_relu for u in model.block2.rep) and all(u.pre_relu for u in model.block7.rep)
    assert (model.conv3.pre_relu, model.conv3.post_relu) == (False, True)
    assert (model.conv4.pre_relu, model.conv4.post_relu) == (False, True)
    assert [u.pointwise.out_channels for u in model.block12.rep] == [728, 1024]


def test_channels_last_model_training_step():
    model = xception_fast.xception(num_classes=3).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 71, 71).contiguous(memory_format=torch.channels_last)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
