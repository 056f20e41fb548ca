"""image_folder: every layout on generated folders of tiny JPEG/PNG files (one corrupt file each)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

import attrax
from attrax.datasets import image_folder as imf
from attrax.errors import AttraxError

S = 8  # decoded image size: tiny, so every test stays fast


def _write(path, rng, fmt="JPEG", size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size or (int(rng.integers(10, 16)), int(rng.integers(10, 16)))
    a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    good = path.with_suffix(".tmp")
    _write(good, np.random.default_rng(99), "JPEG", (32, 32))
    path.write_bytes(good.read_bytes()[:200])  # a truncated JPEG
    good.unlink()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRAX_CACHE", str(tmp_path / "cache"))


def make_tree(root, classes=("cat", "dog", "eel"), per=8, corrupt=True):
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(per):
            fmt = "PNG" if i % 3 == 0 else "JPEG"
            _write(root / c / f"{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}", rng, fmt)
    if corrupt:
        _corrupt(root / classes[1] / "999_bad.jpg")
    return root


SYN = ("n01440764", "n01443537", "n01484850")


def make_imagenet(root, flat_val=True):
    rng = np.random.default_rng(1)
    for s in SYN:
        for i in range(6):
            _write(root / "train" / s / f"{s}_{i}.JPEG", rng)
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n")
    rows = ["ImageId,PredictionString"]
    for k in range(9):
        s = SYN[k % 3]
        name = f"ILSVRC2012_val_{k + 1:08d}"
        if flat_val:
            _write(root / "val" / f"{name}.JPEG", rng)
            rows.append(f"{name},{s} 1 2 3 4")
        else:
            _write(root / "val" / s / f"{name}.JPEG", rng)
    if flat_val:
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    _corrupt(root / "val" / ("ILSVRC2012_val_00000010.JPEG" if flat_val else f"{SYN[0]}/bad.JPEG"))
    if flat_val:
        with open(root / "LOC_val_solution.csv", "a") as f:
            f.write(f"ILSVRC2012_val_00000010,{SYN[0]} 1 2 3 4\n")
    return root


def make_food101(root):
    rng = np.random.default_rng(2)
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    train, test = [], []
    for c in classes:
        for i in range(7):
            _write(root / "images" / c / f"{100 + i}.jpg", rng)
            (test if i >= 5 else train).append(f"{c}/{100 + i}")
    _corrupt(root / "images" / "baklava" / "999.jpg")
    train.append("baklava/999")
    (root / "meta").mkdir()
    (root / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "meta" / "labels.txt").write_text("Apple pie\nBaby back ribs\nBaklava\n")
    return root


def make_birdsnap(root):
    rng = np.random.default_rng(3)
    species = [("1", "Acadian Flycatcher", "Empidonax virescens", "Acadian_Flycatcher"),
               ("2", "Acorn Woodpecker", "Melanerpes formicivorus", "Acorn_Woodpecker")]
    img_rows, test_rows = ["url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2"], ["path"]
    for sid, _, _, d in species:
        for i in range(8):
            p = f"{d}/{i}.jpg"
            img_rows.append(f"http://x/{i}.jpg\t0\t{p}\t{sid}\t0\t0\t5\t5")
            if i < 3:
                test_rows.append(p)
            if not (sid == "2" and i == 7):  # one listed image never downloaded
                _write(root / "download" / "images" / p, rng)
    _corrupt(root / "download" / "images" / "Acorn_Woodpecker" / "bad.jpg")
    img_rows.append("http://x/bad.jpg\t0\tAcorn_Woodpecker/bad.jpg\t2\t0\t0\t5\t5")
    (root / "images.txt").write_text("\n".join(img_rows) + "\n")
    (root / "test_images.txt").write_text("\n".join(test_rows) + "\n")
    (root / "species.txt").write_text("id\tcommon\tscientific\tdir\n" + "\n".join("\t".join(s) for s in species) + "\n")
    return root


def _load(root, split, **kw):
    return attrax.datasets.load("image_folder", split=split, root=str(root), image_size=S, **kw)


def test_tree_layout_streams_and_reports_the_corrupt_file(tmp_path):
    root = make_tree(tmp_path / "tree")
    with pytest.raises(AttraxError) as e:
        _load(root, "train", test_fraction=0.0)  # the channel mean decodes every train file
    msg = str(e.value)
    assert "999_bad.jpg" in msg and "\n" not in msg
    with pytest.warns(UserWarning, match="skipped 1"):
        tr = _load(root, "train", bad_files="skip", test_fraction=0.25, mean_images=None)
    te = _load(root, "test", bad_files="skip", test_fraction=0.25)
    assert tr.meta["layout"] == "tree" and tr.meta["class_names"] == ["cat", "dog", "eel"]
    assert len(tr) + len(te) == 24 and len(te) == 6 and tr.meta["skipped_files"][0].endswith("999_bad.jpg")
    assert not set(tr.files) & set(te.files)
    x = np.asarray(tr.x)
    assert x.shape == (len(tr), S, S, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(tr.meta["channel_mean"], x.reshape(-1, 3).mean(0), atol=1e-5)
    xs, ys = zip(*tr.batches(5), strict=True)
    np.testing.assert_array_equal(np.concatenate(xs), x)
    np.testing.assert_array_equal(np.concatenate(ys), tr.y)
    a = np.concatenate([y for _, y in tr.batches(4, shuffle=True, seed=3)])
    b = np.concatenate([y for _, y in tr.batches(4, shuffle=True, seed=3)])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a), np.sort(tr.y))


def test_streaming_reports_a_bad_file_by_path(tmp_path):
    root = make_tree(tmp_path / "tree", corrupt=False)
    tr = _load(root, "train", test_fraction=0.0)
    bad = root / "cat" / "000.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(AttraxError, match="000.png"):
        list(tr.batches(8))
    with pytest.raises(AttraxError, match="000.png"):
        tr.x[:3]


def test_imagenet_flat_val_with_label_file(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    tr = _load(root, "train")
    assert tr.meta["layout"] == "imagenet" and tr.meta["class_keys"] == list(SYN)
    assert tr.meta["class_names"] == ["tench", "goldfish", "great white shark"] and len(tr) == 18
    with pytest.warns(UserWarning, match="skipped 1"):
        te = _load(root, "test", bad_files="skip")
    assert len(te) == 9 and list(te.y) == [0, 1, 2] * 3
    with pytest.raises(AttraxError, match="ILSVRC2012_val_00000010"):
        list(_load(root, "test").batches(16))


def test_imagenet_val_in_synset_folders_and_subsets(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", flat_val=False)
    with pytest.warns(UserWarning, match="bad.JPEG"):
        te = _load(root, "test", bad_files="skip")
    assert len(te) == 9 and sorted(np.bincount(te.y)) == [3, 3, 3]
    sub = _load(root, "train", per_class=2, classes=2, seed=1)
    again = _load(root, "train", per_class=2, classes=2, seed=1)
    assert list(np.bincount(sub.y)) == [2, 2] and list(sub.files) == list(again.files)
    assert list(sub.meta["class_index"]) == [0, 1] and sub.num_classes == 2
    other = _load(root, "train", classes=["n01484850"])
    assert list(other.meta["class_index"]) == [2] and set(other.y) == {0}
    assert isinstance(sub.take(per_class=1).x, imf.LazyImages) and len(sub.take(per_class=1)) == 2
    plain = sub.replace(x=np.zeros((4, S, S, 3), np.float32))  # ROAR's modified images: in memory
    assert type(plain) is attrax.datasets.Dataset and len(plain.take(per_class=1)) == 2


def test_imagenet_kaggle_nesting_and_devkit_labels(tmp_path):
    import scipy.io

    outer = tmp_path / "kaggle"
    root = make_imagenet(outer / "ILSVRC" / "Data" / "CLS-LOC")
    (root / "LOC_val_solution.csv").unlink()  # labels from the official devkit instead
    (root / "val" / "ILSVRC2012_val_00000010.JPEG").unlink()
    data = outer / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ids = {SYN[1]: 1, SYN[2]: 2, SYN[0]: 3}  # ILSVRC2012 IDs are not in sorted-synset order
    syn = np.zeros(3, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, (w, k) in enumerate(ids.items()):
        syn[i] = (k, w, 0)
    scipy.io.savemat(data / "meta.mat", {"synsets": syn})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(str(ids[SYN[k % 3]]) for k in range(9)))
    te = _load(outer, "test")
    assert te.meta["layout"] == "imagenet" and list(te.y) == [0, 1, 2] * 3


def test_food101_layout(tmp_path):
    root = make_food101(tmp_path / "food-101")
    with pytest.raises(AttraxError, match="999.jpg"):
        _load(root, "train")
    with pytest.warns(UserWarning):
        tr = _load(root, "train", bad_files="skip")
    te = _load(root, "test", bad_files="skip")
    assert tr.meta["layout"] == "food101" and tr.meta["class_names"] == ["Apple pie", "Baby back ribs", "Baklava"]
    assert len(tr) == 15 and len(te) == 6 and list(np.bincount(te.y)) == [2, 2, 2]


def test_birdsnap_layout(tmp_path):
    root = make_birdsnap(tmp_path / "birdsnap")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr = _load(root, "train", bad_files="skip")
        te = _load(root, "test", bad_files="skip")
    assert any("absent" in str(m.message) for m in w) and any("skipped 1" in str(m.message) for m in w)
    assert tr.meta["layout"] == "birdsnap" and tr.meta["missing_files"] == 1
    assert tr.meta["class_names"] == ["Acadian Flycatcher", "Acorn Woodpecker"]
    assert len(te) == 6 and len(tr) == 9


def test_center_crop_matches_the_torchvision_eval_transform(tmp_path):
    rng = np.random.default_rng(5)
    p = tmp_path / "a.png"
    _write(p, rng, "PNG", (30, 20))
    got = imf.decode(str(p), 16, "center_crop", 0.8)  # shorter side 20 -> 20, crop 16
    im = Image.open(p).convert("RGB")
    ref = np.asarray(im.resize((30, 20), Image.BILINEAR).crop((7, 2, 23, 18)), np.float32) / 255
    np.testing.assert_allclose(got, ref)
    assert imf.decode(str(p), 8, "stretch").shape == (8, 8, 3)


def test_channel_mean_is_cached(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree", corrupt=False)
    first = _load(root, "train")
    monkeypatch.setattr(imf, "_scan", lambda *a, **k: pytest.fail("decoded again"))
    again = _load(root, "test")
    np.testing.assert_array_equal(first.meta["channel_mean"], again.meta["channel_mean"])
    assert first.fingerprint() == _load(root, "train").fingerprint() != again.fingerprint()


def test_missing_root_gives_the_fetch_hint(tmp_path, monkeypatch):
    with pytest.raises(AttraxError) as e:
        _load(tmp_path / "nowhere", "train")
    assert "fetch" in str(e.value) and "nowhere" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("ATTRAX_DATA", str(tmp_path / "data"))
    with pytest.raises(AttraxError, match="image-net.org"):
        attrax.datasets.load("image_folder", split="test", layout="imagenet")
    with pytest.raises(AttraxError, match="root is not set"):
        attrax.datasets.load("image_folder", split="test")


def test_config_composes_and_loads(tmp_path):
    from hydra import compose, initialize_config_module

    root = make_tree(tmp_path / "tree", corrupt=False)
    with initialize_config_module(config_module="attrax.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["dataset=image_folder", f"dataset.root={root}",
                                                       f"dataset.image_size={S}"])
    d = dict(cfg.dataset)
    ds = attrax.datasets.load(d.pop("name"), "test", **d)
    assert ds.x.shape[1:] == (S, S, 3) and ds.num_classes == 3
