"""Against the paper author's own Xception: `keras.applications.Xception`, Keras 3 on its torch backend.

One Keras model is built (96x80 input: odd and even sizes, so the TF-"same" pools are exercised in
both dimensions), given random weights with realistic BatchNorm statistics (log-uniform running
variances over three decades, as trained networks have), and saved in each of Keras's formats.
The whole-model comparison is in float32: Keras's BatchNormalization computes in float32 even for
float64 inputs, so float64 would compare nothing more. The layer that is not BatchNorm or a
convolution, the TF-"same" max pool, is compared in float64, bit for bit.
"""

import os
import sys

import numpy as np
import pytest
import torch

if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "torch"  # read once, at Keras's import; no TensorFlow needed
keras = pytest.importorskip("keras")
pytest.importorskip("h5py")

import xception_fast  # noqa: E402
from xception_fast.keras_weights import (load_keras_weights, read_keras_weights, save_keras_weights,  # noqa: E402
                                         to_keras_weights)
from xception_fast.models.layers import MaxPool2dSame  # noqa: E402

# Keras's torch backend converts tensors with np.array(x) without copy=..., which numpy 2 flags on
# every weight it reads: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

H, W, CLASSES = 96, 80, 10
# Keras layers whose outputs are our feature_info taps: the stem, the ReLUs that start blocks 3, 4
# and 13 (our block1, block2, block11 outputs, activated), and the exit flow.
TAPS = ["block1_conv2_act", "block3_sepconv1_act", "block4_sepconv1_act", "block13_sepconv1_act",
        "block14_sepconv2_act"]


def _relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def keras_xception(tmp_path_factory):
    """(Keras model, paths of its saved weights, input, Keras's features + logits)."""
    keras.utils.set_random_seed(0)  # the conv weights Keras draws: a fixed model, a repeatable test
    model = keras.applications.Xception(weights=None, input_shape=(H, W, 3), classes=CLASSES,
                                        classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.2, 0.2, n), rng.uniform(-0.2, 0.2, n),
                               np.exp(rng.uniform(np.log(0.01), np.log(10.0), n))])
        elif layer.name == "predictions":
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.uniform(-0.5, 0.5, bias.shape)])  # Keras's bias starts at zero
    folder = tmp_path_factory.mktemp("keras")
    paths = {"h5": folder / "xception.h5", "weights.h5": folder / "xception.weights.h5",
             "keras": folder / "xception.keras"}
    model.save(paths["h5"])
    model.save_weights(paths["weights.h5"])
    model.save(paths["keras"])
    x = rng.standard_normal((2, H, W, 3)).astype("float32")
    taps = keras.Model(model.inputs, [model.get_layer(n).output for n in TAPS] + [model.output])
    outputs = [np.asarray(keras.ops.convert_to_numpy(o)) for o in taps([x], training=False)]
    return model, paths, x, outputs


def _ours(keras_compat=True, **kwargs):
    return xception_fast.xception(num_classes=CLASSES, keras_compat=keras_compat, backend="reference", **kwargs)


def _run(model, x):
    """Our features (NHWC, as Keras's) and logits for Keras's NHWC input."""
    with torch.no_grad():
        final, maps = model.eval().forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2))
        logits = model.forward_head(final)
    return [m.permute(0, 2, 3, 1).numpy() for m in maps] + [logits.numpy()]


def test_keras_compat_matches_keras_features_and_logits(keras_xception):
    _, paths, x, expected = keras_xception
    model = _ours()
    load_keras_weights(model, paths["h5"])
    for name, ours, theirs in zip(TAPS + ["logits"], _run(model, x), expected):
        assert ours.shape == theirs.shape, name
        # float32 rounding through up to 36 layers; a single misplaced pool window or eps is 1e-3 or more
        assert _relative(ours, theirs) < 1e-5, name


def test_without_keras_compat_the_outputs_differ(keras_xception):
    """The default is timm's numerics (eps 1e-5, symmetric pools): with Keras's weights that is a
    different function. Both differences matter by themselves, the eps most where running variances
    are small, the pools at every even-sized pool input."""
    _, paths, x, expected = keras_xception
    model = _ours(keras_compat=False)
    load_keras_weights(model, paths["h5"])
    assert _relative(_run(model, x)[-1], expected[-1]) > 1e-2
    eps_only = _ours(keras_compat=False)
    for bn in eps_only.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.eps = 1e-3
    load_keras_weights(eps_only, paths["h5"])
    logits = _run(eps_only, x)[-1]
    assert _relative(logits, expected[-1]) > 1e-3  # the pools alone still differ
    pools_only = _ours()
    for bn in pools_only.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.eps = 1e-5
    load_keras_weights(pools_only, paths["h5"])
    assert _relative(_run(pools_only, x)[-1], expected[-1]) > 1e-3  # the eps alone still differs


@pytest.mark.parametrize("fmt", ["h5", "weights.h5", "keras", "live"])
def test_every_source_loads_the_same_weights(keras_xception, fmt):
    keras_model, paths, _, _ = keras_xception
    source = keras_model if fmt == "live" else paths[fmt]
    model = _ours()
    assert load_keras_weights(model, source) == ([], [])
    reference = _ours()
    load_keras_weights(reference, paths["h5"])
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # spot checks of the layouts against Keras's own arrays: a moving variance, a depthwise kernel
    _, _, _, moving_variance = keras_model.get_layer("block5_sepconv2_bn").get_weights()
    np.testing.assert_array_equal(model.block4.rep[1].bn.running_var.numpy(), moving_variance)
    depthwise, _ = keras_model.get_layer("block5_sepconv2").get_weights()  # (kh, kw, C, 1)
    np.testing.assert_array_equal(model.block4.rep[1].depthwise.weight[5, 0].detach().numpy(), depthwise[:, :, 5, 0])


def test_weights_go_back_to_keras(keras_xception, tmp_path):
    keras_model, paths, x, expected = keras_xception
    ours = _ours()
    load_keras_weights(ours, paths["h5"])
    exported = to_keras_weights(ours)
    layers = [layer for layer in keras_model.layers if layer.weights]
    assert len(exported) == len(layers)
    for (name, arrays), layer in zip(exported, layers):
        if not name.startswith(("conv2d", "batch_normalization")):  # generated names vary by session
            assert name == layer.name
        for a, b in zip(arrays, layer.get_weights()):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # a file Keras reads: a second Keras model built from it gives Keras's outputs
    path = tmp_path / "ours.h5"
    save_keras_weights(ours, path)
    rebuilt = keras.applications.Xception(weights=None, input_shape=(H, W, 3), classes=CLASSES,
                                          classifier_activation=None)
    rebuilt.load_weights(path)
    logits = np.asarray(keras.ops.convert_to_numpy(rebuilt(x, training=False)))
    np.testing.assert_array_equal(logits, expected[-1])
    assert [n for n, _ in read_keras_weights(path)] == [n for n, _ in exported]


def test_mismatches_are_named(keras_xception, tmp_path):
    _, paths, _, _ = keras_xception
    model = _ours()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"predictions/kernel .*fc\.weight"):
        load_keras_weights(xception_fast.xception(num_classes=5, keras_compat=True), paths["h5"])
    with pytest.raises(ValueError, match=r"block1_conv1/kernel .*conv1\.weight"):
        load_keras_weights(xception_fast.xception(num_classes=CLASSES, in_chans=1), paths["h5"])
    with pytest.raises(ValueError, match=r"unexpected \['conv2d"):  # no shortcuts to put them in
        load_keras_weights(_ours(residual=False), paths["h5"])
    with pytest.raises(ValueError, match="fc_layers"):
        load_keras_weights(_ours(fc_layers=(16,)), paths["h5"])
    no_top = tmp_path / "notop.h5"  # as Keras's include_top=False files: no classifier
    save_keras_weights(xception_fast.xception(features_only=True), no_top)
    with pytest.raises(ValueError, match=r"missing \['predictions'\]"):
        load_keras_weights(model, no_top)
    for key, value in model.state_dict().items():  # a failed load leaves the model untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert load_keras_weights(model, no_top, strict=False).missing_layers == ["predictions"]
    torch.testing.assert_close(model.fc.weight, before["fc.weight"], rtol=0, atol=0)


def test_a_classifier_file_into_a_features_model(keras_xception):
    keras_model, paths, x, expected = keras_xception
    features = xception_fast.xception(features_only=True, out_indices=(1, 3), keras_compat=True, backend="reference")
    result = load_keras_weights(features, keras_model, strict=False)
    assert result.missing_layers == [] and result.unexpected_layers == ["predictions"]
    with torch.no_grad():
        maps = features.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))
    for ours, theirs in zip(maps, (expected[1], expected[3])):
        assert _relative(ours.permute(0, 2, 3, 1).numpy(), theirs) < 1e-5


@pytest.mark.parametrize("h,w", [(74, 37), (37, 74), (12, 12), (23, 23)])
def test_tf_same_pool_is_keras_max_pooling(h, w):
    x = np.random.default_rng(h * w).standard_normal((2, h, w, 5)) - 4  # negative: the padding must not win
    pool = keras.layers.MaxPooling2D((3, 3), strides=(2, 2), padding="same", dtype="float64")
    expected = np.asarray(keras.ops.convert_to_numpy(pool(x)))
    ours = MaxPool2dSame(3, 2)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, expected)
