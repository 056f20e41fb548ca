"""One conformance test over EVERY registered protocol, discovered from the registry: its config
file, its metadata, its rows and its determinism per key (per-batch and retraining alike)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from test_protocols_registry import SMALL as REGISTRY_SMALL

import attrax
from attrax import results

CONF = Path(attrax.__file__).resolve().parent.parent / "conf" / "protocol"

ALL = attrax.protocols.names()
RETRAIN = attrax.protocols.names(kind="retrain")
SMALL = {
    **REGISTRY_SMALL,  # the per-batch protocols' small settings, shared with test_protocols_registry
    "max_sensitivity": {"n_samples": 3},
    "avg_sensitivity": {"n_samples": 3},
    "sanity_model_randomization": {"metrics": ["spearman", "ssim"]},
    "roar": {"fractions": [0.0, 0.5], "seeds": [0]},
    "kar": {"fractions": [0.0, 0.5], "seeds": [0]},
    "roar_kar": {"fractions": [0.0, 0.5], "seeds": [0]},
    "sanity_data_randomization": {"round_epochs": 1, "max_epochs": 1, "n_explain": 4, "metrics": ["spearman"]},
}


def test_the_retraining_protocols_are_registered():
    assert {"roar", "kar", "roar_kar", "sanity_data_randomization"} <= set(RETRAIN)


@pytest.mark.parametrize("name", ALL)
def test_config_equals_signature_and_metadata(name):
    entry = attrax.protocols.get(name)
    meta = entry.meta
    assert meta["category"] and isinstance(meta["version"], int) and meta["version"] >= 1
    assert isinstance(meta["higher_is_better"], dict) and meta["higher_is_better"]
    assert entry.fn.__doc__ and len(entry.fn.__doc__) > 40
    needs = set(attrax.protocols.needs(name))
    assert needs <= set(attrax.protocols.CONTEXT)
    text = (CONF / f"{name}.yaml").read_text()
    assert text.startswith("# @package protocol")
    cfg = yaml.safe_load(text)
    assert cfg.pop("name") == name
    hp = entry.hparams()
    if attrax.protocols.is_retrain(name):  # the run passes these positionally
        hp = {**hp, **{k: None for k in ("method", "train_set", "test_set")}}
    # every keyword is either configured (with the function's default) or supplied by the run
    assert set(cfg) | needs == set(hp), (set(hp) - set(cfg) - needs, set(cfg) - set(hp))
    assert not set(cfg) & needs, set(cfg) & needs
    for k, v in cfg.items():
        d = hp[k]
        assert v == (list(d) if isinstance(d, tuple) else d), (k, v, d)
    for m in meta["higher_is_better"]:
        mm = attrax.protocols.metric_meta(name, m.split("/")[-1], sub=m.split("/")[0] if "/" in m else None)
        assert set(mm) == {"higher_is_better", "x_label", "aggregation", "version"}


@pytest.fixture(scope="module")
def sets(mnist_train, mnist_test):
    return mnist_train.take(per_class=2), mnist_test.take(per_class=1)


def _batch_run(name, linear, key):
    model, params, x, target, w = linear
    r = (x.reshape(4, -1) * w[:, target].T).reshape(x.shape)
    kw = dict(SMALL.get(name, {}))
    context = {"method": "gradient", "method_hparams": {}, "method_key": jax.random.key(5),
               "masks": jnp.zeros((4, 6, 6), bool).at[:, 1:4, 1:4].set(True), "channel_mean": [0.5]}
    kw.update({k: context[k] for k in attrax.protocols.needs(name) if k in context})
    return attrax.evaluate(name, model, params, x, target, r, key=jax.random.key(key), **kw)


def _retrain_run(name, sets, cache):
    tr, te = sets
    model = attrax.models.create("mlp", hidden=(8,))
    kw = dict(SMALL[name], cache=cache)
    context = {"method_hparams": {}, "train_config": {"epochs": 1, "batch_size": 16}, "model_seed": 0,
               "progress": False}
    kw.update({k: context[k] for k in attrax.protocols.needs(name) if k in context})
    return attrax.protocols.get(name).fn("gradient", model, tr, te, **kw)


@pytest.mark.parametrize("name", ALL)
def test_rows_schema_metadata_and_determinism(name, linear, sets):
    entry = attrax.protocols.get(name)
    if attrax.protocols.is_retrain(name):
        df = _retrain_run(name, sets, cache=True)
        again = _retrain_run(name, sets, cache=False)  # recomputed, not read back
        np.testing.assert_allclose(again["value"].to_numpy(), df["value"].to_numpy(), atol=1e-6)
    else:
        scores = _batch_run(name, linear, 0)
        again = _batch_run(name, linear, 0)
        for m, v in scores.values.items():
            np.testing.assert_allclose(np.asarray(again.values[m]), np.asarray(v), atol=1e-6, err_msg=m)
        df = results.scores_to_rows(scores, example_index=range(4), run_id="r", dataset="d", model="linear",
                                    method="gradient", method_hparams={}, protocol=name, seed=0)
    assert list(df.columns) == results.COLUMNS
    assert dict(df.dtypes.astype(str)) == results.SCHEMA
    assert df["direction"].isin(["higher", "lower", "none"]).all()
    assert (df["version"] == entry.meta["version"]).all()
    assert df["aggregation"].isin(["mean", "mean_over_seeds"]).all()
    assert (df.loc[df["x"].notna(), "x_label"] != "").all()
    ranked = df[df["direction"] != "none"]
    assert not ranked.empty
