"""Weights in and out of Keras's own Xception (`keras.applications.Xception`, the paper author's).

Keras names its layers `block1_conv1(_bn)`, `block1_conv2(_bn)`, `block{2..13}_sepconv{j}(_bn)`,
`block14_sepconv{1,2}(_bn)` and `predictions`; this model's blocks are numbered from the first
residual block, so Keras's block k is our `block{k-1}`, and `block14_sepconv{1,2}` are our
`conv3`/`conv4`. The four shortcut 1x1 convs and their BatchNorms carry generated names
(`conv2d_7`, `batch_normalization_3`, ...) that depend on what else the Keras session built, so
they are matched by order (Keras's layer order) and checked by shape. Layouts: Keras convs are
(kh, kw, in, out), depthwise kernels (kh, kw, C, 1), dense kernels (in, out).

Sources read with h5py alone (no TensorFlow or Keras needed): the HDF5 files of `model.save("x.h5")`
/ `save_weights("x.h5")` and the published ImageNet files (a `layer_names` attribute, one group per
layer), Keras 3's `x.weights.h5` (`layers/<class>_<n>/vars/<i>`, the layer name in an attribute),
and `.keras` archives (a zip holding that file). A live Keras model is read with `get_weights()`.
Use `xception(keras_compat=True)` to get Keras's outputs, not only its weights.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from torch import nn

# Keras's weight order within each layer kind, and the (our suffix, layout) each one lands in.
_KINDS = {
    "conv": [("kernel", "weight", (3, 2, 0, 1))],
    "sep": [("depthwise_kernel", "depthwise.weight", (2, 3, 0, 1)),
            ("pointwise_kernel", "pointwise.weight", (3, 2, 0, 1))],
    "bn": [("gamma", "weight", None), ("beta", "bias", None), ("moving_mean", "running_mean", None),
           ("moving_variance", "running_var", None)],
    "dense": [("kernel", "weight", (1, 0)), ("bias", "bias", None)],
}
_GENERATED = {"conv": "conv2d", "bn": "batch_normalization"}


class _Layer(NamedTuple):
    name: str  # Keras's name, or None for a generated one (matched by order)
    kind: str
    prefix: str  # our module path


class KerasLoadResult(NamedTuple):
    missing_layers: list[str]  # Keras layer names of this model that the source lacks
    unexpected_layers: list[str]  # source layers with no place in this model


def keras_layout(model: nn.Module) -> list[_Layer]:
    """The Keras layers with weights that `model` corresponds to, in Keras's layer order."""
    if len(getattr(model, "fc_layers", ())):
        raise ValueError("Keras's Xception has no fully connected layers before the classifier (fc_layers)")
    layers = [_Layer("block1_conv1", "conv", "conv1"), _Layer("block1_conv1_bn", "bn", "bn1"),
              _Layer("block1_conv2", "conv", "conv2"), _Layer("block1_conv2_bn", "bn", "bn2")]
    for b in range(1, 13):
        block = getattr(model, f"block{b}")
        for j in range(len(block.rep)):
            layers += [_Layer(f"block{b + 1}_sepconv{j + 1}", "sep", f"block{b}.rep.{j}"),
                       _Layer(f"block{b + 1}_sepconv{j + 1}_bn", "bn", f"block{b}.rep.{j}.bn")]
        if block.skip is not None:  # Keras builds the shortcut before the units, orders it after them
            layers += [_Layer(None, "conv", f"block{b}.skip"), _Layer(None, "bn", f"block{b}.skipbn")]
    for j, unit in ((1, "conv3"), (2, "conv4")):
        layers += [_Layer(f"block14_sepconv{j}", "sep", unit), _Layer(f"block14_sepconv{j}_bn", "bn", f"{unit}.bn")]
    if isinstance(model.fc, nn.Linear):
        layers.append(_Layer("predictions", "dense", "fc"))
    return layers


def _natural_key(name: str):
    stem, _, number = name.rpartition("_")
    return (stem, int(number)) if number.isdigit() and stem else (name, -1)


def _decode(names) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_h5(f) -> list[tuple[str, list[np.ndarray]]]:
    if "layer_names" not in f.attrs and "model_weights" in f:  # a whole model saved with model.save
        f = f["model_weights"]
    if "layer_names" in f.attrs:  # Keras 2 layout, and Keras 3's legacy .h5: in layer order
        layers = []
        for name in _decode(f.attrs["layer_names"]):
            group = f[name]
            layers.append((name, [np.asarray(group[w]) for w in _decode(group.attrs["weight_names"])]))
        return layers
    if "layers" in f:  # Keras 3 layout: groups named <class>_<count>, the count following the layer
        # order within a class; sorted by class, then count (all that matching by order needs)
        layers = []
        for key in sorted(f["layers"], key=_natural_key):
            if "vars" not in f["layers"][key]:
                continue
            variables = f["layers"][key]["vars"]
            name = variables.attrs.get("name", key)
            layers.append((name.decode() if isinstance(name, bytes) else name,
                           [np.asarray(variables[str(i)]) for i in range(len(variables))]))
        return layers
    raise ValueError("not a Keras weights file: no 'layer_names' attribute, 'model_weights' or 'layers' group")


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("Keras weight files need h5py: pip install h5py (or xception_fast[keras])") from e
    return h5py


def read_keras_weights(source: Any) -> list[tuple[str, list[np.ndarray]]]:
    """(layer name, [arrays in Keras's order]) for every layer with weights, in layer order, from a
    `.h5`/`.weights.h5`/`.keras` path or a live Keras model."""
    if hasattr(source, "layers") and hasattr(source, "get_weights"):
        return [(layer.name, [np.asarray(w) for w in layer.get_weights()]) for layer in source.layers
                if layer.weights]
    h5py = _h5py()
    path = os.fspath(source)
    if zipfile.is_zipfile(path):  # .keras: a zip with model.weights.h5 inside
        with zipfile.ZipFile(path) as archive:
            data = io.BytesIO(archive.read("model.weights.h5"))
        with h5py.File(data, "r") as f:
            return [(n, a) for n, a in _read_h5(f) if a]
    with h5py.File(path, "r") as f:
        return [(n, a) for n, a in _read_h5(f) if a]


def _kind_of(arrays: list[np.ndarray]) -> str:
    if len(arrays) == 1 and arrays[0].ndim == 4:
        return "conv"
    if arrays and all(a.ndim == 1 for a in arrays):
        return "bn"
    return "other"


def load_keras_weights(model: nn.Module, source: Any, strict: bool = True) -> KerasLoadResult:
    """Load Keras Xception weights (a `.h5`, `.weights.h5` or `.keras` file, or a live Keras model)
    into our `Xception` (or `XceptionFeatures`).

    Every tensor is checked before any is copied: a mismatch raises a ValueError naming the first
    Keras tensor that does not fit. With `strict` (the default) every layer on either side must
    have its counterpart; `strict=False` skips those that do not (for example a classifier file
    into a features-only model) and reports them. The model's own dtype and device are kept.
    """
    source_layers = read_keras_weights(source)
    expected = keras_layout(model)
    named = {layer.name for layer in expected if layer.name is not None}
    by_name = {name: arrays for name, arrays in source_layers if name in named}
    generated = {kind: [(n, a) for n, a in source_layers if n not in named and _kind_of(a) == kind]
                 for kind in _GENERATED}
    unexpected = [n for n, a in source_layers if n not in named and _kind_of(a) not in _GENERATED]
    params = model.state_dict()
    state, missing = {}, []
    for layer in expected:
        if layer.name is not None:
            name, arrays = layer.name, by_name.pop(layer.name, None)
        elif generated[layer.kind]:
            name, arrays = generated[layer.kind].pop(0)
        else:
            name, arrays = None, None
        if arrays is None:
            missing.append(layer.name or f"a {_GENERATED[layer.kind]} (shortcut of {layer.prefix})")
            continue
        slots = _KINDS[layer.kind]
        if len(arrays) != len(slots):
            raise ValueError(f"Keras layer {name!r} has {len(arrays)} weights, {layer.prefix} takes {len(slots)} "
                             f"({', '.join(s[0] for s in slots)})")
        for array, (label, suffix, perm) in zip(arrays, slots):
            key = f"{layer.prefix}.{suffix}"
            value = torch.from_numpy(np.ascontiguousarray(array))
            value = value.permute(perm) if perm else value
            if tuple(value.shape) != tuple(params[key].shape):
                raise ValueError(f"Keras tensor {name}/{label} of shape {tuple(array.shape)} (as ours "
                                 f"{tuple(value.shape)}) does not fit {key} of shape {tuple(params[key].shape)}")
            state[key] = value
    unexpected += list(by_name) + [n for kind in generated.values() for n, _ in kind]
    if strict and (missing or unexpected):
        raise ValueError(f"Keras weights and model do not match: missing {missing}, unexpected {unexpected} "
                         "(strict=False loads the rest)")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)
    return KerasLoadResult(missing, unexpected)


def _to_keras(model: nn.Module) -> list[tuple[str, str, list[np.ndarray]]]:
    params = model.state_dict()
    counts = {kind: 0 for kind in _GENERATED}
    layers = []
    for layer in keras_layout(model):
        name = layer.name
        if name is None:
            count = counts[layer.kind]
            counts[layer.kind] += 1
            name = _GENERATED[layer.kind] + (f"_{count}" if count else "")
        arrays = []
        for _, suffix, perm in _KINDS[layer.kind]:
            value = params[f"{layer.prefix}.{suffix}"].detach().float().cpu()
            if perm:  # the inverse of the permutation loading applies
                value = value.permute(tuple(int(i) for i in np.argsort(perm)))
            arrays.append(value.contiguous().numpy())
        layers.append((name, layer.kind, arrays))
    return layers


def to_keras_weights(model: nn.Module) -> list[tuple[str, list[np.ndarray]]]:
    """Our model's weights as Keras's: (layer name, [float32 arrays]) in Keras's layer order, each
    list ready for that layer's `set_weights` (the shortcuts get the names a fresh Keras session
    generates)."""
    return [(name, arrays) for name, _, arrays in _to_keras(model)]


def save_keras_weights(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write our weights as a Keras HDF5 weights file, the layout of the published ImageNet files:
    `keras.applications.Xception(weights=path)` (or `load_weights(path)`) reads it."""
    h5py = _h5py()
    layers = _to_keras(model)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name, _, _ in layers]
        f.attrs["backend"] = b"torch"
        for name, kind, arrays in layers:
            labels = [f"{name}/{label}" for label, _, _ in _KINDS[kind]]
            group = f.create_group(name)
            group.attrs["weight_names"] = [label.encode() for label in labels]
            for label, array in zip(labels, arrays):
                group.create_dataset(label, data=array)
