"""Gradient maps: gradient (saliency / sensitivity), input x gradient, integrated gradients.

Every gradient of a batch comes from ONE backward pass of the summed target scores
(`input_gradient`); integrated gradients puts all interpolation points of all images of the
batch through that one pass. These methods need nothing but `model(params, x)`, so they also work
on a plain `apply_fn(params, x) -> logits`.

Convolutions: on CPU every supported `conv_general_dilated` of the model's trace is evaluated in
the form of `attrax.fastconv` (same values; the input gradient of few-channel layers as a dot +
col2im instead of XLA's transposed convolution); zoo models already use it. Measured (process
CPU time, shared 2-core machine under load, cnn_a, jitted `gradient`, medians of 5 interleaved
rounds): batch 100 45.6 vs 51.4 ms with XLA's backward, batch 400 274 vs 300 ms, batch 25 within
the noise (a 1.05-1.3x gain: the forward and conv2's input gradient, most of the time, are
XLA's own, which no rewrite beat; see `attrax.fastconv`). `ATTRAX_CONV_VJP=xla` turns it off.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attrax import fastconv
from attrax.errors import AttraxError
from attrax.methods._core import METHODS, input_gradient
from attrax.methods._core import postprocess as apply_postprocess

Array = jax.Array
RULES = ("left", "right", "midpoint", "trapezoid", "gausslegendre")
BASELINES = ("zero", "black", "mean", "blur", "uniform")


def _logits(model, params, x):
    """x -> model(params, x), with the trace's convolutions in the fast form on CPU
    (`attrax.fastconv.for_gradients`)."""
    return fastconv.for_gradients(lambda xx: model(params, xx), x)


@METHODS.register("gradient", family="gradient", needs="apply", stochastic=False, cost=lambda hp: 1)
def gradient(model, params, x, target, *, key=None, score: str = "logit", postprocess: str = "raw") -> Array:
    """Gradient of the target score w.r.t. the input (Simonyan et al. 2014).

    `score`: "logit" (default), "probability" or "log_probability" of the target class.
    `postprocess`: "raw" (default), "abs" (saliency map), "square" (sensitivity analysis).
    """
    _, g = input_gradient(_logits(model, params, x), x, target, score)
    return apply_postprocess(g, postprocess)


@METHODS.register("input_x_gradient", family="gradient", needs="apply", stochastic=False, cost=lambda hp: 1)
def input_x_gradient(model, params, x, target, *, key=None, score: str = "logit") -> Array:
    """Input x gradient, a.k.a. simple Taylor decomposition (Shrikumar et al. 2016; Montavon 2018).

    R = x * d f_c / d x. On bias-free ReLU networks sum R = f_c(x). Default score: the logit.
    """
    _, g = input_gradient(_logits(model, params, x), x, target, score)
    return x * g


def riemann(steps: int, rule: str) -> tuple[Array, Array]:
    """(alphas, weights) of a quadrature of int_0^1 with exactly `steps` points (= gradient
    evaluations per image, the registered cost).

    left: k/m, right: (k+1)/m (the original paper's choice), midpoint: (k+1/2)/m, k = 0..m-1;
    trapezoid: the m points k/(m-1), k = 0..m-1, i.e. m-1 intervals with end weights 1/(2(m-1))
    (Captum's "riemann_trapezoid"; needs m >= 2); gausslegendre: the m Gauss-Legendre nodes and
    weights mapped to [0, 1] (Captum's default), exact for polynomial integrands of degree
    <= 2m - 1.
    """
    if steps < 1 or (rule == "trapezoid" and steps < 2):
        raise AttraxError(f"steps must be >= {2 if rule == 'trapezoid' else 1} for rule {rule!r}, got {steps}")
    if rule == "gausslegendre":
        t, wt = np.polynomial.legendre.leggauss(steps)
        return jnp.asarray((t + 1) / 2, jnp.float32), jnp.asarray(wt / 2, jnp.float32)
    k = jnp.arange(steps, dtype=jnp.float32)
    if rule == "left":
        return k / steps, jnp.full((steps,), 1.0 / steps)
    if rule == "right":
        return (k + 1) / steps, jnp.full((steps,), 1.0 / steps)
    if rule == "midpoint":
        return (k + 0.5) / steps, jnp.full((steps,), 1.0 / steps)
    if rule == "trapezoid":
        m = steps - 1
        w = jnp.full((steps,), 1.0 / m).at[0].set(0.5 / m).at[-1].set(0.5 / m)
        return k / m, w
    raise AttraxError(f"unknown Riemann rule {rule!r}: use one of {', '.join(RULES)}")


def gaussian_blur(x: Array, sigma: float) -> Array:
    """Separable Gaussian blur of an NHWC batch per channel (edge-replicated borders).

    The kernel radius is ceil(3 sigma), capped so that it fits the image.
    """
    if sigma <= 0:
        return x
    h, w = x.shape[1:3]
    radius = int(min(max(1, -(-3 * sigma // 1)), max(h, w) - 1))
    t = jnp.arange(-radius, radius + 1, dtype=x.dtype)
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[-1]
    dn = ("NHWC", "HWIO", "NHWC")
    xp = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    kh = jnp.tile(k.reshape(-1, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(k.reshape(1, -1, 1, 1), (1, 1, 1, c))
    y = jax.lax.conv_general_dilated(xp, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
    return jax.lax.conv_general_dilated(y, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)


def make_baseline(
    x: Array,
    baseline: Any,
    key: Array | None,
    *,
    mean: Any = None,
    blur_sigma: float = 5.0,
    noise_range: tuple[float, float] = (0.0, 1.0),
) -> Array:
    """The reference input x' of each example (same shape as x).

    - "zero": all zeros.
    - "black": the darkest value of each image (its minimum over pixels and channels); equals
      "zero" for [0, 1] images that contain a black pixel, and stays black for standardized inputs.
    - "mean": the dataset mean when given as `mean` (a scalar or one value per channel, e.g.
      `Dataset.meta["channel_mean"]`); otherwise the per-channel mean of each image itself
      (a batch-independent stand-in, so results do not depend on the batch composition).
    - "blur": the image blurred by a Gaussian of std `blur_sigma` pixels (Sturmfels et al. 2020).
    - "uniform": uniform noise in `noise_range`, drawn from each example's key.
    - a number: that constant everywhere.
    """
    if isinstance(baseline, int | float):
        return jnp.full_like(x, baseline)
    if baseline == "zero":
        return jnp.zeros_like(x)
    if baseline == "black":
        lo = jnp.min(x.reshape(x.shape[0], -1), axis=1)
        return jnp.broadcast_to(lo.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape).astype(x.dtype)
    if baseline == "mean":
        if mean is not None:
            return jnp.broadcast_to(jnp.asarray(mean, x.dtype), x.shape)
        axes = tuple(range(1, x.ndim - 1)) if x.ndim > 2 else (1,)
        return jnp.broadcast_to(jnp.mean(x, axis=axes, keepdims=True), x.shape)
    if baseline == "blur":
        if x.ndim != 4:
            raise AttraxError(f"baseline 'blur' needs NHWC images, got shape {x.shape}")
        return gaussian_blur(x, blur_sigma)
    if baseline == "uniform":
        if key is None:
            raise AttraxError("baseline 'uniform' needs a key")
        lo, hi = noise_range
        return jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, lo, hi))(key)
    raise AttraxError(f"unknown baseline {baseline!r}: use one of {', '.join(BASELINES)} or a number")


def path_gradients(model, params, x, base, target, alphas, score: str) -> Array:
    """Gradients at x' + a_k (x - x') for every alpha and example: (m, n, ...) from ONE backward
    pass of the summed scores of all m x n path points.

    Deliberately not split into a `lax.map` over blocks of steps: on CPU that was 1.7x slower
    (14 vs 24 img/s, IG 50 steps, cnn_a, batch 100); memory is bounded by the harness's chunks.
    """
    a = alphas.reshape((-1,) + (1,) * x.ndim)
    path = base[None] + a * (x - base)[None]  # (m, n, ...)
    m, n = path.shape[:2]
    flat = path.reshape((m * n,) + x.shape[1:])
    _, g = input_gradient(_logits(model, params, flat), flat, jnp.tile(target, m), score)
    return g.reshape(path.shape)


@METHODS.register(
    "integrated_gradients",
    family="gradient",
    needs="apply",
    stochastic=False,
    cost=lambda hp: hp.get("steps", 50),
)
def integrated_gradients(
    model,
    params,
    x,
    target,
    *,
    key=None,
    steps: int = 50,
    rule: str = "right",
    baseline: Any = "zero",
    score: str = "logit",
    mean: Any = None,
    blur_sigma: float = 5.0,
) -> Array:
    """Integrated gradients (Sundararajan et al. 2017): (x-x') sum_k w_k grad f(x' + a_k (x-x')).

    Defaults: 50 steps, right Riemann sum (alphas k/m, k = 1..m, as in the paper); `rule`:
    left | right | midpoint | trapezoid | gausslegendre (Captum's default), each with exactly
    `steps` gradient evaluations per image (see `riemann`),
    zero baseline, target logit. `baseline`: zero | black | mean | blur | uniform | a number (see
    `make_baseline`; "mean" uses `mean` = the dataset's channel mean when given, else each image's
    own channel mean; "uniform" draws U(0, 1) noise from the per-example key). All `steps`
    interpolation points of the batch go through one backward pass.
    """
    base = make_baseline(x, baseline, key, mean=mean, blur_sigma=blur_sigma)
    alphas, weights = riemann(steps, rule)
    g = path_gradients(model, params, x, base, target, alphas, score)
    return (x - base) * jnp.tensordot(weights, g, axes=1)
