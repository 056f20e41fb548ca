"""Gradient-based maps: gradient (saliency / sensitivity), integrated gradients; controls."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attrax.methods._core import METHODS, input_gradient
from attrax.methods._core import postprocess as apply_postprocess

Array = jax.Array


@METHODS.register("gradient", family="gradient", needs="apply", stochastic=False, cost=lambda hp: 1)
def gradient(model, params, x, target, *, key=None, score: str = "logit", postprocess: str = "raw") -> Array:
    """Gradient of the target score w.r.t. the input (Simonyan et al. 2014).

    `postprocess`: "raw" (default), "abs" (saliency map), "square" (sensitivity analysis).
    """
    _, g = input_gradient(lambda xx: model(params, xx), x, target, score)
    return apply_postprocess(g, postprocess)


def _alphas(steps: int, rule: str) -> Array:
    k = jnp.arange(steps + (rule == "trapezoid"), dtype=jnp.float32)
    if rule == "left":
        return k / steps, jnp.full((steps,), 1.0 / steps)
    if rule == "right":
        return (k + 1) / steps, jnp.full((steps,), 1.0 / steps)
    if rule == "midpoint":
        return (k + 0.5) / steps, jnp.full((steps,), 1.0 / steps)
    if rule == "trapezoid":
        w = jnp.full((steps + 1,), 1.0 / steps).at[0].set(0.5 / steps).at[-1].set(0.5 / steps)
        return k / steps, w
    raise ValueError(f"unknown Riemann rule {rule!r}: use left, right, midpoint or trapezoid")


@METHODS.register(
    "integrated_gradients", family="gradient", needs="apply", stochastic=False, cost=lambda hp: hp.get("steps", 50)
)
def integrated_gradients(
    model, params, x, target, *, key=None, steps: int = 50, rule: str = "right", baseline: str = "zero",
    score: str = "logit",
) -> Array:
    """Integrated gradients (Sundararajan et al. 2017): (x - x') * sum_k w_k grad f(x' + a_k (x - x')).

    All `steps` interpolation points of the batch go through one backward pass.
    """
    base = jnp.zeros_like(x) if baseline in ("zero", "black") else jnp.asarray(baseline, x.dtype) * jnp.ones_like(x)
    alphas, weights = _alphas(steps, rule)
    a = alphas.reshape((-1,) + (1,) * x.ndim)
    path = base[None] + a * (x - base)[None]  # (m, n, ...)
    m, n = path.shape[:2]
    _, g = input_gradient(lambda xx: model(params, xx), path.reshape((m * n,) + x.shape[1:]), jnp.tile(target, m), score)
    g = g.reshape(path.shape)
    return (x - base) * jnp.tensordot(weights, g, axes=1)


@METHODS.register("random", family="control", needs="apply", stochastic=True, cost=lambda hp: 0)
def random(model, params, x, target, *, key) -> Array:
    """Control: uniform noise in [0, 1), seeded per example."""
    return jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype))(key)
