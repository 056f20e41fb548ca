"""Sanity checks (Adebayo et al. 2018): layer re-initialization schedules, similarities, rows."""

from __future__ import annotations

import inspect
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import attrax
from attrax.errors import AttraxError
from attrax.protocols import sanity

CONF = Path(attrax.__file__).resolve().parent.parent / "conf" / "protocol"


def _same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda p, q: bool(jnp.array_equal(p, q)), a, b)))


def _differs_everywhere(a, b) -> bool:
    # every weight array changed (bias arrays start at zero, so check kernels and scales)
    leaves = jax.tree.leaves_with_path(jax.tree.map(lambda p, q: bool(jnp.array_equal(p, q)), a, b))
    return not any(same for path, same in leaves if "bias" not in jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def small_cnn():
    model = attrax.models.create("cnn_a", channels=(4, 8), dense=(16,))
    x = jax.random.uniform(jax.random.key(0), (6, 12, 12, 1))
    v = model.module.init(jax.random.key(1), x[:1])
    # pretend training: move every parameter away from any init (so a re-init is visible)
    v = jax.tree.map(lambda p: p + 0.1, v)
    return model, v, x


def test_cascading_changes_exactly_the_intended_layers_in_order(small_cnn):
    model, v, x = small_cnn
    key = jax.random.key(5)
    names, steps = sanity.randomized_variables(model, v, x, key=key, mode="cascading")
    assert names == ["dense2", "dense1", "conv2", "conv1"]  # from the logits down
    fresh = model.module.init(key, x[:1])["params"]
    for j, step in enumerate(steps):
        for i, name in enumerate(names):
            if i <= j:  # re-initialized with the layer's own initializer
                assert _same(step["params"][name], fresh[name])
                assert _differs_everywhere(step["params"][name], v["params"][name])
            else:
                assert _same(step["params"][name], v["params"][name])
    names_i, indep = sanity.randomized_variables(model, v, x, key=key, mode="independent")
    for j, step in enumerate(indep):
        for i, name in enumerate(names_i):
            assert _same(step["params"][name], fresh[name] if i == j else v["params"][name])
    sub, steps = sanity.randomized_variables(model, v, x, key=key, layers=["dense1", "conv1"])
    assert sub == ["dense1", "conv1"] and _same(steps[0]["params"]["dense2"], v["params"]["dense2"])
    with pytest.raises(AttraxError, match="unknown layer"):
        sanity.randomized_variables(model, v, x, key=key, layers=["conv9"])


class _NormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4, name="zeta")(x.reshape((x.shape[0], -1)))  # names not in sorted order
        x = nn.BatchNorm(use_running_average=not train, name="norm")(x)
        return nn.Dense(3, name="alpha")(x)


def test_batchnorm_statistics_are_reinitialized_with_their_layer():
    model = attrax.as_model(_NormNet())
    x = jnp.ones((1, 2, 2, 1))
    # tree maps (and training) sort the dict keys; the order must still be the forward order
    v = jax.tree.map(lambda p: p + 1.0, model.module.init(jax.random.key(0), x))
    names, steps = sanity.randomized_variables(model, v, x, key=jax.random.key(2))
    assert names == ["alpha", "norm", "zeta"]
    fresh = model.module.init(jax.random.key(2), x)
    assert _same(steps[1]["batch_stats"]["norm"], fresh["batch_stats"]["norm"])
    assert _same(steps[0]["batch_stats"]["norm"], v["batch_stats"]["norm"])


def test_similarity_of_self_is_one_and_of_independent_maps_about_zero():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(24, 28, 28, 2))
    same = sanity.similarity(r, r)
    for m, v in same.items():
        np.testing.assert_allclose(v, 1.0, atol=1e-9, err_msg=m)
    indep = sanity.similarity(r, rng.normal(size=r.shape))
    for m, v in indep.items():
        assert abs(v.mean()) < (0.15 if m == "hog" else 0.05), (m, v.mean())
    # sign flip: raw rank correlation -1, the absolute-value similarities unchanged
    flip = sanity.similarity(r, -r)
    np.testing.assert_allclose(flip["spearman"], -1.0, atol=1e-9)
    np.testing.assert_allclose(flip["spearman_abs"], 1.0, atol=1e-9)
    # abs normalization: sum |.| over channels, clip at the 99th percentile, scale to [0, 1]
    a = sanity.normalize_abs(r)
    assert a.shape == (24, 28, 28) and a.min() == 0.0 and a.max() == 1.0
    assert ((a == 1.0).reshape(24, -1).sum(1) >= 7).all()  # ~1% of 784 pixels clipped
    with pytest.raises(AttraxError, match="similarity"):
        sanity.similarity(r, r, metrics=["psnr"])
    # a constant map has no rank order (0 against another map) but equals itself (1)
    z = np.zeros((2, 8, 8, 1))
    for m, v in sanity.similarity(z, z).items():
        np.testing.assert_array_equal(v, 1.0, err_msg=m)
    np.testing.assert_array_equal(sanity.similarity(z, r[:2, :8, :8, :1], metrics=["spearman"])["spearman"], 0.0)


def test_registered_protocol_known_answers(small_cnn):
    model, v, x = small_cnn
    target = jnp.zeros(x.shape[0], jnp.int32)

    def identity_map(model, params, x, target, *, key):  # ignores the weights: must fail the check
        return x

    s = attrax.evaluate("sanity_model_randomization", model, v, x, target, x, key=3,
                        method=identity_map)
    for name, curve in s.values.items():
        assert curve.shape == ((6, 4) if name.startswith(sanity.MODES) else (6,)), name
        np.testing.assert_allclose(curve, 1.0, atol=1e-9, err_msg=name)
    r = attrax.explain("gradient", model, v, x, target)
    s = attrax.evaluate("sanity_model_randomization", model, v, x, target, r, key=3,
                        method="gradient", metrics=["spearman"], modes=["cascading"])
    assert set(s.values) == {"cascading_spearman", "unrandomized_spearman", "noise_ceiling_spearman"}
    assert s.choices["layers"]["cascading"] == ["dense2", "dense1", "conv2", "conv1"]
    assert np.asarray(s.values["cascading_spearman"]).mean(0)[-1] < 0.9  # gradient passes
    with pytest.raises(AttraxError, match="method"):
        attrax.evaluate("sanity_model_randomization", model, v, x, target, r, key=3)


def test_model_randomization_rows(small_cnn):
    model, v, x = small_cnn
    df = sanity.model_randomization("gradient", model, v, x, jnp.zeros(6, jnp.int32), key=0,
                                    metrics=["spearman_abs", "ssim"])
    assert set(df.protocol) == {"sanity_cascading", "sanity_independent"}
    assert len(df) == 2 * 2 * 4 * 6
    assert list(df.columns[: len(attrax.results.COLUMNS)]) == attrax.results.COLUMNS
    summary = sanity.summarize(df)
    assert len(summary) == 2 * 2 * 4 and (summary["count"] == 6).all()
    first = summary[(summary.protocol == "sanity_cascading") & (summary.x == 1)]
    assert set(first.layer) == {"dense2"}


def test_data_randomization_fits_random_labels(mnist_train, mnist_test):
    tr, te = mnist_train.take(per_class=4), mnist_test.take(per_class=1)
    model = attrax.models.create("mlp", hidden=(32,))
    df = sanity.sanity_data_randomization(
        "gradient", model, tr, te, train_config={"epochs": 2, "lr": 1e-2}, round_epochs=30,
        max_epochs=60, fit_accuracy=0.9, n_explain=6, metrics=["spearman", "ssim"])
    scal = df[df.example == -1].set_index("metric")["value"]
    assert scal["train_accuracy_random"] >= 0.9 and scal["epochs_random"] <= 60
    per = df[df.example >= 0]
    assert set(per.metric) == {"spearman", "ssim", "noise_ceiling_spearman", "noise_ceiling_ssim"}
    assert len(per) == 24 and scal["fit_reached"] == 1.0 and (df["flag"] == "").all()
    again = sanity.sanity_data_randomization(  # the random-label model comes from the cache
        "gradient", model, tr, te, train_config={"epochs": 2, "lr": 1e-2}, round_epochs=30,
        max_epochs=60, fit_accuracy=0.9, n_explain=6, metrics=["spearman", "ssim"])
    np.testing.assert_array_equal(again.value, df.value)


def test_configs_match_signatures():
    for name, fn in [("sanity_model_randomization", attrax.protocols.get(
            "sanity_model_randomization").fn), ("sanity_data_randomization",
                                                sanity.sanity_data_randomization)]:
        text = (CONF / f"{name}.yaml").read_text()
        assert text.startswith("# @package protocol")
        cfg = yaml.safe_load(text)
        assert cfg.pop("name") == name
        sig = inspect.signature(fn).parameters
        assert set(cfg) <= {k for k, p in sig.items() if p.kind is p.KEYWORD_ONLY}
        for k, val in cfg.items():
            d = sig[k].default
            d = list(d) if isinstance(d, tuple) else ({} if d is None and val == {} else d)
            assert d == val, (name, k)


def test_sanity_table_and_figure_summarize_every_method(tmp_path):
    """The report's model-randomization summary: top layer, all layers, independent mean."""
    import pandas as pd

    from attrax import report

    rows = []
    curves = {"a": [0.9, 0.5, 0.1], "b": [1.0, 1.0, 0.9]}  # cascading, steps 1..3
    for meth, casc in curves.items():
        for ex in range(2):
            for step, v in enumerate(casc, start=1):
                for sim in ("spearman_abs", "ssim"):
                    rows.append({"method": meth, "protocol": "sanity_model_randomization",
                                 "metric": f"cascading_{sim}", "x": float(step), "value": v + 0.01 * ex})
                    rows.append({"method": meth, "protocol": "sanity_model_randomization",
                                 "metric": f"independent_{sim}", "x": float(step), "value": 0.5})
    rows.append({"method": "a", "protocol": "pixel_flipping", "metric": "auc", "x": float("nan"), "value": 1.0})
    df = pd.DataFrame(rows)
    t = report.sanity_table(df).set_index("method")
    assert list(t.index) == ["a", "b"]  # sorted by similarity after all layers: a depends on weights
    assert t.loc["a", "top_spearman_abs"] == pytest.approx(0.905)
    assert t.loc["a", "all_ssim"] == pytest.approx(0.105)
    assert t.loc["b", "independent_ssim"] == pytest.approx(0.5)
    md = report.format_sanity_table(report.sanity_table(df))
    assert "| a | - / 0.91 / 0.91 / - |" in md
    assert report.sanity_figure(df, tmp_path / "s.png").exists()
    assert report.sanity_figure(df[df.protocol != "sanity_model_randomization"], tmp_path / "t.png") is None


@pytest.mark.parametrize("shape", [(6, 28, 28), (3, 5, 9), (2, 12, 12)])
def test_batched_ssim_equals_scikit_images_per_image_ssim(shape):
    """similarity()'s batched SSIM against scikit-image's structural_similarity called per image
    pair with the recorded settings (Gaussian weights, sigma 1.5 or what fits, data range 1)."""
    from attrax.protocols.sanity import _ssim_one, normalize_abs, similarity, ssim_batch

    rng = np.random.default_rng(3)
    r0 = rng.standard_normal(shape)
    r1 = rng.standard_normal(shape) + 2 * r0
    a, b = normalize_abs(r0), normalize_abs(r1)
    per_image = np.array([_ssim_one(p, q) for p, q in zip(a, b, strict=True)])
    np.testing.assert_allclose(ssim_batch(a, b), per_image, rtol=0, atol=1e-12)
    assert np.all(np.abs(per_image) < 1)  # not the identical-map shortcut
    np.testing.assert_allclose(similarity(r0, r1, metrics=["ssim"])["ssim"], per_image, rtol=0, atol=1e-12)
