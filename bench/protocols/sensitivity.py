"""Pixel flipping / deletion / insertion with AUC and AOPC (Samek et al. 2016; Petsiuk 2018).

All steps of all images are built as one batch of perturbed images and scored by chunked
compiled forwards: never one model call per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.harness import forward
from attrax.methods import class_score
from attrax.protocols import PROTOCOLS, Scores

Array = jax.Array
ORDERS = ("morf", "lerf")
REPLACEMENTS = ("zero", "mean", "uniform", "blur")


def rank_locations(relevance: Array, key: Array, order: str = "morf") -> Array:
    """Per-image ranking of pixel locations (relevance summed over channels).

    Returns (n, H*W) location indices, most relevant first for MoRF, least relevant first for
    LeRF. Ties are broken by a seeded random permutation (the recorded tie rule "random").
    """
    n = relevance.shape[0]
    r = relevance.reshape(n, -1, relevance.shape[-1]).sum(-1)
    if order == "lerf":
        r = -r
    elif order != "morf":
        raise AttraxError(f"unknown order {order!r}: use morf or lerf")
    tie = jax.random.uniform(key, r.shape)
    # lexsort: last key is primary; sort descending relevance, ties by the random key.
    return jnp.lexsort((tie, -r), axis=-1)


def _replacement(x: Array, how: str, key: Array, channel_mean) -> Array:
    if how == "zero":
        return jnp.zeros_like(x)
    if how == "mean":
        m = jnp.asarray(channel_mean if channel_mean is not None else x.mean(axis=(0, 1, 2)), x.dtype)
        return jnp.broadcast_to(m, x.shape)
    if how == "uniform":
        return jax.random.uniform(key, x.shape, x.dtype)
    if how == "blur":
        k = jnp.exp(-0.5 * (jnp.arange(-5, 6) / 5.0) ** 2)
        k = k / k.sum()
        c = x.shape[-1]
        kern = (k[:, None] * k[None, :])[:, :, None, None] * jnp.eye(c)[None, None]
        return jax.lax.conv_general_dilated(x, kern, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    raise AttraxError(f"unknown replacement {how!r}: use one of {', '.join(REPLACEMENTS)}")


def perturbation_curve(
    model, params, x, target, order_idx, *, steps, replacement, key, channel_mean=None, score="logit",
    insertion=False,
) -> tuple[Array, np.ndarray]:
    """Scores after removing (or, for insertion, restoring) the first k*L/steps ranked locations."""
    n, h, w, c = x.shape
    hw = h * w
    ks = np.linspace(0, hw, steps + 1).round().astype(int)
    fill = _replacement(x, replacement, key, channel_mean)
    rank = jnp.argsort(order_idx, axis=-1)  # position of each location in the order
    removed = rank[:, None, :] < jnp.asarray(ks)[None, :, None]  # (n, K+1, HW)
    if insertion:
        removed = ~removed
    m = removed.reshape(n, steps + 1, h, w, 1)
    xs = jnp.where(m, fill[:, None], x[:, None]).reshape((n * (steps + 1), h, w, c))
    logits = forward(model, params, xs)
    s = class_score(logits, jnp.repeat(target, steps + 1), score).reshape(n, steps + 1)
    return s, ks / hw


@PROTOCOLS.register(
    "pixel_flipping",
    category="faithfulness",
    higher_is_better={"auc": False, "aopc": True, "aopc_vs_random": True, "curve": None},
    version=1,
)
def pixel_flipping(
    model, params, x, target, relevance, *, key, steps: int = 28, order: str = "morf",
    replacement: str = "zero", score: str = "logit", channel_mean=None, tie: str = "random",
) -> Scores:
    """Remove pixels in relevance order, record the target score at every step.

    Scores: `curve` (n, steps+1) over the fraction removed; `auc` (trapezoid over the fraction
    axis, in score units); `aopc` = mean_k (f(x_0) - f(x_k)) over the L+1 points (Samek 2016);
    `aopc_vs_random` = aopc minus the aopc of a seeded random order of the same images.
    MoRF: a good map makes the score fall fast (low AUC, high AOPC). LeRF: the reverse (the
    registered directions are those of MoRF).
    """
    if tie != "random":
        raise AttraxError("pixel_flipping supports tie='random' (seeded random tie-breaking)")
    k_rank, k_fill, k_rand = jax.random.split(key, 3)
    idx = rank_locations(relevance, k_rank, order)
    curve, fr = perturbation_curve(
        model, params, x, target, idx, steps=steps, replacement=replacement, key=k_fill,
        channel_mean=channel_mean, score=score,
    )
    rand_idx = rank_locations(jax.random.uniform(k_rand, relevance.shape), k_rank, "morf")
    rand_curve, _ = perturbation_curve(
        model, params, x, target, rand_idx, steps=steps, replacement=replacement, key=k_fill,
        channel_mean=channel_mean, score=score,
    )
    aopc = jnp.mean(curve[:, :1] - curve, axis=1)
    aopc_rand = jnp.mean(rand_curve[:, :1] - rand_curve, axis=1)
    auc = jnp.trapezoid(curve, jnp.asarray(fr), axis=1)
    return Scores(
        values={"curve": curve, "auc": auc, "aopc": aopc, "aopc_vs_random": aopc - aopc_rand},
        x={"curve": fr},
        choices=dict(steps=steps, order=order, replacement=replacement, score=score, tie=tie,
                     ranking="per-pixel, channel-summed"),
    )
