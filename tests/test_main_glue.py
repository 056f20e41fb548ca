"""The main job's glue: the map and every re-explanation run the same method (filled
hyperparameters, the map's key), for per-batch and retraining protocols; sweeps stay apart."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import attrax
from attrax import main, report, results

TINY = ["model=mlp", "train=fast", "progress=false", "figures=false", "controls=[]", "n_images=6"]


def _cfg(overrides):
    return main.compose([*TINY, *overrides])


def _quiet(*a, **k):
    pass


def test_expected_gradients_sanity_with_nothing_randomized_reaches_its_noise_ceiling(tmp_path):
    cfg = _cfg(["method=expected_gradients", "method.n_samples=8", "protocol=sanity_model_randomization",
                "protocol.modes=[cascading]", "protocol.metrics=[spearman_abs]"])
    df = main.run(cfg, tmp_path / "eg", log=_quiet)
    mean = df.groupby("metric")["value"].mean()
    assert mean["unrandomized_spearman_abs"] > 0.99  # the same references and key as the map
    assert mean["unrandomized_spearman_abs"] >= mean["noise_ceiling_spearman_abs"] - 0.02
    filled = results.run_info(tmp_path / "eg")["filled_hparams"]["expected_gradients"]
    assert len(filled["baselines"]["indices"]) == 64
    recorded = {json.loads(h)["baselines"] for h in df.loc[df.method == "expected_gradients", "method_hparams"]}
    assert recorded == {None}  # the rows keep the configured values; run.json says how they were filled


def test_retraining_path_gets_the_same_filled_hparams(tmp_path, monkeypatch):
    seen = {}

    def spy(method, model, train_set, test_set, **kw):
        seen.update(kw, method=method, n_train=len(train_set))
        return results.conform(pd.DataFrame({"protocol": ["sanity_data_randomization"], "metric": ["spearman"],
                                             "value": [0.5], "example": [0], "x": [np.nan]}))

    reg = attrax.protocols.PROTOCOLS._entries
    monkeypatch.setitem(reg, "sanity_data_randomization", dataclasses.replace(reg["sanity_data_randomization"],
                                                                              fn=spy))
    cfg = _cfg(["method=expected_gradients", "protocol=sanity_data_randomization", "retrain_train_per_class=5",
                "model_seed=3"])
    main.run(cfg, tmp_path / "dr", log=_quiet)
    assert seen["method"] == "expected_gradients" and seen["n_train"] == 50 and seen["model_seed"] == 3
    tr = attrax.datasets.load("mnist_sample", "train").take(per_class=5)
    want, _ = main.fill_method_hparams("expected_gradients", {}, tr, 0)
    np.testing.assert_array_equal(seen["method_hparams"]["baselines"], want["baselines"])
    assert seen["train_config"]["epochs"] == 1


@pytest.mark.parametrize("steps", [(16, 50)])
def test_a_sweep_over_steps_gives_two_leaderboard_rows(tmp_path, steps):
    for s in steps:
        main.run(_cfg(["method=integrated_gradients", f"method.steps={s}", "protocol=sparseness"]),
                 tmp_path / f"job{s}", log=_quiet)
    lb = report.leaderboard(results.load(tmp_path))
    ig = lb[(lb.method == "integrated_gradients")]
    assert len(ig) == 2 and {json.loads(h)["steps"] for h in ig.method_hparams} == set(steps)
    assert set(ig["label"]) == {f"integrated_gradients (steps={s})" for s in steps}


def test_train_per_class_trains_on_that_many_images_of_each_class(tmp_path, monkeypatch):
    seen = []
    real = attrax.train

    def spy(model, train_set, **kw):
        seen.append(np.bincount(np.asarray(train_set.y)).tolist())
        return real(model, train_set, **kw)

    monkeypatch.setattr(attrax, "train", spy)
    main.run(_cfg(["method=gradient", "protocol=sparseness", "train_per_class=7"]), tmp_path / "r", log=_quiet)
    assert seen == [[7] * 10]
    assert results.run_info(tmp_path / "r")["config"]["train_per_class"] == 7
