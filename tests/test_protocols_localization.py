"""Localization metrics against masks: perfect, constant and random maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.protocols.localization import dilate


@pytest.fixture(scope="module")
def masked():
    masks = jnp.zeros((3, 8, 8), bool).at[:, 2:5, 3:6].set(True)
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
    target = jnp.zeros((3,), jnp.int32)
    model = attrax.as_model(lambda p, xx: xx.reshape(xx.shape[0], -1)[:, :2])
    return model, x, target, masks


def ev(name, masked, r, **kw):
    model, x, target, masks = masked
    return attrax.evaluate(name, model, {}, x, target, r, key=0, masks=masks, **kw)


def test_constant_map_scores_zero_in_tie_aware_pointing(masked):
    const = jnp.ones((3, 8, 8, 1))
    assert ev("pointing_game", masked, const).values["hit"].tolist() == [0.0] * 3
    frac = ev("pointing_game", masked, const, tie="fraction", tolerance=0).values["hit"]
    np.testing.assert_allclose(np.asarray(frac), 9 / 64)
    # the usual first-argmax rule hits with a constant map whenever pixel (0, 0) is in the mask
    masks = masked[3].at[:, 0, 0].set(True)
    model, x, target, _ = masked
    first = attrax.evaluate("pointing_game", model, {}, x, target, const, masks=masks, tie="first")
    assert first.values["hit"].tolist() == [1.0] * 3


def test_perfect_map_scores_one_everywhere(masked):
    r = masked[3][..., None].astype(jnp.float32) + 0.01 * masked[1]
    assert ev("pointing_game", masked, r).values["hit"].tolist() == [1.0] * 3
    np.testing.assert_allclose(
        np.asarray(ev("relevance_mass", masked, r).values["relevance_mass"]),
        (9 + 0.01 * np.asarray((masked[1][..., 0] * masked[3]).sum((1, 2))))
        / (9 + 0.01 * np.asarray(masked[1].sum((1, 2, 3)))),
        rtol=1e-5,
    )
    assert ev("relevance_rank", masked, r).values["relevance_rank"].tolist() == [1.0] * 3
    s = ev("aupr", masked, r)
    np.testing.assert_allclose(np.asarray(s.values["aupr"]), 1.0)
    np.testing.assert_allclose(np.asarray(s.values["auroc"]), 1.0)


def test_tolerance_counts_near_misses(masked):
    r = jnp.zeros((3, 8, 8, 1)).at[:, 5, 6, 0].set(1.0)  # diagonal neighbour of the mask corner
    assert ev("pointing_game", masked, r, tolerance=0).values["hit"].tolist() == [0.0] * 3
    assert ev("pointing_game", masked, r, tolerance=1).values["hit"].tolist() == [0.0] * 3
    assert ev("pointing_game", masked, r, tolerance=2).values["hit"].tolist() == [1.0] * 3
    assert int(dilate(masked[3][:1], 1).sum()) == 9 + 12


def test_constant_and_random_maps_are_chance(masked):
    s = ev("aupr", masked, jnp.ones((3, 8, 8, 1)))
    np.testing.assert_allclose(np.asarray(s.values["auroc"]), 0.5)
    rnd = ev("aupr", masked, jax.random.uniform(jax.random.key(1), (3, 8, 8, 1)))
    assert 0.2 < rnd.mean()["auroc"] < 0.8


def test_missing_or_bad_masks_raise(masked):
    model, x, target, masks = masked
    with pytest.raises(attrax.AttraxError, match="masks"):
        attrax.evaluate("relevance_mass", model, {}, x, target, x)
    with pytest.raises(attrax.AttraxError, match="shape"):
        attrax.evaluate("aupr", model, {}, x, target, x, masks=masks[:, :4])
