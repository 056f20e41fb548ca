"""attrax.train.fit: deterministic per seed, learns, same results through both loops, the epoch
remainder, the split step, and the trained-model cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attrax
from attrax.models import init
from attrax.train import (
    TrainConfig,
    _epoch_batches,
    _fit_runner,
    _make_step,
    _optimizer,
    _threaded,
    cache_key,
    fit,
    load_cached,
    save_cached,
    split_parts,
)


@pytest.fixture(scope="module")
def data(mnist_train):
    ds = mnist_train.take(per_class=7)  # 70 images: not a multiple of the batch sizes below
    return ds.x, ds.y


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda p, q: float(np.abs(p - q).max()), a, b)))


def _reference_fit(model, x, y, seed, cfg):
    """The plain definition: host-side permutation per epoch, remainder dropped, one
    un-split step per batch (what `fit` computed before it moved the loop onto the device)."""
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = init(model, k_init, jnp.asarray(x[:1]))["params"]
    tx = _optimizer(cfg)
    step = jax.jit(_make_step(model, tx, 1))
    state, losses, batch = (params, {}, tx.init(params)), [], min(cfg.batch_size, len(x))
    for ep in range(cfg.epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, ep), len(x)))
        nb = len(x) // batch
        ls = []
        for b in perm[: nb * batch].reshape(nb, batch):
            state, loss = step(state, jnp.asarray(x[b]), jnp.asarray(y[b]))
            ls.append(float(loss))
        losses.append(float(np.mean(ls)))
    return {"params": state[0]}, losses


def test_deterministic_per_seed_and_learns(data):
    x, y = data
    model = attrax.models.create("cnn_a", channels=(4, 8), dense=(16,))
    cfg = TrainConfig(epochs=3, batch_size=32, lr=3e-3)
    a, la = fit(model, x, y, seed=5, cfg=cfg, progress=False)
    b, lb = fit(model, x, y, seed=5, cfg=cfg, progress=False)
    c, _ = fit(model, x, y, seed=6, cfg=cfg, progress=False)
    assert _max_diff(a, b) == 0.0 and la == lb  # the same seed: the same params, bit for bit
    assert _max_diff(a, c) > 1e-3
    assert len(la) == 3 and la[-1] < la[0]
    more, _ = fit(model, x, y, seed=5, cfg=cfg, progress=False, variables=a)  # continue training
    assert _max_diff(a, b) == 0.0 and _max_diff(a, more) > 1e-4  # `a` not donated away
    # one compiled step for all three calls (it used to be recompiled by every call): the
    # threaded split step where chunk threads exist (CPU, 2+ cores), else the fused step
    parts = split_parts(a, 32)
    threaded = _threaded(model, cfg, parts)
    if threaded is not None:
        assert threaded is _threaded(model, cfg, parts)
        assert threaded._gather._cache_size() == parts and threaded._update._cache_size() == 1
    else:
        run = _fit_runner(model, cfg, parts, "python")
        assert run is _fit_runner(model, cfg, parts, "python") and run._cache_size() == 1


@pytest.mark.parametrize(("loop", "threads"), [("python", "2"), ("python", "1"), ("scan", "2")])
def test_equals_reference_with_remainder(data, loop, threads, monkeypatch):
    """70 images, batch 32: 2 steps per epoch, 6 images left out (a different 6 each epoch);
    the split step (2 sub-batches on CPU: from two threads, or fused in one call with one chunk
    thread) and the device-side loop give the plain result."""
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", threads)
    x, y = data
    model = attrax.models.create("mlp", hidden=(16,))
    cfg = TrainConfig(epochs=2, batch_size=32, loop=loop)
    ref, l_ref = _reference_fit(model, x, y, 1, cfg)
    out, losses = fit(model, x, y, seed=1, cfg=cfg, progress=False)
    assert _max_diff(ref, out) < 1e-5
    np.testing.assert_allclose(losses, l_ref, rtol=1e-5)
    idx = np.asarray(_epoch_batches(70, 32, jax.random.key(0)))
    assert idx.shape == (2, 32) and len(set(idx.ravel())) == 64


def test_batch_larger_than_data(data):
    x, y = data
    model = attrax.models.create("mlp", hidden=(8,))
    _, losses = fit(model, x[:10], y[:10], seed=0, cfg=TrainConfig(epochs=2, batch_size=64), progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_split_step_equals_one_step(data):
    x, y = data
    model = attrax.models.create("cnn_a", channels=(4, 8), dense=(16,))
    tx = optax.adam(1e-3)
    params = init(model, jax.random.key(0), jnp.asarray(x[:1]))["params"]
    state = (params, {}, tx.init(params))
    xb, yb = jnp.asarray(x[:48]), jnp.asarray(y[:48])
    (p1, _, _), l1 = jax.jit(_make_step(model, tx, 1))(state, xb, yb)
    (p3, _, _), l3 = jax.jit(_make_step(model, tx, 3))(state, xb, yb)
    assert abs(float(l1) - float(l3)) < 1e-5 and _max_diff(p1, p3) < 1e-6
    expected = 2 if jax.default_backend() == "cpu" else 1
    assert split_parts({"params": params}, 64) == expected
    assert split_parts({"params": params, "batch_stats": {}}, 64) == 1  # BatchNorm: never split
    assert split_parts({"params": params}, 16) == 1


def test_cache_roundtrip_and_key(mnist_train, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRAX_CACHE", str(tmp_path))
    ds = mnist_train.take(per_class=7)
    x, y = ds.x, ds.y
    model = attrax.models.create("mlp", hidden=(8,))
    cfg = TrainConfig(epochs=1, batch_size=32)
    k = cache_key(model, "fp", cfg, 0)
    assert k == cache_key(model, "fp", dataclasses.replace(cfg, loop="scan"), 0)  # the loop: same results
    assert k != cache_key(model, "fp", dataclasses.replace(cfg, epochs=2), 0)
    assert k != cache_key(model, "fp", cfg, 1) and k != cache_key(model, "fp2", cfg, 0)
    variables, _ = fit(model, x, y, seed=0, cfg=cfg, progress=False)
    assert load_cached(k, variables) is None
    save_cached(k, variables, {"seed": 0})
    hit, meta = load_cached(k, jax.tree.map(jnp.zeros_like, variables))
    assert _max_diff(hit, variables) == 0.0 and meta["seed"] == 0
    _, v1, i1 = attrax.train(model, ds, seed=0, cfg=cfg, progress=False)
    _, v2, i2 = attrax.train(model, ds, seed=0, cfg=cfg, progress=False)
    assert not i1["cached"] and i2["cached"] and _max_diff(v1, v2) == 0.0
