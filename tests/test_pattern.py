"""PatternNet / PatternAttribution: the distractor example, closed-form estimators, the cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import attrax
from attrax.methods import pattern as pattern_mod


class Linear2(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(1, use_bias=False, name="w")(x)


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(4, name="hidden")(x.reshape((x.shape[0], -1))))
        return nn.Dense(3, name="out")(h)


class ConvHead(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Conv(3, (3, 3), name="conv")(x))
        return nn.Dense(2, name="out")(h.reshape((h.shape[0], -1)))


def _cos(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_distractor_example_recovers_signal_direction():
    """Kindermans et al. 2018: x = a_s y + d eps, w orthogonal to d; the gradient is w, the
    signal direction is a_s."""
    rng = np.random.default_rng(0)
    a_s, d = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    y, eps = rng.normal(size=2000), rng.normal(size=2000)
    y, eps = y - y.mean(), eps - eps.mean()
    eps = eps - (eps @ y) / (y @ y) * y  # sample-exact: the distractor is uncorrelated with the signal
    x_train = (y[:, None] * a_s + eps[:, None] * d).astype(np.float32)
    params = {"params": {"w": {"kernel": jnp.array([[1.0], [-1.0]])}}}  # w.a_s = 1, w.d = 0
    model = attrax.as_model(Linear2())
    pats = pattern_mod.fit_patterns(model, params, x_train, estimator="linear", batch_size=512, cache=False)
    np.testing.assert_allclose(pats["w"][:, 0], a_s, atol=1e-5)
    x = jnp.asarray(x_train[:5])
    t = jnp.zeros(5, jnp.int32)
    yv = np.asarray(model(params, x))[:, 0]
    net = np.asarray(attrax.explain("pattern_net", model, params, x, t, patterns=pats))
    att = np.asarray(attrax.explain("pattern_attribution", model, params, x, t, patterns=pats))
    grad = np.asarray(attrax.explain("gradient", model, params, x, t))
    np.testing.assert_allclose(net, yv[:, None] * a_s, atol=1e-5)  # the signal a_s y
    for i in range(5):
        assert abs(_cos(net[i], a_s)) > 0.999
        assert abs(_cos(grad[i], a_s)) < 0.8  # the gradient points along w, not a_s
    w = np.array([1.0, -1.0])
    np.testing.assert_allclose(att, yv[:, None] * (w * a_s), atol=1e-5)
    np.testing.assert_allclose(att.sum(1), yv, atol=1e-5)  # w.a = 1: relevance conservation


def _np_pattern(a, y, w, relu):
    """Closed-form pattern for inputs a (N, J), outputs y (N, K), weights w (J, K)."""
    a, y, w = (np.asarray(v, np.float64) for v in (a, y, w))
    m = (y > 0).astype(float) if relu else np.ones_like(y)
    cnt = m.sum(0)
    ex = (a.T @ m) / cnt
    ey = (m * y).sum(0) / cnt
    exy = (a.T @ (m * y)) / cnt
    cov = exy - ex * ey
    return cov / (w * cov).sum(0)


def test_dense_patterns_match_closed_form(estimator="relu"):
    """S_a+ on the hidden layer; the last layer (logits) always uses the linear S_a."""
    model = attrax.as_model(TwoLayer())
    x = jnp.asarray(np.random.default_rng(1).normal(size=(50, 2, 3, 1)), jnp.float32)
    params = jax.jit(model.module.init)(jax.random.key(0), x[:1])
    pats = pattern_mod.fit_patterns(model, params, np.asarray(x), estimator=estimator, batch_size=16, cache=False)
    p = params["params"]
    a0 = np.asarray(x).reshape(50, -1)
    h = a0 @ np.asarray(p["hidden"]["kernel"]) + np.asarray(p["hidden"]["bias"])
    np.testing.assert_allclose(pats["hidden"], _np_pattern(a0, h, p["hidden"]["kernel"], estimator == "relu"),
                               rtol=1e-3, atol=1e-5)
    a1 = np.maximum(h, 0)
    out = a1 @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"])
    np.testing.assert_allclose(pats["out"], _np_pattern(a1, out, p["out"]["kernel"], False), rtol=1e-3, atol=1e-5)


def test_conv_patterns_match_closed_form():
    model = attrax.as_model(ConvHead())
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 4, 4, 2)), jnp.float32)
    params = jax.jit(model.module.init)(jax.random.key(1), x[:1])
    pats = pattern_mod.fit_patterns(model, params, np.asarray(x), batch_size=4, cache=False)
    k = np.asarray(params["params"]["conv"]["kernel"])
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([xp[:, i:i + 4, j:j + 4] for i in range(3) for j in range(3)], axis=3)  # (6,4,4,9,2)
    patches = patches.reshape(-1, 18)
    y = patches @ k.reshape(18, 3) + np.asarray(params["params"]["conv"]["bias"])
    want = _np_pattern(patches, y, k.reshape(18, 3), True).reshape(k.shape)
    np.testing.assert_allclose(pats["conv"], want, rtol=1e-3, atol=1e-5)


def test_patterns_are_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTRAX_CACHE", str(tmp_path))
    model = attrax.as_model(TwoLayer())
    x = np.random.default_rng(3).normal(size=(20, 2, 3, 1)).astype(np.float32)
    params = jax.jit(model.module.init)(jax.random.key(0), x[:1])
    first = pattern_mod.fit_patterns(model, params, x, batch_size=8)
    assert list((tmp_path / "models").glob("patterns-*.msgpack"))

    def fail(*a, **k):
        raise AssertionError("statistics recomputed despite a cache hit")

    monkeypatch.setattr(pattern_mod, "_statistics", fail)
    again = pattern_mod.fit_patterns(model, params, x, batch_size=8)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])


def test_pattern_methods_on_zoo_model_and_naive_default():
    model = attrax.models.create("cnn_a", channels=(4, 6), dense=(12,))
    x = jnp.asarray(np.random.default_rng(4).uniform(size=(20, 12, 12, 1)), jnp.float32)
    params = jax.jit(model.module.init)(jax.random.key(0), x[:1])
    pats = pattern_mod.fit_patterns(model, params, np.asarray(x), batch_size=8, cache=False)
    r = attrax.explain("pattern_attribution", model, params, x[:3], jnp.arange(3), patterns=pats)
    assert r.shape == (3, 12, 12, 1) and bool(jnp.isfinite(r).all()) and float(jnp.abs(r).max()) > 0
    # without patterns: the naive estimator a = w / |w|^2 (on a linear model: w y / |w|^2)
    lin = attrax.as_model(Linear2())
    params = {"params": {"w": {"kernel": jnp.array([[2.0], [1.0]])}}}
    xs = jnp.array([[1.0, 3.0]])
    r = attrax.explain("pattern_net", lin, params, xs, jnp.zeros(1, jnp.int32))
    np.testing.assert_allclose(r, np.array([[2.0, 1.0]]) * 5.0 / 5.0, rtol=1e-6)
