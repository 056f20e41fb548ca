"""train_many: several seeds (and data variants) trained together equal one-by-one training."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import attrax
from attrax.errors import AttraxError
from attrax.train import TrainConfig, cpu_workers, fit, pick_many_mode, train_many


@pytest.fixture(scope="module")
def small(mnist_train):
    ds = mnist_train.take(per_class=10)
    return ds.x, ds.y


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda p, q: float(np.abs(p - q).max()), a, b)))


@pytest.mark.parametrize("loop", ["python", "scan"])
def test_vmap_equals_sequential_per_seed(small, loop):
    x, y = small
    model = attrax.models.create("mlp", hidden=(32, 16))
    cfg = TrainConfig(epochs=2, batch_size=25, loop=loop)
    xs = [x, 1.0 - x, x]  # data variants of equal shape; the first and last are one array
    seeds = [0, 1, 2]
    seq, l_seq = train_many(model, xs, y, seeds, cfg=cfg, mode="sequential")
    vm, l_vm = train_many(model, xs, y, seeds, cfg=cfg, mode="vmap")
    assert l_seq.shape == l_vm.shape == (3, 2)
    np.testing.assert_allclose(l_vm, l_seq, rtol=1e-4, atol=1e-5)
    for i in range(3):
        assert _max_diff(seq[i], vm[i]) < 1e-4
    # different seeds and data give different models (the comparison above is not vacuous)
    assert _max_diff(vm[0], vm[2]) > 1e-3 and _max_diff(vm[1], vm[2]) > 1e-3
    if loop == "python":  # each model is what `fit` trains for its seed and data
        ref, losses = fit(model, xs[1], y, seed=1, cfg=cfg, progress=False)
        assert _max_diff(seq[1], ref) < 1e-5
        np.testing.assert_allclose(l_seq[1], losses, rtol=1e-5)


def test_modes_and_errors(small):
    x, y = small
    cpu = "parallel" if cpu_workers() > 1 else "sequential"
    assert pick_many_mode("auto") == (cpu if jax.default_backend() == "cpu" else "vmap")
    with pytest.raises(AttraxError, match="Did you mean 'parallel'"):
        train_many("mlp", x, y, [0], cfg=TrainConfig(epochs=1), mode="paralel")
    with pytest.raises(AttraxError, match="one per seed"):
        train_many("mlp", [x, x], y, [0, 1, 2], cfg=TrainConfig(epochs=1), mode="vmap")
    out, losses = train_many("mlp", x, y, [], cfg=TrainConfig(epochs=1))
    assert out == [] and losses.shape == (0, 1)


@pytest.mark.parametrize("loop", ["python", "scan"])
def test_parallel_equals_sequential(small, loop):
    """Worker threads train each model through the same compiled step: identical results."""
    x, y = small
    model = attrax.models.create("cnn_a", channels=(4, 8), dense=(16,))
    cfg = TrainConfig(epochs=2, batch_size=25, loop=loop)
    xs = [x, 1.0 - x, x, 0.5 * x]
    seeds = [0, 1, 2, 3]
    seq, l_seq = train_many(model, xs, y, seeds, cfg=cfg, mode="sequential")
    par, l_par = train_many(model, xs, y, seeds, cfg=cfg, mode="parallel", workers=3)
    assert l_par.shape == (4, 2)
    np.testing.assert_allclose(l_par, l_seq, rtol=1e-6)
    for i in range(4):
        assert _max_diff(seq[i], par[i]) < 1e-6
    assert _max_diff(par[0], par[2]) > 1e-3
