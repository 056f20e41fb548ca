"""Explanation continuity and local Lipschitz sensitivity.

Continuity (Montavon, Samek, Mueller, Digital Signal Processing 2018, section 5.1 / tutorial
notebook 5.1): max over x != x' of ||R(x) - R(x')||_1 / ||x - x'||_2, estimated along a path of
inputs (neighbouring points). The translation experiment shifts a digit horizontally from -20 to
+20 px (41 positions, zero fill), records f_c and the relevance summed over the four quadrants,
and reports the maximal ratio between neighbouring shifts.

Max- and average-sensitivity (Yeh, Hsieh, Suggala, Inouye, Ravikumar, NeurIPS 2019, as in
Quantus): over `n_samples` uniform perturbations d in the L-inf ball of radius `radius`,
||R(x + d) - R(x)||_2 / ||R(x)||_2, maximum and mean. Ours: radius 0.1, 20 samples, Frobenius
norm, normalized by ||R(x)|| (Quantus defaults differ: radius 0.2, 200 samples).

All perturbed inputs of all images are explained by one batched `attrax.explain` call; the
translation experiment takes f_c of the shifted digits from the same call (`return_score`).

Speed (cnn_a, 100 digits x 41 shifts, 2 shared CPU cores, process CPU time): the scores of the
4,100 shifted digits cost 1.8 s in `target_scores`' chunks of 1,024 (5 chunks, the last padded:
5,120 forwards) and 0.81 s in chunks of ~256, next to 1.96 s for their 4,100 gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.protocols import PROTOCOLS, Scores
from attrax.protocols._common import (
    aggregate_channels,
    example_keys,
    method_label,
    reexplainer,
    repeat_keys,
    repeat_targets,
)

Array = jax.Array
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")


def neighbour_ratios(r_path: Array, x_path: Array, min_step: float = 1e-8) -> Array:
    """(n, K, ...) relevance and inputs along paths -> (n, K-1) ||dR||_1 / ||dx||_2.

    Pairs of identical neighbouring inputs (||dx|| < min_step) give 0.
    """
    n, k = x_path.shape[:2]
    dr = jnp.abs(jnp.diff(r_path.reshape(n, k, -1), axis=1)).sum(-1)
    dx = jnp.sqrt((jnp.diff(x_path.reshape(n, k, -1), axis=1) ** 2).sum(-1))
    return jnp.where(dx > min_step, dr / jnp.where(dx > min_step, dx, 1.0), 0.0)


def explain_path(
    model,
    params,
    path: Array,
    target: Array,
    *,
    key,
    method,
    method_hparams=None,
    protocol: str = "continuity",
    score: str | None = None,
) -> Array | tuple[Array, Array]:
    """Relevance of every point of (n, K, ...) paths through one batched explain call; with
    `score`, also f_c (n, K) of every point from the same call (`_common.reexplainer`)."""
    n, k = path.shape[:2]
    run = reexplainer(method, method_hparams, model, params, protocol, score=score)
    flat = path.reshape((n * k,) + path.shape[2:])
    out = run(flat, repeat_targets(target, k), key)
    if score is None:
        return out.reshape(path.shape)
    return out[0].reshape(path.shape), out[1].reshape(n, k)


def path_continuity(
    model, params, path: Array, target: Array, *, key, method, method_hparams=None
) -> tuple[Array, Array]:
    """(max ratio (n,), ratios (n, K-1)) of a method along given input paths (n, K, ...)."""
    r = explain_path(
        model, params, path, target, key=key, method=method, method_hparams=method_hparams
    )
    ratios = neighbour_ratios(r, path)
    return ratios.max(axis=1), ratios


def translate(x: Array, shifts: np.ndarray) -> Array:
    """(n, H, W, C) -> (n, S, H, W, C): horizontal shifts (positive = right), zero fill."""
    pad = int(np.max(np.abs(shifts)))
    w = x.shape[2]
    xp = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)))
    return jnp.stack([xp[:, :, pad - s : pad - s + w] for s in shifts.tolist()], axis=1)


@PROTOCOLS.register(
    "continuity",
    category="continuity",
    version=2,
    x_label="shift (px)",
    needs_method=True,
    higher_is_better={
        "max_ratio": False,
        "score": None,
        **{f"quadrant_{q}": None for q in QUADRANTS},
    },
)
def continuity(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    method=None,
    method_hparams: dict | None = None,
    method_key=None,
    max_shift: int = 20,
    score: str = "logit",
    aggregate: str = "sum",
) -> Scores:
    """Translation experiment (Montavon et al. 2018): shifts -max_shift..+max_shift px.

    Scores: `max_ratio` (n,) = max over neighbouring shifts of ||R_s - R_s+1||_1 / ||x_s -
    x_s+1||_2 (lower = more continuous); curves over the shift: `score` (f_c) and
    `quadrant_<q>` (channel-aggregated relevance summed over each image quadrant).
    `method_key`: the key the map was computed with; every shifted copy of image i is explained
    with image i's key (a stochastic method draws the same noise along the path).
    """
    if x.ndim != 4:
        raise AttraxError(f"continuity needs NHWC images, got shape {x.shape}")
    shifts = np.arange(-max_shift, max_shift + 1)
    path = translate(x, shifts)
    n, k = path.shape[:2]
    r, f = explain_path(
        model, params, path, target, key=repeat_keys(example_keys(method_key, n), k), method=method,
        method_hparams=method_hparams, score=score,
    )
    r2 = aggregate_channels(r.reshape((n * k,) + x.shape[1:]), aggregate).reshape(
        n, k, *x.shape[1:3]
    )
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    quads = {
        "top_left": r2[:, :, :h2, :w2],
        "top_right": r2[:, :, :h2, w2:],
        "bottom_left": r2[:, :, h2:, :w2],
        "bottom_right": r2[:, :, h2:, w2:],
    }
    values = {"max_ratio": neighbour_ratios(r, path).max(axis=1), "score": f}
    values.update({f"quadrant_{q}": v.sum(axis=(2, 3)) for q, v in quads.items()})
    xs = {m: shifts for m in values if m != "max_ratio"}
    return Scores(
        values=values,
        x=xs,
        choices=dict(
            method=method_label(method),
            method_hparams=method_hparams or {},
            max_shift=max_shift,
            axis="horizontal",
            fill="zero",
            score=score,
            aggregate=aggregate,
            ratio="L1(dR) / L2(dx)",
        ),
    )


def _sensitivities(
    model, params, x, target, relevance, key, method, method_hparams, radius, n_samples, protocol,
    method_key=None,
) -> Array:
    n = x.shape[0]
    d = jax.random.uniform(key, (n, n_samples) + x.shape[1:], x.dtype, -radius, radius)
    r = explain_path(
        model,
        params,
        x[:, None] + d,
        target,
        key=repeat_keys(example_keys(method_key, n), n_samples),
        method=method,
        method_hparams=method_hparams,
        protocol=protocol,
    )
    num = jnp.sqrt(((r - relevance[:, None]) ** 2).reshape(n, n_samples, -1).sum(-1))
    den = jnp.sqrt((relevance.reshape(n, -1) ** 2).sum(-1))
    return num / jnp.where(den > 0, den, 1.0)[:, None]


def _sens_choices(method, method_hparams, radius, n_samples, method_key=None):
    return dict(
        method_key="the map's" if method_key is not None else "key 0",
        method=method_label(method),
        method_hparams=method_hparams or {},
        radius=radius,
        n_samples=n_samples,
        noise="uniform L-inf ball",
        norm="frobenius",
        normalise="by ||R(x)||",
    )


@PROTOCOLS.register(
    "max_sensitivity",
    category="robustness",
    version=2,
    needs_method=True,
    higher_is_better={"max_sensitivity": False},
)
def max_sensitivity(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    method=None,
    method_hparams: dict | None = None,
    method_key=None,
    radius: float = 0.1,
    n_samples: int = 20,
) -> Scores:
    """Max-sensitivity (Yeh et al. 2019): max_d ||R(x + d) - R(x)|| / ||R(x)||, |d|_inf <= radius.

    Defaults: radius 0.1, 20 uniform samples, Frobenius norm. Lower is better. Every perturbed
    copy of image i is explained with the map's key for image i (`method_key`), so only the input
    changes: at radius 0 the score is 0, for stochastic methods too.
    """
    s = _sensitivities(
        model,
        params,
        x,
        target,
        relevance,
        key,
        method,
        method_hparams,
        radius,
        n_samples,
        "max_sensitivity",
        method_key,
    )
    return Scores(
        values={"max_sensitivity": s.max(axis=1)},
        choices=_sens_choices(method, method_hparams, radius, n_samples, method_key),
    )


@PROTOCOLS.register(
    "avg_sensitivity",
    category="robustness",
    version=2,
    needs_method=True,
    higher_is_better={"avg_sensitivity": False},
)
def avg_sensitivity(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    method=None,
    method_hparams: dict | None = None,
    method_key=None,
    radius: float = 0.1,
    n_samples: int = 20,
) -> Scores:
    """Average-sensitivity (Yeh et al. 2019): the mean instead of the max; same defaults."""
    s = _sensitivities(
        model,
        params,
        x,
        target,
        relevance,
        key,
        method,
        method_hparams,
        radius,
        n_samples,
        "avg_sensitivity",
        method_key,
    )
    return Scores(
        values={"avg_sensitivity": s.mean(axis=1)},
        choices=_sens_choices(method, method_hparams, radius, n_samples, method_key),
    )
