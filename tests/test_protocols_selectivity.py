"""Selectivity (Montavon 2018): iterative re-explanation and the one-shot variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.protocols.selectivity import _remove_best


@pytest.fixture(scope="module")
def linear12():
    """A linear model on 12x12 images (room for several non-overlapping 4x4 windows)."""
    w = jax.random.normal(jax.random.key(0), (144, 3))

    def apply_fn(p, x):
        return x.reshape(x.shape[0], -1) @ p["w"]

    x = jax.random.uniform(jax.random.key(1), (6, 12, 12, 1), minval=0.1, maxval=1.0)
    target = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    return attrax.as_model(apply_fn), {"w": w}, x, target


def contribution(model, params, x, target, *, key):
    """The exact linear contribution w_c * x of the current image (a method-contract function)."""
    return (x.reshape(x.shape[0], -1) * params["w"][:, target].T).reshape(x.shape)


def negated(model, params, x, target, *, key):
    return -contribution(model, params, x, target, key=key)


def noise(model, params, x, target, *, key):
    return jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:]))(key)


def test_iterative_true_relevance_is_most_selective(linear12):
    model, params, x, target = linear12
    aucs = {}
    for fn in (contribution, noise, negated):
        r0 = fn(model, params, x, target, key=attrax.methods.per_example_keys(0, 6))
        s = attrax.evaluate("selectivity", model, params, x, target, r0, key=0, method=fn, steps=5)
        aucs[fn.__name__] = s.mean()["auc"]
        assert s.values["curve"].shape == (6, 6) and s.choices["method"] == fn.__name__
    assert aucs["contribution"] < aucs["noise"] < aucs["negated"]


def test_windows_do_not_overlap_and_are_zeroed(linear12):
    model, params, x, target = linear12
    r = contribution(model, params, x, target, key=None)
    s = attrax.evaluate("selectivity_oneshot", model, params, x, target, r, key=0, steps=3)
    removed = jnp.zeros(x.shape[:3], bool)
    cur = x
    for _ in range(3):
        cur, removed = _remove_best(cur, removed, r[..., 0], jnp.zeros((4,)))
    # three disjoint 4x4 windows: 48 removed pixels, all zero, and f drops by their contribution.
    assert np.all(np.asarray(removed.sum(axis=(1, 2))) == 48)
    assert np.all(np.asarray((cur == 0).sum(axis=(1, 2, 3))) == 48)
    total = (r[..., 0] * removed).sum(axis=(1, 2))
    drop = s.values["curve"][:, 0] - s.values["curve"][:, -1]
    np.testing.assert_allclose(np.asarray(drop), np.asarray(total), rtol=1e-4)
    # the first removal is the best window: the drop equals its summed contribution.
    sums = jax.lax.reduce_window(r[..., 0], 0.0, jax.lax.add, (1, 4, 4), (1, 1, 1), "VALID")
    first_drop = s.values["curve"][:, 0] - s.values["curve"][:, 1]
    np.testing.assert_allclose(np.asarray(first_drop), np.asarray(sums.max(axis=(1, 2))), rtol=1e-4)


def test_iterative_with_a_registered_method_and_missing_method(linear12):
    model, params, x, target = linear12
    g = attrax.explain("gradient", model, params, x, target)
    it = attrax.evaluate(
        "selectivity", model, params, x, target, g, key=0, method="gradient", steps=3
    )
    one = attrax.evaluate("selectivity_oneshot", model, params, x, target, g, key=0, steps=3)
    # a linear model's gradient does not depend on the input: both variants coincide.
    np.testing.assert_allclose(
        np.asarray(it.values["curve"]), np.asarray(one.values["curve"]), atol=1e-5
    )
    with pytest.raises(attrax.AttraxError, match="method"):
        attrax.evaluate("selectivity", model, params, x, target, g, key=0)
