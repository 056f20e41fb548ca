"""Sparseness, complexity and random-logit: closed forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import attrax


def test_sparseness_and_complexity_extremes(linear):
    model, params, x, target, _ = linear
    onehot = jnp.zeros_like(x).at[:, 2, 3, 0].set(-5.0)
    const = jnp.full_like(x, 0.3)
    d = 36

    def sp(r):
        return np.asarray(
            attrax.evaluate("sparseness", model, params, x, target, r).values["sparseness"]
        )

    def cx(r):
        return np.asarray(
            attrax.evaluate("complexity", model, params, x, target, r).values["complexity"]
        )

    np.testing.assert_allclose(sp(onehot), (d - 1) / d, atol=1e-6)
    np.testing.assert_allclose(sp(const), 0.0, atol=1e-6)
    np.testing.assert_allclose(cx(onehot), 0.0, atol=1e-6)
    np.testing.assert_allclose(cx(const), np.log(d), atol=1e-5)
    noise = jax.random.uniform(jax.random.key(0), x.shape)
    assert np.all((sp(noise) > 0) & (sp(noise) < sp(onehot)))
    assert np.all(sp(jnp.zeros_like(x)) == 0) and np.all(cx(jnp.zeros_like(x)) == 0)


def test_random_logit_similarity(linear):
    model, params, x, target, w = linear
    g = attrax.explain("gradient", model, params, x, target)
    s = attrax.evaluate("random_logit", model, params, x, target, g, key=0, method="gradient", similarity="pearson")
    # the other class is recorded through the seeded draw: recompute it and the closed form
    from attrax.protocols.randomization import other_classes

    other = other_classes(jax.random.key(0), target, 3)
    assert np.all(np.asarray(other) != np.asarray(target))
    wn = np.asarray(w)
    expected = [
        np.corrcoef(wn[:, t], wn[:, o])[0, 1]
        for t, o in zip(np.asarray(target), np.asarray(other), strict=True)
    ]
    np.testing.assert_allclose(np.asarray(s.values["similarity"]), expected, atol=1e-5)

    def class_blind(model, params, x, target, *, key):
        return x

    blind = attrax.evaluate("random_logit", model, params, x, target, x, key=0, method=class_blind)
    np.testing.assert_allclose(np.asarray(blind.values["similarity"]), 1.0, atol=1e-6)
    assert blind.choices["similarity"] == "ssim"  # the default, as Quantus
    assert s.choices["num_classes"] == 3
