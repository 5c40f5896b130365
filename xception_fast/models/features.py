"""Feature maps for dense prediction, in timm's conventions (`features_only`, `out_indices`,
`feature_info`, `forward_intermediates`), so segmentation and detection code written for timm
backbones takes this model unchanged.

timm is not a dependency of this package, so its two small helpers are mirrored here with its
semantics: `feature_take_indices` (an int n takes the last n features, a sequence takes those
indices, negative ones from the end) and `FeatureInfo` (the accessors decoders call).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from xception_fast.models.xception import Xception

Indices = Optional[Union[int, Sequence[int]]]


def feature_take_indices(num_features: int, indices: Indices = None) -> tuple[list[int], int]:
    """(absolute indices to take, the largest of them), as timm's function of the same name."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            index = num_features + i if i < 0 else i
            if not 0 <= index < num_features:
                raise ValueError(f"feature index {i} is out of range (0 to {num_features - 1})")
            take.append(index)
    return take, max(take)


class FeatureInfo:
    """Channels, reduction and module name of each feature map, as timm's `FeatureInfo`: an accessor
    without `idx` answers for the selected `out_indices`, with `idx` for those stage indices."""

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]):
        self.info = [dict(d, index=i) for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: Indices = None):
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Indices = None):
        indices = self.out_indices if idx is None else ([idx] if isinstance(idx, int) else idx)
        dicts = [self.info[i] if keys is None else {k: self.info[i][k] for k in keys} for i in indices]
        return dicts[0] if isinstance(idx, int) else dicts

    def channels(self, idx: Indices = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: Indices = None):
        return self.get("reduction", idx)

    def module_name(self, idx: Indices = None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


class XceptionFeatures(Xception):
    """Xception returning a list of feature maps (`xception(features_only=True, out_indices=...)`).

    The classifier is dropped; the trunk keeps every layer under its usual name (layers after the
    deepest requested feature are not run), so timm and Keras weights, the full and the "no top"
    files alike, load into it as into the classifier model.
    """

    def __init__(self, out_indices: Indices = (0, 1, 2, 3, 4), **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(**kwargs)
        self.out_indices, _ = feature_take_indices(len(self.feature_info), out_indices)
        self.feature_info = FeatureInfo(self.feature_info, self.out_indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_intermediates(x, self.out_indices, stop_early=True, intermediates_only=True)
