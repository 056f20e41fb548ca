"""Pieces shared by the evaluation protocols: channel aggregation, seeded rankings, fills,
batched target scores and re-explanation of perturbed inputs.

Nothing here keeps state; compiled functions are memoized per model with `Model.cached`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.harness import _freeze, check_return_score, explain, forward, map_chunks, score_of
from attrax.methods import class_score, per_example_keys
from attrax.models import as_model

Array = jax.Array
AGGREGATES = ("sum", "abs_sum", "max_abs")
ORDERS = ("morf", "lerf")
REPLACEMENTS = ("zero", "mean", "uniform", "blur")


def aggregate_channels(relevance: Array, how: str = "sum") -> Array:
    """(n, H, W, C) -> (n, H, W): the recorded channel aggregation (sum, abs_sum or max_abs)."""
    if relevance.ndim != 4:
        return relevance.reshape(relevance.shape[0], -1)
    if how == "sum":
        return relevance.sum(-1)
    if how == "abs_sum":
        return jnp.abs(relevance).sum(-1)
    if how == "max_abs":
        return jnp.abs(relevance).max(-1)
    raise AttraxError(f"unknown channel aggregation {how!r}: use one of {', '.join(AGGREGATES)}")


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise AttraxError(f"unknown order {order!r}: use morf or lerf")


def rank_desc(values: Array, key: Array, order: str = "morf") -> Array:
    """Per-row indices sorted by value, highest first (MoRF) or lowest first (LeRF).

    Ties are broken by a seeded random permutation (the recorded tie rule "random").
    """
    check_order(order)
    v = -values if order == "lerf" else values
    tie = jax.random.uniform(key, v.shape)
    return jnp.lexsort((tie, -v), axis=-1)


def gaussian_blur(x: Array, size: int = 11, sigma: float = 5.0) -> Array:
    """Gaussian blur of NHWC images (RISE insertion: 11x11, sigma 5), zero padded.

    Separable: two 1-D passes of shifted slices (much faster on CPU than a depthwise conv).
    """
    r = size // 2
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = k / k.sum()
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0)))
    y = sum(float(k[i]) * p[:, i : i + h] for i in range(size))
    p = jnp.pad(y, ((0, 0), (0, 0), (r, r), (0, 0)))
    return sum(float(k[j]) * p[:, :, j : j + w] for j in range(size))


def replacement(x: Array, how: str, key: Array, channel_mean: Any = None) -> Array:
    """The value removed pixels take: zero, the channel mean, uniform noise or a blurred copy."""
    if how == "zero":
        return jnp.zeros_like(x)
    if how == "mean":
        m = x.mean(axis=tuple(range(x.ndim - 1))) if channel_mean is None else channel_mean
        return jnp.broadcast_to(jnp.asarray(m, x.dtype), x.shape)
    if how == "uniform":
        return jax.random.uniform(key, x.shape, x.dtype)
    if how == "blur":
        return gaussian_blur(x)
    raise AttraxError(f"unknown replacement {how!r}: use one of {', '.join(REPLACEMENTS)}")


def target_scores(model, params, x: Array, target: Array, score: str = "logit") -> Array:
    """f_c of every image of a (large) batch through chunked compiled forwards."""
    return class_score(forward(as_model(model), params, x), target, score)


def repeat_targets(target: Array, k: int) -> Array:
    """Targets for a batch laid out as (n, k, ...) -> (n * k, ...)."""
    return jnp.repeat(target, k)


def reexplainer(
    method: str | Callable | None,
    method_hparams: dict | None,
    model,
    params,
    protocol: str,
    score: str | None = None,
) -> Callable[[Array, Array, Array], Array]:
    """`explain(x, target, key) -> relevance` for protocols that re-explain perturbed inputs.

    `method` is a registered method name (run through `attrax.explain`: jitted and chunked) or a
    function with the method contract `fn(model, params, x, target, *, key, **hparams)`.
    With `score` ("logit", ...; "logits": the whole output) the function returns
    `(relevance, f_c(x))`, the target score of the re-explained inputs computed in the same
    compiled call (`explain`'s `return_score`): one forward fewer per input where XLA merges it
    with the method's own forward.
    """
    hp = dict(method_hparams or {})
    model = as_model(model)
    check_return_score(score)
    if method is None:
        raise AttraxError(
            f"protocol {protocol!r} re-explains perturbed inputs: pass method=<name> "
            "(and method_hparams) of the method being evaluated"
        )
    if callable(method):
        def both(p, xx, tt, kk):
            r = method(model, p, xx, tt, key=kk, **hp)
            return r if score is None else (r, score_of(model, p, xx, tt, score))

        fn = model.cached(("reexplain", method, _freeze(hp), score), lambda: jax.jit(both))

        def run(x, target, key):
            return fn(params, x, target, per_example_keys(key, x.shape[0]))

        return run

    def run_named(x, target, key):
        return explain(method, model, params, x, target, key=key, return_score=score, **hp)

    return run_named


def example_keys(method_key: Any, n: int) -> Array:
    """The n per-example keys `explain(..., key=method_key)` gives a batch of n: the map's own
    keys (`None` = key 0, explain's default). Protocols that re-explain "the same explanation"
    (a randomized model, another class, a perturbed or shifted copy of example i) pass these, so
    a stochastic method draws the same noise as for the map."""
    return per_example_keys(0 if method_key is None else method_key, n)


def repeat_keys(keys: Array, k: int) -> Array:
    """Per-example keys for a batch laid out as (n, k, ...): example i's key for each of its k copies."""
    return jnp.repeat(keys, k, axis=0)


def other_keys(keys: Array) -> Array:
    """Per-example keys independent of `keys` (the noise ceiling's second draw)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 0x5EED))(keys)


def is_stochastic(method: Any) -> bool:
    """A registered method's `stochastic` flag (unknown functions count as stochastic)."""
    if isinstance(method, str):
        from attrax.methods.combinators import resolve

        return bool(resolve(method).meta.get("stochastic", True))
    return True


def method_label(method: Any) -> Any:
    """How a method argument is recorded in `Scores.choices`."""
    if method is None or isinstance(method, str):
        return method
    return getattr(method, "__name__", repr(method))


#: Model evaluations per compiled protocol call. On CPU small chunks keep activations in cache:
#: a 28-step curve of 100 digits through cnn_a cost 1.05-1.14x its 29 forward passes with
#: 100-300 evaluations per call, 1.4-1.9x with 600-2900 (2 shared cores).
CHUNK_EVALS = {"cpu": 256}
DEFAULT_CHUNK_EVALS = 4096


def chunked(fn: Callable, n: int, per_image: int, *arrays: Array, budget: int | None = None) -> Array:
    """Run a compiled per-batch `fn` over image chunks of about `budget` model evaluations
    (default: per backend, `CHUNK_EVALS`)."""
    if budget is None:
        budget = CHUNK_EVALS.get(jax.default_backend(), DEFAULT_CHUNK_EVALS)
    n_chunks = -(-n * max(1, per_image) // budget)
    chunk = -(-n // n_chunks)  # equal chunks: little padding in the last one
    return map_chunks(fn, n, chunk, *arrays)


def pearson(a: Array, b: Array, axis: int = -1) -> Array:
    """Pearson correlation along `axis` (0 where either side is constant)."""
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    num = (a * b).sum(axis)
    den = jnp.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def as_np(x: Any) -> np.ndarray:
    return np.asarray(x)
