"""attrax.fastconv: the convolution with a faster backward pass equals jax.grad of XLA's, and the
gradient-family methods substitute it into any model's trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import attrax
from attrax import examples, fastconv
from attrax.methods import backprop, gradient

DN = ("NHWC", "HWIO", "NHWC")
# (input, kernel, strides, padding, rhs_dilation): 1 and several input channels (both input
# gradients), strides, SAME / VALID / explicit asymmetric padding, dilation, 1x1, a batch that
# the kernel gradient's scan splits into chunks plus a remainder
CASES = [
    ((2, 9, 9, 1), (3, 3, 1, 5), (1, 1), "SAME", (1, 1)),
    ((2, 10, 8, 6), (3, 2, 6, 4), (1, 2), "VALID", (1, 1)),
    ((2, 11, 11, 2), (3, 3, 2, 4), (1, 1), ((2, 1), (0, 3)), (2, 2)),
    ((2, 12, 12, 3), (5, 5, 3, 3), (3, 2), "SAME", (1, 2)),
    ((2, 7, 7, 8), (1, 1, 8, 4), (2, 1), "VALID", (1, 1)),
    ((7, 6, 6, 6), (3, 3, 6, 2), (1, 1), "SAME", (1, 1)),
]


def _ref(s, pad, d):
    return lambda x, w: lax.conv_general_dilated(x, w, s, pad, rhs_dilation=d, dimension_numbers=DN)


@pytest.mark.parametrize("xs,ws,s,pad,d", CASES)
def test_values_and_gradients_equal_xla(xs, ws, s, pad, d, monkeypatch):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=xs), jnp.float32)
    w = jnp.asarray(rng.normal(size=ws), jnp.float32)
    ref = _ref(s, pad, d)

    def ours(a, b):
        return fastconv.conv_general_dilated(a, b, s, pad, rhs_dilation=d, dimension_numbers=DN, fast=True)

    if xs[0] == 7:  # several scan chunks + a remainder in the kernel gradient
        monkeypatch.setattr(fastconv, "CHUNK_BYTES", 3 * 9 * 6 * 36 * 4)
    y = ref(x, w)
    np.testing.assert_array_equal(ours(x, w), y)
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    gx, gw = jax.vjp(ref, x, w)[1](ct)
    fx, fw = jax.jit(jax.vjp(ours, x, w)[1])(ct)
    np.testing.assert_allclose(fx, gx, rtol=1e-5, atol=1e-5 * float(jnp.abs(gx).max()))
    np.testing.assert_allclose(fw, gw, rtol=1e-5, atol=1e-5 * float(jnp.abs(gw).max()))
    # the jaxpr-level substitution of the plain convolution gives the same
    sx, sw = jax.jit(lambda c: jax.vjp(fastconv.substitute(ref, x, w), x, w)[1](c))(ct)
    np.testing.assert_allclose(sx, gx, rtol=1e-5, atol=1e-5 * float(jnp.abs(gx).max()))
    np.testing.assert_allclose(sw, gw, rtol=1e-5, atol=1e-5 * float(jnp.abs(gw).max()))


def test_unsupported_forms_are_xlas_own():
    x = jnp.ones((1, 6, 6, 4))
    w = jnp.ones((3, 3, 2, 4))  # two feature groups
    out = fastconv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2,
                                        fast=True)
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda a: fastconv.conv_general_dilated(
        a, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2, fast=True))(x))
    np.testing.assert_array_equal(out, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                                                feature_group_count=2))
    nchw = jnp.ones((1, 4, 6, 6))
    assert not fastconv.supported(nchw, jnp.ones((4, 4, 3, 3)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    assert fastconv.supported(x, jnp.ones((3, 3, 4, 2)), dimension_numbers=DN)
    with pytest.raises(attrax.AttraxError, match="conv_vjp"):
        fastconv.use_fast("cudnn")


def _nonzoo():
    x = jax.random.uniform(jax.random.key(0), (3, 12, 12, 1))
    module, params = examples.build("nonzoo_cnn", 1, x, num_classes=4)
    model = attrax.as_model(module)
    return model, params, x, jnp.array([0, 1, 3])


def _run(name, model, params, x, t):
    fn = attrax.methods.get(name).fn
    return jax.jit(lambda p, xx, tt: fn(model, p, xx, tt))(params, x, t)


def _trace_of(fn, x):
    return str(jax.make_jaxpr(fn)(x))


def test_gradient_methods_substitute_a_user_models_convolutions(monkeypatch):
    model, params, x, t = _nonzoo()
    calls = []
    bind = fastconv.bind_conv
    monkeypatch.setattr(fastconv, "bind_conv", lambda *a: calls.append(1) or bind(*a))
    monkeypatch.setenv("ATTRAX_CONV_VJP", "fast")
    plain = _trace_of(lambda xx: model(params, xx), x)
    assert "conv_general_dilated" in plain and "custom_vjp" not in plain
    assert "custom_vjp" in _trace_of(gradient._logits(model, params, x), x)  # substituted
    fast = {}
    for m in ("gradient", "guided_backprop"):
        n = len(calls)
        fast[m] = _run(m, model, params, x, t)
        assert len(calls) - n == 2, m  # both convolutions of the model in the fast form
    monkeypatch.setenv("ATTRAX_CONV_VJP", "xla")
    assert "custom_vjp" not in _trace_of(gradient._logits(model, params, x), x)
    n = len(calls)
    ref = _run("guided_backprop", model, params, x, t)
    np.testing.assert_allclose(fast["guided_backprop"], ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(ref).max()))
    assert len(calls) == n  # off: XLA's own convolutions
    ref = jax.jit(jax.grad(lambda xx: jnp.take_along_axis(model(params, xx), t[:, None], 1).sum()))(x)
    np.testing.assert_allclose(fast["gradient"], ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(ref).max()))


def test_zoo_convolutions_are_fast_and_train_the_same(monkeypatch):
    model = attrax.models.create("cnn", channels=(3, 4), dense=(8,), num_classes=3)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    params = examples.init_variables(model.module, 1, x)  # no Flax init compile

    def grads():  # a new function each time: traces are cached per function
        def loss(p):
            return jnp.sum(model(p, x) ** 2)

        return "custom_vjp" in str(jax.make_jaxpr(loss)(params)), jax.jit(jax.grad(loss))(params)

    monkeypatch.setenv("ATTRAX_CONV_VJP", "fast")
    fast, g_fast = grads()
    monkeypatch.setenv("ATTRAX_CONV_VJP", "xla")
    plain, g_ref = grads()
    assert fast and not plain
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
    # the rule engine still sees the zoo's layers by name
    assert backprop._engine.graph_of(model, params, x) is not None
