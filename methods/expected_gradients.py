"""Expected gradients and GradientSHAP: integrated gradients averaged over sampled baselines.

R_i = E_{x' ~ D, a ~ U(0, 1)} [ (x_i - x') * grad f_c(x' + a (x_i - x')) ]   (Erion et al. 2021),
estimated with `n_samples` draws of (baseline, alpha) per image from that image's key. All draws of
the batch go through ONE backward pass.

Baselines: pass an array of reference images (B, H, W, C) as `baselines`, e.g. a few hundred
training images (`Dataset.x[:256]`); they are embedded in the compiled function, so keep the
sample moderate. Without `baselines` the method falls back to ONE baseline, the per-channel mean
of each image itself (a batch-independent stand-in for the dataset mean; pass
`baselines=ds.meta["channel_mean"][None, None, None]` for the training-set mean). On a linear
model with one baseline b the result is exactly w * (x - b).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attrax.errors import AttraxError
from attrax.methods._core import METHODS, input_gradient

Array = jax.Array


def _baseline_set(x: Array, baselines: Any) -> Array | None:
    if baselines is None:
        return None
    b = jnp.asarray(baselines, x.dtype)
    if b.ndim == x.ndim - 1:
        b = b[None]
    if b.ndim != x.ndim or any(d not in (1, e) for d, e in zip(b.shape[1:], x.shape[1:], strict=True)):
        raise AttraxError(f"baselines must have shape (B, {', '.join(map(str, x.shape[1:]))}), got {b.shape}")
    return jnp.broadcast_to(b, (b.shape[0],) + x.shape[1:])


def sample_expected_gradients(
    model, params, x, target, key, *, n_samples: int, baselines: Any, stdev: float, score: str
) -> Array:
    """Monte-Carlo expected gradients with optional Gaussian input noise (GradientSHAP)."""
    if n_samples < 1:
        raise AttraxError(f"n_samples must be >= 1, got {n_samples}")
    n = x.shape[0]
    b = _baseline_set(x, baselines)
    ks = jax.vmap(lambda k: jax.random.split(k, 3))(key)  # (n, 3): baseline index, alpha, noise
    alpha = jax.vmap(lambda k: jax.random.uniform(k, (n_samples,), x.dtype))(ks[:, 1]).T  # (S, n)
    if b is None:
        axes = tuple(range(1, x.ndim - 1)) if x.ndim > 2 else (1,)
        base = jnp.broadcast_to(jnp.mean(x, axis=axes, keepdims=True), x.shape)[None]  # (1, n, ...)
    else:
        idx = jax.vmap(lambda k: jax.random.randint(k, (n_samples,), 0, b.shape[0]))(ks[:, 0]).T  # (S, n)
        base = b[idx]  # (S, n, ...)
    xs = jnp.broadcast_to(x[None], (n_samples,) + x.shape)
    if stdev > 0:
        eps = jax.vmap(lambda k: jax.random.normal(k, (n_samples,) + x.shape[1:], x.dtype))(ks[:, 2])
        xs = xs + stdev * jnp.swapaxes(eps, 0, 1)
    delta = xs - base  # (S, n, ...)
    a = alpha.reshape(alpha.shape + (1,) * (x.ndim - 1))
    points = (base + a * delta).reshape((n_samples * n,) + x.shape[1:])
    _, g = input_gradient(lambda xx: model(params, xx), points, jnp.tile(target, n_samples), score)
    return jnp.mean(delta * g.reshape(delta.shape), axis=0)


@METHODS.register(
    "expected_gradients",
    family="gradient",
    needs="apply",
    stochastic=True,
    cost=lambda hp: hp.get("n_samples", 50),
)
def expected_gradients(
    model,
    params,
    x,
    target,
    *,
    key,
    n_samples: int = 50,
    baselines: Any = None,
    score: str = "logit",
) -> Array:
    """Expected gradients (Erion et al. 2021): IG with baselines drawn from the data and one random
    alpha ~ U(0, 1) per draw. Defaults: 50 draws, baselines None -> each image's channel mean
    (pass training images as `baselines`), target logit."""
    return sample_expected_gradients(
        model,
        params,
        x,
        target,
        key,
        n_samples=n_samples,
        baselines=baselines,
        stdev=0.0,
        score=score,
    )


@METHODS.register(
    "gradient_shap",
    family="gradient",
    needs="apply",
    stochastic=True,
    cost=lambda hp: hp.get("n_samples", 50),
)
def gradient_shap(
    model,
    params,
    x,
    target,
    *,
    key,
    n_samples: int = 50,
    stdev: float = 0.1,
    baselines: Any = None,
    score: str = "logit",
) -> Array:
    """GradientSHAP (Lundberg & Lee 2017, as in Captum): expected gradients of the input plus
    Gaussian noise of std `stdev` (absolute, input units), R = mean (x + eps - x') * grad f(point).
    Defaults: 50 draws, stdev 0.1, baselines None -> each image's channel mean, target logit."""
    return sample_expected_gradients(
        model,
        params,
        x,
        target,
        key,
        n_samples=n_samples,
        baselines=baselines,
        stdev=stdev,
        score=score,
    )
