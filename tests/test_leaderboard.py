"""The leaderboard ranks from the results alone: identity, directions carried in the rows, LeRF."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pandas as pd

import attrax
from attrax import report, results

OLD_COLUMNS = ["run_id", "experiment", "dataset", "model", "model_seed", "method", "method_hparams", "protocol",
               "metric", "x", "value", "example", "seed"]


def _rows(linear, r, method, order):
    model, params, x, target, w = linear
    s = attrax.evaluate("pixel_flipping", model, params, x, target, r, key=jax.random.key(0), order=order, steps=9)
    return results.scores_to_rows(s, example_index=range(4), run_id="r", dataset="d", model="linear",
                                  method=method, method_hparams={}, protocol="pixel_flipping", seed=0)


def test_lerf_ranks_the_inverted_map_last_and_does_not_pool_with_morf(linear):
    model, params, x, target, w = linear
    r = (x.reshape(4, -1) * w[:, target].T).reshape(x.shape)  # input x gradient: exact for a linear model
    df = pd.concat([_rows(linear, r, "map", "lerf"), _rows(linear, -r, "inverted", "lerf"),
                    _rows(linear, r, "map", "morf"), _rows(linear, -r, "inverted", "morf")])
    lerf = df[df["protocol_choices"].str.contains('"order": "lerf"')]
    assert (lerf.loc[lerf.metric == "auc", "direction"] == "higher").all()
    lb = report.leaderboard(df)
    auc = lb[lb.metric == "auc"]
    assert len(auc) == 4  # MoRF and LeRF are two experiments, two methods each
    for order in ("lerf", "morf"):
        g = auc[auc.protocol_choices.str.contains(f'"order": "{order}"')].set_index("method")
        assert g.loc["inverted", "rank"] == 2 and g.loc["map", "rank"] == 1, order
    assert "order=lerf" in report.format_table(lb)


def _write(run, df):
    run.mkdir(parents=True)
    df.to_parquet(run / results.ROWS_FILE, index=False)
    (run / results.RUN_FILE).write_text(json.dumps({"status": "complete"}))


def test_metadata_of_older_results_ranks_as_written(tmp_path):
    base = dict(run_id="old", experiment="e", dataset="d", model="m", model_seed=0, method_hparams="{}", x=float("nan"),
                seed=0)
    vals = {"a": [0.2, 0.3], "b": [0.6, 0.7]}
    rows = pd.DataFrame([{**base, "method": m, "protocol": "pixel_flipping", "metric": "auc", "value": v,
                          "example": i} for m, vs in vals.items() for i, v in enumerate(vs)])
    # 1. written before the metadata columns existed: the registry's direction (auc: lower) ranks
    _write(tmp_path / "v0", rows[OLD_COLUMNS])
    lb = report.leaderboard(results.load(tmp_path / "v0")).set_index("method")
    assert lb.loc["a", "rank"] == 1 and lb.loc["a", "higher_is_better"] is False
    # 2. rows that carry their metadata keep their ranking whatever the registry says now
    carried = rows.assign(direction="higher", protocol_choices='{"order": "lerf"}', x_label="", aggregation="mean",
                          version=1, flag="")
    _write(tmp_path / "v1", carried)
    lb = report.leaderboard(results.load(tmp_path / "v1")).set_index("method")
    assert lb.loc["b", "rank"] == 1 and lb.loc["b", "higher_is_better"] is True
    # 3. a metric the writer marked as not ranked stays unranked
    _write(tmp_path / "v2", carried.assign(direction="none"))
    assert report.leaderboard(results.load(tmp_path / "v2"))["rank"].isna().all()


def test_identity_includes_hparams_model_dataset_and_seeds():
    base = dict(run_id="r", experiment="e", protocol="sparseness", metric="gini", x=float("nan"), example=0,
                value=0.5, direction="higher", protocol_choices="{}", x_label="", aggregation="mean", version=1)
    rows = pd.DataFrame([
        {**base, "method": "ig", "method_hparams": '{"steps": 16}', "model": "m", "dataset": "d", "model_seed": 0,
         "seed": 0},
        {**base, "method": "ig", "method_hparams": '{"steps": 50}', "model": "m", "dataset": "d", "model_seed": 0,
         "seed": 0},
        {**base, "method": "ig", "method_hparams": '{"steps": 16}', "model": "m2", "dataset": "d", "model_seed": 0,
         "seed": 0},
        {**base, "method": "ig", "method_hparams": '{"steps": 16}', "model": "m", "dataset": "d", "model_seed": 1,
         "seed": 0},
    ])
    lb = report.leaderboard(results.conform(rows))
    assert len(lb) == 4 and lb["label"].nunique() == 4
    assert "steps" in report.format_table(lb)


def test_curve_only_retrain_rows_pool_their_replicate_seeds():
    base = dict(run_id="r", experiment="e", protocol="roar", metric="test_accuracy", example=-1, model="m",
                dataset="d", model_seed=0, method_hparams="{}", direction="lower", protocol_choices="{}",
                x_label="fraction replaced", aggregation="mean_over_seeds", version=1)
    rows = pd.DataFrame([{**base, "method": m, "x": f, "seed": s, "value": v - f * (m == "good")}
                         for m, v in (("good", 0.9), ("bad", 0.9)) for f in (0.0, 0.5) for s in (0, 1)])
    lb = report.leaderboard(results.conform(rows)).set_index("method")
    assert len(lb) == 2 and lb.loc["good", "rank"] == 1 and lb.loc["good", "n"] == 2


def test_flagged_rows_are_reported():
    base = dict(run_id="r", experiment="e", protocol="sanity_data_randomization", metric="ssim", x=float("nan"),
                model="m", dataset="d", model_seed=0, method_hparams="{}", seed=0, direction="lower",
                protocol_choices="{}", x_label="", aggregation="mean", version=2)
    rows = pd.DataFrame([{**base, "method": "gradient", "example": i, "value": 0.1,
                          "flag": "permuted-label model did not reach fit_accuracy 0.95"} for i in range(3)])
    lb = report.leaderboard(results.conform(rows))
    assert lb["flagged"].str.contains("did not reach").all()
    assert "did not reach" in report.format_table(lb)


def test_per_image_reference_is_sliced_with_the_chunk(linear):
    _, _, x, target, _ = linear
    model = attrax.models.create("mlp", hidden=(8,), num_classes=3)
    params = model.module.init(jax.random.key(0), x[:1])
    ref = jax.random.uniform(jax.random.key(9), x.shape)
    want = jnp.concatenate([attrax.explain("deeplift", model, params, x[i:i + 1], target[i:i + 1],
                                           reference=ref[i]) for i in range(4)])
    for chunk in (None, 1, 3):
        got = attrax.explain("deeplift", model, params, x, target, reference=ref, chunk_size=chunk)
        assert jnp.allclose(got, want, atol=1e-5), chunk
