"""Faithfulness correlation, infidelity and monotonicity on a linear model (closed forms)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import attrax


def contribution(x, w, target):
    return (x.reshape(x.shape[0], -1) * w[:, target].T).reshape(x.shape)


def test_faithfulness_correlation_is_one_for_the_true_contribution(linear):
    model, params, x, target, w = linear
    r = contribution(x, w, target)
    kw = dict(key=0, n_runs=30, subset_size=6)
    good = attrax.evaluate("faithfulness_correlation", model, params, x, target, r, **kw)
    bad = attrax.evaluate("faithfulness_correlation", model, params, x, target, -r, **kw)
    noise = attrax.evaluate(
        "faithfulness_correlation",
        model,
        params,
        x,
        target,
        jax.random.normal(jax.random.key(5), x.shape),
        **kw,
    )
    np.testing.assert_allclose(np.asarray(good.values["faithfulness_correlation"]), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(bad.values["faithfulness_correlation"]), -1.0, atol=1e-4)
    assert abs(noise.mean()["faithfulness_correlation"]) < 0.5
    assert good.choices["n_runs"] == 30 and good.choices["replacement"] == "zero"


def test_infidelity_is_zero_for_the_gradient_of_a_linear_model(linear):
    model, params, x, target, w = linear
    g = attrax.explain("gradient", model, params, x, target)
    zero = attrax.evaluate("infidelity", model, params, x, target, g, key=0)
    other = attrax.evaluate(
        "infidelity", model, params, x, target, contribution(x, w, target), key=0
    )
    assert float(zero.values["infidelity"].max()) < 1e-8
    assert float(other.values["infidelity"].min()) > 1e-4
    # normalize: any positive rescaling of the exact explanation is still exact
    scaled = attrax.evaluate("infidelity", model, params, x, target, 3.0 * g, key=0, normalize=True)
    assert float(scaled.values["infidelity"].max()) < 1e-8


def test_monotonicity(linear):
    model, params, x, target, w = linear
    r = contribution(x, w, target)
    kw = dict(key=0, steps=36, score="logit")
    good = attrax.evaluate("monotonicity", model, params, x, target, r, **kw)
    bad = attrax.evaluate("monotonicity", model, params, x, target, -r, **kw)
    # one pixel per step: each marginal effect is exactly its relevance -> Spearman 1 / -1
    np.testing.assert_allclose(np.asarray(good.values["correlation"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bad.values["correlation"]), -1.0, atol=1e-5)
    # positive weights and inputs: every insertion raises the logit, in any order
    pos = attrax.as_model(lambda p, xx: xx.reshape(xx.shape[0], -1) @ jnp.abs(p))
    s = attrax.evaluate("monotonicity", pos, w, x, target, -r, **kw)
    assert s.values["monotonic"].tolist() == [1.0] * 4
    assert bad.values["monotonic"].tolist() == [0.0] * 4  # mixed signs: the logit goes down too


def test_random_subsets_have_the_exact_size_and_are_uniform():
    from attrax.protocols.faithfulness import random_subsets

    m = np.asarray(random_subsets(jax.random.key(0), 2000, 20, 5))
    assert np.all(m.sum(1) == 5)
    np.testing.assert_allclose(m.mean(0), 0.25, atol=0.04)  # every feature equally likely


def test_zero_map_does_not_beat_real_methods_on_default_infidelity(tiny_cnn, batch):
    # unnormalized, occlusion's maps (logit drops of whole windows) lose to the all-zero map;
    # Yeh et al.'s optimal beta makes infidelity judge the shape of the map, not its scale
    model, params = tiny_cnn
    x, y = batch
    zero = attrax.evaluate("infidelity", model, params, x, y, jnp.zeros_like(x), key=0)
    assert zero.choices["normalize"] is True
    z = np.asarray(zero.values["infidelity"])
    for name in ("gradient", "occlusion"):
        r = attrax.explain(name, model, params, x, y)
        s = attrax.evaluate("infidelity", model, params, x, y, r, key=0)
        v = np.asarray(s.values["infidelity"])
        assert (v <= z + 1e-6).all() and v.mean() < z.mean(), name  # beta = 0 is a candidate
    occ = attrax.explain("occlusion", model, params, x, y)
    raw = attrax.evaluate("infidelity", model, params, x, y, occ, key=0, normalize=False)
    assert raw.mean()["infidelity"] > z.mean()  # why the default matters
