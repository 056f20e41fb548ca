"""The main job over batches and shards: same results as one batch, resume per shard, image folders
that never sit in memory whole, progress lines, and a sweep of shard jobs merged by the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import attrax
from attrax import main, report, results, streaming
from attrax.errors import AttraxError

TINY = ["model=mlp", "train=fast", "progress=false", "figures=false", "controls=[]", "n_images=12",
        "protocols.pixel_flipping.steps=4"]
# a stochastic method, and a protocol that re-explains with the map's keys (its ties are not random)
METHODS = ["method=smoothgrad", "method.n_samples=4", "protocol=sanity_model_randomization",
           "protocol.modes=[cascading]", "protocol.metrics=[spearman_abs]"]


def _cfg(overrides):
    return main.compose([*TINY, *overrides])


def _quiet(*a, **k):
    pass


def _scores(df):
    keep = df[df.protocol != "model"]
    return keep.sort_values(["method", "metric", "example", "x"]).reset_index(drop=True)[
        ["method", "metric", "example", "x", "value"]]


def test_batches_and_shards_give_the_one_batch_results(tmp_path):
    whole = main.run(_cfg(METHODS), tmp_path / "whole", log=_quiet)
    parts = main.run(_cfg([*METHODS, "stream.batch_size=4", "stream.shard_size=8"]), tmp_path / "parts",
                     log=_quiet)
    a, b = _scores(whole), _scores(parts)
    assert len(a) == len(b) and set(a.method) == {"smoothgrad"}
    pd.testing.assert_frame_equal(a[["method", "metric", "example"]], b[["method", "metric", "example"]])
    # the stochastic method draws the same per-example noise whatever batch an image falls in, and
    # the protocol's re-explanations get the map's per-example keys in every batch
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-5, atol=1e-6)
    unrand = b[b.metric == "unrandomized_spearman_abs"]["value"]
    assert len(unrand) == 12 and (unrand > 0.99).all()
    info = results.run_info(tmp_path / "parts")["shards"]
    assert info["smoothgrad"]["shards"] == 2 and info["smoothgrad"]["computed"] == [0, 1]


def test_an_interrupted_run_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    cfg = _cfg(["method=gradient", "stream.shard_size=4"])  # 3 shards of 4 images, one batch each
    real = attrax.explain
    calls = []

    def dies_on_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(attrax, "explain", dies_on_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        main.run(cfg, tmp_path / "run", log=_quiet)
    assert not results.is_complete(tmp_path / "run")
    assert len(list((tmp_path / "run" / streaming.SHARD_DIR).glob("*.json"))) == 2
    calls.clear()
    monkeypatch.setattr(attrax, "explain", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    lines = []
    resumed = main.run(cfg, tmp_path / "run", log=lines.append)
    assert len(calls) == 1  # only the third shard was explained again
    assert any("2 shard(s) resumed" in ln for ln in lines)
    fresh = main.run(cfg, tmp_path / "fresh", log=_quiet)
    pd.testing.assert_frame_equal(_scores(resumed), _scores(fresh))
    # a changed setting does not reuse the old shards
    (tmp_path / "run" / results.RUN_FILE).unlink()
    calls.clear()
    main.run(_cfg(["method=gradient", "stream.shard_size=4", "seed=1"]), tmp_path / "run", log=_quiet)
    assert len(calls) == 3


def test_damaged_shard_and_bad_settings_are_one_line_errors(tmp_path):
    cfg = _cfg(["method=gradient", "stream.shard_size=6"])
    main.run(cfg, tmp_path / "run", log=_quiet)
    (tmp_path / "run" / results.RUN_FILE).unlink()
    bad = sorted((tmp_path / "run" / streaming.SHARD_DIR).glob("*.parquet"))[0]
    bad.write_bytes(b"PAR1 broken")
    with pytest.raises(AttraxError, match="cannot be read") as e:
        main.run(cfg, tmp_path / "run", log=_quiet)
    assert str(bad.with_suffix("")) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AttraxError, match="only 2 shard"):
        main.run(_cfg(["method=gradient", "stream.shard_size=6", "stream.shards=[5]"]), tmp_path / "x",
                 log=_quiet)
    with pytest.raises(AttraxError, match="batch_size"):
        streaming.StreamConfig.from_config({"batch_size": 0})
    with pytest.raises(AttraxError, match="no setting"):
        streaming.StreamConfig.from_config({"shard": 1})


def test_shard_jobs_of_a_sweep_merge_in_the_report(tmp_path):
    whole = main.run(_cfg(["method=gradient", "stream.shard_size=6"]), tmp_path / "whole", log=_quiet)
    for k in (0, 1):  # one job per (method, shard), as `-m stream.shards=0,1` launches them
        main.run(_cfg(["method=gradient", "stream.shard_size=6", f"stream.shards=[{k}]"]),
                 tmp_path / "sweep" / str(k), log=_quiet)
    merged = results.load(tmp_path / "sweep")
    assert (merged.protocol == "model").sum() == 1  # the test accuracy comes from shard 0's job
    a = report.leaderboard(whole).set_index(["method", "metric"])
    b = report.leaderboard(merged).set_index(["method", "metric"])
    assert (b.loc["gradient", "n"] == 12).all()
    np.testing.assert_allclose(b.loc["gradient", "mean"], a.loc["gradient", "mean"], rtol=1e-6)


def _tree(root, per_train=4, per_test=10, classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    for split, per in (("train", per_train), ("test", per_test)):
        for c in classes:
            for i in range(per):
                p = root / split / c / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(p)
    return root


def test_image_folder_streams_from_disk_and_shows_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRAX_CACHE", str(tmp_path / "cache"))
    root = _tree(tmp_path / "imgs")
    # the in-memory view of the 30 test images (22 kB) is refused, the 12 training images fit
    over = ["dataset=image_folder", f"dataset.root={root}", "dataset.image_size=8", "dataset.max_memory_mb=0.015",
            "method=gradient", "n_images=30", "stream.batch_size=4", "stream.shard_size=12",
            "progress=true", "stream.progress_s=0"]
    test = attrax.datasets.load("image_folder", "test", root=str(root), image_size=8, max_memory_mb=0.015)
    with pytest.raises(AttraxError, match="stream them"):
        np.asarray(test.x)
    lines = []
    df = main.run(_cfg(over), tmp_path / "run", log=lines.append)
    assert set(df.loc[df.protocol == "pixel_flipping", "example"]) == set(range(30))
    prog = [ln for ln in lines if "images/s" in ln]
    assert any("30/30 images" in ln and "ETA" in ln and "shard 3/3" in ln for ln in prog), prog
    acc = df.loc[df.protocol == "model", "value"].item()
    assert acc == pytest.approx(streaming.accuracy(*_trained(over), test))


def _trained(over):
    cfg = main._plain(_cfg(over))
    tr = attrax.datasets.load("image_folder", "train", **{k: v for k, v in cfg["dataset"].items() if k != "name"})
    model = attrax.models.create("mlp", num_classes=3)
    model, params, _ = attrax.train(model, tr, seed=0, cfg=attrax.TrainConfig(**cfg["train"]), progress=False)
    return model, params


# (streamed batches with per-example keys over 2 forced devices: tests/test_sharding.py)
