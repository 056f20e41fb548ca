"""`image_folder`: images on disk in the common layouts, decoded and resized on the host, streamed.

    ds = attrax.datasets.load("image_folder", split="train", root="~/data/imagenet", image_size=224)
    for x, y in ds.batches(64):          # float32 NHWC in [0, 1], int32 labels, decoded from disk
        ...
    ds.x[:16]                            # random access decodes just those files
    np.asarray(ds.x)                     # the in-memory view, for small sets only (see `max_memory_mb`)

Layouts (`layout="auto"` detects them, in this order; `split="test"` is ImageNet's `val`):
- `food101`: `meta/train.txt` / `meta/test.txt` lines `apple_pie/1005649` -> `images/apple_pie/1005649.jpg`;
  classes from `meta/classes.txt` (else the sorted folder names), names from `meta/labels.txt`.
- `birdsnap`: `images.txt` (tab-separated with a header holding `path` and `species_id`), `species.txt`
  (`id`, `common`, ...), `test_images.txt` (header `path`): test = the listed paths, train = the rest;
  images under `download/images/` or `images/` (the layout of Birdsnap's `get_birdsnap.py`). Birdsnap
  is fetched from Flickr URLs, many of them dead, so listed files that are absent are left out with a
  warning and counted in `meta["missing_files"]`.
- `imagenet`: `train/<synset>/*.JPEG` (synsets `n01440764`, ...; also under `ILSVRC/Data/CLS-LOC/`, the
  Kaggle layout) and `val/` either in synset folders or flat with a label file: `LOC_val_solution.csv`
  (Kaggle: `ImageId,PredictionString` whose first word is the synset), or `val_labels.txt` / `val.txt`
  lines `<file> <synset or 0-based index>`, or `val_labels=PATH`, or the official devkit
  (`ILSVRC2012_devkit_t12/data/meta.mat` + `ILSVRC2012_validation_ground_truth.txt`). The label map
  `LOC_synset_mapping.txt` / `synset_words.txt` (lines `n01440764 tench, Tinca tinca`) gives the class
  names. Classes are the sorted synsets: torchvision's `ImageFolder` order, the order of the
  published 1000-class weights.
- `tree`: `<class>/*.jpg` under `train/` and `test/` (or `val/`), or directly under `root`, then split
  by a seeded class-stratified draw of `test_fraction` (default 0.2) of every class.

Decoding (Pillow, converted to RGB): `resize="center_crop"` (default) is the standard evaluation
transform of torchvision / timm: the shorter side to `round(image_size / crop_fraction)` (256 for 224
at 0.875), bilinear with Pillow's antialiasing, then the central `image_size` square; `"stretch"` resizes
straight to `image_size` x `image_size`. Values are `uint8 / 255`, float32 NHWC in [0, 1].

Normalisation (recorded choice): the data set returns [0, 1] as every attrax data set does; the
ImageNet mean/std normalisation belongs to the MODEL (`normalize="imagenet"` of the zoo's ResNet,
VGG and ViT and of `attrax.models.import_weights`), so attributions are maps over [0, 1] pixels,
baselines such as black or the channel mean keep their meaning, and perturbation protocols fill
[0, 1] values. `meta["normalization"]` records this and the mean/std to use.

Input pipeline: Grain (`grain.MapDataset` over a random-access source of (path, label), map = Pillow
decode + resize, batch, `to_iter_dataset` with `num_threads` prefetching threads; Pillow releases
the GIL while decoding, so threads scale without worker processes). `batches(..., shuffle=True,
seed=s)` is Grain's seeded global shuffle, deterministic for a seed.

Subsets (deterministic): `classes=K` keeps the first K classes in the layout's order (or a list of
class folder names / synsets), relabelled 0..K-1 (`meta["class_index"]` holds the original
indices, e.g. to read 1000-way logits); `per_class=N` keeps N images of every class (a seeded draw,
`seed`, from each class's sorted files), so subsets are class-balanced and reproducible.

Channel mean (ROAR / KAR replacement): the per-channel mean of the TRAIN split's decoded images,
over a class-balanced deterministic sample of `mean_images` files (default 10,000; None = all),
computed once and cached in `$ATTRAX_CACHE/image_folder/` by a hash of the files and the decoding
settings; `meta["channel_mean_images"]` records how many images it covers.

Bad files (recorded choice): `bad_files="error"` (default) raises a one-line `AttraxError` naming
the file that cannot be decoded (corrupt, truncated, not an image) as soon as it is read: a run
never silently changes its data. `bad_files="skip"` decodes the whole split once when it is loaded
(cached like the mean), leaves the bad files out with a warning, and records them in
`meta["skipped_files"]`.

A missing `root` (or a folder without images) gives the one-line hint of what to fetch and where
(`root=None` with `layout` = imagenet, food101 or birdsnap looks in `$ATTRAX_DATA/<layout>`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from attrax.datasets import DATASETS, Dataset
from attrax.errors import AttraxError, unknown_name

LAYOUTS = ("auto", "imagenet", "food101", "birdsnap", "tree")
RESIZES = ("center_crop", "stretch")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNSET = re.compile(r"n\d{8}")
CACHE_VERSION = 1

FETCH_HINTS = {
    "imagenet": "ImageNet (ILSVRC2012 train + val, https://image-net.org/download-images.php, or Kaggle's "
                "imagenet-object-localization-challenge) unpacked as train/<synset>/*.JPEG and val/ (synset folders, "
                "or flat with LOC_val_solution.csv)",
    "food101": "Food-101 (https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/food-101.tar.gz) unpacked so "
               "that meta/train.txt and images/<class>/ are inside",
    "birdsnap": "Birdsnap (https://thomasberg.org: birdsnap.tgz, then its get_birdsnap.py) so that images.txt, "
                "species.txt, test_images.txt and download/images/ are inside",
    "tree": "a folder of class_name/*.jpg (optionally under train/ and test/)",
}


class BadImageError(AttraxError):
    """A file that Pillow cannot decode (corrupt, truncated, not an image)."""


# ---------------------------------------------------------------------------------------------
# Decoding


def decode(path: str, image_size: int, resize: str = "center_crop", crop_fraction: float = 0.875) -> np.ndarray:
    """One image file -> (image_size, image_size, 3) float32 in [0, 1] (one-line error naming the path)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # loads the pixels: a truncated file fails here
            w, h = im.size
            if resize == "stretch":
                im = im.resize((image_size, image_size), Image.BILINEAR)
            else:
                short = round(image_size / crop_fraction)
                # torchvision Resize(short): the shorter side to `short`, the other int(short * long / short_side)
                nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
                im = im.resize((nw, nh), Image.BILINEAR)
                top, left = int(round((nh - image_size) / 2.0)), int(round((nw - image_size) / 2.0))
                im = im.crop((left, top, left + image_size, top + image_size))
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImageError(f"image_folder: cannot decode {path}: {reason} (replace or delete the file, "
                            "or load with bad_files=skip)") from None
    return a.astype(np.float32) / np.float32(255.0)


def _try_decode(path: str, image_size: int, resize: str, crop_fraction: float) -> np.ndarray | None:
    try:
        return decode(path, image_size, resize, crop_fraction)
    except BadImageError:
        return None


def default_threads() -> int:
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# The lazily decoded image array and the streaming data set


class LazyImages:
    """An (n, S, S, 3) float32 "array" of image files: indexing decodes only the files it selects.

    `np.asarray(...)` decodes everything (refused above `max_memory_mb`: stream with `batches`).
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, files: Sequence[str], image_size: int, resize: str, crop_fraction: float,
                 num_threads: int, max_memory_mb: float):
        self.files = np.asarray(files, dtype=object)
        self.image_size, self.resize, self.crop_fraction = int(image_size), resize, float(crop_fraction)
        self.num_threads, self.max_memory_mb = int(num_threads), float(max_memory_mb)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.image_size, self.image_size, 3)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return len(self.files)

    def decode_files(self, files: Sequence[str]) -> np.ndarray:
        args = (self.image_size, self.resize, self.crop_fraction)
        if len(files) <= 4 or self.num_threads <= 1:
            out = [decode(f, *args) for f in files]
        else:
            with ThreadPoolExecutor(self.num_threads) as pool:
                out = list(pool.map(lambda f: decode(f, *args), files))
        return np.stack(out) if out else np.zeros((0, *self.shape[1:]), np.float32)

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, tuple):  # x[i, ...] style: decode the first axis, index the rest in memory
            return self[idx[0]][(slice(None), *idx[1:])] if not np.isscalar(idx[0]) else self[idx[0]][idx[1:]]
        if isinstance(idx, (int, np.integer)):
            return decode(self.files[int(idx)], self.image_size, self.resize, self.crop_fraction)
        return self.decode_files(list(self.files[idx]))

    def take_files(self, idx: Any) -> LazyImages:
        return LazyImages(self.files[idx], self.image_size, self.resize, self.crop_fraction, self.num_threads,
                          self.max_memory_mb)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        mb = self.nbytes / 2**20
        if mb > self.max_memory_mb:
            raise AttraxError(
                f"image_folder: {len(self)} images of {self.image_size}x{self.image_size} need {mb:.0f} MB in memory "
                f"(max_memory_mb={self.max_memory_mb:.0f}): stream them with ds.batches(...) or take a subset "
                "(per_class=, classes=)"
            )
        a = self[np.arange(len(self))]
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} files, {self.image_size}x{self.image_size}x3)"


class _Source:
    """Grain random-access source of (file, label) records."""

    def __init__(self, files: np.ndarray, labels: np.ndarray):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return str(self.files[i]), int(self.labels[i])


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFolderDataset(Dataset):
    """A `Dataset` whose `x` is a `LazyImages`: batches stream from disk (`batches`), subsets stay lazy."""

    x: LazyImages  # type: ignore[assignment]

    @property
    def files(self) -> np.ndarray:
        return self.x.files

    def subset(self, idx: np.ndarray) -> ImageFolderDataset:
        idx = np.asarray(idx)
        meta = dict(self.meta)
        for k in ("masks", "boxes", "index"):
            if k in meta and meta[k] is not None:
                meta[k] = np.asarray(meta[k])[idx]
        return ImageFolderDataset(self.x.take_files(idx), self.y[idx], meta)

    def replace(self, **changes: Any) -> Dataset:
        """Replacing `x` by an array (ROAR / KAR's modified images) gives a plain in-memory `Dataset`."""
        if "x" in changes and not isinstance(changes["x"], LazyImages):
            return Dataset(changes["x"], changes.get("y", self.y), changes.get("meta", self.meta))
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Hash of the files (relative paths, sizes, mtimes), labels and decoding settings."""
        h = hashlib.sha256()
        root = self.meta.get("root", "")
        for f in self.files:
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, root)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        h.update(np.ascontiguousarray(self.y).tobytes())
        h.update(json.dumps([self.meta.get("name"), self.x.image_size, self.x.resize, self.x.crop_fraction]).encode())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0, drop_remainder: bool = False,
                num_threads: int | None = None, prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x, y) batches decoded from disk by a Grain pipeline (threads prefetch `prefetch` batches)."""
        import grain

        x = self.x
        ds = grain.MapDataset.source(_Source(x.files, self.y))
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.map(lambda r: (decode(r[0], x.image_size, x.resize, x.crop_fraction), np.int32(r[1])))
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        threads = num_threads if num_threads is not None else x.num_threads
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, threads),
                                                  prefetch_buffer_size=max(1, prefetch * batch_size)))
        for xb, yb in it:
            yield np.asarray(xb, np.float32), np.asarray(yb, np.int32)

    def num_batches(self, batch_size: int, drop_remainder: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_remainder else -(-n // batch_size)


# ---------------------------------------------------------------------------------------------
# Layouts: each returns {split: [(path, class key)]}, the ordered class keys and their names


@dataclasses.dataclass
class Listing:
    items: dict[str, list[tuple[str, str]]]  # split -> [(absolute path, class key)]
    classes: list[str]  # class keys in label order
    names: dict[str, str]  # class key -> human-readable name
    missing: int = 0


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_tree(folder: Path) -> dict[str, list[str]]:
    """{class folder name: sorted image paths} of folder/<class>/**."""
    out: dict[str, list[str]] = {}
    for d in sorted((e for e in os.scandir(folder) if e.is_dir()), key=lambda e: e.name):
        files = []
        for dirpath, dirnames, filenames in os.walk(d.path):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        if files:
            out[d.name] = files
    return out


def _read_label_map(root: Path) -> dict[str, str]:
    for cand in ("LOC_synset_mapping.txt", "synset_words.txt", "synsets.txt", "labels.txt"):
        for base in (root, root.parent):
            p = base / cand
            if p.is_file():
                out = {}
                for line in p.read_text().splitlines():
                    parts = line.strip().split(None, 1)
                    if parts and SYNSET.fullmatch(parts[0]):
                        out[parts[0]] = parts[1].split(",")[0].strip() if len(parts) > 1 else parts[0]
                if out:
                    return out
    return {}


def _imagenet_base(root: Path) -> Path | None:
    for base in (root, root / "ILSVRC" / "Data" / "CLS-LOC"):
        tr = base / "train"
        if tr.is_dir() and any(SYNSET.fullmatch(e.name) for e in os.scandir(tr) if e.is_dir()):
            return base
    return None


def _imagenet(root: Path, val_labels: str | None) -> Listing:
    base = _imagenet_base(root)
    if base is None:
        raise AttraxError(f"image_folder: {root} has no train/<synset>/ folders; expected {FETCH_HINTS['imagenet']}")
    train = _class_tree(base / "train")
    classes = sorted(train)
    items = {"train": [(f, c) for c in classes for f in train[c]], "test": []}
    val = base / "val"
    if val.is_dir():
        vtree = {k: v for k, v in _class_tree(val).items() if SYNSET.fullmatch(k)}
        if vtree:
            items["test"] = [(f, c) for c in sorted(vtree) for f in vtree[c]]
        else:
            items["test"] = _imagenet_flat_val(root, base, val, classes, val_labels)
    return Listing(items, classes, _read_label_map(root) or _read_label_map(base))


def _imagenet_flat_val(root: Path, base: Path, val: Path, classes: list[str], val_labels: str | None):
    cands = [Path(val_labels).expanduser()] if val_labels else [
        b / n for b in (root, base, val, root / "LOC") for n in
        ("LOC_val_solution.csv", "val_labels.txt", "val.txt", "ILSVRC2012_val_labels.txt")]
    label_file = next((p for p in cands if p.is_file()), None)
    if label_file is None and not val_labels:
        devkit = _devkit_labels(root, base, classes)
        if devkit is not None:
            return _match_val(val, devkit, "the ImageNet devkit", classes)
    if label_file is None:
        raise AttraxError(
            f"image_folder: {val} holds flat images without a label file: put LOC_val_solution.csv (Kaggle), "
            "val_labels.txt ('<file> <synset>' lines) or the devkit (ILSVRC2012_devkit_t12/) in the ImageNet root, "
            "or pass val_labels=PATH"
        )
    by_name: dict[str, str] = {}
    text = label_file.read_text().splitlines()
    if text and text[0].lower().startswith("imageid"):
        for row in csv.reader(text[1:]):
            if len(row) >= 2 and row[1].split():
                by_name[row[0]] = row[1].split()[0]
    else:
        for line in text:
            parts = line.split()
            if len(parts) >= 2:
                lab = parts[1]
                if lab.isdigit():
                    i = int(lab)
                    if not 0 <= i < len(classes):
                        raise AttraxError(f"image_folder: {label_file}: label {i} outside 0..{len(classes) - 1}")
                    lab = classes[i]
                by_name[os.path.splitext(os.path.basename(parts[0]))[0]] = lab
    return _match_val(val, by_name, str(label_file), classes)


def _match_val(val: Path, by_name: dict[str, str], source: str, classes: list[str]) -> list[tuple[str, str]]:
    known = set(classes)
    out = []
    for f in sorted(e.path for e in os.scandir(val) if e.is_file() and _is_image(e.name)):
        stem = os.path.splitext(os.path.basename(f))[0]
        if stem not in by_name:
            raise AttraxError(f"image_folder: {f} has no label in {source}")
        if by_name[stem] not in known:
            raise AttraxError(f"image_folder: {source}: synset {by_name[stem]!r} of {stem} is not a train class")
        out.append((f, by_name[stem]))
    return out


def _devkit_labels(root: Path, base: Path, classes: list[str]) -> dict[str, str] | None:
    """The official devkit (ILSVRC2012_devkit_t12/data/): meta.mat maps ILSVRC2012_ID -> synset, and
    ILSVRC2012_validation_ground_truth.txt holds one ID per val image, ILSVRC2012_val_00000001 first."""
    for d in (root / "ILSVRC2012_devkit_t12" / "data", base / "ILSVRC2012_devkit_t12" / "data", root):
        gt, meta = d / "ILSVRC2012_validation_ground_truth.txt", d / "meta.mat"
        if gt.is_file() and meta.is_file():
            from scipy.io import loadmat

            try:
                syn = loadmat(str(meta), squeeze_me=True)["synsets"]
                wnid = {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in np.atleast_1d(syn)}
            except Exception as e:  # noqa: BLE001
                raise AttraxError(f"image_folder: cannot read {meta} ({type(e).__name__}: {e})") from None
            ids = [int(t) for t in gt.read_text().split()]
            if any(i not in wnid for i in ids):
                raise AttraxError(f"image_folder: {gt} holds IDs missing from {meta}")
            return {f"ILSVRC2012_val_{k + 1:08d}": wnid[i] for k, i in enumerate(ids)}
    return None


def _food101(root: Path) -> Listing:
    base = root if (root / "meta" / "train.txt").is_file() else root / "food-101"
    meta = base / "meta"
    items: dict[str, list[tuple[str, str]]] = {}
    for split, fname in (("train", "train.txt"), ("test", "test.txt")):
        p = meta / fname
        if not p.is_file():
            raise AttraxError(f"image_folder: {p} is missing; expected {FETCH_HINTS['food101']}")
        rows = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        items[split] = [(str(base / "images" / f"{r}.jpg"), r.split("/")[0]) for r in rows]
    cls_file = meta / "classes.txt"
    classes = ([c.strip() for c in cls_file.read_text().splitlines() if c.strip()] if cls_file.is_file()
               else sorted({c for rows in items.values() for _, c in rows}))
    names = {c: c.replace("_", " ") for c in classes}
    lab_file = meta / "labels.txt"
    if lab_file.is_file():
        labels = [c.strip() for c in lab_file.read_text().splitlines() if c.strip()]
        if len(labels) == len(classes):
            names = dict(zip(classes, labels, strict=True))
    missing = 0
    for split in items:
        keep = [(f, c) for f, c in items[split] if os.path.exists(f)]
        missing += len(items[split]) - len(keep)
        items[split] = keep
    if missing:
        raise AttraxError(f"image_folder: {missing} images listed in {meta} are absent under {base / 'images'}")
    return Listing(items, classes, names)


def _tsv(path: Path) -> list[dict[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"), strict=False)) for ln in lines[1:]]


def _birdsnap(root: Path) -> Listing:
    rows = _tsv(root / "images.txt")
    species = {r["id"]: r for r in _tsv(root / "species.txt")} if (root / "species.txt").is_file() else {}
    if not rows or "path" not in rows[0] or "species_id" not in rows[0]:
        raise AttraxError(f"image_folder: {root / 'images.txt'} needs a header with 'path' and 'species_id' columns")
    test_file = root / "test_images.txt"
    if not test_file.is_file():
        raise AttraxError(f"image_folder: {test_file} is missing; expected {FETCH_HINTS['birdsnap']}")
    test = {r.get("path", "") for r in _tsv(test_file)}
    img_base = next((b for b in (root / "download" / "images", root / "images") if b.is_dir()), root)
    classes = sorted({r["species_id"] for r in rows}, key=lambda s: (int(s) if s.isdigit() else 0, s))
    items: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    missing = 0
    for r in rows:
        f = str(img_base / r["path"])
        if not os.path.exists(f):
            missing += 1
            continue
        items["test" if r["path"] in test else "train"].append((f, r["species_id"]))
    names = {c: species.get(c, {}).get("common", c) for c in classes}
    if missing:
        warnings.warn(f"image_folder: {missing} Birdsnap images listed in images.txt are absent under {img_base} "
                      "(dead download URLs): left out", stacklevel=3)
    return Listing(items, classes, names, missing)


def _tree(root: Path, test_fraction: float, seed: int) -> Listing:
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if train_dir.is_dir() and test_dir is not None:
        tr, te = _class_tree(train_dir), _class_tree(test_dir)
        classes = sorted(tr)
        extra = sorted(set(te) - set(tr))
        if extra:
            raise AttraxError(f"image_folder: {test_dir} has classes missing from {train_dir}: {', '.join(extra[:3])}")
        items = {"train": [(f, c) for c in classes for f in tr[c]], "test": [(f, c) for c in sorted(te) for f in te[c]]}
        return Listing(items, classes, {c: c for c in classes})
    tree = _class_tree(root)
    classes = sorted(tree)
    rng = np.random.default_rng(seed)
    items = {"train": [], "test": []}
    for c in classes:
        files = tree[c]
        perm = rng.permutation(len(files))
        k = int(round(test_fraction * len(files)))
        test_idx = set(perm[:k].tolist())
        items["test"] += [(f, c) for i, f in enumerate(files) if i in test_idx]
        items["train"] += [(f, c) for i, f in enumerate(files) if i not in test_idx]
    return Listing(items, classes, {c: c for c in classes})


def detect_layout(root: Path) -> str:
    if (root / "meta" / "train.txt").is_file() or (root / "food-101" / "meta" / "train.txt").is_file():
        return "food101"
    if (root / "images.txt").is_file() and (root / "species.txt").is_file():
        return "birdsnap"
    if _imagenet_base(root) is not None:
        return "imagenet"
    return "tree"


def _missing_root_error(root: Path | None, layout: str) -> AttraxError:
    what = FETCH_HINTS.get(layout) if layout != "auto" else (
        f"{FETCH_HINTS['imagenet']}; or Food-101, Birdsnap, or {FETCH_HINTS['tree']}")
    where = f"no images at {root}" if root is not None else "dataset.root is not set"
    return AttraxError(f"image_folder: {where}: fetch {what}, then pass root=PATH (dataset.root=PATH)")


# ---------------------------------------------------------------------------------------------
# Cache (channel mean, bad files)


def _cache_dir() -> Path:
    root = os.environ.get("ATTRAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attrax")
    return Path(root) / "image_folder"


def _files_key(files: Sequence[str], what: str, settings: Sequence[Any]) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, what, *settings]).encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:20]


def _cached_json(key: str, compute) -> dict:
    path = _cache_dir() / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a broken entry is recomputed
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
    return value


def _scan(files: Sequence[str], image_size: int, resize: str, crop_fraction: float, threads: int,
          skip_bad: bool) -> dict:
    """Decode every file once: per-channel sum of means, count, bad files."""

    def one(f):
        a = _try_decode(f, image_size, resize, crop_fraction) if skip_bad else decode(f, image_size, resize,
                                                                                        crop_fraction)
        return f, None if a is None else a.reshape(-1, 3).mean(axis=0, dtype=np.float64)

    total, n, bad = np.zeros(3), 0, []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for f, m in pool.map(one, files):
            if m is None:
                bad.append(f)
            else:
                total += m
                n += 1
    return {"sum": total.tolist(), "count": n, "bad": bad}


def _balanced_sample(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Up to `n` indices spread evenly over the classes (a seeded draw inside each class), sorted."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]
    return np.sort(np.concatenate(idx))[:n]


# ---------------------------------------------------------------------------------------------
# The loader


@DATASETS.register("image_folder", source="folder", embedded=False)
def image_folder(
    *,
    split: str = "test",
    root: str | None = None,
    image_size: int = 224,
    layout: str = "auto",
    resize: str = "center_crop",
    crop_fraction: float = 0.875,
    classes: int | Sequence[str] | None = None,
    per_class: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_labels: str | None = None,
    bad_files: str = "error",
    mean_images: int | None = 10_000,
    num_threads: int | None = None,
    max_memory_mb: float = 4096,
    name: str | None = None,
) -> ImageFolderDataset:
    """Images under `root` in one of the layouts of the module docstring, as a streaming `Dataset`."""
    if layout not in LAYOUTS:
        raise unknown_name("image_folder layout", layout, LAYOUTS)
    if resize not in RESIZES:
        raise unknown_name("image_folder resize", resize, RESIZES)
    if bad_files not in ("error", "skip"):
        raise AttraxError(f"image_folder: bad_files={bad_files!r}: use error or skip")
    if root is None and layout in ("imagenet", "food101", "birdsnap"):
        from attrax.datasets.download import data_dir

        root = str(data_dir() / layout)
    if root is None:
        raise _missing_root_error(None, layout)
    rootp = Path(root).expanduser()
    if not rootp.is_dir() or not any(os.scandir(rootp)):
        raise _missing_root_error(rootp, layout)
    kind = detect_layout(rootp) if layout == "auto" else layout
    if kind == "imagenet":
        listing = _imagenet(rootp, val_labels)
    elif kind == "food101":
        listing = _food101(rootp)
    elif kind == "birdsnap":
        listing = _birdsnap(rootp)
    else:
        listing = _tree(rootp, test_fraction, seed)
    if not listing.classes or not listing.items["train"]:
        raise _missing_root_error(rootp, kind)

    keys = list(listing.classes)
    if classes is not None:
        if isinstance(classes, int):
            keep = keys[:classes]
        else:
            unknown = [c for c in classes if c not in listing.classes]
            if unknown:
                raise unknown_name("image_folder class", unknown[0], listing.classes)
            keep = list(classes)
        keys = keep
    label_of = {c: i for i, c in enumerate(keys)}
    full_index = {c: i for i, c in enumerate(listing.classes)}
    threads = num_threads or default_threads()
    settings = (image_size, resize, crop_fraction)

    def select(sp: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = [(f, label_of[c]) for f, c in listing.items[sp] if c in label_of]
        files = np.asarray([f for f, _ in pairs], dtype=object)
        labels = np.asarray([lab for _, lab in pairs], dtype=np.int32)
        if per_class is not None:
            rng = np.random.default_rng(seed)
            idx = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(keys))]
            idx = np.sort(np.concatenate(idx)) if idx else np.zeros(0, int)
            files, labels = files[idx], labels[idx]
        return files, labels

    def drop_bad(files: np.ndarray, labels: np.ndarray, sp: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        key = _files_key(list(files), "scan", settings)
        scan = _cached_json(key, lambda: _scan(list(files), image_size, resize, crop_fraction, threads, True))
        bad = set(scan["bad"])
        if bad and sp == split:
            first = sorted(bad)[0]
            warnings.warn(f"image_folder: skipped {len(bad)} undecodable {sp} file(s) (bad_files=skip), e.g. {first}",
                          stacklevel=3)
        if bad:
            keep = np.asarray([f not in bad for f in files], bool)
            files, labels = files[keep], labels[keep]
        return files, labels, sorted(bad)

    train_files, train_labels = select("train")
    skipped: list[str] = []
    if bad_files == "skip" and split == "train":  # the mean's own pass skips bad files of the sample
        train_files, train_labels, skipped = drop_bad(train_files, train_labels, "train")
    mean_idx = _balanced_sample(train_labels, mean_images, seed)
    mean_files = list(train_files[mean_idx])
    mkey = _files_key(mean_files, "mean", settings)
    stats = _cached_json(mkey, lambda: _scan(mean_files, image_size, resize, crop_fraction, threads,
                                             bad_files == "skip"))
    if stats["count"] == 0:
        raise _missing_root_error(rootp, kind)
    channel_mean = (np.asarray(stats["sum"]) / stats["count"]).astype(np.float32)

    if split == "train":
        files, labels = train_files, train_labels
    else:
        files, labels = select("test")
        if len(files) == 0:
            raise AttraxError(f"image_folder: {rootp} ({kind}) has no test images"
                              + (" (ImageNet: put val/ beside train/)" if kind == "imagenet" else ""))
        if bad_files == "skip":
            files, labels, skipped = drop_bad(files, labels, "test")

    meta: dict[str, Any] = {
        "name": name or "image_folder",
        "split": split,
        "root": str(rootp),
        "layout": kind,
        "class_names": [listing.names.get(c, c) for c in keys],
        "class_keys": keys,
        "class_index": np.asarray([full_index[c] for c in keys], np.int32),
        "channel_mean": channel_mean,
        "channel_mean_images": int(stats["count"]),
        "index": np.arange(len(files)),
        "image_size": int(image_size),
        "resize": resize,
        "crop_fraction": float(crop_fraction),
        "normalization": {"applied": False, "where": "model (normalize='imagenet')",
                          "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "bad_files": bad_files,
        "skipped_files": skipped,
        "missing_files": listing.missing,
        "per_class": per_class,
        "seed": seed,
    }
    x = LazyImages(list(files), image_size, resize, crop_fraction, threads, max_memory_mb)
    return ImageFolderDataset(x, labels, meta)
