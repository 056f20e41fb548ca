"""Localization against ground-truth masks (cluttered MNIST, synthetic data).

Masks come from `Dataset.meta["masks"]` ((n, H, W) bool) and are passed as the protocol
parameter `masks`. Relevance is channel-aggregated first (`aggregate`, default sum).

- Pointing game (Zhang, Bargal, Lin, Brandt, Shen, Sclaroff, ECCV 2016 / IJCV 2018): a hit if
  the maximal-relevance pixel lies in the mask dilated by `tolerance` pixels (the paper: 15 px at
  224 px; ours default 1 px on 28 px). Ties are explicit (`tie`): "strict" = a hit only if every
  maximal pixel is inside (a constant map scores 0), "fraction" = the share of maximal pixels
  inside, "first" = the first maximal pixel in row-major order (as most libraries do).
- Relevance mass accuracy (Arras, Osman, Samek, Information Fusion 2022): positive relevance
  inside the mask / all positive relevance (0 if there is none).
- Relevance rank accuracy (same paper): the share of the K most relevant pixels that lie in the
  mask, K = mask size (ties seeded random).
- AUPR / AUROC of the relevance as a score for mask membership: average precision (ties seeded
  random) and the Mann-Whitney AUROC with average ranks for ties (a constant map scores 0.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.protocols import PROTOCOLS, Scores
from attrax.protocols._common import aggregate_channels, rank_desc

Array = jax.Array
TIES = ("strict", "fraction", "first")


def check_masks(masks, x) -> Array:
    if masks is None:
        raise AttraxError(
            "localization protocols need masks=<(n, H, W) bool array> (Dataset.meta['masks'] of "
            "cluttered_mnist or synthetic)"
        )
    m = jnp.asarray(masks)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != x.shape[:3]:
        raise AttraxError(f"masks have shape {m.shape}, expected {x.shape[:3]}")
    return m.astype(bool)


def dilate(masks: Array, radius: int) -> Array:
    """Masks grown by a Euclidean disk of `radius` pixels."""
    if radius <= 0:
        return masks
    r = int(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = jnp.asarray((yy**2 + xx**2 <= r * r).astype(np.float32))[:, :, None, None]
    out = jax.lax.conv_general_dilated(
        masks[..., None].astype(jnp.float32),
        disk,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return out[..., 0] > 0.5


def _maps(relevance, x, masks, aggregate):
    m = check_masks(masks, x)
    r = aggregate_channels(relevance, aggregate)
    return r.reshape(r.shape[0], -1), m.reshape(m.shape[0], -1)


@PROTOCOLS.register(
    "pointing_game",
    category="localization",
    version=1,
    needs_masks=True,
    higher_is_better={"hit": True},
)
def pointing_game(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    masks=None,
    tolerance: int = 1,
    tie: str = "strict",
    aggregate: str = "sum",
) -> Scores:
    """Pointing game with tolerance radius (default 1 px) and explicit ties (default strict)."""
    if tie not in TIES:
        raise AttraxError(f"unknown tie rule {tie!r}: use one of {', '.join(TIES)}")
    m = check_masks(masks, x)
    r, _ = _maps(relevance, x, m, aggregate)
    inside = dilate(m, tolerance).reshape(r.shape)
    is_max = r >= r.max(-1, keepdims=True)
    if tie == "first":
        hit = jnp.take_along_axis(inside, jnp.argmax(r, -1)[:, None], -1)[:, 0].astype(jnp.float32)
    else:
        frac = (is_max & inside).sum(-1) / is_max.sum(-1)
        hit = frac if tie == "fraction" else (frac >= 1.0).astype(jnp.float32)
    return Scores(
        values={"hit": hit},
        choices=dict(tolerance=tolerance, tie=tie, aggregate=aggregate, dilation="disk"),
    )


@PROTOCOLS.register(
    "relevance_mass",
    category="localization",
    version=1,
    needs_masks=True,
    higher_is_better={"relevance_mass": True},
)
def relevance_mass(
    model, params, x, target, relevance, *, key, masks=None, aggregate: str = "sum"
) -> Scores:
    """Relevance mass accuracy (Arras et al. 2022): positive relevance inside / all positive."""
    r, m = _maps(relevance, x, masks, aggregate)
    pos = jnp.maximum(r, 0.0)
    total = pos.sum(-1)
    inside = (pos * m).sum(-1)
    return Scores(
        values={
            "relevance_mass": jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0)
        },
        choices=dict(aggregate=aggregate, relevance="positive part"),
    )


@PROTOCOLS.register(
    "relevance_rank",
    category="localization",
    version=1,
    needs_masks=True,
    higher_is_better={"relevance_rank": True},
)
def relevance_rank(
    model, params, x, target, relevance, *, key, masks=None, aggregate: str = "sum"
) -> Scores:
    """Relevance rank accuracy (Arras et al. 2022): share of the top-K pixels inside, K = |mask|."""
    r, m = _maps(relevance, x, masks, aggregate)
    order = rank_desc(r, key, "morf")
    pos = jnp.argsort(order, -1)  # rank of every pixel
    k = m.sum(-1, keepdims=True)
    hits = ((pos < k) & m).sum(-1)
    kk = k[:, 0]
    return Scores(
        values={"relevance_rank": jnp.where(kk > 0, hits / jnp.where(kk > 0, kk, 1), 0.0)},
        choices=dict(aggregate=aggregate, k="mask size", tie="random"),
    )


@PROTOCOLS.register(
    "aupr",
    category="localization",
    version=1,
    needs_masks=True,
    higher_is_better={"aupr": True, "auroc": True},
)
def aupr(model, params, x, target, relevance, *, key, masks=None, aggregate: str = "sum") -> Scores:
    """Average precision and AUROC of relevance against the mask (pixel-level)."""
    r, m = _maps(relevance, x, masks, aggregate)
    order = rank_desc(r, key, "morf")
    lab = jnp.take_along_axis(m, order, -1).astype(jnp.float32)
    tp = jnp.cumsum(lab, -1)
    prec = tp / jnp.arange(1, lab.shape[-1] + 1)
    npos = lab.sum(-1)
    ap = jnp.where(npos > 0, (prec * lab).sum(-1) / jnp.where(npos > 0, npos, 1.0), 0.0)
    ranks = jax.vmap(jax.scipy.stats.rankdata)(r)  # average ranks, 1 = least relevant
    mf = m.astype(jnp.float32)
    nneg = mf.shape[-1] - npos
    u = (ranks * mf).sum(-1) - npos * (npos + 1) / 2
    den = npos * nneg
    auroc = jnp.where(den > 0, u / jnp.where(den > 0, den, 1.0), 0.5)
    return Scores(
        values={"aupr": ap, "auroc": auroc},
        choices=dict(aggregate=aggregate, tie="random (AP), average ranks (AUROC)"),
    )
