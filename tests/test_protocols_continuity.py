"""Continuity: the max(x1, x2) toy network contrast, the translation experiment, sensitivities."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.protocols.continuity import path_continuity, translate

HIDDEN = jnp.array([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]])  # columns: (1,-1), (-1,1), (1,1)


def max_net(params, x):
    """f = max(x1, x2) as a ReLU net (Montavon 2018, fig. 6).

    f = 1/2 (relu(x1 - x2) + relu(x2 - x1) + relu(x1 + x2)).
    """
    v = x.reshape(x.shape[0], 2)
    f = 0.5 * jax.nn.relu(v @ HIDDEN).sum(-1)
    return jnp.stack([f, -f], axis=-1)


def deep_taylor(model, params, x, target, *, key):
    """The closed-form deep Taylor (z+) map of the toy net (METHODS.md testable properties)."""
    v = x.reshape(x.shape[0], 2)
    x1, x2 = v[:, 0], v[:, 1]
    r = jnp.where(
        (x1 > x2)[:, None],
        jnp.stack([(2 * x1 - x2) / 2, x2 / 2], -1),
        jnp.stack([x1 / 2, (2 * x2 - x1) / 2], -1),
    )
    return r.reshape(x.shape)


def crossing_path(k: int):
    t = jnp.linspace(-0.1, 0.1, k)
    return jnp.stack([0.5 + t, 0.5 - t], -1).reshape(1, k, 1, 2, 1)


def test_toy_network_gradient_jumps_deep_taylor_is_continuous():
    model = attrax.as_model(max_net)
    target = jnp.zeros((1,), jnp.int32)
    ratios = {}
    for k in (21, 81):
        path = crossing_path(k)
        g, _ = path_continuity(model, {}, path, target, key=0, method="gradient")
        dt, _ = path_continuity(model, {}, path, target, key=0, method=deep_taylor)
        ratios[k] = float(g[0]), float(dt[0])
    # deep Taylor: bounded (its map is Lipschitz along the path); gradient: a jump, so the ratio
    # grows as the path gets finer.
    assert ratios[21][1] < 2.0 and ratios[81][1] < 2.0
    assert ratios[21][0] > 20 * ratios[21][1]
    assert ratios[81][0] > 3 * ratios[21][0]


def test_translation_experiment_on_a_half_image_max_network():
    """x1 = left half sum, x2 = right half sum: moving a blob across the middle flips the gradient
    from the left to the right half (a jump), while R = x / 2 changes only with the input."""

    def half_max(params, x):
        w = x.shape[2] // 2
        halves = jnp.stack([x[:, :, :w].sum((1, 2, 3)), x[:, :, w:].sum((1, 2, 3))], -1)
        return max_net(params, halves)

    def half_input(model, params, x, target, *, key):
        return x / 2

    x = jnp.zeros((1, 8, 12, 1)).at[0, 3:5, 4:7].set(1.0)
    target = jnp.zeros((1,), jnp.int32)
    model = attrax.as_model(half_max)
    g = attrax.evaluate("continuity", model, {}, x, target, x, key=0, method="gradient", max_shift=4)
    s = attrax.evaluate("continuity", model, {}, x, target, x, key=0, method=half_input, max_shift=4)
    assert g.values["score"].shape == (1, 9) and list(g.x["score"]) == list(range(-4, 5))
    # f = the larger half sum: 6 while the blob sits in one half, 4 when split 4 / 2
    np.testing.assert_allclose(np.asarray(g.values["score"][0]), [6, 6, 6, 6, 4, 4, 6, 6, 6])
    assert float(g.values["max_ratio"][0]) > 5 * float(s.values["max_ratio"][0])
    # the gradient's relevance sits in the left quadrants at -4 and in the right ones at +4
    assert float(g.values["quadrant_top_left"][0, 0]) > 0 and float(g.values["quadrant_top_right"][0, 0]) == 0
    assert float(g.values["quadrant_top_right"][0, -1]) > 0


def test_translate_shifts_right_with_zero_fill():
    x = jnp.arange(5.0).reshape(1, 1, 5, 1)
    out = translate(x, np.array([-1, 0, 2]))[0, :, 0, :, 0]
    np.testing.assert_array_equal(np.asarray(out), [[1, 2, 3, 4, 0], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])


def test_sensitivities_on_linear_model(linear):
    model, params, x, target, w = linear
    g = attrax.explain("gradient", model, params, x, target)
    s = attrax.evaluate("max_sensitivity", model, params, x, target, g, key=0, method="gradient")
    np.testing.assert_allclose(np.asarray(s.values["max_sensitivity"]), 0.0, atol=1e-6)

    def input_x_grad(model, params, x, target, *, key):
        return x * attrax.methods.get("gradient").fn(model, params, x, target, key=key)

    ixg = x * g
    mx = attrax.evaluate("max_sensitivity", model, params, x, target, ixg, key=0, method=input_x_grad, radius=0.05)
    av = attrax.evaluate("avg_sensitivity", model, params, x, target, ixg, key=0, method=input_x_grad, radius=0.05)
    bound = (
        0.05
        * np.linalg.norm(np.asarray(g).reshape(4, -1), axis=1)
        / np.linalg.norm(np.asarray(ixg).reshape(4, -1), axis=1)
    )
    m, a = np.asarray(mx.values["max_sensitivity"]), np.asarray(av.values["avg_sensitivity"])
    assert np.all(m > 0) and np.all(m <= bound + 1e-6) and np.all(a <= m + 1e-7)
    assert mx.choices["radius"] == 0.05 and mx.choices["n_samples"] == 20


class ToyMax(nn.Module):
    """The same toy network as Flax layers (bias-free), so layer-rule methods can run on it."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(3, use_bias=False, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(2, use_bias=False, name="out")(h)


def test_registered_z_plus_rule_is_continuous_on_the_toy_network():
    """Deep Taylor with the z+ rule (registered as lrp_zplus) gives the closed form and no jump."""
    if "lrp_zplus" not in attrax.methods.names():
        pytest.skip("lrp_zplus is not registered")
    params = {"params": {"hidden": {"kernel": HIDDEN}, "out": {"kernel": jnp.array([[0.5, -0.5]] * 3)}}}
    model, target = attrax.as_model(ToyMax()), jnp.zeros((1,), jnp.int32)
    path = crossing_path(21)
    z, _ = path_continuity(model, params, path, target, key=0, method="lrp_zplus")
    g, _ = path_continuity(model, params, path, target, key=0, method="gradient")
    assert float(z[0]) < 2.0 and float(g[0]) > 20 * float(z[0])
    pts = path[0, [2, 18]]
    r = attrax.explain("lrp_zplus", model, params, pts, jnp.zeros((2,), jnp.int32))
    expected = deep_taylor(None, None, pts, None, key=None)
    np.testing.assert_allclose(np.asarray(r), np.asarray(expected), atol=1e-5)
