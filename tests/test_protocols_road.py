"""ROAD: the imputation's known answers (constant image, dense solve) and the linear-model order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.protocols.road import NEIGHBOUR_WEIGHTS, impute


def dense_imputation(x: np.ndarray, removed: np.ndarray, eps: float) -> np.ndarray:
    """The same system built as a dense matrix over the removed pixels and solved directly."""
    h, w = removed.shape
    idx = {p: i for i, p in enumerate(zip(*np.nonzero(removed), strict=True))}
    a = np.zeros((len(idx), len(idx)))
    b = np.zeros(len(idx))
    for (i, j), row in idx.items():
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                wt = NEIGHBOUR_WEIGHTS[di + 1, dj + 1]
                ii, jj = i + di, j + dj
                if wt == 0 or not (0 <= ii < h and 0 <= jj < w):
                    continue
                a[row, row] += wt
                if removed[ii, jj]:
                    a[row, idx[(ii, jj)]] -= wt
                else:
                    b[row] += wt * x[ii, jj]
        a[row, row] += eps
    v = np.linalg.solve(a, b)
    out = x.copy()
    for (i, j), row in idx.items():
        out[i, j] = v[row]
    return out


def test_imputation_matches_dense_solve_on_tiny_image():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 5, 6)).astype(np.float32)
    removed = rng.uniform(size=(2, 5, 6)) < 0.6
    removed[1, 2:5, 1:4] = True  # a hole with no known pixel inside
    got = np.asarray(impute(jnp.asarray(x)[..., None], jnp.asarray(removed), tol=1e-7))[..., 0]
    for k in range(2):
        np.testing.assert_allclose(got[k], dense_imputation(x[k], removed[k], 1e-6), atol=1e-4)
    assert np.array_equal(got[~removed], x[~removed])  # known pixels untouched


def test_imputation_of_constant_image_is_the_constant():
    x = jnp.full((1, 7, 7, 2), 0.37)
    removed = jax.random.uniform(jax.random.key(0), (1, 7, 7)) < 0.8
    np.testing.assert_allclose(np.asarray(impute(x, removed)), 0.37, atol=1e-5)


def test_road_true_relevance_beats_random_and_inverse_loses(linear):
    model, params, x, target, w = linear
    r = (x.reshape(4, -1) * w[:, target].T).reshape(x.shape)
    kw = dict(key=0, score="logit", noise_std=0.0)
    good = attrax.evaluate("road", model, params, x, target, r, **kw)
    bad = attrax.evaluate("road", model, params, x, target, -r, **kw)
    assert good.mean()["aopc_vs_random"] > 0 > bad.mean()["aopc_vs_random"]
    assert good.values["curve"].shape == (4, 10) and good.x["curve"][-1] == 0.9
    assert good.choices["noise_std"] == 0.0 and good.choices["order"] == "morf"


def test_road_scores_accuracy_by_default_and_probability_on_request(linear):
    # the paper reports accuracy: per image 1 while the prediction is still the target, else 0
    model, params, x, target, w = linear
    r = (x.reshape(4, -1) * w[:, target].T).reshape(x.shape)
    acc = attrax.evaluate("road", model, params, x, target, r, key=0, noise_std=0.0)
    assert acc.choices["score"] == "accuracy"
    c = np.asarray(acc.values["curve"])
    assert set(np.unique(c)) <= {0.0, 1.0}
    logits = model(params, x)
    np.testing.assert_array_equal(c[:, 0], np.asarray(jnp.argmax(logits, -1) == target, np.float32))
    prob = attrax.evaluate("road", model, params, x, target, r, key=0, noise_std=0.0, score="probability")
    p = np.asarray(prob.values["curve"])
    np.testing.assert_allclose(p[:, 0], jax.nn.softmax(logits)[jnp.arange(4), target], rtol=1e-5)
    assert prob.choices["score"] == "probability"
    with pytest.raises(attrax.AttraxError, match="road score"):
        attrax.evaluate("road", model, params, x, target, r, key=0, score="nope")
