"""Control "methods" that every leaderboard includes: a random map and an edge filter.

Neither looks at the model: a method that does not beat them on a protocol carries no
model-specific information there (Adebayo et al. 2018; OpenXAI keeps the random explainer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attrax.errors import AttraxError
from attrax.methods._core import METHODS

Array = jax.Array


@METHODS.register("random", family="control", needs="apply", stochastic=True, cost=lambda hp: 0)
def random(model, params, x, target, *, key) -> Array:
    """Control: uniform noise in [0, 1), seeded per example (independent of the batch)."""
    return jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype))(key)


@METHODS.register("sobel", family="control", needs="apply", stochastic=False, cost=lambda hp: 0)
def sobel(model, params, x, target, *, key=None) -> Array:
    """Control: Sobel edge magnitude of the input, sqrt(Gx^2 + Gy^2) per channel (Sobel 1968).

    3x3 Sobel kernels on edge-replicated borders, so a constant image gives exactly 0 and the
    image border creates no artificial edge. Model-independent.
    """
    if x.ndim != 4:
        raise AttraxError(f"sobel needs NHWC images, got shape {x.shape}")
    c = x.shape[-1]
    d = jnp.array([-1.0, 0.0, 1.0], x.dtype)
    s = jnp.array([1.0, 2.0, 1.0], x.dtype)
    gx = jnp.outer(s, d)  # d/dW along width, smoothed along height
    kern = jnp.stack([gx, gx.T], axis=-1)[:, :, None, :]  # (3, 3, 1, 2)
    kern = jnp.tile(kern, (1, 1, 1, c))  # depthwise: channel k gets outputs (2k, 2k+1)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    g = jax.lax.conv_general_dilated(
        xp, kern, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c
    )
    g = g.reshape(x.shape[:3] + (c, 2))
    return jnp.sqrt(jnp.sum(g * g, axis=-1))
