"""Cluttered MNIST: a digit at a random position on a larger canvas among fragments of others.

After the cluttered translated MNIST of Mnih, Heess, Graves, Kavukcuoglu ("Recurrent Models of
Visual Attention", NeurIPS 2014): each 28x28 digit of `mnist_sample` is placed at a seeded random
position on a `canvas` x `canvas` image (default 60) and `clutter` fragments (default 4) of
`clutter_size` x `clutter_size` pixels (default 8), cut from the ink region of OTHER digits of the
same split, are scattered at random positions. Pixels combine by maximum, so the digit itself is
never dimmed. Ground truth in `meta`: `boxes` (n, 4) int = the tight box of the digit's ink
(y0, x0, y1, x1, exclusive ends) and `masks` (n, canvas, canvas) bool = the digit's ink pixels
(`mask="pixels"`, default) or its box (`mask="box"`). Used for CAM-style localization checks.
"""

from __future__ import annotations

import numpy as np

from attrax.datasets import DATASETS, Dataset
from attrax.datasets.mnist_sample import CLASS_NAMES, mnist_sample
from attrax.errors import AttraxError

DIGIT = 28
INK_MARGIN = 4  # MNIST digits sit in the central 20x20 of the 28x28 frame


def ink_boxes(digits: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Tight boxes (y0, x0, y1, x1; exclusive ends) of the pixels > threshold of (n, h, w)."""
    ink = digits > threshold
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    h, w = digits.shape[1:3]
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    y1, x1 = h - rows[:, ::-1].argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    return np.stack([y0, x0, y1, x1], axis=1).astype(np.int32)


def compose(
    digits: np.ndarray, rng: np.random.Generator, *, canvas: int, clutter: int, clutter_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place (n, 28, 28) digits on canvases with clutter. Returns (images, digit offsets, ink)."""
    n = digits.shape[0]
    k = clutter_size
    images = np.zeros((n, canvas, canvas), np.float32)
    offsets = rng.integers(0, canvas - DIGIT + 1, size=(n, 2))
    ii = np.arange(n)
    if clutter > 0 and n > 1:
        source = (ii[:, None] + rng.integers(1, n, size=(n, clutter))) % n  # never the digit itself
        lo, hi = INK_MARGIN, max(INK_MARGIN, DIGIT - INK_MARGIN - k)
        crop = rng.integers(lo, hi + 1, size=(n, clutter, 2))
        place = rng.integers(0, canvas - k + 1, size=(n, clutter, 2))
        r = np.arange(k)
        rows = (crop[..., 0, None] + r)[..., :, None]  # (n, clutter, k, 1)
        cols = (crop[..., 1, None] + r)[..., None, :]  # (n, clutter, 1, k)
        frags = digits[source[..., None, None], rows, cols]  # (n, clutter, k, k)
        prow = (place[..., 0, None] + r)[..., :, None]
        pcol = (place[..., 1, None] + r)[..., None, :]
        np.maximum.at(images, (ii[:, None, None, None], prow, pcol), frags)
    r = np.arange(DIGIT)
    rows = (offsets[:, 0, None] + r)[:, :, None]
    cols = (offsets[:, 1, None] + r)[:, None, :]
    sel = (ii[:, None, None], rows, cols)
    images[sel] = np.maximum(images[sel], digits)
    ink = np.zeros((n, canvas, canvas), bool)
    ink[sel] = digits > 0
    return images, offsets, ink


def _split(split: str, *, canvas, clutter, clutter_size, mask, seed, test_per_class, split_seed):
    base = mnist_sample(split=split, test_per_class=test_per_class, split_seed=split_seed)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    digits = base.x[..., 0]
    images, offsets, ink = compose(
        digits, rng, canvas=canvas, clutter=clutter, clutter_size=clutter_size
    )
    boxes = ink_boxes(digits) + np.concatenate([offsets, offsets], axis=1).astype(np.int32)
    if mask == "pixels":
        masks = ink
    else:
        yy = np.arange(canvas)[None, :, None]
        xx = np.arange(canvas)[None, None, :]
        b = boxes[:, :, None, None]
        masks = (yy >= b[:, 0]) & (yy < b[:, 2]) & (xx >= b[:, 1]) & (xx < b[:, 3])
    return base, images[..., None], masks, boxes


@DATASETS.register("cluttered_mnist", source="mnist_sample", embedded=True, has_masks=True)
def cluttered_mnist(
    *,
    split: str = "test",
    canvas: int = 60,
    clutter: int = 4,
    clutter_size: int = 8,
    mask: str = "pixels",
    seed: int = 0,
    test_per_class: int = 100,
    split_seed: int = 0,
) -> Dataset:
    """Digits of `mnist_sample` on a `canvas`^2 image with `clutter` fragments (Mnih et al. 2014).

    Defaults: canvas 60, clutter 4 fragments of 8x8, mask "pixels" (or "box"), seed 0, and the
    mnist_sample split (100 test digits per class, split_seed 0): 4,000 train / 1,000 test.
    """
    if canvas < DIGIT:
        raise AttraxError(f"cluttered_mnist: canvas must be at least {DIGIT}, got {canvas}")
    if not 1 <= clutter_size <= DIGIT - 2 * INK_MARGIN:
        raise AttraxError(f"cluttered_mnist: clutter_size must be in 1..{DIGIT - 2 * INK_MARGIN}")
    if mask not in ("pixels", "box"):
        raise AttraxError(f"cluttered_mnist: mask must be 'pixels' or 'box', got {mask!r}")
    opts = dict(canvas=canvas, clutter=clutter, clutter_size=clutter_size, mask=mask, seed=seed,
                test_per_class=test_per_class, split_seed=split_seed)
    base, x, masks, boxes = _split(split, **opts)
    x_train = x if split == "train" else _split("train", **opts)[1]
    meta = {
        "name": "cluttered_mnist",
        "split": split,
        "class_names": CLASS_NAMES,
        "channel_mean": x_train.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32),
        "masks": masks,
        "boxes": boxes,
        "index": base.meta["index"],
        "source": "mnist_sample digits on a cluttered canvas (Mnih et al. 2014)",
    }
    return Dataset(x.astype(np.float32, copy=False), base.y, meta)
