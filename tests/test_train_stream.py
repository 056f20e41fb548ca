"""attrax.train.fit_stream: training from memory-mapped shards gives fit's parameters, reads only
batches, reports bad shards by name, shows images/s; train_many over stream sources."""

from __future__ import annotations

import dataclasses
import threading

import jax
import numpy as np
import pytest

import attrax
from attrax.errors import AttraxError
from attrax.train import StreamSource, TrainConfig, fit, fit_stream, train_many


@pytest.fixture(scope="module")
def data(mnist_train):
    ds = mnist_train.take(per_class=7)  # 70 digits: not a multiple of the batch size
    return ds.x, ds.y


def _shards(tmp_path, x, sizes):
    paths, at = [], 0
    for k, s in enumerate(sizes):
        p = tmp_path / f"train-{k:05d}.npy"
        np.save(p, x[at:at + s])
        paths.append(p)
        at += s
    assert at == len(x)
    return paths


MODEL = dict(name="mlp", hidden=(16,))  # one model and batch size for every test: one compile per step kind
CFG = TrainConfig(epochs=1, batch_size=16)


def _model():
    return attrax.models.create(**MODEL)


def _max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda p, q: float(np.abs(np.asarray(p) - np.asarray(q)).max()), a, b)))


def test_stream_from_shards_equals_fit_bitwise(data, tmp_path):
    x, y = data
    model = _model()
    cfg = dataclasses.replace(CFG, epochs=2)  # 4 steps an epoch, 6 digits left out
    ref, l_ref = fit(model, x, y, seed=4, cfg=cfg, progress=False)
    src = StreamSource.from_files(_shards(tmp_path, x, [30, 25, 15]), y)
    assert src.shape == x.shape and src.nbytes == x.nbytes
    assert all(isinstance(p, np.memmap) for p in src.parts)  # nothing loaded
    out, losses = fit_stream(model, src, seed=4, cfg=cfg, progress=False)
    assert _max_diff(ref, out) == 0.0 and losses == l_ref
    mem, l_mem = fit_stream(model, x, y, seed=4, cfg=cfg, progress=False, prefetch=1)  # in-memory arrays
    assert _max_diff(ref, mem) == 0.0 and l_mem == l_ref
    rows = np.array([69, 0, 31, 30, 55, 30])  # any order, across shards, repeats
    np.testing.assert_array_equal(src.rows(rows), x[rows])


class _Guarded:
    """An array-like of rows that refuses whole-array access and records every read."""

    def __init__(self, x, fail_at=None):
        self.x, self.shape, self.dtype = x, x.shape, x.dtype
        self.reads: list[int] = []
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        if idx.ndim != 1:
            raise AssertionError(f"not a row gather: {idx!r}")
        with self.lock:
            self.reads.append(len(idx))
            if self.fail_at is not None and len(self.reads) > self.fail_at:
                raise OSError("disk gone")
        return self.x[idx]

    def __array__(self, *a, **k):
        raise AssertionError("the whole array was materialized")

    def __len__(self):
        raise AssertionError("len() of a part")


def test_reads_only_batches_never_the_whole_array(data):
    x, y = data
    model = _model()
    cfg = dataclasses.replace(CFG, epochs=3)
    parts = [_Guarded(x[:40]), _Guarded(x[40:])]
    out, _ = fit_stream(model, StreamSource(parts, y), seed=0, cfg=cfg, progress=False)
    reads = parts[0].reads + parts[1].reads
    assert max(reads) <= 16  # at most one batch per read
    assert sum(reads) == 1 + 3 * (70 // 16) * 16  # the init row and every epoch's batches, once
    ref, _ = fit(model, x, y, seed=0, cfg=cfg, progress=False)
    assert _max_diff(ref, out) == 0.0


def test_prefetch_runs_at_most_a_few_batches_ahead(data, monkeypatch):
    """With prefetch=1 the reader is never more than 2 batches ahead of the step being run (one
    queued, one waiting to be queued), even when the steps are slow."""
    import importlib
    import time

    T = importlib.import_module("attrax.train")
    x, y = data
    part = _Guarded(x)
    ahead = []
    real = T._stream_runner

    def slow_runner(*a, **k):
        run = real(*a, **k)

        def wrapped(carry, xb, yb):
            time.sleep(0.02)  # a slow step: an unbounded reader would race ahead meanwhile
            ahead.append(sum(part.reads) // 16 - (len(ahead) + 1))  # batches read - batches stepped
            return run(carry, xb, yb)

        return wrapped

    monkeypatch.setattr(T, "_stream_runner", slow_runner)
    fit_stream(_model(), StreamSource([part], y), seed=0, cfg=dataclasses.replace(CFG, epochs=2), progress=False,
               prefetch=1)
    assert len(ahead) == 2 * (70 // 16) and 0 <= min(ahead) and max(ahead) <= 2


def test_a_failing_read_surfaces_and_the_thread_ends(data):
    x, y = data
    part = _Guarded(x, fail_at=3)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(OSError, match="disk gone"):
        fit_stream(_model(), StreamSource([part], y), seed=0, cfg=CFG, progress=False)
    alive = [t for t in threading.enumerate() if t.name == "attrax-prefetch" and t.name not in before]
    assert not alive


def test_bad_shards_are_one_line_errors_naming_the_file(data, tmp_path):
    x, y = data
    paths = _shards(tmp_path, x, [35, 35])
    truncated = paths[1].read_bytes()
    paths[1].write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(AttraxError, match="train-00001.npy") as e:
        StreamSource.from_files(paths, y)
    assert "\n" not in str(e.value)
    paths[1].write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(AttraxError, match="train-00001.npy"):
        StreamSource.from_files(paths, y)
    np.save(paths[1], x[35:, :5])  # rows of another shape
    with pytest.raises(AttraxError, match="train-00001.npy"):
        StreamSource.from_files(paths, y)
    np.save(paths[1], x[35:])
    with pytest.raises(AttraxError, match="labels"):
        StreamSource.from_files(paths, y[:-1])


def test_progress_shows_images_per_second_and_is_quiet_without(data, capsys):
    x, y = data
    fit_stream(_model(), x, y, seed=0, cfg=CFG, progress=False)
    assert capsys.readouterr().err == ""
    fit_stream(_model(), x, y, seed=0, cfg=CFG, progress=True)
    err = capsys.readouterr().err
    assert "img/s" in err and "streamed" in err


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_train_many_over_sources_equals_in_memory(data, tmp_path, mode):
    x, y = data
    model, cfg = _model(), CFG
    src = StreamSource.from_files(_shards(tmp_path, x, [50, 20]), y)
    flipped = StreamSource([1.0 - x], y)
    ref, l_ref = train_many(model, [x, 1.0 - x, x], y, [0, 1, 2], cfg=cfg, mode=mode)
    out, losses = train_many(model, [src, flipped, src], None, [0, 1, 2], cfg=cfg, mode=mode)
    assert losses.shape == (3, 1)
    for a, b in zip(ref, out, strict=True):
        assert _max_diff(a, b) < 1e-6
    np.testing.assert_allclose(losses, l_ref, rtol=1e-6)


def test_train_streams_an_image_folder_too_big_for_memory(tmp_path, monkeypatch):
    """attrax.train on an image_folder split above its max_memory_mb (np.asarray refused) trains
    from batches decoded from the files: fit's parameters on the same rows; accuracy by batches."""
    from PIL import Image

    monkeypatch.setenv("ATTRAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "tree" / c / f"{i}.png")
    kw = dict(root=str(tmp_path / "tree"), image_size=4, test_fraction=0.25, max_memory_mb=1e-4)
    tr = attrax.datasets.load("image_folder", split="train", **kw)
    te = attrax.datasets.load("image_folder", split="test", **kw)
    with pytest.raises(AttraxError, match="max_memory_mb"):
        np.asarray(tr.x)
    model = attrax.models.create("mlp", hidden=(16,), num_classes=2)
    _, variables, info = attrax.train(model, tr, cfg=CFG, cache=False, progress=False, test_set=te)
    assert info["streamed"] and 0 <= info["test_accuracy"] <= 1
    # the decoded rows in memory, through the same step (bitwise fit's, tested above)
    ref, _ = fit_stream(model, tr.x[np.arange(len(tr))], tr.y, seed=0, cfg=CFG, progress=False)
    assert _max_diff(ref, variables) == 0.0
