"""Explanation selectivity (Montavon, Samek, Mueller, "Methods for interpreting and understanding
deep neural networks", Digital Signal Processing 2018, section 5.2 / tutorial notebook 5.2).

Iterative: T times, record f_c, re-explain the current image, and set to zero the window
(default 4x4, stride 1) with the largest summed relevance among windows that do not overlap
earlier removals. One-shot: the same greedy window removal driven by the initial map only.
The score is the area under the f_c curve (lower = more selective). Re-explanation is one
batched `attrax.explain` call per step for all images, which also returns f_c of the state it
explains (`return_score`); the first and last states are scored by a compiled forward in
CPU-sized chunks (`_common.chunked`).

Speed of the scored re-explanation (cnn_a, 100 digits, gradient, 20 steps, idle 2-core EPYC,
best of 3, identical curves): 686 -> 414 ms (1.66x; continuity with 29 shifts 867 -> 543 ms).
In one compiled call XLA merges the score's forward with the gradient's own (gradient + score
19.4 ms, gradient alone 18.8, the forward alone 9.5), so 19 of the 21 forwards cost nothing.

Speed (cnn_a, 100 digits, 2 shared CPU cores, process CPU time, identical curves): scoring each
state as it is made instead of one forward of all T+1 stacked states (run by `harness.forward`
in chunks of 1,024 images with the last one padded: 2,100 states cost 3,072 forwards, out of
cache) made iterative selectivity (20 steps) 1.43x and one-shot (49 steps) 1.47x faster.
Measured and dropped: one compiled call per step (re-explain + removal + score) was 0.84x (the
re-explanation compiled inside the larger call ran slower); all T steps in one call did not pay
either: unrolled it compiled for ~60 s, as a `fori_loop` it ran ~1.5x slower (XLA:CPU runs
convolutions inside while loops slower, the effect `attrax.train` documents).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.methods import class_score
from attrax.models import as_model
from attrax.protocols import PROTOCOLS, Scores
from attrax.protocols._common import (
    aggregate_channels,
    chunked,
    example_keys,
    method_label,
    reexplainer,
)

Array = jax.Array


def _window_sums(a: Array, window: int) -> Array:
    """(n, H, W) -> (n, H-w+1, W-w+1) sums over every w x w window, stride 1."""
    return jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, window, window), (1, 1, 1), "VALID")


@jax.jit
def _remove_best(x: Array, removed: Array, r2d: Array, window_arr: Array) -> tuple[Array, Array]:
    window = window_arr.shape[0]
    n, h, w = removed.shape
    sums = _window_sums(r2d, window)
    overlap = _window_sums(removed.astype(r2d.dtype), window) > 0
    sums = jnp.where(overlap, -jnp.inf, sums)
    flat = sums.reshape(n, -1)
    best = jnp.argmax(flat, axis=1)
    ok = jnp.isfinite(jnp.max(flat, axis=1))  # no free window left: remove nothing
    cols = w - window + 1
    i0, j0 = best // cols, best % cols
    ii = jnp.arange(h)[None, :, None]
    jj = jnp.arange(w)[None, None, :]
    m = (
        (ii >= i0[:, None, None])
        & (ii < i0[:, None, None] + window)
        & (jj >= j0[:, None, None])
        & (jj < j0[:, None, None] + window)
        & ok[:, None, None]
    )
    return jnp.where(m[..., None], 0.0, x), removed | m


def state_scores(model, params, x: Array, target: Array, score: str) -> Array:
    """f_c of every image of a batch through a compiled forward in CPU-sized chunks
    (`_common.chunked`: ~256 images on CPU, balanced, so little padding). Faster on CPU than
    `_common.target_scores` for large batches (chunks of 1,024, the last one padded)."""
    model = as_model(model)
    f = model.cached(
        ("state_scores", score),
        lambda: jax.jit(lambda p, xx, tt: class_score(model(p, xx), tt, score)),
    )
    return chunked(lambda xx, tt: f(params, xx, tt), x.shape[0], 1, x, target)


def _check(x, window):
    if x.ndim != 4:
        raise AttraxError(f"selectivity needs NHWC images, got shape {x.shape}")
    if not 1 <= window <= min(x.shape[1:3]):
        raise AttraxError(f"window {window} does not fit images of size {x.shape[1:3]}")


def _scores(curve: Array, steps: int) -> tuple[dict, np.ndarray]:
    t = np.arange(steps + 1)
    auc = jnp.trapezoid(curve, jnp.asarray(t / steps), axis=1)
    return {"curve": curve, "auc": auc, "drop": curve[:, 0] - curve[:, -1]}, t


_DIRS = {"curve": None, "auc": False, "drop": True}


@PROTOCOLS.register(
    "selectivity", category="selectivity", higher_is_better=_DIRS, version=2, needs_method=True,
    x_label="step",
)
def selectivity(
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
    steps: int = 20,
    window: int = 4,
    score: str = "logit",
    aggregate: str = "sum",
) -> Scores:
    """Iterative selectivity (Montavon et al. 2018): re-explain after every window removal.

    `method` / `method_hparams`: the method being evaluated (a registered name or a function
    with the method contract); `relevance` is used for the first step. Defaults: T = 20 steps,
    4x4 windows at stride 1 without overlap, zero fill, logit score, channel sum. Scores:
    `curve` (n, T+1) of f_c over the step, `auc` (trapezoid, step axis scaled to [0, 1]; lower
    is better) and `drop` = f(x_0) - f(x_T). Every re-explanation of image i uses the map's key for
    image i (`method_key`): the same method, only the image changes.
    """
    _check(x, window)
    # each state is re-explained and scored by one call (f_c computed with the map: for gradient
    # methods XLA merges that forward with the method's own); the last state is only scored
    run = reexplainer(method, method_hparams, model, params, "selectivity", score=score)
    keys = example_keys(method_key, x.shape[0])
    warr = jnp.zeros((window,))
    removed = jnp.zeros(x.shape[:3], bool)
    cur, r = x, relevance
    curve = [state_scores(model, params, x, target, score)]
    for t in range(steps):
        cur, removed = _remove_best(cur, removed, aggregate_channels(r, aggregate), warr)
        if t + 1 < steps:
            r, f = run(cur, target, keys)
        else:
            f = state_scores(model, params, cur, target, score)
        curve.append(f)
    values, ts = _scores(jnp.stack(curve, axis=1), steps)
    return Scores(
        values=values,
        x={"curve": ts},
        choices=dict(
            method=method_label(method),
            method_hparams=method_hparams or {},
            steps=steps,
            window=window,
            stride=1,
            overlap="excluded",
            fill="zero",
            score=score,
            aggregate=aggregate,
            iterative=True,
        ),
    )


@PROTOCOLS.register(
    "selectivity_oneshot", category="selectivity", higher_is_better=_DIRS, version=1, x_label="step",
)
def selectivity_oneshot(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    steps: int = 20,
    window: int = 4,
    score: str = "logit",
    aggregate: str = "sum",
) -> Scores:
    """One-shot selectivity: greedy non-overlapping window removal from the initial map only.

    Same defaults and scores as `selectivity`, without re-explanation (cheaper; differs where
    the method's map changes as evidence is removed).
    """
    _check(x, window)
    warr = jnp.zeros((window,))
    r2d = aggregate_channels(relevance, aggregate)
    removed = jnp.zeros(x.shape[:3], bool)
    cur = x
    curve = [state_scores(model, params, x, target, score)]
    for _ in range(steps):
        cur, removed = _remove_best(cur, removed, r2d, warr)
        curve.append(state_scores(model, params, cur, target, score))
    values, ts = _scores(jnp.stack(curve, axis=1), steps)
    return Scores(
        values=values,
        x={"curve": ts},
        choices=dict(
            steps=steps,
            window=window,
            stride=1,
            overlap="excluded",
            fill="zero",
            score=score,
            aggregate=aggregate,
            iterative=False,
        ),
    )
