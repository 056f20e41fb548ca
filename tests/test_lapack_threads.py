"""Computations with LAPACK calls run their chunks in turn: jaxlib's LAPACK kernels wait on the
shared intra-op thread pool from one of its threads, so two of them from two chunk threads at once
deadlocked (KernelSHAP's pinv -> eigh on a small user CNN hung forever, 2026-12-04)."""

from __future__ import annotations

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax import harness


class SmallNet(nn.Module):
    """A user CNN written the ordinary way (strided conv, GELU, average pooling, tanh)."""

    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.gelu(nn.Conv(8, (5, 5), strides=2)(x)), (2, 2), (2, 2))
        x = nn.tanh(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def test_lapack_primitives_are_found_inside_sub_computations():
    def solve(a):
        return jax.lax.scan(lambda c, m: (c, jnp.linalg.pinv(m @ m.T, hermitian=True)), 0.0, a)[1]

    found = harness.lapack_primitives(jax.make_jaxpr(jax.jit(solve))(jnp.ones((2, 3, 3))))
    assert found == {"eigh"}
    assert not harness.lapack_primitives(jax.make_jaxpr(jax.grad(lambda v: jnp.sin(v).sum()))(jnp.ones(3)))


def _finishes(fn, seconds: float = 240.0):
    """fn() in a daemon thread: its result, or None if it did not finish in time (a deadlock)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else None


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_surrogate_methods_on_a_user_cnn_with_chunk_threads_finish(method, monkeypatch):
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "2")
    net = SmallNet()
    x = np.random.default_rng(0).random((8, 28, 28, 1), np.float32)
    params = net.init(jax.random.key(0), x[:1])
    model = attrax.as_model(net)

    def run():
        maps = [attrax.explain(method, model, params, x, "predicted", key=k, n_samples=32) for k in range(3)]
        return jax.block_until_ready(maps)

    maps = _finishes(run)
    assert maps is not None, f"{method} with two chunk threads did not finish (LAPACK deadlock)"
    assert all(m.shape == x.shape and bool(jnp.isfinite(m).all()) for m in maps)
    # the same maps as one chunk at a time
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "1")
    one = attrax.explain(method, model, params, x, "predicted", key=0, n_samples=32)
    np.testing.assert_allclose(np.asarray(one), np.asarray(maps[0]), rtol=1e-5, atol=1e-6)


def test_training_a_model_with_an_eigh_layer_runs_one_step_at_a_time(monkeypatch):
    """A whitening-style layer (eigh of the batch covariance) trains in fit and train_many
    parallel without hanging, and uses_lapack says why it is not threaded."""
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "2")
    tr = __import__("importlib").import_module("attrax.train")

    class Whiten(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x.reshape(x.shape[0], -1))
            cov = h.T @ h / h.shape[0] + 1e-3 * jnp.eye(4)
            w, v = jnp.linalg.eigh(cov)
            return nn.Dense(2)(h @ v / jnp.sqrt(w))

    model = attrax.as_model(Whiten())
    rng = np.random.default_rng(0)
    x, y = rng.random((128, 6, 6, 1), np.float32), rng.integers(0, 2, 128).astype(np.int32)
    variables = model.module.init(jax.random.key(0), x[:1])
    assert tr.uses_lapack(model, variables, x[:1])
    assert not tr.uses_lapack(attrax.models.create("mlp", hidden=(4,), num_classes=2),
                              attrax.models.create("mlp", hidden=(4,), num_classes=2).module.init(
                                  jax.random.key(0), x[:1]), x[:1])
    cfg = attrax.TrainConfig(epochs=1, batch_size=64)  # fit: two sub-batches (threads where allowed)
    got = _finishes(lambda: (tr.fit(model, x, y, seed=0, cfg=cfg, progress=False),
                             tr.train_many(model, x, y, [0, 1], cfg=cfg, mode="parallel")))
    assert got is not None, "training a model with eigh from two threads did not finish"
    (fitted, _), (many, _) = got
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves((fitted, many)))
    # un-split steps (batch < 32): parallel and sequential train_many and fit train the same model
    small = attrax.TrainConfig(epochs=1, batch_size=16)
    par = tr.train_many(model, x, y, [0, 1], cfg=small, mode="parallel")[0]
    seq = tr.train_many(model, x, y, [0, 1], cfg=small, mode="sequential")[0]
    one = tr.fit(model, x, y, seed=1, cfg=small, progress=False)[0]
    for a, b, c in zip(jax.tree.leaves(par[1]), jax.tree.leaves(seq[1]), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
