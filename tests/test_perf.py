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
        "--bound-batches", "2,8", "--out", str(out), "--quiet",
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
    assert ("gradient", "bar_images_per_s") not in got.index  # no PyTorch figure without --against
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

    # rounded ReLU values: many exact ties (zeros and repeated positives) inside windows (NumPy
    # draws, and everything below in one compiled call: eager ops would each compile)
    rng = np.random.default_rng(2)
    x = np.round(np.maximum(rng.normal(size=shape), 0), 1).astype(np.float32)
    v = rng.normal(size=shape).astype(np.float32)
    ref = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2), padding=padding)  # noqa: E731
    ours = lambda z: max_pool(z, 2, padding)  # noqa: E731
    w = rng.normal(size=jax.eval_shape(ref, x).shape).astype(np.float32)

    @jax.jit
    def both(x, w, v):
        return [(f(x), jax.grad(lambda z, f=f: (f(z) * w).sum())(x), jax.jvp(f, (x,), (v,))[1]) for f in (ours, ref)]

    (y_ours, g_ours, t_ours), (y_ref, g_ref, t_ref) = both(x, w, v)
    np.testing.assert_array_equal(y_ours, y_ref)
    np.testing.assert_array_equal(g_ours, g_ref)  # the first maximum of a window wins, as in XLA
    # forward-mode too (the rule is a JVP; reverse mode is its transpose)
    np.testing.assert_allclose(t_ours, t_ref, rtol=1e-6)


def test_bench_roar_grid_times_batched_and_sequential_retraining(tmp_path):
    """The benchmark's ROAR + KAR grid: same retrains in both modes, same accuracies, a ratio."""
    import yaml

    import attrax
    from attrax import perf

    cfg = {
        "dataset": "mnist_sample", "model": "mlp", "batch": 4, "train_epochs": 0, "repeats": 1,
        "warmup": 0, "max_seconds": 2, "relevance_method": "gradient", "methods": {}, "protocols": {},
        "roar_grid": {"train_per_class": 4, "test_images": 40, "epochs": 1, "batch_size": 8,
                      "fractions": [0.0, 0.5], "seeds": [0, 1], "batched": "parallel",
                      "vmap_methods": ["gradient"], "methods": {"gradient": {}, "random": {}}},
        "against": {"attribution": {"Saliency": [{"method": "gradient"}]},
                    "training": {"roar_retrain": [{"train": "fit"}, {"train": "roar_grid"}]}},
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    assert perf.main(["--config", str(tmp_path / "b.yaml"), "--roar-only", "--out", str(out), "--quiet",
                      "--against", str(_anchor_json(tmp_path))]) == 0
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
    # images/s counts the images the steps went through (40 digits, batch 8: all of them)
    tr = __import__("importlib").import_module("attrax.train")
    for r in recs[:2]:
        per = r["hparams"]["images_per_retrain"]
        assert per == tr.images_trained(40, 8, 1) == 40
        assert r["images_per_s"] == pytest.approx(r["hparams"]["retrains"] * per / r["train_s"])
    # --against with --roar-only compares the grid only: no method is timed for the anchor's rows
    every = meta["bench"]["records"]
    assert not [r for r in every if r["kind"] in ("method", "protocol", "train")]
    vs = {(r["name"], r.get("counterpart")): r for r in every if r["kind"] == "against"}
    assert "not run (--roar-only" in vs[("attribution.Saliency", "gradient")]["note"]
    assert "not run (--roar-only" in vs[("training.roar_retrain", "train.fit (fit)")]["note"]
    assert vs[("training.roar_retrain", "ROAR + KAR grid (roar_grid section), batched retraining")]["speedup"] > 0


# ---------------------------------------------------------------------------------------------
# --against: the PyTorch stack's JSON read side by side


def _anchor_json(tmp_path):
    """A small synthetic torch_anchor.py result: one method with a counterpart, one without, a
    failed entry, two Quantus metrics (one without an attrax counterpart) and the retrain."""
    data = {
        "meta": {"date_utc": "2026-01-01T00:00:00+00:00", "quick": False},
        "model": {"train": {"epochs": 3, "batch_size": 64}},
        "attribution": {
            "Saliency": {"status": "ok", "images_per_s": 1000.0, "settings": "captum Saliency",
                         "cpu_during_passes": [{"foreign_cpu_cores_avg": 0.01}]},
            "Mystery": {"status": "ok", "images_per_s": 10.0, "settings": "nothing like it"},
            "Lime": {"status": "failed", "error": "ValueError: boom", "settings": "n_samples=200"},
        },
        "quantus": {
            "Sparseness": {"status": "ok", "images_per_s": 500.0, "settings": "defaults",
                           "cpu_during": {"foreign_cpu_cores_avg": 0.02}},
            "MonotonicityCorrelation_fis28": {"status": "ok", "images_per_s": 2.0, "settings": "fis28"},
        },
        "roar_retrain": {"n_train": 4000, "wall_s": 6.0, "cpu_during": {"foreign_cpu_cores_avg": 0.0}},
    }
    path = tmp_path / "torch_cpu.json"
    path.write_text(json.dumps(data))
    return path


def test_against_prints_a_ratio_for_every_anchor_workload(tmp_path, capsys):
    import attrax
    from attrax import perf

    out = tmp_path / "bench"
    code = perf.main(["--methods", "none", "--protocols", "none", "--batch", "4", "--train-epochs", "0",
                      "--repeats", "2", "--no-steps", "--no-training", "--no-budget", "--no-roar",
                      "--bound-batches", "4", "--against", str(_anchor_json(tmp_path)), "--out", str(out),
                      "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Against the PyTorch stack" in printed
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in printed.splitlines() if ln.startswith("| ")}
    for key in ("attribution.Saliency", "attribution.Mystery", "attribution.Lime", "quantus.Sparseness",
                "quantus.MonotonicityCorrelation_fis28", "training.roar_retrain"):
        assert key in lines, key
    assert "no attrax counterpart named" in lines["attribution.Mystery"]
    assert "anchor entry failed" in lines["attribution.Lime"] and "boom" in lines["attribution.Lime"]
    assert "no attrax counterpart: attrax's monotonicity" in lines["quantus.MonotonicityCorrelation_fis28"]
    assert "--no-training" in printed
    recs = json.loads((out / "run.json").read_text())["bench"]["records"]
    rows = {(r["name"], r.get("counterpart")): r for r in recs if r["kind"] == "against"}
    sal = rows[("attribution.Saliency", "gradient")]
    grad = next(r for r in recs if r["kind"] == "method" and r["name"] == "gradient")
    assert sal["speedup"] == pytest.approx(grad["images_per_s"] / 1000.0)
    assert grad["bar"] == 1000.0  # the methods table shows the anchor's figure beside it
    sp = rows[("quantus.Sparseness", "sparseness")]
    assert sp["speedup"] == pytest.approx(sp["images_per_s"] / 500.0)
    assert sp["anchor_foreign"] == 0.02
    df = attrax.results.load(out)
    ag = df[df.experiment == "bench/against"].set_index(["method", "metric"]).value
    assert ag[("attribution.Saliency", "bar_images_per_s")] == 1000.0
    assert ag[("attribution.Saliency", "speedup_vs_bar")] == pytest.approx(sal["speedup"])


@pytest.mark.parametrize("content,msg", [(None, "no such file"), ("{not json", "not valid JSON"),
                                         ("[1, 2]", "not a torch_anchor.py result"),
                                         ('{"meta": {}}', "not a torch_anchor.py result")])
def test_against_rejects_a_missing_or_corrupt_json_in_one_line(tmp_path, capsys, content, msg):
    from attrax import perf

    path = tmp_path / "torch_cpu.json"
    if content is not None:
        path.write_text(content)
    assert perf.main(["--methods", "none", "--protocols", "none", "--against", str(path), "--quiet",
                      "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and err.startswith("attrax-bench: error: --against")
    assert not (tmp_path / "o").exists()  # failed before anything ran


def test_default_config_keeps_no_speed_constants_and_names_real_counterparts():
    from importlib import resources

    import yaml

    import attrax
    from attrax import perf

    text = (resources.files("attrax.conf") / "bench" / "default.yaml").read_text()
    cfg = yaml.safe_load(text)

    def keys(v):
        if isinstance(v, dict):
            for k, x in v.items():
                yield k
                yield from keys(x)
        elif isinstance(v, list):
            for x in v:
                yield from keys(x)

    assert not {"bar", "bars", "pytorch", "torch"} & set(keys(cfg))
    for section, table in cfg["against"].items():
        for name in table:
            for spec in perf.counterparts(cfg, section, name):
                # `goal`: a ratio the counterpart must reach (not a speed), a positive number
                assert set(spec) <= {"method", "hparams", "protocol", "choices", "train", "seeds", "none", "goal"}, spec
                assert "goal" not in spec or (isinstance(spec["goal"], int | float) and spec["goal"] > 0), spec
                if "method" in spec:
                    allowed = attrax.methods.get(spec["method"]).hparams()
                    assert set(spec.get("hparams") or {}) <= set(allowed), spec
                elif "protocol" in spec:
                    allowed = attrax.protocols.get(spec["protocol"]).hparams()
                    assert set(spec.get("choices") or {}) <= set(allowed), spec
                elif "train" in spec:
                    assert spec["train"] in ("fit", "parallel", "roar_grid")


def test_bound_is_the_fastest_rate_at_any_batch_size(cnn, monkeypatch):
    """reference_times: per-image seconds minimised over the sweep, scaled to the batch."""
    from attrax import perf

    model, params, x, t = cnn  # batch 6
    # per call (forward, gradient) at batch 2, 6, 12: the gradient is fastest per image at 12,
    # the forward at 2
    fake = iter([0.001, 0.010, 0.006, 0.024, 0.024, 0.024])

    def fake_time_calls(fn, **kw):
        v = next(fake)
        return {"median_s": v, "cpu_s": 2 * v, "first_s": v, "compile_s": 0.0, "repeats": 1, "min_s": v}

    monkeypatch.setattr(perf, "time_calls", fake_time_calls)
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "1")  # one call per size (the threaded form below)
    ref = perf.reference_times(model, params, x, t, repeats=1, max_seconds=1, batches=[12, 2])
    assert [r["batch"] for r in ref["sweep"]] == [2, 6, 12]
    assert ref["gradient"] == pytest.approx(6 * 0.024 / 12) and ref["gradient_best_batch"] == 12
    assert ref["forward"] == pytest.approx(6 * 0.001 / 2) and ref["forward_best_batch"] == 2
    assert ref["gradient_batch"] == 0.024 and ref["forward_batch"] == 0.006
    assert ref["gradient_cpu"] == pytest.approx(perf.cpu_equivalent_s(2 * 0.024) * 6 / 12)

    # with chunk threads each size is also timed as explain runs it (forward, gradient, threaded
    # forward, threaded gradient): the faster form is the bound, the single call is kept
    fake = iter([0.004, 0.010, 0.002, 0.020])
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "2")
    ref = perf.reference_times(model, params, x, t, repeats=1, max_seconds=1)
    row = ref["sweep"][0]
    assert row["forward"] == 0.002 and row["forward_one_call"] == 0.004
    assert row["gradient"] == 0.010 and row["gradient_one_call"] == 0.010
    assert ref["forward"] == pytest.approx(0.002) and ref["gradient"] == pytest.approx(0.010)


def test_against_markdown_flags_a_quick_anchor_run():
    from attrax import perf

    rec = {"kind": "against", "name": "quantus.Sparseness", "anchor_settings": "defaults", "bar": 10.0,
           "source": "x.json", "anchor_quick": True, "counterpart": "sparseness", "images_per_s": 20.0,
           "speedup": 2.0}
    md = "\n".join(perf.against_markdown([rec], 1.5))
    assert "smoke run" in md and "| quantus.Sparseness |" in md and "| 2.00 |" in md and "| ok" in md
    assert "smoke run" not in "\n".join(perf.against_markdown([{**rec, "anchor_quick": False}], 1.5))


def test_against_verdict_uses_a_counterparts_own_goal():
    """The ROAR + KAR grid's goal is 2x (conf/bench/default.yaml `goal:`), not the run's 1.5x: a
    1.67x grid is BELOW, a 1.67x method is ok."""
    from attrax import perf

    base = {"kind": "against", "anchor_settings": "s", "bar": 10.0, "source": "x.json", "images_per_s": 16.7,
            "speedup": 1.67}
    grid = {**base, "name": "training.roar_retrain", "counterpart": "ROAR + KAR grid", "goal": 2.0}
    meth = {**base, "name": "attribution.Saliency", "counterpart": "gradient"}
    lines = perf.against_markdown([grid, meth], 1.5)
    assert "| BELOW (goal 2x)" in next(x for x in lines if "ROAR + KAR grid" in x)
    assert next(x for x in lines if "| gradient |" in x).endswith("| ok |")
    grid_cfg = next(c for c in perf.counterparts(perf.load_config(), "training", "roar_retrain")
                    if c.get("train") == "roar_grid")
    assert grid_cfg["goal"] == 2.0


# ---------------------------------------------------------------------------------------------
# The faster protocols give the numbers of the straightforward computation


def test_selectivity_and_continuity_scores_equal_one_forward_of_all_states(cnn):
    """Scores taken from the re-explaining call (`explain(return_score=)`: selectivity's states,
    continuity's shifted digits) against the plain computation: every state stacked and scored
    by one `target_scores` call."""
    import attrax
    from attrax.protocols._common import example_keys, repeat_keys, repeat_targets, target_scores
    from attrax.protocols.continuity import explain_path, translate
    from attrax.protocols.selectivity import _remove_best

    model, params, x, t = cnn
    r0 = attrax.explain("gradient", model, params, x, t)
    s = attrax.evaluate("selectivity", model, params, x, t, r0, key=0, method="gradient", steps=3)
    keys = example_keys(None, x.shape[0])
    cur, removed, r, states = x, jnp.zeros(x.shape[:3], bool), r0, [x]
    for i in range(3):
        if i:
            r = attrax.explain("gradient", model, params, cur, t, key=keys)
        cur, removed = _remove_best(cur, removed, r.sum(-1), jnp.zeros((4,)))
        states.append(cur)
    xs = jnp.stack(states, 1)
    ref = target_scores(model, params, xs.reshape((-1,) + x.shape[1:]), repeat_targets(t, 4)).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(s.values["curve"]), np.asarray(ref), rtol=1e-6, atol=1e-6)

    c = attrax.evaluate("continuity", model, params, x, t, r0, key=0, method="gradient", max_shift=2)
    path = translate(x, np.arange(-2, 3))
    ref_f = target_scores(model, params, path.reshape((-1,) + x.shape[1:]), repeat_targets(t, 5)).reshape(-1, 5)
    np.testing.assert_allclose(np.asarray(c.values["score"]), np.asarray(ref_f), rtol=1e-6, atol=1e-6)
    rp = explain_path(model, params, path, t, key=repeat_keys(keys, 5), method="gradient")
    np.testing.assert_allclose(np.asarray(c.values["quadrant_top_left"]),
                               np.asarray(rp[:, :, :14, :14].sum(axis=(2, 3, 4))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gradient", "guided_backprop", "occlusion"])
def test_explain_return_score_is_the_forward_of_the_same_inputs(cnn, method):
    """`return_score` gives the maps of a plain call and f_c of the inputs, whether or not the
    method's own forward is the model's (guided backprop's ReLUs; occlusion never takes x alone)."""
    import attrax
    from attrax.protocols._common import example_keys, reexplainer, target_scores

    model, params, x, t = cnn
    hp = {"window": 14, "stride": 14} if method == "occlusion" else {}
    r, f = attrax.explain(method, model, params, x, t, return_score="log_probability", **hp)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(attrax.explain(method, model, params, x, t, **hp)))
    ref = target_scores(model, params, x, t, "log_probability")
    np.testing.assert_allclose(np.asarray(f), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # a method-contract function through the protocols' re-explainer: the same pair
    fn = attrax.methods.METHODS.get(method).fn
    r2, f2 = reexplainer(lambda m, p, xx, tt, *, key: fn(m, p, xx, tt, key=key, **hp), None, model, params,
                         "selectivity", score="log_probability")(x, t, example_keys(None, x.shape[0]))
    np.testing.assert_allclose(np.asarray(f2), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert r2.shape == x.shape
    _, logits = attrax.explain(method, model, params, x, t, return_score="logits", **hp)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(params, x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(attrax.AttraxError, match="unknown return_score 'prob'.*logits"):
        attrax.explain(method, model, params, x, t, return_score="prob", **hp)


def test_input_invariance_memoizes_the_first_layer_lookup(cnn):
    import attrax
    from attrax.protocols.invariance import first_linear_layer

    model, params, x, t = cnn
    m = attrax.as_model(model)
    assert first_linear_layer(m, params, x) == (("conv1",), "conv")
    calls = []
    orig = m.apply_fn
    m2 = attrax.models.Model(m.name, lambda p, z: calls.append(1) or orig(p, z), m.module)
    assert first_linear_layer(m2, params, x) == first_linear_layer(m2, params, x) == (("conv1",), "conv")
    assert len(calls) == 1  # traced once: the second lookup is memoized
    r = attrax.explain("gradient", m, params, x, t)
    a = attrax.evaluate("input_invariance", m, params, x, t, r, key=0, method="gradient")
    b = attrax.evaluate("input_invariance", m, params, x, t, r, key=0, method="gradient")
    np.testing.assert_array_equal(np.asarray(a.values["distance"]), np.asarray(b.values["distance"]))
    # the logits taken from the explain calls (`return_score="logits"`) against separate forwards
    from attrax.harness import forward
    from attrax.protocols.invariance import shifted_twin

    twin, _ = shifted_twin(m, params, x, -1.0)
    ref_err = jnp.abs(forward(m, params, x) - forward(m, twin, x - 1.0)).max(-1)
    np.testing.assert_allclose(np.asarray(a.values["twin_error"]), np.asarray(ref_err), rtol=1e-5, atol=1e-6)
    r2 = attrax.explain("gradient", m, twin, x - 1.0, t)
    ref_d = jnp.abs(r - r2).reshape(6, -1).sum(-1) / jnp.abs(r).reshape(6, -1).sum(-1)
    np.testing.assert_allclose(np.asarray(a.values["distance"]), np.asarray(ref_d), rtol=1e-5)


def test_parallel_step_bound_runs_a_model_per_thread():
    """The training section's bound of parallel retraining: `threads` models stepped at once,
    each for an epoch's steps; images/s counts every thread's images."""
    import importlib

    import attrax
    from attrax import perf

    tr = importlib.import_module("attrax.train")
    ds = attrax.datasets.load("synthetic", "train", n_train=40, n_test=4, size=16, num_classes=2, distractors=0, seed=0)
    model = attrax.models.create("mlp", hidden=(4,), num_classes=2)
    rec = perf._parallel_step_bound(tr, model, ds, epochs=1, workers=2, min_steps=1)
    assert rec["name"] == "parallel steps alone" and rec["hparams"] == {"batch": 40, "steps": 1, "threads": 2}
    assert rec["images_per_s"] == pytest.approx(2 * 40 / rec["seconds"])
    assert perf._parallel_step_bound(tr, model, ds, epochs=1, workers=1) is None  # one core: no bound to report


def test_sandwich_rescores_a_finished_run_against_the_anchor_before_and_after(tmp_path, capsys):
    """`--from-run DIR --against-after PATH`: each PyTorch figure becomes the geometric mean of the
    anchor run before attrax and the one after it; the single-run ratios and the drift are kept;
    an unchanged second run gives the one-run ratios back."""
    from attrax import perf

    before = json.loads(_anchor_json(tmp_path).read_text())
    sal = {"kind": "against", "name": "attribution.Saliency", "anchor_settings": "s", "bar": 1000.0,
           "anchor_foreign": 0.01, "source": "before.json", "counterpart": "gradient", "images_per_s": 3000.0,
           "cpu_images_per_s": 3300.0, "speedup": 3.0, "cpu_speedup": 3.3}
    grid = {"kind": "against", "name": "training.roar_retrain", "anchor_settings": "s", "bar": 2000.0,
            "source": "before.json", "counterpart": "ROAR + KAR grid", "images_per_s": 3000.0, "speedup": 1.5,
            "goal": 2.0, "retrains": 10, "train_images_total": 120_000, "train_s": 40.0, "grid_s": 60.0}
    grid["note"] = perf._grid_note(grid, 2000.0)
    gone = {"kind": "against", "name": "attribution.Gone", "anchor_settings": "s", "bar": 50.0,
            "source": "before.json", "counterpart": "x", "images_per_s": 100.0, "speedup": 2.0}
    records = [{"kind": "method", "name": "gradient", "images_per_s": 3000.0}, sal, grid, gone]

    same = perf.sandwich_records(records, {**before, "roar_retrain": {"n_train": 4000, "wall_s": 6.0}}, "a.json")
    assert len(same) == 3  # only the side-by-side records
    s0 = same[0]
    assert s0["anchor_drift"] == pytest.approx(1.0) and s0["speedup"] == pytest.approx(3.0)
    assert s0["speedup_before"] == s0["speedup_after"] == pytest.approx(3.0)

    slower = json.loads(json.dumps(before))
    slower["attribution"]["Saliency"]["images_per_s"] = 250.0  # the machine got 4x slower for PyTorch
    slower["roar_retrain"] = {"n_train": 4000, "wall_s": 24.0}  # 3 x 4000 / 24 = 500 training images/s
    rows = perf.sandwich_records(records, slower, "after.json")
    s, g, x = rows
    assert s["bar"] == pytest.approx(500.0) and s["bar_before"] == 1000.0 and s["bar_after"] == 250.0
    assert s["anchor_drift"] == pytest.approx(0.25)
    assert (s["speedup"], s["speedup_before"], s["speedup_after"]) == pytest.approx((6.0, 3.0, 12.0))
    assert s["cpu_speedup"] == pytest.approx(6.6) and s["anchor_foreign"] == 0.01
    assert g["bar"] == pytest.approx(1000.0) and g["speedup"] == pytest.approx(3.0)
    assert "PyTorch-equivalent 120.0 s" in g["note"]  # 120,000 images at the mean 1,000 images/s
    # a training row's arithmetic-bound note follows the re-scored PyTorch figure
    bounded = perf.sandwich_records([dict(grid, arith_bound=4000.0)], slower, "after.json")[0]
    assert "PyTorch-equivalent 120.0 s" in bounded["note"]
    assert "PyTorch 25%, attrax 75%; 2x needs 50%" in bounded["note"]
    assert x["speedup"] == 2.0 and "before-run figure only" in x["note"] and "bar_after" not in x
    md = "\n".join(perf.against_markdown(rows, 1.5))
    assert "Sandwich" in md and "after.json" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| attribution.Saliency"))
    assert "| 1,000.0 / 250.0 | 0.25 | 3.00 / 12.00 |" in line and line.endswith("| ok |")
    assert "BELOW (goal 2x)" not in next(ln for ln in md.splitlines() if ln.startswith("| training.roar_retrain"))

    # the command: a run folder with its records, the second anchor JSON
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"bench": {"records": records}}))
    after = tmp_path / "after.json"
    after.write_text(json.dumps(slower))
    capsys.readouterr()
    assert perf.main(["--from-run", str(run), "--against-after", str(after)]) == 0
    printed = capsys.readouterr().out
    assert "| 1,000.0 / 250.0 | 0.25 |" in printed and (run / "sandwich.md").read_text() in printed
    assert json.loads((run / "sandwich.json").read_text())[0]["speedup"] == pytest.approx(6.0)


@pytest.mark.parametrize("case,msg", [("alone", "go together"), ("no_run", "no run.json"),
                                      ("damaged", "run.json is damaged"), ("no_against", "no side-by-side records")])
def test_sandwich_bad_input_is_one_line(tmp_path, capsys, case, msg):
    from attrax import perf

    run = tmp_path / "run"
    run.mkdir()
    if case == "damaged":
        (run / "run.json").write_text("{half")
    elif case == "no_against":
        (run / "run.json").write_text(json.dumps({"bench": {"records": [{"kind": "method", "name": "gradient"}]}}))
    args = ["--against-after", str(_anchor_json(tmp_path))]
    if case != "alone":
        args += ["--from-run", str(run if case != "no_run" else tmp_path / "nowhere")]
    assert perf.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err and err.startswith("attrax-bench: error:")


def test_images_trained_counts_only_full_batches():
    """fit / train_many drop an epoch's last n % batch examples: images/s must not count them."""
    import importlib

    tr = importlib.import_module("attrax.train")
    assert tr.images_trained(1000, 64, 2) == 15 * 64 * 2 == 1920
    assert tr.images_trained(4000, 64, 3) == 62 * 64 * 3
    assert tr.images_trained(40, 64, 1) == 40  # a batch larger than the set: one step of all of it
    assert tr.images_trained(0, 64, 1) == 0
    # and the steps really see that many: a fit of 10 images at batch 4 takes 2 steps per epoch
    idx = tr._epoch_batches(10, 4, __import__("jax").random.key(0))
    assert idx.shape == (2, 4) and tr.images_trained(10, 4, 1) == idx.size


def test_training_flops_per_image_is_xlas_count_of_the_gradient():
    """Known answer on a model written the ordinary way: a VALID 3x3 conv (8x8x1 -> 2 channels)
    and a dense layer (72 -> 2). Products: the conv's forward and kernel gradient 6*6*2*9*2 each
    (no input gradient for the data), the dense layer's forward, kernel and input gradient 72*2*2
    each; plus the elementwise ops (bias, ReLU, loss: XLA counts 4,128 in all)."""
    import flax.linen as nn

    import attrax
    from attrax import perf

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(2, (3, 3), padding="VALID")(x))
            return nn.Dense(2)(x.reshape(x.shape[0], -1))

    model = attrax.models.as_model(Tiny())
    fpi = perf.training_flops_per_image(model, np.zeros((1, 8, 8, 1), np.float32), batch=4)
    matmul = 2 * (6 * 6 * 2 * 9 * 2) + 3 * (72 * 2 * 2)
    assert matmul <= fpi <= 1.25 * matmul


def test_matmul_probe_and_the_efficiency_note():
    from attrax import perf

    r = perf.matmul_probe(start_at=0.0, seconds=0.05, shapes=((64, 64, 64), (32, 64, 16)))
    assert r["flops"] > 0 and r["shape"] in ("(64, 64) @ (64, 64)", "(32, 64) @ (64, 16)")
    note = perf._efficiency_note({"bar": 1000.0, "images_per_s": 1500.0, "goal": 2.0}, {"images_per_s": 2500.0})
    assert note == "arithmetic bound 2,500 img/s: PyTorch 40%, attrax 60%; 2x needs 80%"
    rows = perf._with_bound_notes([{"name": "training.roar_retrain", "bar": 1000.0, "images_per_s": 1500.0},
                                   {"name": "attribution.Saliency", "bar": 1000.0, "images_per_s": 1500.0}],
                                  {"images_per_s": 2500.0})
    assert rows[0]["arith_bound"] == 2500.0 and "PyTorch 40%" in rows[0]["note"]
    assert "arith_bound" not in rows[1] and "note" not in rows[1]


@pytest.mark.slow
def test_arithmetic_bound_runs_one_pinned_probe_per_core():
    import attrax
    from attrax import perf

    rec = perf.arithmetic_bound(attrax.models.create("mlp", hidden=(8,)), np.zeros((1, 28, 28, 1), np.float32))
    assert rec["images_per_s"] == pytest.approx(rec["matmul_flops"] / rec["flops_per_image"])
    assert "pinned process" in rec["note"]


def test_fit_steps_alone_times_fits_own_step(monkeypatch):
    """`fit steps alone` steps the state with fit's own step (two threaded halves on a 2-thread
    CPU), and the trained state equals the fused split step's to float rounding."""
    import importlib

    import attrax
    from attrax import perf

    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "2")
    tr = importlib.import_module("attrax.train")
    ds = attrax.datasets.load("synthetic", "train", n_train=64, n_test=4, size=16, num_classes=2, distractors=0, seed=0)
    model = attrax.models.create("mlp", hidden=(8,), num_classes=2)
    batch, run = perf._fixed_batch_steps(tr, model, ds, split=True)
    threaded_state = run(3)
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "1")
    _, fused = perf._fixed_batch_steps(tr, model, ds, split=True)
    for a, b in zip(jax.tree.leaves(threaded_state), jax.tree.leaves(fused(3)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    rec = perf._fit_step_overhead(tr, model, ds, epochs=1, fit_s=1.0)
    assert rec["hparams"] == {"batch": 64, "steps": 1} and rec["images_per_s"] == pytest.approx(64 / rec["seconds"])
