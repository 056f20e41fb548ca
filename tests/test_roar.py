"""ROAR / KAR (Hooker et al. 2019): ranking, tie rules, replacement, controls, the retrain run."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import attrax
from attrax.errors import AttraxError
from attrax.protocols import roar

CONF = Path(attrax.__file__).resolve().parent.parent / "conf" / "protocol"


def _hand_made():
    # one 2x2 image with 2 channels; flat value index i = (row*2 + col)*2 + channel
    r = jnp.array([3.0, -5.0, 1.0, 5.0, 0.0, 1.0, -1.0, 0.0]).reshape(1, 2, 2, 2)
    x = jnp.arange(8, dtype=jnp.float32).reshape(1, 2, 2, 2) / 10
    return r, x


def test_value_ranking_and_replacement_exact():
    r, x = _hand_made()
    # |R| = 3 5 1 5 0 1 1 0; descending, ties by lower index: 1 3 0 2 5 6 4 7
    pos = roar.rank_positions(r, rank="value", tie="index")
    np.testing.assert_array_equal(pos[0], [2, 0, 3, 1, 6, 4, 5, 7])
    fill = np.array([0.5, 0.25], np.float32)  # per-channel train mean
    out = roar.apply_mask(x, roar.replace_mask(pos, 0.25, "roar"), fill, "value")
    expect = np.asarray(x).reshape(-1).copy()
    expect[[1, 3]] = 0.25  # both replaced values sit in channel 1
    np.testing.assert_array_equal(np.asarray(out).reshape(-1), expect)
    # ROAR 0.5 replaces indices 1 3 0 2; KAR 0.5 keeps exactly those and replaces 5 6 4 7
    roar_half = np.asarray(roar.replace_mask(pos, 0.5, "roar"))[0]
    np.testing.assert_array_equal(np.flatnonzero(roar_half), [0, 1, 2, 3])
    kar_half = np.asarray(roar.replace_mask(pos, 0.5, "kar"))[0]
    np.testing.assert_array_equal(np.flatnonzero(kar_half), [4, 5, 6, 7])
    out = np.asarray(roar.apply_mask(x, kar_half[None], fill, "value")).reshape(-1)
    np.testing.assert_array_equal(out[4:], [0.5, 0.25, 0.5, 0.25])


def test_pixel_ranking_replaces_whole_pixels():
    r, x = _hand_made()
    # pixel |R| sums: 8, 6, 1, 1 -> the tie between pixels 2 and 3 goes to the lower index
    pos = roar.rank_positions(r, rank="pixel", tie="index")
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 3])
    out = roar.apply_mask(x, roar.replace_mask(pos, 0.75, "roar"), np.array([0.5, 0.25]), "pixel")
    np.testing.assert_array_equal(np.asarray(out)[0, 0], [[0.5, 0.25], [0.5, 0.25]])
    np.testing.assert_array_equal(np.asarray(out)[0, 1, 0], [0.5, 0.25])
    np.testing.assert_array_equal(np.asarray(out)[0, 1, 1], np.asarray(x)[0, 1, 1])


def test_random_ties_are_seeded_and_documented():
    r = jnp.ones((2, 4, 4, 1))  # every value tied
    key = jax.random.key(7)
    pos = roar.rank_positions(r, key=key, rank="value", tie="random")
    np.testing.assert_array_equal(pos, roar.rank_positions(r, key=key, tie="random"))
    for i in range(2):  # example i: ascending uniform keys from fold_in(key, i) go first
        u = jax.random.uniform(jax.random.fold_in(key, i), (16,))
        np.testing.assert_array_equal(np.argsort(np.asarray(pos[i])), np.argsort(np.asarray(u)))
    other = roar.rank_positions(r, key=jax.random.key(8), tie="random")
    assert not np.array_equal(pos, other)
    # a strict order is never touched by the tie rule
    strict = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(roar.rank_positions(strict, key=key)[0], np.arange(16)[::-1])


def test_kar_t_and_roar_one_minus_t_are_complementary():
    r = jax.random.normal(jax.random.key(0), (3, 5, 5, 3))
    pos = roar.rank_positions(r, key=jax.random.key(1))
    d = 75
    for t in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        kar_t = np.asarray(roar.replace_mask(pos, t, "kar"))
        roar_c = np.asarray(roar.replace_mask(pos, 1.0 - t, "roar"))
        np.testing.assert_array_equal(kar_t, ~roar_c)
        roar_t = np.asarray(roar.replace_mask(pos, t, "roar"))
        assert (roar_t.sum(1) == round(t * d)).all()
        # the ROAR set is the top of |R|: every replaced value >= every kept one
        mag = np.abs(np.asarray(r)).reshape(3, -1)
        for i in range(3):
            if 0 < roar_t[i].sum() < d:
                assert mag[i][roar_t[i]].min() >= mag[i][~roar_t[i]].max()


def test_random_control_removes_about_t():
    for t in (0.1, 0.5, 0.9):
        m = np.asarray(roar.random_mask(jax.random.key(3), (64, 784), t))
        assert abs(m.mean() - t) < 0.01
        assert m.mean(1).std() < 0.05  # per image too
    x = jnp.zeros((4, 28, 28, 1))
    out = roar.apply_mask(x, roar.random_mask(0, (4, 784), 0.3), np.array([1.0]), "value")
    assert abs(float(out.mean()) - 0.3) < 0.05


def test_errors():
    r, _ = _hand_made()
    with pytest.raises(AttraxError, match="rank"):
        roar.rank_positions(r, rank="patch")
    with pytest.raises(AttraxError, match="tie"):
        roar.rank_positions(r, tie="first")
    with pytest.raises(AttraxError, match="fraction"):
        roar.n_units(1.5, 10)


@pytest.fixture(scope="module")
def tiny_sets(mnist_train, mnist_test):
    return mnist_train.take(per_class=8), mnist_test.take(per_class=4)


def test_run_tiny_grid_rows_and_cache(tiny_sets):
    tr, te = tiny_sets
    model = attrax.models.create("mlp", hidden=(32,))
    kw = dict(fractions=(0.0, 0.5), seeds=(0, 1), train_config={"epochs": 1, "batch_size": 16})
    df = roar.run("gradient", model, tr, te, **kw)
    assert list(df.columns) == attrax.results.COLUMNS
    assert len(df) == 2 * 2 * 2 and set(df.protocol) == {"roar", "kar"}
    assert (df.metric == "test_accuracy").all() and df.value.between(0, 1).all()
    assert df.attrs["timings"]["n_trained"] == 2 * 3  # fraction 0 is shared by ROAR and KAR
    at0 = df[df.x == 0].pivot_table(index="seed", columns="protocol", values="value")
    np.testing.assert_array_equal(at0["roar"], at0["kar"])
    again = roar.run("gradient", model, tr, te, **kw)  # everything from the cache
    assert again.attrs["timings"]["n_trained"] == 0 and again.attrs["timings"]["n_cached"] == 6
    np.testing.assert_array_equal(again.value, df.value)
    ctrl = roar.run("random", model, tr, te, **kw)  # Bernoulli control: ROAR and KAR coincide
    assert ctrl.attrs["timings"]["n_trained"] == 2  # fraction 0 came from the cache
    c = ctrl.pivot_table(index=["x", "seed"], columns="protocol", values="value")
    np.testing.assert_array_equal(c["roar"], c["kar"])


@pytest.mark.parametrize("name", ["roar", "kar"])
def test_configs_match_signature(name):
    import inspect

    text = (CONF / f"{name}.yaml").read_text()
    assert text.startswith("# @package protocol")
    cfg = yaml.safe_load(text)
    assert cfg.pop("name") == name
    sig = inspect.signature(getattr(roar, name)).parameters
    assert set(cfg) <= {k for k, p in sig.items() if p.kind is p.KEYWORD_ONLY}
    for k, v in cfg.items():
        default = sig[k].default
        assert (list(default) if isinstance(default, tuple) else default) == v, k


def test_run_on_colour_images_with_batchnorm_resnet():
    """The CIFAR-10 configuration's path (32x32x3, per-channel train mean, BatchNorm ResNet):
    exercised on the generated colour data set, since CIFAR-10 cannot be fetched here."""
    kw = dict(n_train=40, n_test=20, size=32, channels=3, num_classes=4, seed=0)
    tr = attrax.datasets.load("synthetic", "train", **kw)
    te = attrax.datasets.load("synthetic", "test", **kw)
    model = attrax.models.create("resnet", num_classes=4, stages=(4, 8))
    df = roar.run("gradient", model, tr, te, fractions=(0.0, 0.5), seeds=(0,), mode="parallel",
                  train_config={"epochs": 1, "batch_size": 20}, cache=False)
    assert len(df) == 4 and df.value.between(0, 1).all()
    fill = roar.channel_mean(tr)
    assert fill.shape == (3,)
    pos = roar.rank_positions(jnp.asarray(tr.x[:2]), key=0)
    x = np.asarray(roar.apply_mask(tr.x[:2], roar.replace_mask(pos, 1.0), fill))
    np.testing.assert_allclose(x[..., 2], fill[2])  # every value replaced by its channel's mean


def test_report_ranks_curve_only_results_by_area(tmp_path):
    """ROAR/KAR results hold curves only: the report ranks methods by the area under them."""
    import pandas as pd

    from attrax import report

    rows = []
    curves = {"good": [0.9, 0.5, 0.1], "random": [0.9, 0.8, 0.7]}  # accuracy at x = 0, .5, 1
    for meth, acc in curves.items():
        for seed in (0, 1):
            for x, v in zip((0.0, 0.5, 1.0), acc, strict=True):
                for proto in ("roar", "kar"):
                    rows.append({"run_id": "r", "experiment": "e", "dataset": "d", "model": "m", "model_seed": 0,
                                 "method": meth, "method_hparams": "{}", "protocol": proto,
                                 "metric": "test_accuracy", "x": x, "value": v, "example": -1, "seed": seed})
    df = pd.DataFrame(rows)
    areas = report.curve_areas(df)
    good = areas[(areas.method == "good") & (areas.protocol == "roar")].value
    np.testing.assert_allclose(good, (0.9 + 2 * 0.5 + 0.1) / 4)  # trapezoid mean height
    lb = report.leaderboard(df).set_index(["protocol", "method"])
    assert lb.loc[("roar", "good"), "metric"] == "test_accuracy_area"
    assert lb.loc[("roar", "good"), "rank"] == 1 and lb.loc[("kar", "good"), "rank"] == 2  # ROAR lower, KAR higher
    attrax.results.write_run(tmp_path / "run", attrax.results.conform(df), {}, {})
    out = report.build([str(tmp_path / "run")], tmp_path / "rep")
    assert "roar/test_accuracy_area" in (out / "leaderboard.md").read_text()


def test_signal_removed_counts_foreground_replacements():
    x = np.zeros((1, 2, 2, 1), np.float32)
    x[0, 0, 0, 0] = x[0, 1, 1, 0] = 1.0  # two foreground values of four
    rel = jnp.asarray([[[[4.0], [3.0]], [[1.0], [2.0]]]])  # order: (0,0), (0,1), (1,1), (1,0)
    s = roar.signal_removed(x, rel, 0.5, tie="index")  # replaces (0,0) and (0,1)
    assert s == {"signal_removed": 0.5, "removed_on_signal": 0.5}
    s = roar.signal_removed(x, rel, 0.25, protocol="kar", tie="index")  # KAR keeps the top 3
    assert s == {"signal_removed": 0.0, "removed_on_signal": 0.0}


def test_mask_only_leak_control(tiny_sets):
    """mask_only retrains on the 0/1 replacement mask: blank images (nothing replaced) and a
    class-independent random mask carry no class information - chance accuracy."""
    tr, te = tiny_sets  # the test split is class-balanced: 4 digits per class
    model = attrax.models.create("mlp", hidden=(32,))
    kw = dict(fractions=(0.0, 0.5), seeds=(0, 1), train_config={"epochs": 2, "batch_size": 16}, mask_only=True)
    df = roar.run("random", model, tr, te, **kw)
    assert set(df.protocol) == {"roar_mask", "kar_mask"} and df.attrs["choices"]["mask_only"]
    np.testing.assert_allclose(df[df.x == 0].value, 0.1)  # one constant prediction on blank images
    assert df[df.x == 0.5].value.max() <= 0.35
    g = roar.run("gradient", model, tr, te, **kw)
    assert set(g.protocol) == {"roar_mask", "kar_mask"} and g.value.between(0, 1).all()


def test_modified_data_sets_are_written_once_as_shards(tiny_sets, tmp_path, monkeypatch):
    """Each modified data set is written once as shards (cached by a content hash of data, map
    settings, fraction, replacement and key), read back by later runs; a damaged shard is a
    one-line error naming the file."""
    monkeypatch.setenv("ATTRAX_CACHE", str(tmp_path / "cache"))
    tr, te = tiny_sets  # 80 training and 40 test digits
    model = attrax.models.create("mlp", hidden=(16,))
    kw = dict(protocols=("roar",), fractions=(0.0, 0.5), seeds=(0,), train_config={"epochs": 1, "batch_size": 16})
    df = roar.run("gradient", model, tr, te, shard_images=32, **kw)
    t = df.attrs["timings"]
    assert (t["n_data_written"], t["n_data_reused"], t["n_trained"]) == (1, 0, 2)
    (folder,) = (tmp_path / "cache" / "roar" / "data").iterdir()
    assert [p.name for p in sorted(folder.glob("*.npy"))] == [
        "test-00000.npy", "test-00001.npy", "train-00000.npy", "train-00001.npy", "train-00002.npy"]
    sharded = np.concatenate([np.load(p) for p in sorted(folder.glob("train-*.npy"))])
    assert sharded.shape == tr.x.shape and not np.array_equal(sharded, tr.x)
    # one shard per split: the same modified images (maps and ranks are per example, not per chunk)
    one = roar.run("gradient", model, tr, te, shard_images=1000, **kw)
    assert one.attrs["timings"]["n_data_written"] == 1
    (single,) = [d for d in (tmp_path / "cache" / "roar" / "data").iterdir() if d != folder]
    np.testing.assert_allclose(np.load(single / "train-00000.npy"), sharded, atol=1e-6)
    again = roar.run("gradient", model, tr, te, shard_images=32, **kw)
    t = again.attrs["timings"]
    assert (t["n_data_written"], t["n_data_reused"], t["n_trained"]) == (0, 1, 0)
    np.testing.assert_array_equal(again.value, df.value)
    other = roar.run("gradient", model, tr, te, shard_images=32, **{**kw, "fractions": (0.0, 0.3)})
    assert other.attrs["timings"]["n_data_written"] == 1  # another fraction: another data set
    bad = folder / "test-00001.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(AttraxError, match="test-00001.npy") as e:
        roar.run("gradient", model, tr, te, shard_images=32, **kw)
    assert "\n" not in str(e.value)


def test_streamed_retraining_gives_the_in_memory_rows(tiny_sets):
    """train_in_memory_mb=0 streams every retrain from the memory-mapped shards (3 train shards
    of 32 images): the same accuracies as the in-memory retrains; the threshold is recorded."""
    tr, te = tiny_sets
    model = attrax.models.create("mlp", hidden=(16,))
    kw = dict(fractions=(0.0, 0.5), seeds=(0, 1), train_config={"epochs": 1, "batch_size": 16}, cache=False,
              shard_images=32)
    mem = roar.run("gradient", model, tr, te, **kw)
    streamed = roar.run("gradient", model, tr, te, train_in_memory_mb=0, **kw)
    assert mem.attrs["timings"]["n_streamed"] == 0 and streamed.attrs["timings"]["n_streamed"] == 3
    np.testing.assert_array_equal(streamed.value, mem.value)
    assert '"train_in_memory_mb": 0' in streamed.protocol_choices.iloc[0]
    with pytest.raises(AttraxError, match="train_in_memory_mb"):
        roar.run("gradient", model, tr, te, train_in_memory_mb=-1, **kw)


def test_in_memory_retrains_are_pooled_within_the_memory_limit(tiny_sets, monkeypatch):
    """All in-memory variants of a run go through ONE train_many call (workers stay busy), or as
    many calls as `train_in_memory_mb` needs, each holding at most that many MiB of distinct data
    (one variant at least); the models, so the rows, do not depend on the pooling."""
    tr, te = tiny_sets
    model = attrax.models.create("mlp", hidden=(16,))
    kw = dict(fractions=(0.0, 0.5, 0.9), seeds=(0, 1), train_config={"epochs": 1, "batch_size": 16}, cache=False)
    calls = []
    real = roar.train_many

    def counting(model, xs, ys, seeds, **k):
        arrays = {id(a): a for a in xs} if isinstance(xs, list) else {id(xs): xs}
        calls.append((len(seeds), sum(a.nbytes for a in arrays.values()) / 2**20))
        return real(model, xs, ys, seeds, **k)

    monkeypatch.setattr(roar, "train_many", counting)
    pooled = roar.run("gradient", model, tr, te, **kw)
    assert [c[0] for c in calls] == [2 * 5]  # (none, roar 0.5, roar 0.9, kar 0.5, kar 0.9) x 2 seeds
    one_mb = calls[0][1] / 5
    calls.clear()
    split = roar.run("gradient", model, tr, te, train_in_memory_mb=2.5 * one_mb, **kw)
    assert [c[0] for c in calls] == [4, 4, 2] and all(c[1] <= 2.5 * one_mb for c in calls)
    np.testing.assert_array_equal(split.value, pooled.value)
    assert split.attrs["timings"]["n_streamed"] == 0 and split.attrs["timings"]["n_trained"] == 10
