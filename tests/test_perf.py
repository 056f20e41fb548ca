"""The benchmark command (attrax.perf), no retracing, memory-budget chunking and the fast max pool."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def cnn():
    import attrax

    model = attrax.models.create("cnn_a")
    x = jax.random.uniform(jax.random.key(0), (6, 28, 28, 1))
    params = attrax.models.init(model, jax.random.key(1), x[:1])
    return model, params, x, jnp.array([0, 1, 2, 3, 4, 5], jnp.int32)


def test_bench_command_writes_table_and_summary(tmp_path):
    import attrax
    from attrax import perf

    out = tmp_path / "bench"
    code = perf.main([
        "--methods", "gradient,occlusion", "--protocols", "pixel_flipping,sparseness", "--batch", "4",
        "--train-epochs", "0", "--repeats", "2", "--no-steps", "--no-training", "--no-budget", "--no-roar",
        "--out", str(out), "--quiet",
    ])
    assert code == 0
    df = attrax.results.load(out)
    assert set(df.protocol) == {"bench"}
    assert {"gradient", "occlusion", "pixel_flipping", "sparseness"} <= set(df.method)
    got = df.set_index(["method", "metric"]).value
    for name in ("gradient", "occlusion"):
        assert got[(name, "images_per_s")] > 0
        assert got[(name, "compile_s")] >= 0
        assert got[(name, "peak_mb")] > 0
        assert got[(name, "bound_ratio")] > 0
    assert got[("pixel_flipping", "bound_ratio")] > 0
    assert ("sparseness", "bound_ratio") not in got.index  # no model evaluation: no bound
    assert got[("gradient", "bar_images_per_s")] == 2560
    md = (out / "performance.md").read_text()
    assert "| gradient |" in md and "| pixel_flipping |" in md and "bound ratio" in md


def test_bench_rejects_unknown_names(capsys):
    from attrax import perf

    assert perf.main(["--methods", "gradiant", "--protocols", "none", "--quiet"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


def test_bound_counts_follow_the_method_cost():
    from attrax import perf

    assert perf.method_bound("integrated_gradients", {"steps": 50}, {}) == ("gradient", 50.0)
    assert perf.method_bound("gradient", {}, {}) == ("gradient", 1.0)
    assert perf.method_bound("occlusion", {}, {})[0] == "forward"
    assert perf.protocol_bound("pixel_flipping", {"steps": 28, "random_runs": 0}, {}, 1.0) == ("forward", 29.0)
    assert perf.protocol_bound("pixel_flipping", {"steps": 28}, {}, 1.0) == ("forward", 58.0)  # + random curve
    assert perf.method_bound("gradient", {}, {"bound": {"kind": "forward", "evals": 3}}) == ("forward", 3.0)
    assert perf.protocol_bound("continuity", {"max_shift": 2}, {}, 1.0) == ("gradient", 5.0)


def test_second_batch_of_the_same_shape_compiles_nothing(cnn):
    import attrax
    from attrax.perf import count_compilations

    model, params, x, t = cnn
    x2 = jax.random.uniform(jax.random.key(5), x.shape)
    for name, hp in (("gradient", {}), ("integrated_gradients", {"steps": 4})):
        with count_compilations() as first:
            r1 = attrax.explain(name, model, params, x, t, key=0, **hp)
        with count_compilations() as second:
            r2 = attrax.explain(name, model, params, x2, t, key=1, **hp)
        jax.block_until_ready((r1, r2))
        assert first.count >= 1  # the counter sees compilations
        assert second.count == 0, f"{name}: a second batch of the same shape recompiled"


def test_chunks_are_balanced():
    from attrax.harness import chunk_size_for

    assert chunk_size_for(50, 100, 4096) == 50  # 2 x 50, not 81 + a padded 19
    assert chunk_size_for(1, 100, 4096) == 100
    assert chunk_size_for(256, 10, 256) == 1
    assert chunk_size_for(50, 100, 4096) * 50 <= 4096


def test_memory_budget_picks_chunks_within_the_budget(cnn):
    import attrax
    from attrax.errors import AttraxError
    from attrax.harness import chunk_size_for, compiled_memory_bytes, evals_per_chunk_for_memory
    from attrax.methods import get, per_example_keys

    model, params, x, t = cnn
    steps, budget = 16, 40.0
    evals = evals_per_chunk_for_memory("integrated_gradients", model, params, x, memory_mb=budget, steps=steps)
    chunk = chunk_size_for(steps, 10_000, evals)
    assert 1 <= chunk < 10_000
    fn = jax.jit(lambda p, xx, tt, kk: get("integrated_gradients").fn(model, p, xx, tt, key=kk, steps=steps))
    for c, within in ((chunk, True), (4 * chunk + 8, False)):
        compiled = fn.lower(params, jnp.zeros((c, 28, 28, 1)), jnp.zeros((c,), jnp.int32),
                            per_example_keys(0, c)).compile()
        assert (compiled_memory_bytes(compiled) / 2**20 <= budget) == within
    small = evals_per_chunk_for_memory("integrated_gradients", model, params, x, memory_mb=budget / 4, steps=steps)
    assert small < evals
    # chunking does not change the maps
    r_budget = attrax.explain("integrated_gradients", model, params, x, t, steps=steps, evals_per_chunk=small)
    r_whole = attrax.explain("integrated_gradients", model, params, x, t, steps=steps, chunk_size=x.shape[0])
    np.testing.assert_allclose(r_budget, r_whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(AttraxError, match="too small"):
        evals_per_chunk_for_memory("integrated_gradients", model, params, x, memory_mb=0.01, steps=steps)


@pytest.mark.parametrize("shape,padding", [((3, 8, 8, 4), "SAME"), ((2, 7, 9, 3), "SAME"), ((2, 7, 9, 3), "VALID")])
def test_max_pool_equals_flax_values_and_gradient_with_ties(shape, padding):
    from attrax.models import max_pool

    # rounded ReLU values: many exact ties (zeros and repeated positives) inside windows
    x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.key(2), shape)), 1)
    ref = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2), padding=padding)  # noqa: E731
    ours = lambda z: max_pool(z, 2, padding)  # noqa: E731
    np.testing.assert_array_equal(ours(x), ref(x))
    w = jax.random.normal(jax.random.key(3), ref(x).shape)
    g_ref = jax.grad(lambda z: (ref(z) * w).sum())(x)
    g_ours = jax.grad(lambda z: (ours(z) * w).sum())(x)
    np.testing.assert_array_equal(g_ours, g_ref)  # the first maximum of a window wins, as in XLA
    # forward-mode too (the rule is a JVP; reverse mode is its transpose)
    v = jax.random.normal(jax.random.key(4), shape)
    np.testing.assert_allclose(jax.jvp(ours, (x,), (v,))[1], jax.jvp(ref, (x,), (v,))[1], rtol=1e-6)


def test_bench_roar_grid_times_batched_and_sequential_retraining(tmp_path):
    """The benchmark's ROAR + KAR grid: same retrains in both modes, same accuracies, a ratio."""
    import yaml

    import attrax
    from attrax import perf

    cfg = {
        "dataset": "mnist_sample", "model": "cnn_a", "batch": 4, "train_epochs": 0, "repeats": 1,
        "warmup": 0, "max_seconds": 2, "relevance_method": "gradient", "methods": {}, "protocols": {},
        "roar_grid": {"train_per_class": 4, "test_images": 40, "epochs": 1, "batch_size": 8,
                      "fractions": [0.0, 0.5], "seeds": [0, 1], "batched": "parallel",
                      "vmap_methods": ["gradient"], "methods": {"gradient": {}, "random": {}}},
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    assert perf.main(["--config", str(tmp_path / "b.yaml"), "--roar-only", "--out", str(out), "--quiet"]) == 0
    run = attrax.results.load(out)
    meta = json.loads((out / "run.json").read_text())
    recs = [r for r in meta["bench"]["records"] if r["kind"] == "roar"]
    df = run[run.experiment == "bench/roar"]
    modes = [json.loads(h)["mode"] for h in df[df.metric == "train_ratio"].method_hparams]
    assert modes == ["parallel", "sequential", "vmap"]
    ratios = df[df.metric == "train_ratio"].value.to_numpy()
    assert ratios[1] == 1.0 and np.all(ratios > 0)
    # gradient: none + roar/kar at 0.5 = 3 variants x 2 seeds; random: its 0.5 variant (none is shared)
    assert {json.loads(h)["retrains"] for h in df.method_hparams} >= {8, 6}
    md = (out / "performance.md").read_text()
    assert "## ROAR + KAR grid" in md and "| parallel | 8 |" in md and "difference" in md
    assert recs[0]["max_accuracy_diff"] == 0.0  # parallel retrains equal the sequential ones
