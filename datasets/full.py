"""The full MNIST, Fashion-MNIST and CIFAR-10 data sets, downloaded once (see `download.py`).

- `mnist` (LeCun, Bottou, Bengio, Haffner 1998): 60,000 / 10,000 digits, 28x28x1, IDX gz files.
- `fashion_mnist` (Xiao, Rasul, Vollgraf 2017): 60,000 / 10,000 articles, 28x28x1, IDX gz files.
- `cifar10` (Krizhevsky 2009): 50,000 / 10,000 images, 32x32x3, the "python version" tarball.

Files are parsed here with numpy only. The CIFAR pickles are read by an unpickler that admits
only the numpy array constructors (besides the SHA-256 check of the tarball), so a tampered file
cannot run code. Every loader returns float32 NHWC in [0, 1], int32 labels, and `meta` with
`class_names`, `channel_mean` (per channel, of the TRAIN split) and `split`.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import posixpath
import tarfile

import numpy as np

from attrax.datasets import DATASETS, Dataset
from attrax.datasets.download import fetch
from attrax.errors import AttraxError

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse a (gzipped) IDX file: magic 0x0000<type><ndim>, big-endian int32 dims, then data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise AttraxError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    arr = np.frombuffer(data, _IDX_DTYPES[data[2]], offset=header)
    if arr.size != int(np.prod(dims)):
        raise AttraxError(f"{path}: IDX header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


def _to_float(x_uint8: np.ndarray) -> np.ndarray:
    out = x_uint8.astype(np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def _channel_mean(x_uint8: np.ndarray) -> np.ndarray:
    """Per-channel mean in [0, 1] of NHWC uint8 images (accumulated in float64)."""
    return (x_uint8.mean(axis=(0, 1, 2), dtype=np.float64) / 255.0).astype(np.float32)


def _idx_dataset(name: str, class_names, source: str, split: str, root, download: bool) -> Dataset:
    paths = fetch(name, root=root, download=download)

    def images(prefix: str) -> np.ndarray:
        x = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
        return x.reshape(x.shape[0], x.shape[1], x.shape[2], 1)

    prefix = "train" if split == "train" else "t10k"
    x = images(prefix)
    y = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"]).astype(np.int32)
    if y.shape != (x.shape[0],):
        raise AttraxError(f"{name}: {x.shape[0]} images but {y.shape} labels")
    x_train = x if split == "train" else images("train")
    meta = {
        "name": name,
        "split": split,
        "class_names": class_names,
        "channel_mean": _channel_mean(x_train),
        "index": np.arange(x.shape[0]),
        "source": source,
    }
    return Dataset(_to_float(x), y, meta)


@DATASETS.register("mnist", source="download", embedded=False)
def mnist(*, split: str = "test", root: str | None = None, download: bool = True) -> Dataset:
    """MNIST (LeCun et al. 1998): 60,000 train / 10,000 test digits, 28x28x1.

    `root`: cache folder (default `$ATTRAX_DATA` or ~/.cache/attrax/data); `download`: fetch the
    files when they are not cached (default True).
    """
    return _idx_dataset("mnist", MNIST_CLASSES, "MNIST, LeCun et al. 1998", split, root, download)


@DATASETS.register("fashion_mnist", source="download", embedded=False)
def fashion_mnist(
    *, split: str = "test", root: str | None = None, download: bool = True
) -> Dataset:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60,000 / 10,000 articles, 28x28x1.

    `root`: cache folder (default `$ATTRAX_DATA` or ~/.cache/attrax/data); `download`: fetch the
    files when they are not cached (default True).
    """
    return _idx_dataset(
        "fashion_mnist", FASHION_CLASSES, "Fashion-MNIST, Xiao et al. 2017", split, root, download
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch needs: numpy array and dtype reconstruction."""

    def find_class(self, module: str, name: str):
        core = getattr(np, "_core", None) or np.core
        allowed = {
            ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
            ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}: not allowed")
        return allowed[(module, name)]


def _cifar_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError, TypeError) as e:
        raise AttraxError(f"{name} is not a valid CIFAR-10 batch: {e}") from e
    if "data" not in d or "labels" not in d:
        raise AttraxError(f"{name} is not a valid CIFAR-10 batch: no data/labels")
    data = np.asarray(d["data"], np.uint8)
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R(1024) G(1024) B(1024)
    y = np.asarray(d["labels"], np.int32)
    return x, y


def read_cifar10(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (x, y), "test": (x, y)} from cifar-10-python.tar.gz, x uint8 NHWC."""
    wanted = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch"}
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            base = posixpath.basename(member.name)
            if member.isfile() and base in wanted:
                batches[base] = _cifar_batch(tar.extractfile(member).read(), member.name)
    if set(batches) != wanted:
        raise AttraxError(f"{path}: missing CIFAR-10 batches {sorted(wanted - set(batches))}")
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    return {
        "train": (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])),
        "test": batches["test_batch"],
    }


@DATASETS.register("cifar10", source="download", embedded=False)
def cifar10(*, split: str = "test", root: str | None = None, download: bool = True) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009): 50,000 train / 10,000 test images, 32x32x3.

    `root`: cache folder (default `$ATTRAX_DATA` or ~/.cache/attrax/data); `download`: fetch the
    tarball when it is not cached (default True).
    """
    paths = fetch("cifar10", root=root, download=download)
    parts = read_cifar10(paths["cifar-10-python.tar.gz"])
    x, y = parts[split]
    meta = {
        "name": "cifar10",
        "split": split,
        "class_names": CIFAR10_CLASSES,
        "channel_mean": _channel_mean(parts["train"][0]),
        "index": np.arange(x.shape[0]),
        "source": "CIFAR-10, Krizhevsky 2009",
    }
    return Dataset(_to_float(x), y, meta)
