"""Feature extraction (timm's conventions), classifier reset, gradient checkpointing, and the
Keras-compatibility option's structure (its numerics against Keras itself: test_keras.py)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xception_fast
from xception_fast.models.features import FeatureInfo, XceptionFeatures, feature_take_indices
from xception_fast.models.layers import MaxPool2dSame, same_pad
from xception_fast.models.xception import Block
from xception_fast.testing import randomize_batchnorm_

# Feature-map sizes worked out by hand from the architecture: the stem's two unpadded 3x3 convs
# (n -> (n-3)//2+1 -> that-2), then four stride-2 stages of ceil(n/2) each (3x3 pools padded to
# keep ceil), the middle flow and exit flow at stride 1.
SIZES = {299: [147, 74, 37, 19, 10], 224: [109, 55, 28, 14, 7]}


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("size", [299, 224])
def test_feature_maps_match_feature_info(size):
    model = xception_fast.xception(features_only=True).eval()
    info = model.feature_info
    assert info.channels() == [64, 128, 256, 728, 2048] and info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, size, size))
    assert [m.shape[1] for m in maps] == info.channels()
    assert [tuple(m.shape[2:]) for m in maps] == [(s, s) for s in SIZES[size]]
    for m, reduction in zip(maps, info.reduction()):  # the nominal reduction, less the unpadded stem's loss
        assert size / reduction - 3 <= m.shape[-1] <= math.ceil(size / reduction)
    assert all((m >= 0).all() for m in maps)  # every tap is after a ReLU, as timm's


def test_features_only_selects_stages_and_stops_early():
    model = xception_fast.xception(features_only=True, out_indices=(1, -2)).eval()
    assert isinstance(model, XceptionFeatures) and isinstance(model.fc, nn.Identity)
    assert model.out_indices == [1, 3]
    assert model.feature_info.channels() == [128, 728] and model.feature_info.module_name() == ["block1", "block11"]
    assert model.feature_info.channels(0) == 64 and len(model.feature_info) == 5
    full = xception_fast.xception(num_classes=0).eval()
    full.load_state_dict(model.state_dict())  # same names: weights move both ways
    x = torch.randn(2, 3, 96, 80)
    calls = []
    model.conv3.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        low, high = model(x)
        final, maps = full.forward_intermediates(x)
    assert not calls  # stop_early: the exit flow does not run for a block-11 tap
    torch.testing.assert_close(low, maps[1])
    torch.testing.assert_close(high, maps[3])
    torch.testing.assert_close(full.forward_head(final), full(x))


def test_take_indices_and_feature_info_follow_timm():
    assert feature_take_indices(5) == ([0, 1, 2, 3, 4], 4)
    assert feature_take_indices(5, 2) == ([3, 4], 4)
    assert feature_take_indices(5, (0, -1)) == ([0, 4], 4)
    for bad in (0, 6, (5,), (-6,)):
        with pytest.raises(ValueError):
            feature_take_indices(5, bad)
    info = FeatureInfo([dict(num_chs=8, reduction=2, module="a"), dict(num_chs=16, reduction=4, module="b")], [1])
    assert info.channels() == [16] and info.reduction(0) == 2 and info.get_dicts(keys=["num_chs"]) == [{"num_chs": 16}]


def test_forward_intermediates_match_timm_legacy_xception():
    timm = pytest.importorskip("timm")
    reference = timm.create_model("legacy_xception", pretrained=False, num_classes=0)
    if not hasattr(reference, "forward_intermediates"):
        pytest.skip("this timm's legacy_xception has no forward_intermediates")
    randomize_batchnorm_(reference)
    ours = xception_fast.xception(num_classes=0)
    xception_fast.load_timm_weights(ours, reference)
    x = torch.randn(1, 3, 90, 97)  # odd and even sizes: every tap and pool sees both
    with torch.no_grad():
        for indices, stop_early in ((None, False), ((1, 3), True), (2, False)):
            mine = ours.eval().forward_intermediates(x, indices, stop_early=stop_early)
            theirs = reference.eval().forward_intermediates(x, indices, stop_early=stop_early)
            torch.testing.assert_close(mine[0], theirs[0], rtol=1e-5, atol=1e-5)
            assert len(mine[1]) == len(theirs[1])
            for a, b in zip(mine[1], theirs[1]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [d["num_chs"] for d in ours.feature_info] == [d["num_chs"] for d in reference.feature_info]
    assert [d["reduction"] for d in ours.feature_info] == [d["reduction"] for d in reference.feature_info]


def test_reset_classifier():
    model = xception_fast.xception(num_classes=10, fc_layers=(64,)).double()
    model.reset_classifier(3)
    assert model.get_classifier() is model.fc
    assert (model.fc.in_features, model.fc.out_features, model.fc.weight.dtype) == (64, 3, torch.float64)
    model.reset_classifier(0)
    assert isinstance(model.fc, nn.Identity)
    assert model.eval()(torch.randn(1, 3, 71, 71, dtype=torch.float64)).shape == (1, 64)
    with pytest.raises(ValueError, match="average"):
        model.reset_classifier(3, global_pool="max")


def _train_step(model, x):
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_gives_plain_training():
    # The recomputation reruns the same ops on the same inputs, so everything is compared bit for bit.
    # keras_compat: its TF-same pools are inside the checkpointed blocks too.
    torch.manual_seed(0)
    plain = randomize_batchnorm_(xception_fast.xception(num_classes=4, keras_compat=True)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(2, 3, 72, 71)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss_plain, grads_plain = _train_step(plain, x)
        plain_saved, saved[:] = sum(saved), []
        loss_ckpt, grads_ckpt = _train_step(checkpointed, x)
    assert sum(saved) < plain_saved / 4  # activations inside the blocks were not kept
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)
    # running statistics updated once per step, as plain training does (not again by the recomputation)
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    with torch.no_grad():  # checkpointing is a training-time switch: nothing changes without grad
        torch.testing.assert_close(checkpointed.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_grad_checkpointing_composes_with_the_triton_units(monkeypatch):
    from xception_fast import backends

    if not torch.cuda.is_available():
        from xception_fast.triton_kernels import depthwise_pointwise

        if type(depthwise_pointwise._sepconv_infer_kernel.fn).__name__ != "InterpretedFunction":
            pytest.skip("the Triton kernels were imported without the CPU interpreter in this process")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if "triton" not in backends.available_backends():
        pytest.skip("the triton provider is not available here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # small on purpose: each unit is a few interpreter programs; a stride-2 block has a pool and a shortcut
    plain = randomize_batchnorm_(Block(8, 16, 2, 2, backend="triton")).to(device).train()
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(2, 8, 9, 10, device=device, requires_grad=True)
    y = plain(x)
    y.square().sum().backward()
    from xception_fast.models.layers import checkpoint_module

    x2 = x.detach().clone().requires_grad_()
    y2 = checkpoint_module(checkpointed, x2)
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_keras_compat_sets_every_batchnorm_and_pool():
    default, compat = xception_fast.xception(), xception_fast.xception(keras_compat=True)
    assert len(_batchnorms(compat)) == 40
    assert all((bn.eps, bn.momentum) == (1e-5, 0.1) for bn in _batchnorms(default))
    assert all((bn.eps, bn.momentum) == (1e-3, 0.01) for bn in _batchnorms(compat))
    pools = [getattr(compat, f"block{i}").pool for i in (1, 2, 3, 12)]
    assert all(isinstance(p, MaxPool2dSame) for p in pools)
    assert all(isinstance(getattr(default, f"block{i}").pool, nn.MaxPool2d) for i in (1, 2, 3, 12))
    # the same parameters and state-dict names: weights move between the two
    compat.load_state_dict(default.state_dict())


@pytest.mark.parametrize("h,w", [(9, 9), (8, 8), (74, 37), (1, 2)])
def test_tf_same_max_pool(h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64) - 5  # all negative: a zero pad would win, -inf must not
    pooled = MaxPool2dSame(3, 2)(x)
    (top, bottom), (left, right) = same_pad(h, 3, 2), same_pad(w, 3, 2)
    assert (top, bottom) == ((1, 1) if h % 2 else (0, 1)) or h < 3
    expected = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=float("-inf")), 3, 2)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    assert pooled.shape[-2:] == (-(-h // 2), -(-w // 2))
    if h % 2 and w % 2:  # odd sizes: exactly PyTorch's symmetric pool
        torch.testing.assert_close(pooled, F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)
    elif h > 2:  # even: the windows differ from the symmetric pool's
        assert not torch.equal(pooled, F.max_pool2d(x, 3, 2, 1))
    try:
        from timm.layers import MaxPool2dSame as TimmMaxPool2dSame
    except ImportError:
        return
    torch.testing.assert_close(pooled, TimmMaxPool2dSame(3, 2)(x), rtol=0, atol=0)


def test_grad_checkpointing_compiles_without_graph_breaks():
    from xception_fast.models.layers import checkpoint_module

    class Checkpointed(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return checkpoint_module(self.block, x)

    torch.manual_seed(0)
    eager = randomize_batchnorm_(Block(8, 16, 2, 2, backend="reference")).train()
    compiled_block = copy.deepcopy(eager)
    # aot_eager: the graph capture and the partitioner's recomputation, without a C++ toolchain
    compiled = torch.compile(Checkpointed(compiled_block), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 9, 10)
    y_eager, y = eager(x), compiled(x)
    y_eager.square().sum().backward()
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for (name, p), q in zip(eager.named_parameters(), compiled_block.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, a), b in zip(eager.named_buffers(), compiled_block.buffers()):  # updated once, not twice
        torch.testing.assert_close(b, a, msg=name)
