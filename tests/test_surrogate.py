"""LIME and KernelSHAP: exact recovery on linear models, exact Shapley values with all coalitions,
efficiency, seeding and batch independence."""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.methods.surrogate import feature_groups


def _uniform(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _patch_coefficients(w, x, target, patch):
    """Coefficient of patch feature f for a linear model: sum over its pixels of W[i, t] x_i."""
    seg, f = feature_groups(x.shape[1:], patch=patch)
    contrib = np.asarray(w)[:, np.asarray(target)].T * np.asarray(x).reshape(x.shape[0], -1)  # (n, D)
    flat = seg.reshape(-1)
    return np.stack([np.bincount(flat, weights=c, minlength=f) for c in contrib]), seg


def test_feature_groups_grid():
    seg, f = feature_groups((5, 6, 3), patch=2)
    assert f == 9 and seg.shape == (5, 6)
    assert seg[0, 0] == 0 and seg[0, 2] == 1 and seg[2, 0] == 3 and seg[4, 5] == 8
    with pytest.raises(attrax.AttraxError, match="grouping"):
        feature_groups((5, 6, 3), grouping="slic")


@pytest.mark.parametrize(
    "method,hp",
    [
        ("lime", {"ridge": 0.0, "n_samples": 64}),
        ("kernel_shap", {"n_samples": 32}),
        ("kernel_shap", {"coalitions": "all"}),
    ],
)
def test_recovers_linear_model_coefficients(linear, method, hp):
    model, params, x, target, w = linear
    coef, seg = _patch_coefficients(w, x, target, patch=3)
    r = attrax.explain(method, model, params, x, target, key=3, patch=3, **hp)
    assert r.shape == x.shape
    np.testing.assert_allclose(np.asarray(r[..., 0]), coef[:, seg], rtol=2e-3, atol=2e-4)


class Interactions(nn.Module):
    """A nonlinear function of the four 2x2 patch sums of a 4x4 image (two classes)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = x[..., 0].reshape(x.shape[0], 2, 2, 2, 2).sum(axis=(2, 4)).reshape(x.shape[0], 4)
        a, b, c, d = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
        out = a * b + jax.nn.relu(c - 1.0) + 0.3 * d + a * c * d
        return jnp.stack([out, -out], axis=-1)


def _brute_force_shapley(model, x, target):
    """Exact Shapley values of the 4 patch features, absent = 0, by the subset formula."""
    seg, f = feature_groups(x.shape[1:], patch=2)
    subsets = list(itertools.product([0, 1], repeat=f))
    masks = np.stack([np.asarray(s, np.float32)[seg] for s in subsets])  # (2^F, H, W)
    xs = np.asarray(x)[:, None] * masks[None, ..., None]
    v = np.asarray(model({}, jnp.asarray(xs.reshape((-1,) + x.shape[1:]))))
    v = v.reshape(x.shape[0], len(subsets), -1)[np.arange(x.shape[0]), :, np.asarray(target)]
    index = {s: i for i, s in enumerate(subsets)}
    phi = np.zeros((x.shape[0], f))
    for s in subsets:
        for j in range(f):
            if s[j]:
                continue
            with_j = tuple(1 if k == j else s[k] for k in range(f))
            size = sum(s)
            wgt = math.factorial(size) * math.factorial(f - size - 1) / math.factorial(f)
            phi[:, j] += wgt * (v[:, index[with_j]] - v[:, index[s]])
    return phi, seg


def test_kernel_shap_all_coalitions_gives_exact_shapley_values():
    model = attrax.as_model(Interactions())
    x = _uniform(0, (3, 4, 4, 1))
    target = jnp.array([0, 1, 0], jnp.int32)
    phi, seg = _brute_force_shapley(model, x, target)
    r = attrax.explain("kernel_shap", model, {}, x, target, patch=2, coalitions="all")
    np.testing.assert_allclose(np.asarray(r[..., 0]), phi[:, seg], rtol=1e-4, atol=1e-5)
    # efficiency: the sum of the feature values is f(x) - f(baseline)
    f_x = model({}, x)[jnp.arange(3), target]
    f_0 = model({}, jnp.zeros_like(x))[jnp.arange(3), target]
    np.testing.assert_allclose(phi.sum(-1), f_x - f_0, rtol=1e-5, atol=1e-5)


def test_sampled_kernel_shap_is_efficient_and_close_to_exact():
    model = attrax.as_model(Interactions())
    x = _uniform(1, (2, 4, 4, 1))
    target = jnp.zeros(2, jnp.int32)
    phi, seg = _brute_force_shapley(model, x, target)
    r = attrax.explain("kernel_shap", model, {}, x, target, key=0, patch=2, n_samples=400)
    est = np.asarray(r[:, ::2, ::2, 0]).reshape(2, 4)
    np.testing.assert_allclose(est.sum(-1), phi.sum(-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(est, phi, atol=0.1 * np.abs(phi).max())


def test_all_coalitions_refuses_many_features(linear):
    model, params, x, target, _ = linear
    with pytest.raises(attrax.AttraxError, match="at most 16 features"):
        attrax.explain("kernel_shap", model, params, x, target, patch=1, coalitions="all")


def test_lime_kernel_is_the_lime_packages():
    # lime weighs a sample by sqrt(exp(-d^2 / w^2)) = exp(-d^2 / (2 w^2)) of its cosine distance d
    from attrax.methods.surrogate import lime_weights

    f = 16
    on = jnp.array([16.0, 4.0, 0.0])  # d = 0, 1 - sqrt(1/4) = 0.5, 1 (all off)
    d = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(lime_weights(on, f, 0.25), np.exp(-(d**2) / (2 * 0.25**2)), rtol=1e-6)
    np.testing.assert_allclose(lime_weights(on, f, 0.25, "exp"), np.exp(-(d**2) / 0.25**2), rtol=1e-6)
    # end to end on a nonlinear model: the default kernel with width w is the "exp" one at w sqrt 2
    model = attrax.as_model(Interactions())
    x = 0.2 + 0.8 * _uniform(0, (2, 4, 4, 1))
    t = jnp.zeros(2, jnp.int32)
    hp = {"n_samples": 24, "patch": 2}
    a = attrax.explain("lime", model, {}, x, t, key=1, kernel_width=0.5, **hp)
    b = attrax.explain("lime", model, {}, x, t, key=1, kernel_width=0.5 * math.sqrt(2), kernel="exp", **hp)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    c = attrax.explain("lime", model, {}, x, t, key=1, kernel_width=0.5, kernel="exp", **hp)
    assert float(jnp.abs(a - c).max()) > 1e-4
