"""Activation maximization (image and code space) and meaningful perturbation: closed-form
optima, shapes, determinism, result rows and the image grid."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.methods import activation_maximization as am


def _uniform(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(model, seed, x):
    """Random parameters of the right shapes without compiling an init (keeps the tests fast)."""
    module = getattr(model, "module", model)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), shapes)


def test_class_means():
    x = jnp.arange(24.0).reshape(4, 2, 3, 1)
    y = jnp.array([1, 0, 1, 0])
    m = am.class_means(x, y, num_classes=3)
    np.testing.assert_allclose(m[0], (x[1] + x[3]) / 2)
    np.testing.assert_allclose(m[1], (x[0] + x[2]) / 2)
    np.testing.assert_allclose(m[2], 0.0)


@pytest.mark.parametrize("prior", ["mean", "zero"])
def test_am_linear_logit_converges_to_prior_plus_w_over_lambda(linear, prior):
    model, params, x, _, w = linear
    means = _uniform(3, (3,) + x.shape[1:])
    lam = 2.0
    units = jnp.array([0, 1, 2])
    out = am.activation_maximization(
        model,
        params,
        units,
        prior=prior,
        means=means,
        lam=lam,
        steps=600,
        lr=0.05,
        schedule="cosine",
    )
    assert out.shape == (3,) + x.shape[1:]
    m = means if prior == "mean" else jnp.zeros_like(means)
    expect = m + (w.T / lam).reshape(means.shape)
    np.testing.assert_allclose(out, expect, atol=2e-3)
    # deterministic; seeded noise start reaches the same optimum
    again = am.activation_maximization(
        model,
        params,
        units,
        prior=prior,
        means=means,
        lam=lam,
        steps=600,
        lr=0.05,
        schedule="cosine",
    )
    np.testing.assert_array_equal(out, again)


def test_am_units_of_a_layer_and_errors(linear):
    model = attrax.models.create("camnet", num_classes=3, channels=(4,))
    params = _init(model, 0, jnp.zeros((1, 6, 6, 1)))
    params["params"]["conv1"]["bias"] = jnp.full((4,), 0.5)  # no dead channel
    before = am.unit_scores(model, params, jnp.zeros((2, 6, 6, 1)), jnp.array([1, 3]), layer="features")
    out = am.activation_maximization(
        model,
        params,
        [1, 3],
        prior="zero",
        shape=(6, 6, 1),
        layer="features",
        steps=50,
        lr=0.05,
        init_std=0.1,
        key=0,
    )
    after = am.unit_scores(model, params, out, jnp.array([1, 3]), layer="features")
    assert out.shape == (2, 6, 6, 1) and bool(jnp.all(after > before))
    named = am.unit_scores(model, params, out, jnp.array([1, 3]), layer="conv1")
    assert named.shape == (2,)
    with pytest.raises(attrax.AttraxError, match="needs the class means"):
        am.activation_maximization(model, params, [0], prior="mean", steps=1)
    with pytest.raises(attrax.AttraxError, match="needs a `key`"):
        am.activation_maximization(model, params, [0], prior="zero", shape=(6, 6, 1), steps=1, init_std=1.0)


def test_am_code_linear_decoder_closed_form(linear):
    model, params, x, _, w = linear
    dec_module = am.MLPDecoder(tuple(x.shape[1:]), hidden=(), output="linear")
    dparams = _init(dec_module, 1, jnp.zeros((1, 5)))
    decoder = am.Decoder(dec_module, dparams, code_dim=5)
    code_means = _normal(2, (3, 5))
    lam = 4.0
    images, z = am.activation_maximization_code(
        model,
        params,
        [2, 0],
        decoder=decoder,
        code_means=code_means,
        lam=lam,
        steps=600,
        lr=0.05,
        schedule="cosine",
    )
    a = dparams["params"]["Dense_0"]["kernel"]  # G(z) = z A + c
    expect = code_means[jnp.array([2, 0])] + (a @ w[:, jnp.array([2, 0])]).T / lam
    np.testing.assert_allclose(z, expect, atol=2e-3)
    np.testing.assert_allclose(images, decoder(z), rtol=1e-6)
    assert images.shape == (2,) + x.shape[1:]


class TinyClassifier(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(8, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(3, name="out")(h)


def test_decoder_training_and_code_space_am(tmp_path):
    model = attrax.as_model(TinyClassifier())
    x = _uniform(0, (64, 6, 6, 1))
    y = jnp.arange(64) % 3
    params = _init(model, 1, x[:1])
    codes = jax.jit(lambda xx: am.penultimate_code(model, params, xx))(x)
    assert codes.shape == (64, 8)
    decoder = am.train_decoder(model, params, x, hidden=(16,), steps=60, batch_size=32, lr=1e-2)
    assert decoder.code_dim == 8 and decoder.losses[-1] < decoder.losses[0]
    zm = am.class_code_means(model, params, x, y, 3)
    images, z = am.activation_maximization_code(model, params, [0, 1, 2], decoder=decoder, code_means=zm, steps=30)
    assert images.shape == (3, 6, 6, 1) and z.shape == (3, 8)
    scores = jax.jit(lambda xx: am.unit_scores(model, params, xx, jnp.arange(3)))
    start, end = scores(decoder(zm)), scores(images)
    assert bool(jnp.all(end > start))
    # tidy rows and the image grid
    means = am.class_means(x, y, 3)
    df = am.summarize(
        model,
        params,
        images,
        [0, 1, 2],
        means=means,
        path=tmp_path / "grid.png",
        ids={"model": "tiny", "method": "am_code", "method_hparams": {"steps": 30}},
    )
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert set(df["metric"]) == {"logit", "probability", "distance_to_mean"}
    assert len(df) == 9 and list(df.columns) == attrax.results.COLUMNS
    logit = df[(df.metric == "logit") & (df.example == 1)]["value"].item()
    assert logit == pytest.approx(float(model(params, images)[1, 1]), rel=1e-5)
    dist = df[(df.metric == "distance_to_mean") & (df.example == 2)]["value"].item()
    assert dist == pytest.approx(float(jnp.linalg.norm(images[2] - means[2])), rel=1e-5)
    with pytest.raises(attrax.AttraxError, match="no Dense layer"):
        am.penultimate_code(attrax.as_model(QuadrantFree()), {}, x)


class QuadrantFree(nn.Module):
    def __call__(self, x, train: bool = False):
        return x.reshape(x.shape[0], -1)[:, :3]


class RegionNet(nn.Module):
    """Looks only at rows 4:12, columns 0:8 of a 16x16 image."""

    def __call__(self, x, train: bool = False):
        s = x[:, 4:12, 0:8].sum(axis=(1, 2, 3))
        return jnp.stack([s, -s], axis=-1)


@pytest.mark.parametrize("game", ["preserve", "delete"])
def test_meaningful_perturbation_finds_the_region(game):
    model = attrax.as_model(RegionNet())
    x = 0.2 + 0.8 * _uniform(0, (2, 16, 16, 1))
    region = np.zeros((16, 16), bool)
    region[4:12, 0:8] = True
    r = attrax.explain(
        "meaningful_perturbation",
        model,
        {},
        x,
        jnp.zeros(2, jnp.int32),
        area=0.25,
        mask_size=8,
        perturbation="zero",
        game=game,
        steps=100,
    )
    assert r.shape == x.shape
    r = np.asarray(r[..., 0])
    top = np.argsort(-r.reshape(2, -1), axis=1)[:, : region.sum()]
    assert (region.ravel()[top].mean(axis=1) > 0.75).all()
    assert r[:, region].mean() > 0.75 and r[:, ~region].mean() < 0.2


def test_meaningful_perturbation_blur_and_errors():
    model = attrax.as_model(RegionNet())
    x = _uniform(1, (1, 16, 16, 1))
    r = attrax.explain("meaningful_perturbation", model, {}, x, jnp.zeros(1, jnp.int32), steps=3)
    assert r.shape == x.shape and bool(jnp.all((r >= 0) & (r <= 1)))
    from attrax.methods.meaningful_perturbation import gaussian_blur

    const = jnp.full((1, 5, 7, 2), 0.3)
    np.testing.assert_allclose(gaussian_blur(const, 2.0), const, rtol=1e-6)
    with pytest.raises(attrax.AttraxError, match="area"):
        attrax.explain("meaningful_perturbation", model, {}, x, jnp.zeros(1, jnp.int32), area=1.5)
