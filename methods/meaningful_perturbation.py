"""Meaningful / extremal perturbation (Fong & Vedaldi 2017; Fong, Patrick & Vedaldi 2019).

A smooth mask m in [0, 1] is optimized per image: m = bilinear upsampling of sigmoid(theta), theta
a `mask_size` x `mask_size` grid, so the mask is smooth by construction. The perturbation blends
the image with a perturbed version p(x) (gaussian blur, zero or the image mean):
Phi(x, m) = m x + (1 - m) p(x).

- `game="preserve"` (extremal perturbation, default): maximize f_c(Phi(x, m)) - the mask keeps
  the evidence; `game="delete"` (meaningful perturbation's deletion game): minimize
  f_c(Phi(x, 1 - m)) - the mask removes the evidence.
- Area constraint (Fong 2019): area_weight * mean_i (sort(m)_i - r_i)^2 with r the sorted target
  mask holding a fraction `area` of ones, so the mask covers about `area` of the image.

All images are optimized together: one compiled `lax.fori_loop` of `steps` Adam steps (optax),
each one forward and backward pass of the whole batch (the per-image losses are summed; their
gradients do not mix). Relevance: the final mask, broadcast over channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from attrax.errors import AttraxError
from attrax.methods._core import METHODS, class_score

Array = jax.Array
GAMES = ("preserve", "delete")
PERTURBATIONS = ("blur", "zero", "mean")


def gaussian_blur(x: Array, sigma: float) -> Array:
    """Separable gaussian blur of NHWC images (kernel renormalized at the borders)."""

    def matrix(size):
        i = jnp.arange(size, dtype=jnp.float32)
        k = jnp.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
        return k / k.sum(axis=1, keepdims=True)

    return jnp.einsum("ij,njkc,lk->nilc", matrix(x.shape[1]), x, matrix(x.shape[2]))


def perturbed(x: Array, perturbation: str, sigma: float) -> Array:
    if perturbation == "blur":
        return gaussian_blur(x, sigma)
    if perturbation == "zero":
        return jnp.zeros_like(x)
    if perturbation == "mean":
        return jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    raise AttraxError(
        f"unknown perturbation {perturbation!r}: use one of {', '.join(PERTURBATIONS)}"
    )


def _mask(theta: Array, shape: tuple[int, int]) -> Array:
    n = theta.shape[0]
    return jax.image.resize(jax.nn.sigmoid(theta), (n,) + shape, "bilinear")


@METHODS.register(
    "meaningful_perturbation",
    family="perturbation",
    needs="apply",
    stochastic=False,
    cost=lambda hp: hp.get("steps", 100),
)
def meaningful_perturbation(
    model,
    params,
    x,
    target,
    *,
    key=None,
    area: float = 0.1,
    game: str = "preserve",
    steps: int = 100,
    lr: float = 0.1,
    mask_size: int = 7,
    area_weight: float = 100.0,
    perturbation: str = "blur",
    sigma: float = 5.0,
    score: str = "logit",
) -> Array:
    """Extremal / meaningful perturbation mask (see the module docstring).

    Defaults: preservation game, area 0.1, 100 Adam steps at lr 0.1 on a 7x7 mask grid started at
    m = 0.5, area weight 100, gaussian blur with sigma 5 pixels, logit score.
    """
    if game not in GAMES:
        raise AttraxError(f"unknown game {game!r}: use one of {', '.join(GAMES)}")
    if not 0.0 < area < 1.0:
        raise AttraxError(f"area must be a fraction in (0, 1), got {area}")
    if x.ndim != 4:
        raise AttraxError(f"meaningful_perturbation needs NHWC images, got input shape {x.shape}")
    n, h, w = x.shape[:3]
    base = perturbed(x, perturbation, sigma)
    npix = h * w
    ones = round(area * npix)
    ref = jnp.concatenate([jnp.zeros(npix - ones), jnp.ones(ones)])
    sign = -1.0 if game == "preserve" else 1.0

    def loss(theta):
        m = _mask(theta, (h, w))
        keep = m if game == "preserve" else 1.0 - m
        xs = base + (x - base) * keep[..., None]
        s = class_score(model(params, xs), target, score)
        area_loss = jnp.mean((jnp.sort(m.reshape(n, -1), axis=-1) - ref) ** 2, axis=-1)
        return jnp.sum(sign * s + area_weight * area_loss)

    opt = optax.adam(lr)
    theta0 = jnp.zeros((n, mask_size, mask_size), x.dtype)

    def step(_, state):
        theta, opt_state = state
        g = jax.grad(loss)(theta)
        updates, opt_state = opt.update(g, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    theta, _ = jax.lax.fori_loop(0, steps, step, (theta0, opt.init(theta0)))
    return jnp.broadcast_to(_mask(theta, (h, w))[..., None], x.shape).astype(x.dtype)
