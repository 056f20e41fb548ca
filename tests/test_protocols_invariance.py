"""Input invariance (Kindermans 2017): gradient passes, input x gradient fails on the twin."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.protocols.invariance import shifted_twin


def input_x_gradient(model, params, x, target, *, key):
    """x * gradient (computed here so the test does not depend on another module)."""
    return x * attrax.methods.get("gradient").fn(model, params, x, target, key=key)


def test_twin_is_exact_for_a_dense_first_layer(linear):
    model, params, x, target, _ = linear
    twin, kind = shifted_twin(model, params, x, -1.0)
    assert kind == "dense"
    np.testing.assert_allclose(np.asarray(model(params, x)), np.asarray(model(twin, x - 1.0)), atol=1e-5)
    # the original params are untouched
    assert not np.allclose(np.asarray(params["params"]["dense"]["bias"]), np.asarray(twin["params"]["dense"]["bias"]))


def test_gradient_passes_input_x_gradient_fails(linear):
    model, params, x, target, _ = linear
    r = attrax.explain("gradient", model, params, x, target)
    g = attrax.evaluate("input_invariance", model, params, x, target, r, key=0, method="gradient")
    i = attrax.evaluate("input_invariance", model, params, x, target, r, key=0, method=input_x_gradient)
    assert g.values["passed"].tolist() == [1.0] * 4 and float(g.values["distance"].max()) < 1e-5
    assert i.values["passed"].tolist() == [0.0] * 4 and float(i.values["distance"].min()) > 0.5
    assert float(g.values["twin_error"].max()) < 1e-5
    assert g.choices["shift"] == -1.0 and g.choices["method"] == "gradient"


def test_registered_input_x_gradient_fails_if_available(linear):
    if "input_x_gradient" not in attrax.methods.names():
        pytest.skip("input_x_gradient is not registered")
    model, params, x, target, _ = linear
    s = attrax.evaluate("input_invariance", model, params, x, target, x, key=0, method="input_x_gradient")
    assert float(s.values["passed"].max()) == 0.0


def test_image_shift_and_mlp(linear):
    model = attrax.models.create("mlp", hidden=(16,))
    x = jax.random.uniform(jax.random.key(0), (3, 6, 6, 1))
    params = attrax.models.init(model, jax.random.key(1), x)
    target = jnp.array([0, 1, 2], jnp.int32)
    m = jax.random.normal(jax.random.key(2), (6, 6, 1))
    s = attrax.evaluate(
        "input_invariance",
        model,
        params,
        x,
        target,
        x,
        key=0,
        method="gradient",
        shift=np.asarray(m),
    )
    assert float(s.values["twin_error"].max()) < 1e-4 and s.values["passed"].tolist() == [1.0] * 3


class TinyConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(2, (3, 3), padding="SAME", name="conv")(x))
        return nn.Dense(2, name="out")(h.reshape(h.shape[0], -1))


def test_conv_first_layer_reports_its_border_error():
    model = attrax.as_model(TinyConv())
    x = jnp.zeros((2, 6, 6, 1)).at[:, 2:4, 2:4].set(1.0)
    params = attrax.models.init(model, jax.random.key(1), x)
    s = attrax.evaluate("input_invariance", model, params, x, jnp.zeros((2,), jnp.int32), x, key=0, method="gradient")
    assert s.choices["twin"] == "first conv bias"
    # zero padding is not shifted: only the interior is compensated, and the error is reported
    assert np.all(np.asarray(s.values["twin_error"]) > 0)
    twin, _ = shifted_twin(model, params, x, -1.0)

    def first_layer(p, xx):
        k, b = p["params"]["conv"]["kernel"], p["params"]["conv"]["bias"]
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(xx, k, (1, 1), "SAME", dimension_numbers=dn) + b

    a1, a2 = first_layer(params, x), first_layer(twin, x - 1.0)
    np.testing.assert_allclose(np.asarray(a1[:, 1:-1, 1:-1]), np.asarray(a2[:, 1:-1, 1:-1]), atol=1e-5)
    assert not np.allclose(np.asarray(a1[:, 0]), np.asarray(a2[:, 0]))
