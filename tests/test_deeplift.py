"""DeepLIFT (rescale) and DeepLIFT-SHAP: summation-to-delta, input x gradient, no NaN, reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.methods import class_score, input_gradient


def _init(model, x, seed=0):
    """Random variables from NumPy with the module's shapes (compiling Flax init is slow on CPU)."""
    shapes = jax.eval_shape(model.module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, s in flat:
        name = str(path[-1].key)
        if name == "kernel":
            v = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif name in ("scale", "var"):
            v = 1.0 + rng.uniform(0, 0.5, size=s.shape)
        else:
            v = 0.1 * rng.normal(size=s.shape)
        leaves.append(jnp.asarray(v, s.dtype))
    return jax.tree.unflatten(tree, leaves)


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _score(model, params, x, t):
    return class_score(attrax.forward(model, params, x), t)


@pytest.mark.parametrize("net", ["cnn", "resnet"])
def test_summation_to_delta_with_biases_and_nonzero_reference(net):
    if net == "cnn":  # biases and three max pools (14 -> 7 -> 4 -> 2: SAME padding on odd sizes)
        model, shape = attrax.models.create("cnn", channels=(4, 6, 8), dense=(10,)), (4, 14, 14, 1)
    else:  # BatchNorm and residual additions
        model, shape = attrax.models.create("resnet", stages=(4, 6)), (4, 8, 8, 3)
    x, ref = _x(shape, 1), _x(shape, 2)
    params = _init(model, x)
    t = jnp.array([0, 1, 2, 3])
    delta = _score(model, params, x, t) - _score(model, params, ref, t)
    c = attrax.explain("deeplift", model, params, x, t, reference=ref)
    np.testing.assert_allclose(c.sum(tuple(range(1, x.ndim))), delta, atol=1e-5)
    # a scalar reference (one reference image for the batch)
    c2 = attrax.explain("deeplift", model, params, x, t, reference=0.5)
    delta2 = _score(model, params, x, t) - _score(model, params, jnp.full_like(x, 0.5), t)
    np.testing.assert_allclose(c2.sum(tuple(range(1, x.ndim))), delta2, atol=1e-5)


def test_zero_reference_no_bias_equals_input_times_gradient():
    model = attrax.models.create("cnn_a", channels=(4, 6), dense=(12,), use_bias=False)
    x = _x((3, 12, 12, 1))
    params = _init(model, x)
    t = jnp.array([4, 5, 6])
    c = attrax.explain("deeplift", model, params, x, t)
    _, g = jax.jit(lambda p, xx: input_gradient(lambda v: model(p, v), xx, t))(params, x)
    np.testing.assert_allclose(c, x * g, atol=1e-6 * float(jnp.abs(x * g).max()))


def test_no_nan_where_delta_x_is_zero():
    model = attrax.models.create("cnn_a", channels=(4, 6), dense=(12,))
    x = _x((3, 12, 12, 1))
    ref = x.at[0].set(0.0).at[1, :6].set(0.0)  # example 2 equals its reference, example 1 half does
    x = x.at[0].set(0.0).at[2].set(ref[2])
    params = _init(model, x)
    t = jnp.array([1, 2, 3])
    c = attrax.explain("deeplift", model, params, x, t, reference=ref)
    assert bool(jnp.isfinite(c).all())
    np.testing.assert_array_equal(c[0], 0.0)
    np.testing.assert_array_equal(c[2], 0.0)
    delta = _score(model, params, x, t) - _score(model, params, ref, t)
    np.testing.assert_allclose(c.sum((1, 2, 3)), delta, atol=1e-5)


def test_matches_captum_reference(reference):
    model, params, maps, _ = reference
    x, t = jnp.asarray(maps["x"]), jnp.asarray(maps["target"])
    ref = maps["deeplift"]
    # The Captum maps route max pooling by its gradient (README: sums within ~0.3% of the delta).
    r = attrax.explain("deeplift", model, params, x, t, max_pool="gradient")
    np.testing.assert_allclose(r, ref, atol=1e-5 * np.abs(ref).max())
    # The default exact rule differs only at max-pool windows where the reference wins.
    r = np.asarray(attrax.explain("deeplift", model, params, x, t))
    for i in range(10):
        assert np.corrcoef(r[i].ravel(), ref[i].ravel())[0, 1] > 0.99
    delta = maps["logits"][np.arange(10), maps["target"]] - np.asarray(_score(model, params, jnp.zeros_like(x), t))
    np.testing.assert_allclose(r.sum((1, 2, 3)), delta, atol=2e-5)


def test_deeplift_shap():
    model = attrax.models.create("mlp", hidden=(16, 8))
    x = _x((3, 5, 5, 1))
    bank = _x((1, 5, 5, 1), 3)
    params = _init(model, x)
    t = jnp.array([0, 1, 2])
    # one background image: DeepLIFT-SHAP = DeepLIFT with that reference
    a = attrax.explain("deeplift_shap", model, params, x, t, references=np.asarray(bank), n_references=4, key=0)
    b = attrax.explain("deeplift", model, params, x, t, reference=bank[0])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # several: sums to f(x) minus the mean score of the drawn references; deterministic per key
    bank = _x((6, 5, 5, 1), 4)
    a = attrax.explain("deeplift_shap", model, params, x, t, references=np.asarray(bank), n_references=32, key=1)
    a2 = attrax.explain("deeplift_shap", model, params, x, t, references=np.asarray(bank), n_references=32, key=1)
    np.testing.assert_array_equal(a, a2)
    keys = attrax.methods.per_example_keys(1, 3)
    idx = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (32,), 0, 6))(keys))
    bank_logits = np.asarray(attrax.forward(model, params, bank))
    f_ref = np.stack([bank_logits[idx[i], int(t[i])].mean() for i in range(3)])
    np.testing.assert_allclose(a.sum((1, 2, 3)), np.asarray(_score(model, params, x, t)) - f_ref, atol=1e-5)


def test_overlapping_max_pool_routes_the_gradient():
    """DeepLIFT's convention on overlapping windows (3x3 stride 2, as in a ResNet stem): the max's
    gradient whatever `max_pool` says (documented); non-overlapping windows keep the split rule."""
    import flax.linen as nn

    class Net(nn.Module):
        stride: int

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
            pad = ((1, 1), (1, 1)) if self.stride == 2 else "VALID"
            x = nn.max_pool(x, (3, 3), strides=(self.stride, self.stride), padding=pad)
            return nn.Dense(3, name="dense")(x.mean(axis=(1, 2)))

    x = _x((2, 12, 12, 1), seed=3)
    t = jnp.array([0, 2], jnp.int32)
    for stride, same in ((2, True), (3, False)):
        module = Net(stride)
        params = _init(attrax.as_model(module), x, seed=2)
        a = attrax.explain("deeplift", module, params, x, t, reference=0.3, max_pool="rescale")
        b = attrax.explain("deeplift", module, params, x, t, reference=0.3, max_pool="gradient")
        assert np.allclose(a, b, rtol=1e-6, atol=1e-7) == same, f"stride {stride}"
