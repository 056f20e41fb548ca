"""Pixel flipping, deletion, insertion and region perturbation with AUC and AOPC.

Sources: Samek, Binder, Montavon, Lapuschkin, Mueller, "Evaluating the visualization of what a
deep neural network has learned", IEEE TNNLS 2017 (arXiv 2015; AOPC, region perturbation);
Petsiuk, Das, Saenko, "RISE", BMVC 2018 (deletion / insertion AUC).

Every curve is one compiled function of (images, fill, ranks): all steps of a chunk of images
are masked inside the compiled call and go through the model as one batch (never one call per
step). Locations are ranked by channel-aggregated relevance; with `patch_size` p > 1 the image
is cut into a non-overlapping p x p grid (edge patches are smaller) and patches are ranked by
summed relevance. Ties are broken by a seeded random permutation (tie rule "random").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attrax._arrays import to_device
from attrax.errors import AttraxError
from attrax.methods import class_score
from attrax.models import as_model
from attrax.protocols import PROTOCOLS, Scores
from attrax.protocols._common import (
    ORDERS,
    REPLACEMENTS,
    aggregate_channels,
    check_order,
    chunked,
    rank_desc,
    replacement,
)

Array = jax.Array
__all__ = ["ORDERS", "REPLACEMENTS", "perturbation_curve", "rank_locations", "unit_grid"]


def unit_grid(h: int, w: int, patch_size: int = 1) -> tuple[np.ndarray, int]:
    """Unit (patch) id of every pixel for a non-overlapping p x p grid, and the number of units."""
    if patch_size < 1:
        raise AttraxError(f"patch_size must be >= 1, got {patch_size}")
    cols = -(-w // patch_size)
    ii, jj = np.meshgrid(np.arange(h) // patch_size, np.arange(w) // patch_size, indexing="ij")
    unit = (ii * cols + jj).reshape(-1)
    return unit.astype(np.int32), int(unit.max() + 1)


def unit_relevance(relevance: Array, patch_size: int = 1, aggregate: str = "sum") -> Array:
    """(n, H, W, C) -> (n, U) relevance per unit (channel-aggregated, summed per patch)."""
    n, h, w = relevance.shape[:3]
    r = aggregate_channels(relevance, aggregate).reshape(n, h * w)
    if patch_size == 1:
        return r
    unit, n_units = unit_grid(h, w, patch_size)
    return jax.vmap(lambda row: jax.ops.segment_sum(row, to_device(unit), n_units))(r)


def rank_locations(
    relevance: Array,
    key: Array,
    order: str = "morf",
    *,
    patch_size: int = 1,
    aggregate: str = "sum",
) -> Array:
    """(n, U) unit indices, most relevant first (MoRF) or least relevant first (LeRF)."""
    return rank_desc(unit_relevance(relevance, patch_size, aggregate), key, order)


def _curve_fn(model, n_points: int, score: str, insertion: bool):
    def run(params, x, fill, pixel_pos, ks, target):
        b, h, w, c = x.shape
        removed = pixel_pos[:, None, :] < ks[None, :, None]  # (b, K+1, HW)
        if insertion:
            removed = ~removed
        m = removed.reshape(b, n_points, h, w, 1)
        xs = jnp.where(m, fill[:, None], x[:, None]).reshape(b * n_points, h, w, c)
        s = class_score(model(params, xs), jnp.repeat(target, n_points), score)
        return s.reshape(b, n_points)

    return jax.jit(run)


def perturbation_curve(
    model,
    params,
    x,
    target,
    order_idx,
    *,
    steps: int,
    replacement: str = "zero",
    key=None,
    channel_mean=None,
    score: str = "logit",
    insertion: bool = False,
    patch_size: int = 1,
    fill: Array | None = None,
) -> tuple[Array, np.ndarray]:
    """Target scores after removing (insertion: restoring) the first k*U/steps ranked units.

    `order_idx` (n, U) from `rank_locations`. Returns the (n, steps+1) curve and the fraction of
    units removed at each point. One compiled call per chunk of images, all steps inside it.
    """
    if x.ndim != 4:
        raise AttraxError(f"perturbation protocols need NHWC images, got shape {x.shape}")
    model = as_model(model)
    n, h, w, c = x.shape
    unit, n_units = unit_grid(h, w, patch_size)
    if order_idx.shape != (n, n_units):
        raise AttraxError(f"order has shape {order_idx.shape}, expected {(n, n_units)}")
    ks = np.linspace(0, n_units, steps + 1).round().astype(np.int32)
    if fill is None:
        fill = replacement_fill(x, replacement, key, channel_mean)
    unit_pos = jnp.argsort(order_idx, axis=-1)  # position of every unit in the order
    pixel_pos = unit_pos[:, to_device(unit)]  # (n, HW)
    fn = model.cached(
        ("perturbation_curve", x.shape[1:], steps + 1, score, insertion),
        lambda: _curve_fn(model, steps + 1, score, insertion),
    )
    ks_j = to_device(ks)
    curve = chunked(
        lambda xx, ff, pp, tt: fn(params, xx, ff, pp, ks_j, tt),
        n,
        steps + 1,
        x,
        fill,
        pixel_pos,
        target,
    )
    return curve, ks / n_units


def replacement_fill(x, how, key, channel_mean=None):
    if key is None:
        key = jax.random.key(0)
    return replacement(x, how, key, channel_mean)


def _curve_protocol(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    steps,
    order,
    replacement,
    score,
    channel_mean,
    patch_size,
    aggregate,
    insertion,
    random_runs,
) -> Scores:
    check_order(order)
    k_rank, k_fill, k_rand = jax.random.split(key, 3)
    fill = replacement_fill(x, replacement, k_fill, channel_mean)
    common = dict(steps=steps, fill=fill, score=score, insertion=insertion, patch_size=patch_size)
    idx = rank_locations(relevance, k_rank, order, patch_size=patch_size, aggregate=aggregate)
    curve, fr = perturbation_curve(model, params, x, target, idx, **common)
    auc = jnp.trapezoid(curve, to_device(fr), axis=1)
    values = {"curve": curve, "auc": auc}
    if insertion:
        values["aopc"] = jnp.mean(curve - curve[:, :1], axis=1)
    else:
        values["aopc"] = jnp.mean(curve[:, :1] - curve, axis=1)
    if random_runs > 0:
        rand_aopc, rand_auc = [], []
        for r in range(random_runs):
            kr = jax.random.fold_in(k_rand, r)
            ridx = rank_desc(jax.random.uniform(kr, idx.shape), k_rank, "morf")
            rc, _ = perturbation_curve(model, params, x, target, ridx, **common)
            sign = -1.0 if insertion else 1.0
            rand_aopc.append(sign * jnp.mean(rc[:, :1] - rc, axis=1))
            rand_auc.append(jnp.trapezoid(rc, to_device(fr), axis=1))
        values["aopc_vs_random"] = values["aopc"] - jnp.mean(jnp.stack(rand_aopc), 0)
        values["auc_vs_random"] = auc - jnp.mean(jnp.stack(rand_auc), 0)
    return Scores(
        values=values,
        x={"curve": fr},
        choices=dict(
            steps=steps,
            order=order,
            replacement=replacement,
            score=score,
            tie="random",
            patch_size=patch_size,
            aggregate=aggregate,
            random_runs=random_runs,
            grid="non-overlapping",
            x_axis="fraction of units",
            direction="insertion" if insertion else "deletion",
            channel_mean=None if channel_mean is None else np.asarray(channel_mean).tolist(),
        ),
    )


_DELETION_DIRS = {
    "curve": None,
    "auc": False,
    "aopc": True,
    "aopc_vs_random": True,
    "auc_vs_random": False,
}
_INSERTION_DIRS = {
    "curve": None,
    "auc": True,
    "aopc": True,
    "aopc_vs_random": True,
    "auc_vs_random": True,
}


@PROTOCOLS.register(
    "pixel_flipping",
    category="faithfulness",
    x_label="fraction of pixels removed",
    higher_is_better=_DELETION_DIRS,
    version=2,
    directions_for="morf",
)
def pixel_flipping(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    steps: int = 28,
    order: str = "morf",
    replacement: str = "zero",
    score: str = "logit",
    channel_mean=None,
    tie: str = "random",
    aggregate: str = "sum",
    random_runs: int = 1,
) -> Scores:
    """Pixel flipping (Samek et al. 2017): remove pixels in relevance order, record f_c.

    Defaults: 28 steps over all pixels, MoRF, zero replacement, logit score, channel sum, seeded
    random ties, one random order as control. Scores: `curve` (n, steps+1) over the fraction
    removed; `auc` (trapezoid over the fraction axis); `aopc` = mean_k (f(x_0) - f(x_k)) over the
    L+1 points; `aopc_vs_random` / `auc_vs_random` = the same minus the random order's.
    MoRF: a good map makes f fall fast (low AUC, high AOPC); LeRF reverses both (the registered
    directions are those of MoRF).
    """
    if tie != "random":
        raise AttraxError("pixel_flipping supports tie='random' (seeded random tie-breaking)")
    return _curve_protocol(
        model,
        params,
        x,
        target,
        relevance,
        key=key,
        steps=steps,
        order=order,
        replacement=replacement,
        score=score,
        channel_mean=channel_mean,
        patch_size=1,
        aggregate=aggregate,
        insertion=False,
        random_runs=random_runs,
    )


@PROTOCOLS.register(
    "region_perturbation",
    category="faithfulness",
    x_label="fraction of regions removed",
    higher_is_better=_DELETION_DIRS,
    version=1,
    directions_for="morf",
)
def region_perturbation(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    patch_size: int = 4,
    steps: int = 49,
    order: str = "morf",
    replacement: str = "uniform",
    score: str = "logit",
    channel_mean=None,
    aggregate: str = "sum",
    random_runs: int = 1,
) -> Scores:
    """Region perturbation with AOPC (Samek et al. 2017): patches ranked by summed relevance.

    Defaults: 4x4 non-overlapping patches (the paper used 9x9 on ImageNet), 49 steps (all 7x7
    patches of a 28x28 digit), MoRF, uniform-noise replacement as in the paper, logit score.
    """
    return _curve_protocol(
        model,
        params,
        x,
        target,
        relevance,
        key=key,
        steps=steps,
        order=order,
        replacement=replacement,
        score=score,
        channel_mean=channel_mean,
        patch_size=patch_size,
        aggregate=aggregate,
        insertion=False,
        random_runs=random_runs,
    )


@PROTOCOLS.register(
    "deletion",
    category="faithfulness",
    x_label="fraction removed",
    higher_is_better=_DELETION_DIRS,
    version=1,
    directions_for="morf",
)
def deletion(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    steps: int = 28,
    order: str = "morf",
    replacement: str = "zero",
    score: str = "probability",
    channel_mean=None,
    aggregate: str = "sum",
    random_runs: int = 1,
) -> Scores:
    """Deletion (Petsiuk et al. 2018): remove pixels most relevant first, AUC of the probability.

    Defaults: 28 steps (28 pixels per step on 28x28; RISE used 224 per step on ImageNet), zero
    replacement, softmax probability. Lower AUC is better.
    """
    return _curve_protocol(
        model,
        params,
        x,
        target,
        relevance,
        key=key,
        steps=steps,
        order=order,
        replacement=replacement,
        score=score,
        channel_mean=channel_mean,
        patch_size=1,
        aggregate=aggregate,
        insertion=False,
        random_runs=random_runs,
    )


@PROTOCOLS.register(
    "insertion",
    category="faithfulness",
    x_label="fraction inserted",
    higher_is_better=_INSERTION_DIRS,
    version=1,
    directions_for="morf",
)
def insertion(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    steps: int = 28,
    order: str = "morf",
    replacement: str = "blur",
    score: str = "probability",
    channel_mean=None,
    aggregate: str = "sum",
    random_runs: int = 1,
) -> Scores:
    """Insertion (Petsiuk et al. 2018): start from the blurred image (11x11, sigma 5) and restore
    pixels most relevant first; AUC of the probability (higher is better). `aopc` here is the
    mean gain mean_k (f(x_k) - f(x_0)).
    """
    return _curve_protocol(
        model,
        params,
        x,
        target,
        relevance,
        key=key,
        steps=steps,
        order=order,
        replacement=replacement,
        score=score,
        channel_mean=channel_mean,
        patch_size=1,
        aggregate=aggregate,
        insertion=True,
        random_runs=random_runs,
    )
