"""Surrogate-model attributions over interpretable features: LIME and KernelSHAP.

Both switch groups of pixels (features) on and off, evaluate the class score of every perturbed
image, and fit a weighted linear model of the score on the on/off pattern:

- Features: `feature_groups` splits the image into a grid of `patch` x `patch` squares (the last
  row/column may be smaller); both methods share it. Superpixel grouping is not implemented.
- A switched-off feature takes the `baseline` value: "zero" (default), "mean" (the image's
  per-channel mean) or a number.
- Sampling is seeded from the per-example keys, so a map does not depend on the batch.
- All samples of all images of a chunk go through the model in ONE batched forward; the weighted
  least-squares problems are solved together in JAX (pseudo-inverse of the normal equations).
- Relevance: the coefficient of a feature, written to every pixel and channel of its patch (so
  summing relevance over pixels multiplies it by the patch area x channels).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.methods._core import METHODS, class_score

Array = jax.Array
GROUPINGS = ("grid",)
MAX_EXACT_FEATURES = 16


def feature_groups(
    shape: tuple[int, ...], *, grouping: str = "grid", patch: int = 4
) -> tuple[np.ndarray, int]:
    """(segment ids (H, W) int32, number of features) for images of `shape` (H, W, C).

    `grouping="grid"`: row-major `patch` x `patch` squares.
    """
    if grouping not in GROUPINGS:
        raise AttraxError(
            f"unknown feature grouping {grouping!r}: use one of {', '.join(GROUPINGS)}"
        )
    if len(shape) != 3:
        raise AttraxError(
            f"surrogate methods need (H, W, C) images, got example shape {tuple(shape)}"
        )
    if patch < 1:
        raise AttraxError(f"patch must be a positive number of pixels, got {patch}")
    h, w = shape[:2]
    rows, cols = math.ceil(h / patch), math.ceil(w / patch)
    seg = (np.arange(h)[:, None] // patch) * cols + np.arange(w)[None, :] // patch
    return seg.astype(np.int32), rows * cols


def _fill(x: Array, baseline) -> Array:
    if baseline == "zero":
        return jnp.zeros_like(x)
    if baseline == "mean":
        return jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    if isinstance(baseline, int | float):
        return jnp.full_like(x, baseline)
    raise AttraxError(f"unknown baseline {baseline!r}: use zero, mean or a number")


def evaluate_coalitions(
    model, params, x, target, z: Array, seg: np.ndarray, baseline="zero", score="logit"
) -> Array:
    """Class scores (n, S) of the images with the features where z (n, S, F) is 0 switched off.

    All n S images go through the model in one batched call.
    """
    n, s = z.shape[:2]
    fill = _fill(x, baseline)
    m = z[:, :, jnp.asarray(seg)].astype(x.dtype)[..., None]  # (n, S, H, W, 1)
    xs = fill[:, None] + (x - fill)[:, None] * m
    logits = model(params, xs.reshape((n * s,) + x.shape[1:]))
    return class_score(logits, jnp.repeat(target, s), score).reshape(n, s)


def weighted_least_squares(
    z: Array, y: Array, weights: Array, ridge: float = 0.0, intercept: bool = True
) -> Array:
    """Batched min_b sum_s w_s (y_s - b0 - z_s . b)^2 + ridge |b|^2 (intercept unpenalized).

    z (n, S, F), y (n, S), weights (n, S) -> coefficients (n, F) (the intercept is dropped).
    """
    z = z.astype(jnp.float32)
    if intercept:
        z = jnp.concatenate([jnp.ones(z.shape[:2] + (1,), z.dtype), z], axis=-1)
    d = z.shape[-1]
    a = jnp.einsum("nsf,ns,nsg->nfg", z, weights, z)
    pen = jnp.full((d,), ridge, z.dtype)
    if intercept:
        pen = pen.at[0].set(0.0)
    a = a + jnp.eye(d) * pen[None, :, None]
    b = jnp.einsum("nsf,ns,ns->nf", z, weights, y)
    # pseudo-inverse of the symmetric normal matrix: the exact solution when it is well posed,
    # the minimum-norm one when fewer samples than features (or a constant feature) make it singular
    coef = jnp.einsum("nfg,ng->nf", jnp.linalg.pinv(a, hermitian=True), b)
    return coef[:, 1:] if intercept else coef


def _to_pixels(coef: Array, seg: np.ndarray, x: Array) -> Array:
    return jnp.broadcast_to(coef[:, jnp.asarray(seg)][..., None], x.shape).astype(x.dtype)


LIME_KERNELS = ("lime", "exp")


def lime_weights(on: Array, f: int, kernel_width: float, kernel: str = "lime") -> Array:
    """Sample weights of LIME from the number of features `on` of each binary pattern.

    d is the cosine distance between the pattern and the all-on pattern, 1 - sqrt(on / f) (1 for
    the all-off pattern). kernel "lime": exp(-d^2 / (2 w^2)), what the lime package computes (its
    kernel is the square root of exp(-d^2 / w^2)); kernel "exp": exp(-d^2 / w^2).
    """
    if kernel not in LIME_KERNELS:
        raise AttraxError(f"unknown lime kernel {kernel!r}: use one of {', '.join(LIME_KERNELS)}")
    d = 1.0 - jnp.sqrt(on / f)
    scale = 2.0 if kernel == "lime" else 1.0
    return jnp.exp(-(d**2) / (scale * kernel_width**2))


@METHODS.register(
    "lime",
    family="surrogate",
    needs="apply",
    stochastic=True,
    cost=lambda hp: hp.get("n_samples", 200),
)
def lime(
    model,
    params,
    x,
    target,
    *,
    key,
    n_samples: int = 200,
    patch: int = 4,
    grouping: str = "grid",
    baseline: str | float = "zero",
    kernel_width: float = 0.25,
    kernel: str = "lime",
    ridge: float = 0.01,
    score: str = "logit",
) -> Array:
    """LIME (Ribeiro et al. 2016) over patch features.

    Samples: the unperturbed image plus `n_samples - 1` patterns with every feature on with
    probability 1/2 (as the lime package's image explainer). Weights (`lime_weights`): the lime
    package's kernel exp(-d^2 / (2 kernel_width^2)) of the cosine distance d between the pattern
    and the all-on pattern (default, `kernel="lime"`; "exp": exp(-d^2 / kernel_width^2)), width
    0.25 as lime's image explainer. Surrogate: ridge regression with an unpenalized intercept
    (`ridge` 0.01; the lime package's default regressor uses 1.0). Defaults: 200 samples, 4x4
    patches, zero baseline, logit score.
    """
    seg, f = feature_groups(x.shape[1:], grouping=grouping, patch=patch)
    if n_samples < 2:
        raise AttraxError(f"lime needs n_samples >= 2, got {n_samples}")
    z = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (n_samples - 1, f)))(key)
    z = jnp.concatenate([jnp.ones((x.shape[0], 1, f), bool), z], axis=1).astype(jnp.float32)
    y = evaluate_coalitions(model, params, x, target, z, seg, baseline, score)
    weights = lime_weights(z.sum(-1), f, kernel_width, kernel)
    coef = weighted_least_squares(z, y, weights, ridge)
    return _to_pixels(coef, seg, x)


def shapley_kernel(f: int, size: Array) -> Array:
    """Shapley kernel weight (F - 1) / (C(F, s) s (F - s)) of a coalition of `size` s, 0 < s < F."""
    s = size.astype(jnp.float32)
    log_binom = (
        jax.scipy.special.gammaln(f + 1.0)
        - jax.scipy.special.gammaln(s + 1)
        - jax.scipy.special.gammaln(f - s + 1)
    )
    return (f - 1) / (jnp.exp(log_binom) * s * (f - s))


def all_coalitions(f: int) -> np.ndarray:
    """Every coalition except the empty and the full one, (2^F - 2, F) float32."""
    if f > MAX_EXACT_FEATURES:
        raise AttraxError(
            f"kernel_shap with all coalitions needs at most {MAX_EXACT_FEATURES} features, "
            f"got {f}: "
            "use a larger patch or coalitions='sample'"
        )
    z = np.array(list(itertools.product([0.0, 1.0], repeat=f)), np.float32)
    return z[1:-1]


def _sample_coalitions(key: Array, n_samples: int, f: int) -> Array:
    """Paired samples: half drawn from the Shapley kernel over sizes 1..F-1 (then a uniform
    subset of that size), the other half their complements. Kernel weights are then all equal."""
    half = max(1, n_samples // 2)
    sizes = jnp.arange(1, f)
    p = (f - 1) / (sizes * (f - sizes)).astype(jnp.float32)
    k1, k2 = jax.random.split(key)
    s = jax.random.choice(k1, sizes, (half,), p=p / p.sum())
    u = jax.random.uniform(k2, (half, f))
    kth = jnp.take_along_axis(jnp.sort(u, axis=-1), (s - 1)[:, None], axis=-1)
    z = (u <= kth).astype(jnp.float32)  # a uniformly random subset of size s
    return jnp.concatenate([z, 1.0 - z], axis=0)


@METHODS.register(
    "kernel_shap",
    family="surrogate",
    needs="apply",
    stochastic=True,
    cost=lambda hp: (
        hp.get("n_samples", 200) + 2 if hp.get("coalitions", "sample") == "sample" else 4096
    ),
)
def kernel_shap(
    model,
    params,
    x,
    target,
    *,
    key,
    n_samples: int = 200,
    patch: int = 4,
    grouping: str = "grid",
    baseline: str | float = "zero",
    coalitions: str = "sample",
    ridge: float = 0.0,
    score: str = "logit",
) -> Array:
    """KernelSHAP (Lundberg & Lee 2017) over patch features: Shapley values of the class score,
    a feature's absence being the `baseline` value.

    Weighted least squares with the Shapley kernel under the exact constraints phi_0 = f(empty)
    and sum phi = f(x) - f(empty) (one coefficient eliminated), so efficiency holds exactly.
    `coalitions="all"`: every coalition (at most 16 features) -> the exact Shapley values;
    `"sample"` (default): `n_samples` paired coalitions drawn from the kernel (equal weights).
    Defaults: 200 samples, 4x4 patches, zero baseline, logit score, no ridge.
    """
    seg, f = feature_groups(x.shape[1:], grouping=grouping, patch=patch)
    n = x.shape[0]
    if coalitions == "all":
        zc = jnp.asarray(all_coalitions(f))
        z = jnp.broadcast_to(zc, (n,) + zc.shape)
        weights = jnp.broadcast_to(shapley_kernel(f, zc.sum(-1)), z.shape[:2])
    elif coalitions == "sample":
        if f < 2:
            z = jnp.zeros((n, 0, f))
        else:
            z = jax.vmap(lambda k: _sample_coalitions(k, n_samples, f))(key)
        weights = jnp.ones(z.shape[:2])
    else:
        raise AttraxError(f"unknown coalitions {coalitions!r}: use sample or all")
    ends = jnp.broadcast_to(jnp.stack([jnp.zeros(f), jnp.ones(f)]), (n, 2, f))
    y = evaluate_coalitions(
        model, params, x, target, jnp.concatenate([ends, z], axis=1), seg, baseline, score
    )
    v0, v1, y = y[:, 0], y[:, 1], y[:, 2:]
    delta = v1 - v0
    if f == 1:
        return _to_pixels(delta[:, None], seg, x)
    # eliminate the last feature: phi_F = delta - sum_{j<F} phi_j
    lhs = z[..., :-1] - z[..., -1:]
    rhs = y - v0[:, None] - z[..., -1] * delta[:, None]
    phi = weighted_least_squares(lhs, rhs, weights, ridge, intercept=False)
    phi = jnp.concatenate([phi, (delta - phi.sum(-1))[:, None]], axis=-1)
    return _to_pixels(phi, seg, x)
