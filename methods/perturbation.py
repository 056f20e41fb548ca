"""Perturbation maps: occlusion and RISE.

Both score many perturbed copies of each image. The copies are evaluated in blocks of
perturbations x the whole batch per forward call (about `images_per_call()` images), inside one
compiled `lax.scan`, so the number of compiled calls does not grow with the number of windows or
masks and memory stays bounded by the block size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.methods._core import METHODS, class_score

Array = jax.Array

#: Perturbed images per forward call inside the scan on CPU: small blocks keep activations in
#: cache (occlusion 4x4 on cnn_a, batch 100, this 2-core CPU: 166 img/s at 128 vs 80 at 2048).
CPU_IMAGES_PER_CALL = 128
#: On GPU/TPU bigger calls keep the device busy.
ACCELERATOR_IMAGES_PER_CALL = 4096


def images_per_call() -> int:
    """Images per forward call inside the perturbation scan on the default backend."""
    return CPU_IMAGES_PER_CALL if jax.default_backend() == "cpu" else ACCELERATOR_IMAGES_PER_CALL



def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2 or min(v) < 1:
        raise AttraxError(f"{what} must be a positive int or a pair of positive ints, got {v}")
    return v


def occlusion_windows(height: int, width: int, window: Any = 4, stride: Any = 4) -> np.ndarray:
    """(P, H, W) 0/1 masks of every window position (top-left corners 0, s, 2s, ... that fit)."""
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    if wh > height or ww > width:
        raise AttraxError(f"occlusion window {(wh, ww)} is larger than the image {(height, width)}")
    tops = range(0, height - wh + 1, sh)
    lefts = range(0, width - ww + 1, sw)
    masks = np.zeros((len(tops) * len(lefts), height, width), np.float32)
    for i, (t, l) in enumerate((t, l) for t in tops for l in lefts):
        masks[i, t : t + wh, l : l + ww] = 1.0
    return masks


def _blocks(masks: Array, n: int) -> tuple[Array, int]:
    """Masks padded with all-zero masks and reshaped to (n_blocks, block, H, W).

    Blocks are balanced (49 windows at most 40 per block -> 2 x 25, not 40 + 9 padded to 40)."""
    p = masks.shape[0]
    most = int(max(1, min(p, images_per_call() // max(1, n))))
    n_blocks = -(-p // most)
    block = -(-p // n_blocks)
    pad = n_blocks * block - p
    if pad:
        masks = jnp.concatenate([masks, jnp.zeros((pad,) + masks.shape[1:], masks.dtype)])
    return masks.reshape((n_blocks, block) + masks.shape[1:]), block


def _scores_of_blocks(model, params, x, target, blocks: Array, perturb, score: str) -> Array:
    """Target scores of perturb(x, mask) for every mask: (n_blocks * block, n)."""
    n = x.shape[0]

    def one(_, mb):  # mb: (block, H, W)
        xs = jax.vmap(lambda m: perturb(x, m))(mb)  # (block, n, H, W, C)
        b = mb.shape[0]
        s = class_score(model(params, xs.reshape((b * n,) + x.shape[1:])), jnp.tile(target, b), score)
        return None, s.reshape(b, n)

    _, s = jax.lax.scan(one, None, blocks)
    return s.reshape((-1, n))


def _fill_value(x: Array, fill: Any) -> Array:
    if isinstance(fill, int | float):
        return jnp.asarray(fill, x.dtype)
    if fill == "mean":  # each image's own channel mean
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    raise AttraxError(f"unknown fill {fill!r}: use a number or 'mean'")


def occlusion_cost(hp: dict, size: int = 28) -> int:
    """Model evaluations per image: windows + 1. The registry's cost sees no shapes, so it assumes
    28x28 images (MNIST); it sizes chunks and the benchmark's lower bound."""
    wh, ww = _pair(hp.get("window", 4), "window")
    sh, sw = _pair(hp.get("stride", 4), "stride")
    return max(0, (size - wh) // sh + 1) * max(0, (size - ww) // sw + 1) + 1


@METHODS.register("occlusion", family="perturbation", needs="apply", stochastic=False, cost=occlusion_cost)
def occlusion(
    model,
    params,
    x,
    target,
    *,
    key=None,
    window: Any = 4,
    stride: Any = 4,
    fill: Any = 0.0,
    score: str = "logit",
) -> Array:
    """Occlusion (Zeiler & Fergus 2014): the drop f_c(x) - f_c(x with a window filled) of every
    sliding window, given to each pixel of the window and averaged over the windows covering it.

    Defaults: 4x4 window, stride 4, fill 0 (a number, or "mean" = each image's channel mean),
    target logit. The window covers all channels; the map is the same across channels; pixels
    no window covers get 0. All windows are scored in blocks of batched forwards in one scan.
    """
    if x.ndim != 4:
        raise AttraxError(f"occlusion needs NHWC images, got shape {x.shape}")
    n, h, w, _ = x.shape
    masks_np = occlusion_windows(h, w, window, stride)
    counts = masks_np.sum(0)
    inv = jnp.asarray(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0), x.dtype)
    masks = jnp.asarray(masks_np, x.dtype)
    value = _fill_value(x, fill)

    def perturb(xx, m):
        m = m[None, :, :, None]
        return xx * (1 - m) + value * m

    blocks, _ = _blocks(masks, n)
    s = _scores_of_blocks(model, params, x, target, blocks, perturb, score)[: masks.shape[0]]
    s0 = class_score(model(params, x), target, score)
    drop = s0[None] - s  # (P, n)
    r = jnp.einsum("pn,phw->nhw", drop, masks) * inv
    return jnp.broadcast_to(r[..., None], x.shape)


def rise_masks(n_masks: int, cells: int, p_keep: float, height: int, width: int, seed: int = 0) -> Array:
    """RISE masks (Petsiuk et al. 2018): a cells x cells Bernoulli(p_keep) grid, bilinearly
    upsampled to (cells + 1) * cell size and cropped to H x W at a random shift within one cell.
    Returns (n_masks, H, W) float32 in [0, 1], reproducible from `seed`."""
    if not 0.0 < p_keep <= 1.0:
        raise AttraxError(f"p_keep must be in (0, 1], got {p_keep}")
    ch, cw = -(-height // cells), -(-width // cells)
    k_grid, k_shift = jax.random.split(jax.random.key(seed))
    grid = jax.random.bernoulli(k_grid, p_keep, (n_masks, cells, cells)).astype(jnp.float32)
    up = jax.image.resize(grid, (n_masks, (cells + 1) * ch, (cells + 1) * cw), "linear")
    shifts = jax.random.randint(k_shift, (n_masks, 2), 0, jnp.array([ch, cw]))
    return jax.vmap(lambda u, s: jax.lax.dynamic_slice(u, (s[0], s[1]), (height, width)))(up, shifts)


@METHODS.register(
    "rise",
    family="perturbation",
    needs="apply",
    stochastic=False,
    cost=lambda hp: hp.get("n_masks", 1000),
)
def rise(
    model,
    params,
    x,
    target,
    *,
    key=None,
    n_masks: int = 1000,
    cells: int = 7,
    p_keep: float = 0.5,
    mask_seed: int = 0,
    score: str = "logit",
) -> Array:
    """RISE (Petsiuk et al. 2018): S = 1 / (N p) sum_j f_c(x * M_j) M_j over N random smooth masks.

    Defaults: 1000 masks (the paper uses 4000-8000 on ImageNet), 7x7 cells, keep probability 0.5,
    target logit. The masks come from `mask_seed` and are SHARED across the batch (not from the
    per-example keys), so an example's map does not depend on its batch; they are scored in
    blocks of batched forwards in one scan. The map is the same across channels.
    """
    if x.ndim != 4:
        raise AttraxError(f"rise needs NHWC images, got shape {x.shape}")
    n, h, w, _ = x.shape
    masks = rise_masks(n_masks, cells, p_keep, h, w, mask_seed).astype(x.dtype)
    blocks, _ = _blocks(masks, n)
    s = _scores_of_blocks(model, params, x, target, blocks, lambda xx, m: xx * m[None, :, :, None], score)
    s = s[:n_masks]
    r = jnp.einsum("pn,phw->nhw", s, masks) / (n_masks * p_keep)
    return jnp.broadcast_to(r[..., None], x.shape)
