"""Perturbation maps: occlusion and RISE.

Both score many perturbed copies of each image. The copies are evaluated in blocks of
perturbations x the whole batch per forward call (about `images_per_call()` images), inside one
compiled `lax.scan`, so the number of compiled calls does not grow with the number of windows or
masks. The masks are built block by block inside the scan from small per-mask arrays (window
corners, RISE's coarse grids and shifts) and their weighted sum is accumulated there, so memory
stays bounded by one block, not by the number of masks.
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


def _window_corners(height: int, width: int, window: Any = 4, stride: Any = 4) -> np.ndarray:
    """(P, 2) top-left corners (0, s, 2s, ... that fit) of every window position, row-major."""
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    if wh > height or ww > width:
        raise AttraxError(f"occlusion window {(wh, ww)} is larger than the image {(height, width)}")
    return np.asarray([(t, l) for t in range(0, height - wh + 1, sh) for l in range(0, width - ww + 1, sw)],
                      np.int32)


def occlusion_windows(height: int, width: int, window: Any = 4, stride: Any = 4) -> np.ndarray:
    """(P, H, W) 0/1 masks of every window position (top-left corners 0, s, 2s, ... that fit)."""
    wh, ww = _pair(window, "window")
    corners = _window_corners(height, width, window, stride)
    masks = np.zeros((len(corners), height, width), np.float32)
    for i, (t, l) in enumerate(corners):
        masks[i, t : t + wh, l : l + ww] = 1.0
    return masks


def _block_layout(p: int, n: int) -> tuple[int, int]:
    """(n_blocks, block): p perturbations in blocks of about `images_per_call() // n`.

    Blocks are balanced (49 windows at most 40 per block -> 2 x 25, not 40 + 9 padded to 40)."""
    most = int(max(1, min(p, images_per_call() // max(1, n))))
    n_blocks = -(-p // most)
    return n_blocks, -(-p // n_blocks)


def _in_blocks(a: Array, n_blocks: int, block: int) -> Array:
    """a (p, ...) zero-padded to n_blocks * block rows and reshaped to (n_blocks, block, ...)."""
    pad = n_blocks * block - a.shape[0]
    if pad:
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
    return a.reshape((n_blocks, block) + a.shape[1:])


def _weighted_mask_sum(model, params, x, target, p: int, specs, make_masks, perturb, weigh, score: str) -> Array:
    """sum_j weigh(score of perturb(x, M_j)) M_j over p masks: (n, H, W).

    The masks are never held all at once: `specs` are small per-mask arrays (p, ...) that
    `make_masks` turns into one block of (block, H, W) masks inside a `lax.scan`, each block is
    scored in one batched forward and its weighted masks are added to a running (n, H, W) sum.
    Memory is one block of masks and perturbed images, whatever p is (RISE's 4,000 masks at
    224x224 are 800 MB). Padding rows (past p) get weight 0.
    """
    n = x.shape[0]
    n_blocks, block = _block_layout(p, n)
    blocks = jax.tree.map(lambda a: _in_blocks(a, n_blocks, block), specs)
    index = jnp.arange(n_blocks * block).reshape(n_blocks, block)

    def one(acc, blk):
        spec, idx = blk
        mb = make_masks(spec).astype(x.dtype)  # (block, H, W)
        xs = jax.vmap(lambda m: perturb(x, m))(mb)  # (block, n, H, W, C)
        s = class_score(model(params, xs.reshape((block * n,) + x.shape[1:])), jnp.tile(target, block), score)
        wgt = jnp.where((idx < p)[:, None], weigh(s.reshape(block, n)), 0).astype(x.dtype)
        return acc + jnp.einsum("bn,bhw->nhw", wgt, mb), None

    acc0 = jnp.zeros((n,) + x.shape[1:3], x.dtype)
    acc, _ = jax.lax.scan(one, acc0, (blocks, index))
    return acc


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


@METHODS.register("occlusion", family="perturbation", needs="apply", stochastic=False, cost=occlusion_cost,
                  forward_only=True)
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
    wh, ww = _pair(window, "window")
    corners_np = _window_corners(h, w, window, stride)  # (P, 2) top-left corners
    counts = np.zeros((h, w), np.float32)  # windows covering each pixel
    for t, l in corners_np:
        counts[t : t + wh, l : l + ww] += 1.0
    inv = jnp.asarray(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0), x.dtype)
    corners = jnp.asarray(corners_np)
    value = _fill_value(x, fill)
    rows, cols = jnp.arange(h), jnp.arange(w)

    def make_masks(tl):  # (block, 2) corners -> (block, H, W) 0/1 windows
        t, l = tl[:, :1], tl[:, 1:]
        in_r = (rows[None] >= t) & (rows[None] < t + wh)
        in_c = (cols[None] >= l) & (cols[None] < l + ww)
        return (in_r[:, :, None] & in_c[:, None, :]).astype(x.dtype)

    def perturb(xx, m):
        m = m[None, :, :, None]
        return xx * (1 - m) + value * m

    s0 = class_score(model(params, x), target, score)
    r = _weighted_mask_sum(model, params, x, target, corners.shape[0], corners, make_masks, perturb,
                           lambda s: s0[None] - s, score) * inv
    return jnp.broadcast_to(r[..., None], x.shape)


def _rise_specs(n_masks: int, cells: int, p_keep: float, height: int, width: int, seed: int) -> tuple[Array, Array]:
    """What defines RISE's masks, small enough to hold for thousands of masks: the (n, cells,
    cells) Bernoulli grids and the (n, 2) shifts of the crop."""
    if not 0.0 < p_keep <= 1.0:
        raise AttraxError(f"p_keep must be in (0, 1], got {p_keep}")
    ch, cw = -(-height // cells), -(-width // cells)
    k_grid, k_shift = jax.random.split(jax.random.key(seed))
    grid = jax.random.bernoulli(k_grid, p_keep, (n_masks, cells, cells)).astype(jnp.float32)
    shifts = jax.random.randint(k_shift, (n_masks, 2), 0, jnp.array([ch, cw]))
    return grid, shifts


def _rise_upsample(grid: Array, shifts: Array, height: int, width: int) -> Array:
    """(k, cells, cells) grids -> (k, H, W) smooth masks (each mask on its own)."""
    k, cells = grid.shape[0], grid.shape[1]
    ch, cw = -(-height // cells), -(-width // cells)
    up = jax.image.resize(grid, (k, (cells + 1) * ch, (cells + 1) * cw), "linear")
    return jax.vmap(lambda u, s: jax.lax.dynamic_slice(u, (s[0], s[1]), (height, width)))(up, shifts)


def rise_masks(n_masks: int, cells: int, p_keep: float, height: int, width: int, seed: int = 0) -> Array:
    """RISE masks (Petsiuk et al. 2018): a cells x cells Bernoulli(p_keep) grid, bilinearly
    upsampled to (cells + 1) * cell size and cropped to H x W at a random shift within one cell.
    Returns (n_masks, H, W) float32 in [0, 1], reproducible from `seed`. (`rise` itself builds
    them block by block inside its scan; these are the same masks.)"""
    return _rise_upsample(*_rise_specs(n_masks, cells, p_keep, height, width, seed), height, width)


@METHODS.register(
    "rise",
    family="perturbation",
    needs="apply",
    stochastic=False,
    forward_only=True,
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
    _, h, w, _ = x.shape
    specs = _rise_specs(n_masks, cells, p_keep, h, w, mask_seed)
    r = _weighted_mask_sum(model, params, x, target, n_masks, specs,
                           lambda gs: _rise_upsample(gs[0], gs[1], h, w),
                           lambda xx, m: xx * m[None, :, :, None], lambda s: s, score)
    r = r / (n_masks * p_keep)
    return jnp.broadcast_to(r[..., None], x.shape)
