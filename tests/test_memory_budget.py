"""Memory of the mask methods and the memory-budget chunk choice, from XLA's memory analysis
(compile only, abstract inputs; nothing is timed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.errors import AttraxError
from attrax.methods import per_example_keys
from attrax.methods.combinators import resolve


def _linear_apply(p, x):  # a plain apply_fn: compiles in a fraction of a second
    return x.reshape(x.shape[0], -1) @ p["w"]


def _temp_bytes(method, model, params, shape, n, **hp):
    entry = resolve(method)
    fn = jax.jit(lambda p, xx, tt, kk: entry.fn(model, p, xx, tt, key=kk, **hp))
    compiled = fn.lower(params, jax.ShapeDtypeStruct((n, *shape), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32),
                        jax.eval_shape(lambda: per_example_keys(0, n))).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def cnn32():
    model = attrax.models.create("cnn_a", num_classes=3)
    x = jnp.zeros((1, 32, 32, 3))
    return model, jax.eval_shape(lambda: attrax.models.init(model, jax.random.key(0), x))


def test_rise_memory_does_not_grow_with_the_mask_count(cnn32):
    # the masks are built block by block inside the scan: 16x more masks cost only their coarse
    # grids (n x 4 x 4), not n x H x W (measured: +0.36 MB; before, all masks were held at once
    # and temp grew by 39 MB from 250 to 4,000 masks)
    model, params = cnn32
    few, many = 250, 4000
    t_few = _temp_bytes("rise", model, params, (32, 32, 3), 2, n_masks=few, cells=4)
    t_many = _temp_bytes("rise", model, params, (32, 32, 3), 2, n_masks=many, cells=4)
    all_masks = many * 32 * 32 * 4
    assert t_many - t_few < all_masks / 8


def test_occlusion_program_holds_no_window_masks(cnn32):
    # the windows are built inside the scan from their corners: the program carries no
    # (windows, H, W) constant (before: 961 x 32 x 32 floats, 7.9 MB of program text; now 48 kB)
    model, params = cnn32
    entry = resolve("occlusion")
    lowered = jax.jit(lambda p, xx, tt: entry.fn(model, p, xx, tt, window=2, stride=1)).lower(
        params, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32))
    assert len(lowered.as_text()) < 961 * 32 * 32 * 4 / 8


def test_budget_chunk_is_checked_where_memory_is_not_linear(monkeypatch):
    # memory analysis made quadratic in the chunk: the linear estimate from the 2- and 4-image
    # probes (94 images) overshoots; the harness compiles it and shrinks to a chunk that fits
    from attrax import harness

    real = harness.compiled_memory_bytes
    seen = []

    def quadratic(compiled):
        assert real(compiled) is not None
        k = compiled.args_info[0][1].shape[0]  # args: (params, x, target, keys)
        seen.append(k)
        return 1_000_000 + 10_000 * k + 100 * k * k

    monkeypatch.setattr(harness, "compiled_memory_bytes", quadratic)
    params = {"w": jnp.zeros((12, 3))}
    budget_bytes = 2_000_000
    evals = harness.evals_per_chunk_for_memory("gradient", _linear_apply, params, np.zeros((1, 2, 2, 3)),
                                               memory_mb=budget_bytes / 2**20)
    assert max(seen) > evals  # a larger chunk was tried and rejected
    assert 1_000_000 + 10_000 * evals + 100 * evals**2 <= budget_bytes
    # the chord of a convex curve undershoots: 52 here, of the 61 that would fit
    assert evals >= 45


def test_budget_chunk_is_capped_where_memory_does_not_grow(monkeypatch):
    # memory that does not grow with the chunk (RISE's: its forwards have a fixed size) gives no
    # slope to extrapolate: the chunk stops at max_images instead of billions of images
    from attrax import harness

    monkeypatch.setattr(harness, "compiled_memory_bytes", lambda c: 1_000_000 - c.args_info[0][1].shape[0])
    evals = harness.evals_per_chunk_for_memory("gradient", _linear_apply, {"w": jnp.zeros((12, 3))},
                                               np.zeros((1, 2, 2, 3)), memory_mb=100.0, max_images=1000)
    assert evals == 1000


def test_budget_chunk_of_a_small_batch_takes_one_compile(monkeypatch):
    # when the largest chunk asked for (max_images) is no larger than the second probe, it is
    # compiled first; it fits here, so it is the answer without the probes' line. When it does
    # not fit, the probes and the line take over (and the answer fits).
    from attrax import harness

    seen = []

    def linear(c):
        seen.append(c.args_info[0][1].shape[0])
        return 1_000_000 + 100_000 * seen[-1]

    monkeypatch.setattr(harness, "compiled_memory_bytes", linear)
    w = {"w": jnp.zeros((12, 3))}
    assert harness.evals_per_chunk_for_memory("gradient", _linear_apply, w, np.zeros((1, 2, 2, 3)),
                                              memory_mb=2.0, probe_images=(1, 4), max_images=3) == 3
    assert seen == [3]
    seen.clear()
    evals = harness.evals_per_chunk_for_memory("gradient", _linear_apply, w, np.zeros((1, 2, 2, 3)),
                                               memory_mb=1.25, probe_images=(1, 4), max_images=3)
    assert evals == 3 and 1_000_000 + 100_000 * 3 <= 1.25 * 2**20  # 3 fits 1.25 MB (1.31e6 bytes)
    seen.clear()
    evals = harness.evals_per_chunk_for_memory("gradient", _linear_apply, w, np.zeros((1, 2, 2, 3)),
                                               memory_mb=1.2, probe_images=(1, 4), max_images=3)
    assert seen[0] == 3 and 1_000_000 + 100_000 * evals <= 1.2 * 2**20 and evals == 2


@pytest.mark.slow  # four RISE compiles; the two tests above cover the same code on a cheap method
def test_rise_budget_chunk_fits(cnn32):
    # RISE's memory barely grows with the chunk while its forwards have a fixed size (the linear
    # estimate is huge); the chunk returned fits the budget by XLA's analysis
    from attrax.harness import chunk_size_for, compiled_memory_bytes, evals_per_chunk_for_memory

    model, params = cnn32
    hp = {"n_masks": 64, "cells": 4}
    entry = resolve("rise")
    fn = jax.jit(lambda p, xx, tt, kk: entry.fn(model, p, xx, tt, key=kk, **hp))

    def mb(c):
        compiled = fn.lower(params, jax.ShapeDtypeStruct((c, 32, 32, 3), jnp.float32),
                            jax.ShapeDtypeStruct((c,), jnp.int32), jax.eval_shape(lambda: per_example_keys(0, c)))
        return compiled_memory_bytes(compiled.compile()) / 2**20

    budget = 2 * mb(4)
    evals = evals_per_chunk_for_memory("rise", model, params, jnp.zeros((1, 32, 32, 3)), memory_mb=budget, **hp)
    chunk = chunk_size_for(64, 100_000, evals)
    assert evals % 64 == 0 and 4 <= chunk < 100_000
    assert mb(chunk) <= budget


@pytest.mark.parametrize("bad", [0, -1.0, "8"])
def test_budget_must_be_positive(bad):
    from attrax.harness import evals_per_chunk_for_memory

    with pytest.raises(AttraxError, match="memory_mb must be a positive"):
        evals_per_chunk_for_memory("gradient", _linear_apply, {"w": jnp.zeros((12, 3))}, np.zeros((1, 2, 2, 3)),
                                   memory_mb=bad)


def test_map_chunks_threads_split_a_chunk_and_keep_the_order(monkeypatch):
    """With chunk threads a chunk of 2+ images is cut into equal chunks run from the threads: the
    results come back in order and equal the one-call result; chunks of one image run in turn;
    a nested map_chunks (inside a pool thread) runs in turn (no deadlock); errors propagate."""
    import threading

    from attrax.harness import map_chunks

    x = jnp.arange(7 * 3, dtype=jnp.float32).reshape(7, 3)
    seen, threads = [], set()

    def fn(a):
        seen.append(a.shape[0])
        threads.add(threading.current_thread().name)
        inner = map_chunks(lambda b: b * 2.0, a.shape[0], a.shape[0], a)  # nested: in turn
        return inner + 1.0

    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "2")
    out = map_chunks(fn, 7, 7, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x * 2.0 + 1.0))
    assert seen == [4, 4] and all(t.startswith("attrax-chunk") for t in threads)  # 7 -> 4 + 4 (padded)
    seen.clear()
    threads.clear()
    map_chunks(fn, 3, 1, x[:3])  # one image per chunk: in this thread, in turn
    assert seen == [1, 1, 1] and threads == {threading.current_thread().name}
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "1")
    seen.clear()
    np.testing.assert_array_equal(np.asarray(map_chunks(fn, 7, 7, x)), np.asarray(out))
    assert seen == [7]

    def bad(a):
        raise AttraxError("chunk failed")

    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "2")
    with pytest.raises(AttraxError, match="chunk failed"):
        map_chunks(bad, 7, 7, x)
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "two")
    with pytest.raises(AttraxError, match="ATTRAX_CHUNK_THREADS must be a whole number"):
        map_chunks(fn, 7, 7, x)
