"""Dataset loaders: `load(name, split, **cfg) -> Dataset(x, y, meta)`.

Every loader returns float32 NHWC images in [0, 1], int32 labels and a metadata dict with at least
`name`, `split`, `class_names`, `channel_mean` (per-channel mean of the TRAIN split, used as the
replacement value by ROAR/KAR) and, where the data set has them, ground-truth `masks`
((n, H, W) bool) and `boxes` ((n, 4) int: y0, x0, y1, x1, exclusive ends).

Loaders register themselves in `attrax.datasets.DATASETS`; adding a data set is adding a module.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from attrax._plugins import import_submodules
from attrax.errors import AttraxError, unknown_name
from attrax.registry import Registry

DATASETS = Registry("dataset")
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    x: np.ndarray  # (n, H, W, C) float32 in [0, 1]
    y: np.ndarray  # (n,) int32
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.meta.get("class_names", range(int(self.y.max()) + 1)))

    def fingerprint(self) -> str:
        """A content hash (images, labels, name): the cache key of anything trained on it."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.y).tobytes())
        h.update(str(self.meta.get("name")).encode())
        return h.hexdigest()[:16]

    def take(self, n: int | None = None, *, per_class: int | None = None) -> Dataset:
        """The first `n` examples, or the first `per_class` examples of every class."""
        if per_class is not None:
            idx = np.concatenate([np.flatnonzero(self.y == c)[:per_class] for c in np.unique(self.y)])
            idx.sort()
        else:
            idx = np.arange(min(n if n is not None else len(self), len(self)))
        return self.subset(idx)

    def subset(self, idx: np.ndarray) -> Dataset:
        meta = dict(self.meta)
        for k in ("masks", "boxes", "index"):
            if k in meta and meta[k] is not None:
                meta[k] = np.asarray(meta[k])[idx]
        return Dataset(self.x[idx], self.y[idx], meta)

    def replace(self, **changes: Any) -> Dataset:
        return dataclasses.replace(self, **changes)


def check(ds: Dataset) -> Dataset:
    """Validate the loader contract (dtype, layout, range, labels)."""
    if ds.x.dtype != np.float32 or ds.x.ndim != 4:
        raise AttraxError(f"dataset {ds.meta.get('name')}: expected float32 NHWC, got {ds.x.dtype} {ds.x.shape}")
    if ds.y.dtype != np.int32 or ds.y.shape != (ds.x.shape[0],):
        raise AttraxError(f"dataset {ds.meta.get('name')}: labels must be int32 of shape (n,)")
    return ds


def load(name: str, split: str = "test", **cfg: Any) -> Dataset:
    """Load a registered data set split as float32 NHWC in [0, 1] with int32 labels."""
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    return check(DATASETS.get(name).fn(split=split, **cfg))


def names() -> list[str]:
    return DATASETS.names()


def stratified_split(y: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: `test_per_class` examples of every class go to the test set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


import_submodules(__name__, __path__)
