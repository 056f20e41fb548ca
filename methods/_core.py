"""Shared pieces of all methods: the registry, target scores, batched input gradients, keys."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attrax.errors import AttraxError
from attrax.registry import Registry

Array = jax.Array
METHODS = Registry("method")
SCORES = ("logit", "probability", "log_probability")


def class_score(logits: Array, target: Array, score: str = "logit") -> Array:
    """The explained quantity per example: the target logit (default), probability or log-prob."""
    if score == "logit":
        s = logits
    elif score == "probability":
        s = jax.nn.softmax(logits, axis=-1)
    elif score == "log_probability":
        s = jax.nn.log_softmax(logits, axis=-1)
    else:
        raise AttraxError(f"unknown score {score!r}: use one of {', '.join(SCORES)}")
    return jnp.take_along_axis(s, target[:, None].astype(jnp.int32), axis=-1)[:, 0]


def input_gradient(
    fn: Callable[[Array], Array], x: Array, target: Array, score: str = "logit"
) -> tuple[Array, Array]:
    """(scores, d score_i / d x_i) for a batch from one backward pass of the summed scores.

    `fn(x) -> logits`. Valid because example i's score depends only on x_i.
    """

    def total(xx):
        s = class_score(fn(xx), target, score)
        return s.sum(), s

    (_, s), g = jax.value_and_grad(total, has_aux=True)(x)
    return s, g


def per_example_keys(key: Array | int, n: int, offset: int = 0) -> Array:
    """n keys, example i's key = fold_in(key, offset + i): independent of batching."""
    if isinstance(key, int):
        key = jax.random.key(key)
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 1:  # already per-example
        return key
    return _fold_in_range(key, offset, n)


@functools.partial(jax.jit, static_argnums=2)
def _fold_in_range(key: Array, offset: Array | int, n: int) -> Array:
    # one compiled call per n (any offset); inside a traced method it is inlined
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(n, dtype=jnp.int32))


def postprocess(r: Array, how: str) -> Array:
    """Explicit, recorded post-processing: raw, abs (saliency) or square (sensitivity)."""
    if how == "raw":
        return r
    if how == "abs":
        return jnp.abs(r)
    if how == "square":
        return r * r
    raise AttraxError(f"unknown postprocess {how!r}: use raw, abs or square")


def hparams_of(entry: Any) -> dict[str, Any]:
    return entry.hparams()
