"""Download-once file cache for the full data sets, with SHA-256 verification.

Files live in `$ATTRAX_DATA/<dataset>/<file>` (default: `$XDG_CACHE_HOME/attrax/data`, i.e.
`~/.cache/attrax/data`). A file is used only after its SHA-256 matches the table `REMOTES`; a
download is written to a temporary file in the same folder and renamed into place only when its
checksum is right, so an interrupted or corrupt transfer never leaves a usable-looking file. A
cached file whose checksum does not match is renamed aside (`<file>.corrupt`) and fetched again
once. Offline and not cached: one `AttraxError` line naming the files, their URLs, the folder to
put them in and the command that fetches them.

Set `ATTRAX_MIRROR=<base url>` to fetch `<base url>/<dataset>/<file>` instead of the official
addresses (a local mirror, or the loopback server of the tests).

Command line: `python -m attrax.datasets.download mnist fashion_mnist cifar10` (or `all`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import types
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from attrax.errors import AttraxError, unknown_name

# `python -m attrax.datasets.download` runs this module a second time as __main__ after the
# package import has already imported it (the package imports all its submodules); runpy warns
# about that. The double import is harmless here (no state), so only that one warning is muted.
warnings.filterwarnings(
    "ignore", message=r"'attrax\.datasets\.download' found in sys\.modules", category=RuntimeWarning
)

CHUNK = 1 << 20
TIMEOUT_S = 60.0
COMMAND = "python -m attrax.datasets.download"


@dataclasses.dataclass(frozen=True)
class Remote:
    """One file of a data set: its name, SHA-256, size in bytes and the URLs to try in order."""

    filename: str
    sha256: str
    size: int | None
    urls: tuple[str, ...]


def _remotes(base_urls: Sequence[str], files: Sequence[tuple[str, int, str]]) -> tuple[Remote, ...]:
    return tuple(
        Remote(name, sha, size, tuple(f"{b.rstrip('/')}/{name}" for b in base_urls))
        for name, size, sha in files
    )


# SHA-256 and sizes as published in tensorflow/datasets `url_checksums` (mnist.txt,
# fashion_mnist.txt, cifar10.csv) and confirmed by independent copies (e.g. Keras' cifar10 loader
# uses the same file_hash for cifar-10-python.tar.gz; its MD5 c58f30108f718f92721af3b95e74349a is
# the one on the CIFAR page). yann.lecun.com often refuses downloads, so the Google mirror that
# TensorFlow uses comes first for MNIST; the bytes are identical (same checksums).
REMOTES: Mapping[str, tuple[Remote, ...]] = types.MappingProxyType({
    "mnist": _remotes(
        ("https://storage.googleapis.com/cvdf-datasets/mnist", "http://yann.lecun.com/exdb/mnist"),
        (
            ("train-images-idx3-ubyte.gz", 9912422,
             "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            ("train-labels-idx1-ubyte.gz", 28881,
             "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            ("t10k-images-idx3-ubyte.gz", 1648877,
             "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            ("t10k-labels-idx1-ubyte.gz", 4542,
             "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        ),
    ),
    "fashion_mnist": _remotes(
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
        ),
        (
            ("train-images-idx3-ubyte.gz", 26421880,
             "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            ("train-labels-idx1-ubyte.gz", 29515,
             "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            ("t10k-images-idx3-ubyte.gz", 4422102,
             "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            ("t10k-labels-idx1-ubyte.gz", 5148,
             "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        ),
    ),
    "cifar10": _remotes(
        ("https://www.cs.toronto.edu/~kriz",),
        (
            ("cifar-10-python.tar.gz", 170498071,
             "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
        ),
    ),
})


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: `root` if given, else `$ATTRAX_DATA`, else `<user cache>/attrax/data`."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("ATTRAX_DATA"):
        return Path(os.environ["ATTRAX_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "attrax" / "data"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def urls(dataset: str, remote: Remote) -> tuple[str, ...]:
    """Where to fetch `remote`: `$ATTRAX_MIRROR/<dataset>/<file>` if set, else the official URLs."""
    mirror = os.environ.get("ATTRAX_MIRROR")
    if mirror:
        return (f"{mirror.rstrip('/')}/{dataset}/{remote.filename}",)
    return remote.urls


def _remotes_of(dataset: str) -> tuple[Remote, ...]:
    if dataset not in REMOTES:
        raise unknown_name("downloadable dataset", dataset, REMOTES)
    return REMOTES[dataset]


def _download(url: str, folder: Path, remote: Remote, progress: bool) -> Path:
    """Fetch `url` into a temp file in `folder`, check its SHA-256, rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{remote.filename}.", suffix=".part")
    h = hashlib.sha256()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "attrax"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or remote.size
            bar = _progress_bar(total, remote.filename, disable=not progress)
            try:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
        got = h.hexdigest()
        if got != remote.sha256:
            raise AttraxError(
                f"checksum mismatch for {remote.filename} downloaded from {url}: expected sha256 "
                f"{remote.sha256}, got {got}; the download was discarded"
            )
        os.replace(tmp, folder / remote.filename)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return folder / remote.filename


def _progress_bar(total: int | None, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=True if disable else None)  # None: only on a terminal


def _offline_error(
    dataset: str, folder: Path, missing: Sequence[Remote], reason: str
) -> AttraxError:
    files = ", ".join(f"{r.filename} ({' or '.join(urls(dataset, r))})" for r in missing)
    return AttraxError(
        f"data set {dataset!r} is not cached and could not be downloaded ({reason}): put {files} "
        f"into {folder} or run `{COMMAND} {dataset}`"
    )


def fetch(
    dataset: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
) -> dict[str, Path]:
    """Paths of the verified files of `dataset`, downloading the missing ones (once).

    A cached file with a wrong checksum is renamed to `<file>.corrupt` and fetched again; a
    download with a wrong checksum is discarded and raises `AttraxError`. With `download=False`
    (or when every URL fails) a missing file raises a one-line `AttraxError` that names the files,
    URLs, the folder and the fetch command.
    """
    remotes = _remotes_of(dataset)
    folder = data_dir(root) / dataset
    paths: dict[str, Path] = {}
    missing: list[Remote] = []
    for r in remotes:
        path = folder / r.filename
        if path.is_file():
            if sha256_file(path) == r.sha256:
                paths[r.filename] = path
                continue
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            again = "; fetching it again" if download else ""
            warnings.warn(
                f"{path} failed its SHA-256 check; moved to {aside.name}{again}", stacklevel=2
            )
        missing.append(r)
    if not missing:
        return paths
    if not download:
        raise _offline_error(dataset, folder, missing, "downloads are off")
    folder.mkdir(parents=True, exist_ok=True)
    for r in missing:
        errors = []
        for url in urls(dataset, r):
            try:
                paths[r.filename] = _download(url, folder, r, progress)
                break
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                errors.append(" ".join(f"{url}: {getattr(e, 'reason', None) or e}".split()))
        else:
            still = [m for m in missing if m.filename not in paths]
            raise _offline_error(dataset, folder, still, "; ".join(errors))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Download and verify the full data sets into the attrax cache."
    )
    parser.add_argument("datasets", nargs="+", help=f"any of {', '.join(REMOTES)}, or 'all'")
    parser.add_argument(
        "--root", default=None, help="cache folder (default: $ATTRAX_DATA or ~/.cache/attrax/data)"
    )
    args = parser.parse_args(argv)
    names = list(REMOTES) if args.datasets == ["all"] else args.datasets
    try:
        for name in names:
            for path in fetch(name, root=args.root).values():
                print(f"{name}: {path}")
    except AttraxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
