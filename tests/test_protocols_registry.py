"""Every evaluation protocol: registration metadata, its config file, and tidy result rows."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

import attrax
from attrax import results

CONF = Path(attrax.__file__).resolve().parent.parent / "conf" / "protocol"
MINE = [
    "pixel_flipping",
    "deletion",
    "insertion",
    "region_perturbation",
    "road",
    "selectivity",
    "selectivity_oneshot",
    "continuity",
    "max_sensitivity",
    "avg_sensitivity",
    "input_invariance",
    "faithfulness_correlation",
    "infidelity",
    "monotonicity",
    "random_logit",
    "sparseness",
    "complexity",
    "pointing_game",
    "relevance_mass",
    "relevance_rank",
    "aupr",
]


@pytest.mark.parametrize("name", MINE)
def test_registered_with_metadata_and_config(name):
    entry = attrax.protocols.get(name)
    assert entry.meta["category"] and entry.meta["version"] >= 1
    assert isinstance(entry.meta["higher_is_better"], dict) and entry.meta["higher_is_better"]
    assert entry.fn.__doc__ and len(entry.fn.__doc__) > 40
    path = CONF / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("# @package protocol")
    node = OmegaConf.to_container(OmegaConf.create(text))
    assert node.pop("name") == name
    hp = entry.hparams()
    assert set(node) <= set(hp), set(node) - set(hp)
    for k, v in node.items():  # config defaults are the function's defaults
        default = hp[k]
        assert v == (list(default) if isinstance(default, tuple) else default), (k, v, default)


def _run(name, linear, **kw):
    model, params, x, target, w = linear
    r = (x.reshape(4, -1) * w[:, target].T).reshape(x.shape)
    if attrax.protocols.get(name).meta.get("needs_method"):
        kw.setdefault("method", "gradient")
    if attrax.protocols.get(name).meta.get("needs_masks"):
        kw["masks"] = jnp.zeros((4, 6, 6), bool).at[:, 1:4, 1:4].set(True)
    return attrax.evaluate(name, model, params, x, target, r, key=jax.random.key(0), **kw)


SMALL = {
    "continuity": {"max_shift": 2},
    "selectivity": {"steps": 2, "window": 2},
    "selectivity_oneshot": {"steps": 2, "window": 2},
    "faithfulness_correlation": {"subset_size": 4},
    "monotonicity": {"steps": 6},
    "region_perturbation": {"patch_size": 2, "steps": 9},
}


@pytest.mark.parametrize("name", MINE)
def test_rows_follow_the_schema(linear, name):
    scores = _run(name, linear, **SMALL.get(name, {}))
    dirs = attrax.protocols.get(name).meta["higher_is_better"]
    assert set(scores.values) <= set(dirs), set(scores.values) - set(dirs)
    for metric, v in scores.values.items():
        v = np.asarray(v)
        assert v.shape[0] == 4 and v.ndim in (1, 2) and np.all(np.isfinite(v)), metric
        if v.ndim == 2:
            assert len(scores.x[metric]) == v.shape[1]
    assert scores.choices  # every choice recorded
    df = results.scores_to_rows(
        scores,
        example_index=range(4),
        run_id="r",
        dataset="d",
        model="linear",
        method="true",
        method_hparams={},
        protocol=name,
        seed=0,
    )
    assert list(df.columns) == results.COLUMNS
    assert dict(df.dtypes.astype(str)) == {c: t for c, t in results.SCHEMA.items()}
    scalar = df[df.metric.isin([m for m, v in scores.values.items() if np.ndim(v) == 1])]
    assert scalar.x.isna().all() and set(scalar.example) <= {0, 1, 2, 3}


def test_methods_that_reexplain_say_so(linear):
    model, params, x, target, w = linear
    for name in MINE:
        if attrax.protocols.get(name).meta.get("needs_method"):
            with pytest.raises(attrax.AttraxError, match="method"):
                attrax.evaluate(name, model, params, x, target, x, key=0)
