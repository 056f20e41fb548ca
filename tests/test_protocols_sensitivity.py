"""Known answers for pixel flipping, deletion, insertion, region perturbation (linear model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.protocols.sensitivity import perturbation_curve, rank_locations, unit_grid


def true_relevance(x, w, target):
    """w_c * x: the exact contribution of every pixel to the linear logit."""
    return (x.reshape(x.shape[0], -1) * w[:, target].T).reshape(x.shape)


@pytest.fixture(scope="module")
def linear_many(linear):
    """The conftest linear model on 48 images (enough for a mean over random orders)."""
    model, params, _, _, w = linear
    x = jax.random.uniform(jax.random.key(7), (48, 6, 6, 1))
    target = jnp.arange(48, dtype=jnp.int32) % 3
    return model, params, x, target, w


CASES = [
    ("pixel_flipping", {}),
    ("deletion", {"score": "logit"}),
    ("region_perturbation", {"patch_size": 2, "steps": 9, "replacement": "zero"}),
    ("insertion", {"replacement": "zero", "score": "logit"}),
]


@pytest.mark.parametrize("name,hp", CASES)
def test_true_relevance_beats_random_and_inverse_loses(linear, name, hp):
    model, params, x, target, w = linear
    r = true_relevance(x, w, target)
    good = attrax.evaluate(name, model, params, x, target, r, key=0, **hp).mean()
    bad = attrax.evaluate(name, model, params, x, target, -r, key=0, **hp).mean()
    assert good["aopc_vs_random"] > 0 > bad["aopc_vs_random"]
    assert good["aopc"] > bad["aopc"]
    higher = attrax.protocols.higher_is_better(name, "auc")
    assert (good["auc"] > bad["auc"]) == higher


def test_curve_matches_closed_form(linear):
    """One pixel per step on a linear model: f(x_k) = f(x) - sum of the k largest w_i x_i."""
    model, params, x, target, w = linear
    r = true_relevance(x, w, target)
    s = attrax.evaluate("pixel_flipping", model, params, x, target, r, key=0, steps=36)
    contrib = np.sort(np.asarray(r).reshape(4, -1), axis=1)[:, ::-1]
    f0 = np.asarray(attrax.forward(model, params, x))[np.arange(4), np.asarray(target)]
    expected = f0[:, None] - np.concatenate([np.zeros((4, 1)), np.cumsum(contrib, 1)], 1)
    np.testing.assert_allclose(np.asarray(s.values["curve"]), expected, atol=1e-4)
    np.testing.assert_allclose(s.x["curve"], np.arange(37) / 36)
    assert s.choices["order"] == "morf" and s.choices["tie"] == "random"


def test_lerf_reverses_morf(linear):
    model, params, x, target, w = linear
    r = true_relevance(x, w, target)
    lerf = attrax.evaluate(
        "pixel_flipping", model, params, x, target, r, key=0, order="lerf"
    ).mean()
    morf = attrax.evaluate(
        "pixel_flipping", model, params, x, target, -r, key=0, order="morf"
    ).mean()
    assert lerf["aopc"] == pytest.approx(morf["aopc"], abs=1e-5)


def test_random_order_aopc_is_about_zero(linear_many):
    model, params, x, target, w = linear_many
    noise = jax.random.uniform(jax.random.key(3), x.shape)
    rand = attrax.evaluate("pixel_flipping", model, params, x, target, noise, key=1, random_runs=4)
    true = attrax.evaluate(
        "pixel_flipping",
        model,
        params,
        x,
        target,
        true_relevance(x, w, target),
        key=1,
        random_runs=4,
    )
    assert abs(rand.mean()["aopc_vs_random"]) < 0.1 * true.mean()["aopc_vs_random"]


def test_patches_rank_by_summed_relevance():
    unit, n_units = unit_grid(5, 5, 2)
    assert n_units == 9 and unit[0] == unit[1] == unit[5] == unit[6] == 0 and unit[24] == 8
    r = jnp.zeros((1, 5, 5, 1)).at[0, 4, 4, 0].set(1.0).at[0, 0, 0, 0].set(0.5)
    idx = rank_locations(r, jax.random.key(0), "morf", patch_size=2)
    assert int(idx[0, 0]) == 8 and int(idx[0, 1]) == 0


def test_all_steps_go_through_the_model_in_batches(linear, monkeypatch):
    """The model sees whole chunks of (images x steps), never one image-step at a time."""
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "1")  # the batch as one chunk (not one per core)
    _, params, x, target, _ = linear
    seen = []

    def apply_fn(p, xx):
        seen.append(xx.shape[0])
        return xx.reshape(xx.shape[0], -1) @ p["w"]

    model = attrax.as_model(apply_fn)
    p = {"w": jnp.ones((36, 3))}
    idx = rank_locations(x, jax.random.key(0))
    curve, _ = perturbation_curve(model, p, x, target, idx, steps=10)
    assert curve.shape == (4, 11) and seen == [44]  # traced once, 4 images x 11 points


def test_bad_choices_raise(linear):
    model, params, x, target, w = linear
    with pytest.raises(attrax.AttraxError, match="order"):
        attrax.evaluate("pixel_flipping", model, params, x, target, x, order="best")
    with pytest.raises(attrax.AttraxError, match="replacement"):
        attrax.evaluate("deletion", model, params, x, target, x, replacement="grey")


def test_blur_matches_a_2d_gaussian_convolution():
    from attrax.protocols._common import gaussian_blur

    x = jax.random.uniform(jax.random.key(0), (2, 13, 12, 2))
    k = np.exp(-0.5 * (np.arange(-5, 6) / 5.0) ** 2)
    k = k / k.sum()
    kern = jnp.asarray(np.einsum("i,j,cd->ijcd", k, k, np.eye(2)), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    ref = jax.lax.conv_general_dilated(x, kern, (1, 1), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(np.asarray(gaussian_blur(x)), np.asarray(ref), atol=1e-5)
