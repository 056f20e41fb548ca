"""ROAR and KAR: remove (or keep) the most relevant inputs and retrain (Hooker et al. 2019).

"A Benchmark for Interpretability Methods in Deep Neural Networks", Hooker, Erhan, Kindermans,
Kim, NeurIPS 2019. These protocols retrain models, so they are not per-batch metrics: they are
registered (`roar`, `kar`, `roar_kar`) with `kind="retrain"` and declare what the run supplies
(`needs`); the function is `run(method, model, train_set, test_set, ...) -> DataFrame` (tidy rows in the
`attrax.results` schema; metric `test_accuracy`, x = fraction of inputs replaced), with the
shortcuts `roar(...)` and `kar(...)`.

Recipe (every choice is a parameter with the default in brackets):

1. Train the base model (cached) and compute relevance for every TRAIN and TEST image with
   `attrax.explain`, target = the base model's predicted class, score = logit [method default].
2. Rank per image by magnitude |R| (abs and square give the same order): `rank="value"` ranks
   all H*W*C values without channel aggregation, as in the paper ["value"]; `rank="pixel"` ranks
   pixels by sum_c |R| and replaces whole pixels. Ties are broken by an explicit rule:
   `tie="random"` - a seeded uniform key per value (example i uses `fold_in(key, i)`), or
   `tie="index"` - the lower row-major flat index first ["random"].
3. x = the fraction t of units REPLACED, for both protocols (the paper's axis): ROAR replaces
   the round(t*D) most relevant units; KAR keeps the round((1-t)*D) most relevant and replaces
   the rest, so KAR(t) and ROAR(1-t) replace complementary sets. The replacement is the
   per-channel mean of the TRAIN split (`train_set.meta["channel_mean"]`).
   `method="random"` is the control of PROTOCOLS.md: every unit is replaced independently with
   probability t (no map, so its ROAR and KAR curves coincide and are trained once).
4. Retrain from scratch (one model per fraction and seed in `seeds`; all missing ones go through
   `attrax.train.train_many` together; `mode="auto"`: worker threads on CPU, vmap on GPU/TPU)
   on the modified train set; report accuracy on the modified test set.

Caching (under $ATTRAX_CACHE, atomic writes): relevance maps keyed by (base model, data, method,
hyperparameters, key) and per-image rank positions keyed by (maps, rank, tie, key), both per
chunk of `shard_images` images; every modified data set (ROAR or KAR at one fraction, the random
control at one fraction) is written ONCE as shards of `shard_images` images under
`roar/data/<hash>/`, the hash covering the train and test data, the map's settings, fraction,
replacement value, rank, mask_only and key, and read back shard by shard: a retrain's train set
up to `train_in_memory_mb` is loaded and trained in memory (variants pooled up to that size,
all their retrains in one `train_many` call), a bigger one streams
from its memory-mapped shards (`attrax.train.fit_stream`: only a few batches in host memory, the
same models), and evaluation streams the test shards. Retrained models are cached by the data
set's hash, config and seed. A sweep over methods, fractions or seeds, also as separate jobs (one
per (method, fraction, seed)), never recomputes a model, a map, a ranking or a modified data set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attrax._arrays import to_device
from attrax.errors import AttraxError
from attrax.harness import explain, forward
from attrax.methods import per_example_keys
from attrax.models import as_model, init
from attrax.protocols import PROTOCOLS
from attrax.results import conform, hparams_json
from attrax.train import (
    StreamSource,
    TrainConfig,
    atomic_write_bytes,
    cache_dir,
    cache_key,
    load_cached,
    open_npy,
    save_cached,
    streams_from_files,
    train,
    train_many,
)

Array = jax.Array
FRACTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
PROTOCOL_NAMES = ("roar", "kar")
RANKS = ("value", "pixel")
TIES = ("random", "index")
RANDOM_CONTROL = "random"
VERSION = 1


# ---------------------------------------------------------------------------------------------
# Ranking and replacement (pure array functions)


def magnitude(relevance: Array, rank: str = "value") -> Array:
    """(n, D) per-unit magnitudes: |R| per value (D = H*W*C) or sum_c |R| per pixel (D = H*W)."""
    r = jnp.abs(to_device(relevance))
    n = r.shape[0]
    if rank == "value":
        return r.reshape(n, -1)
    if rank == "pixel":
        return r.reshape(n, -1, r.shape[-1]).sum(-1)
    raise AttraxError(f"unknown rank {rank!r}: use one of {', '.join(RANKS)}")


def rank_positions(relevance: Array, *, key: Array | int = 0, rank: str = "value",
                   tie: str = "random") -> Array:
    """(n, D) int32: each unit's position in its image's order, 0 = most relevant.

    Ties in |R| are broken by `tie` ("random": seeded uniform keys, example i from
    `fold_in(key, i)`; "index": lower flat index first). One compiled call per shape (op by op,
    a shard of another size compiled each of its dozen ops again).
    """
    if isinstance(key, int):
        key = jax.random.key(key)
    return _rank_positions(to_device(relevance), key, rank=rank, tie=tie)


@functools.partial(jax.jit, static_argnames=("rank", "tie"))
def _rank_positions(relevance: Array, key: Array, *, rank: str, tie: str) -> Array:
    mag = magnitude(relevance, rank)
    n, d = mag.shape
    if tie == "random":
        keys = per_example_keys(key, n)
        tiebreak = jax.vmap(lambda k: jax.random.uniform(k, (d,)))(keys)
    elif tie == "index":
        tiebreak = jnp.broadcast_to(jnp.arange(d, dtype=jnp.float32), (n, d))
    else:  # raised while tracing (rank and tie are static): the one-line error, as before
        raise AttraxError(f"unknown tie rule {tie!r}: use one of {', '.join(TIES)}")
    order = jnp.lexsort((tiebreak, -mag), axis=-1)  # primary key last: descending magnitude
    ranks = jnp.broadcast_to(jnp.arange(d, dtype=order.dtype), (n, d))
    pos = jnp.zeros_like(order).at[jnp.arange(n)[:, None], order].set(ranks)
    return pos.astype(jnp.int32)


def n_units(fraction: float, d: int) -> int:
    """round(fraction * d), the number of units a fraction stands for."""
    if not 0.0 <= fraction <= 1.0:
        raise AttraxError(f"fractions must lie in [0, 1], got {fraction}")
    return int(np.rint(fraction * d))


def replace_mask(positions: Array, fraction: float, protocol: str = "roar") -> Array:
    """(n, D) bool, True = replaced: ROAR the top round(t*D), KAR all but the top round((1-t)*D)."""
    d = positions.shape[-1]
    if protocol == "roar":
        return positions < n_units(fraction, d)
    if protocol == "kar":
        return positions >= n_units(1.0 - fraction, d)
    raise AttraxError(f"unknown protocol {protocol!r}: use roar or kar")


def random_mask(key: Array | int, shape: tuple[int, int], fraction: float) -> Array:
    """The random control: every unit replaced independently with probability `fraction`."""
    keys = per_example_keys(key, shape[0])
    return _uniform_units(keys, tuple(shape[1:])) < fraction


@functools.partial(jax.jit, static_argnums=1)
def _uniform_units(keys: Array, shape: tuple[int, ...]) -> Array:
    return jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)


def apply_mask(x: Array, mask: Array, fill: Any, rank: str = "value") -> Array:
    """Replace the masked units of `x` (NHWC) by `fill` (per-channel values, broadcast). NumPy in,
    NumPy out (the modified data sets are built on the host, for disk); otherwise a jax array."""
    xp = np if isinstance(x, np.ndarray) and isinstance(mask, np.ndarray) else jnp
    x = xp.asarray(x)
    n, h, w, c = x.shape
    m = mask.reshape(n, h, w, c) if rank == "value" else mask.reshape(n, h, w, 1)
    return xp.where(m, xp.asarray(fill, x.dtype).reshape(1, 1, 1, -1), x)


def channel_mean(train_set) -> np.ndarray:
    m = train_set.meta.get("channel_mean")
    return np.asarray(m if m is not None else train_set.x.mean(axis=(0, 1, 2)), np.float32)


def signal_removed(x: Array, relevance: Array, fraction: float, *, protocol: str = "roar",
                   threshold: float = 0.1, key: Array | int = 0, rank: str = "value",
                   tie: str = "random") -> dict[str, float]:
    """Where a ranking's replaced units fall, for images with a known foreground (MNIST strokes:
    values above `threshold`): `signal_removed` = share of foreground units replaced,
    `removed_on_signal` = share of replaced units that are foreground. A diagnostic of ROAR
    outcomes: a ranking that replaces little foreground, or whose replaced set outlines it, can
    leave the class readable after retraining."""
    pos = rank_positions(relevance, key=key, rank=rank, tie=tie)
    mask = np.asarray(replace_mask(pos, fraction, protocol))
    xa = np.asarray(x)
    sig = (xa.reshape(len(xa), -1) if rank == "value" else xa.max(-1).reshape(len(xa), -1)) > threshold
    both = (mask & sig).sum()
    return {"signal_removed": float(both / max(sig.sum(), 1)), "removed_on_signal": float(both / max(mask.sum(), 1))}


# ---------------------------------------------------------------------------------------------
# Disk cache of maps and rankings


def _compact(positions: Array) -> np.ndarray:
    p = np.asarray(positions)
    return p.astype(np.uint16) if p.shape[-1] <= np.iinfo(np.uint16).max else p


def _array_dir():
    return cache_dir().parent / "roar"


def _digest(desc: Any) -> str:
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cached_array(desc: Any, build, cache: bool) -> tuple[np.ndarray, bool]:
    """(array, was_cached): load `desc`'s .npy or build and write it atomically."""
    if not cache:
        return np.asarray(build()), False
    path = _array_dir() / f"{_digest(desc)}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False), True
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    arr = np.asarray(build())
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return arr, False


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)] or [(0, 0)]


class ShardedData:
    """Modified data sets on disk: `<root>/<digest>/{train,test}-<k>.npy` shards and `done.json`,
    written last (shard list, shapes), so a folder without it is unfinished and rebuilt. Every
    file is written atomically; a damaged shard of a finished set is a one-line error naming it."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def complete(self, dig: str) -> bool:
        try:
            return json.loads((self.root / dig / "done.json").read_text()).get("status") == "complete"
        except (OSError, ValueError):
            return False

    def write(self, dig: str, builders: dict[str, list[Callable[[], np.ndarray]]], info: dict) -> None:
        """Build and write every shard (`builders`: split -> one function per shard), then done.json."""
        folder = self.root / dig
        shards = {}
        for split, fns in builders.items():
            shards[split] = []
            for k, fn in enumerate(fns):
                buf = io.BytesIO()
                np.save(buf, np.asarray(fn()), allow_pickle=False)
                name = f"{split}-{k:05d}.npy"
                atomic_write_bytes(folder / name, buf.getvalue())
                shards[split].append(name)
        atomic_write_bytes(folder / "done.json", json.dumps({"status": "complete", "shards": shards,
                                                             **info}).encode())

    def _names(self, dig: str, split: str) -> list[str]:
        return json.loads((self.root / dig / "done.json").read_text())["shards"][split]

    def paths(self, dig: str, split: str) -> list[Path]:
        return [self.root / dig / name for name in self._names(dig, split)]

    def _hint(self, dig: str) -> dict:
        """How a damaged shard of set `dig` is named in its one-line error (`open_npy`)."""
        return {"what": "ROAR/KAR data cache shard", "hint": f": delete {self.root / dig} to rebuild it"}

    def iter_split(self, dig: str, split: str) -> Iterator[np.ndarray]:
        for path in self.paths(dig, split):
            yield np.asarray(open_npy(path, mmap=False, **self._hint(dig)))

    def source(self, dig: str, split: str, y: np.ndarray) -> StreamSource:
        """The split's shards memory-mapped (rows read from disk when a batch needs them)."""
        return StreamSource.from_files(self.paths(dig, split), y, **self._hint(dig))

    def read(self, dig: str, split: str) -> np.ndarray:
        parts = list(self.iter_split(dig, split))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# The protocol


def _check(protocols, fractions, rank, tie):
    bad = set(protocols) - set(PROTOCOL_NAMES)
    if bad or not protocols:
        raise AttraxError(f"unknown protocol(s) {sorted(bad)}: use roar and/or kar")
    if rank not in RANKS:
        raise AttraxError(f"unknown rank {rank!r}: use one of {', '.join(RANKS)}")
    if tie not in TIES:
        raise AttraxError(f"unknown tie rule {tie!r}: use one of {', '.join(TIES)}")
    for f in fractions:
        n_units(float(f), 1)


def run(
    method: str,
    model: Any,
    train_set,
    test_set,
    *,
    protocols: Sequence[str] = PROTOCOL_NAMES,
    fractions: Sequence[float] = FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
    rank: str = "value",
    tie: str = "random",
    key: int = 0,
    method_hparams: dict[str, Any] | None = None,
    model_seed: int = 0,
    train_config: TrainConfig | dict | None = None,
    retrain_config: TrainConfig | dict | None = None,
    mode: str = "auto",
    cache: bool = True,
    progress: bool = False,
    mask_only: bool = False,
    shard_images: int = 4096,
    train_in_memory_mb: float = 2048,
) -> pd.DataFrame:
    """ROAR and/or KAR test accuracy of retrained models vs the fraction replaced.

    `model`: a zoo name or a Flax-module Model, trained on `train_set` with `train_config`
    (default TrainConfig()) and `model_seed`; retrains use `retrain_config` (default: the same)
    and `seeds`. Returns tidy rows (protocol roar|kar, metric test_accuracy, x = fraction, seed =
    retrain seed); `df.attrs["timings"]` holds seconds for maps, training and evaluation and the
    numbers of models trained and loaded from the cache.

    `mask_only=True` is the leak control: the retrained models see only WHERE values were
    replaced (images of the 0/1 replacement mask, no pixel values), protocols `roar_mask` /
    `kar_mask`. Accuracy well above chance means the replaced set itself reveals the class, so
    ROAR/KAR accuracy measures the mask as much as the information removed.

    `shard_images`: images per chunk of maps and per shard of a modified data set on disk (see
    the module docstring, "Caching"); `df.attrs["timings"]` counts `n_data_written` /
    `n_data_reused` modified data sets.

    `train_in_memory_mb`: a retrain's train set (modified or not) of at most this many MiB is
    loaded and trained in memory (`train_many`, the fastest path); a bigger one, or any with 0,
    streams from its shards on disk (`train_many` over memory-mapped `StreamSource`s:
    `attrax.train.fit_stream`, the same models to float rounding; an unmodified image_folder
    split streams from its files). `df.attrs["timings"]["n_streamed"]` counts streamed data sets.
    """
    protocols = tuple(protocols)
    fractions = tuple(float(f) for f in fractions)
    _check(protocols, fractions, rank, tie)
    hp = dict(method_hparams or {})
    as_cfg = lambda c: TrainConfig(**c) if isinstance(c, dict) else c  # noqa: E731
    base_cfg = as_cfg(train_config) or TrainConfig()
    re_cfg = as_cfg(retrain_config) or base_cfg
    model = as_model(model)
    timings = {"maps_s": 0.0, "rank_s": 0.0, "data_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    if not isinstance(shard_images, int) or shard_images < 1:
        raise AttraxError(f"shard_images must be a positive integer, got {shard_images!r}")
    if isinstance(train_in_memory_mb, bool) or not isinstance(train_in_memory_mb, int | float) \
            or not train_in_memory_mb >= 0:
        raise AttraxError(f"train_in_memory_mb must be a number >= 0 (0: always stream), got {train_in_memory_mb!r}")

    model, variables, _ = train(model, train_set, seed=model_seed, cfg=base_cfg, cache=cache,
                                progress=progress)
    base_key = cache_key(model, train_set.fingerprint(), base_cfg, model_seed)
    fill = channel_mean(train_set)
    splits = {"train": train_set, "test": test_set}

    # 1-2. maps and rank positions of every train and test image, per chunk of `shard_images` (cached)
    chunks = {split: _ranges(len(ds), shard_images) for split, ds in splits.items()}
    map_desc = {"v": VERSION, "model": base_key, "method": method, "hparams": hparams_json(hp), "key": key,
                "target": "predicted", "rank": rank, "tie": tie}

    def positions(split: str, start: int, stop: int) -> np.ndarray:
        """Rank positions of images start..stop of a split (maps and positions cached per chunk)."""
        ds, i = splits[split], list(splits).index(split)
        desc = {**map_desc, "data": ds.fingerprint(), "split": i, "range": [start, stop]}

        def build_map():
            x = to_device(ds.x[start:stop])
            target = jnp.argmax(forward(model, variables, x), -1).astype(jnp.int32)
            k = jax.random.fold_in(jax.random.key(key), i)
            return explain(method, model, variables, x, target, key=per_example_keys(k, stop - start, start), **hp)

        t1 = time.perf_counter()
        maps, _ = _cached_array(desc, build_map, cache)
        timings["maps_s"] += time.perf_counter() - t1
        t1 = time.perf_counter()
        k_tie = per_example_keys(jax.random.fold_in(jax.random.key(key + 1), i), stop - start, start)
        pos, _ = _cached_array({"maps": desc, "tie_key": key},
                               lambda: _compact(rank_positions(maps, key=k_tie, rank=rank, tie=tie)), cache)
        timings["rank_s"] += time.perf_counter() - t1
        return pos

    # 3. modified data sets, one per distinct replacement rule, written once as shards on disk
    #    (cached by a content hash of everything that determines them) and read back when used
    def modified(split: str, protocol: str, f: float, start: int, stop: int) -> np.ndarray:
        ds = splits[split]
        x = np.asarray(ds.x[start:stop])
        d = x.shape[1] * x.shape[2] * (x.shape[3] if rank == "value" else 1)
        if method == RANDOM_CONTROL:
            k = jax.random.fold_in(jax.random.fold_in(jax.random.key(key), 1 + (split == "test")),
                                   int(round(f * 1e6)))
            mask = np.asarray(random_mask(per_example_keys(k, stop - start, start), (stop - start, d), f))
        else:
            mask = replace_mask(np.asarray(positions(split, start, stop)), f, protocol)
        if mask_only:
            return np.asarray(apply_mask(np.zeros_like(x), mask, np.ones_like(fill), rank))
        return np.asarray(apply_mask(x, mask, fill, rank))

    tmp = None if cache else tempfile.TemporaryDirectory(prefix="attrax-roar-")
    store = ShardedData(_array_dir() / "data" if cache else Path(tmp.name))
    data_desc = {"v": VERSION, "train": train_set.fingerprint(), "test": test_set.fingerprint(),
                 "labels": hashlib.sha256(np.ascontiguousarray(train_set.y).tobytes()).hexdigest()[:16],
                 "map": None if method == RANDOM_CONTROL else map_desc, "fill": fill.tolist(),
                 "rank": rank, "mask_only": mask_only, "key": key, "shard_images": shard_images}
    variants: dict[tuple, str | None] = {}  # variant -> its data digest (None: the original images)
    point_variant: dict[tuple[str, float], tuple] = {}
    n_written = n_reused = 0
    t0 = time.perf_counter()
    for p in protocols:
        for f in fractions:
            if f == 0.0:
                vid = ("none",)
            else:
                vid = (RANDOM_CONTROL, f) if method == RANDOM_CONTROL else (p, f)
            point_variant[(p, f)] = vid
            if vid in variants:
                continue
            if vid == ("none",) and not mask_only:
                variants[vid] = None
                continue
            dig = _digest({**data_desc, "variant": list(vid)})
            variants[vid] = dig
            if store.complete(dig):
                n_reused += 1
            else:
                store.write(dig, {sp: [(lambda sp=sp, a=a, b=b, p=p, f=f: modified(sp, p, f, a, b))
                                       for a, b in chunks[sp]] for sp in splits}, {"variant": list(vid)})
                n_written += 1
    timings["data_s"] = time.perf_counter() - t0 - timings["maps_s"] - timings["rank_s"]

    y_train = np.asarray(train_set.y)

    def train_data(vid: tuple) -> tuple[StreamSource, Callable[[], np.ndarray] | None]:
        """The variant's train set as a StreamSource and the loader of its array: None where it
        streams (over `train_in_memory_mb`, or an unmodified split that streams from its files)."""
        dig = variants[vid]
        src = StreamSource([train_set.x], y_train) if dig is None else store.source(dig, "train", y_train)
        if src.nbytes / 2**20 > train_in_memory_mb or (dig is None and streams_from_files(train_set)):
            return src, None
        return src, (lambda: np.asarray(train_set.x)) if dig is None else (lambda: store.read(dig, "train"))

    # 4. retrain every (variant, seed) missing from the cache: the in-memory variants pooled up to
    #    `train_in_memory_mb`, a bigger one streamed from its shards
    t0 = time.perf_counter()
    template = init(model, jax.random.key(0), to_device(train_set.x[:1]))
    trained: dict[tuple, Any] = {}
    jobs: dict[tuple, list[tuple[int, str]]] = {}
    for vid, dig in variants.items():
        fp = train_set.fingerprint() if dig is None else f"roar-data:{dig}"
        for s in seeds:
            ck = cache_key(model, fp, re_cfg, int(s), extra="retrain")
            hit = load_cached(ck, template) if cache else None
            if hit is not None:
                trained[(vid, s)] = hit[0]
            else:
                jobs.setdefault(vid, []).append((int(s), ck))
    n_cached = len(trained)
    n_streamed = 0

    def retrain(todo: list[tuple[tuple, int, str]], xs, ys) -> None:
        """train_many over (variant, seed, cache key) jobs; xs: one data set, or one per job."""
        out, _ = train_many(model, xs, ys, [s for _, s, _ in todo], cfg=re_cfg, mode=mode, progress=progress)
        for (vid, s, ck), v in zip(todo, out, strict=True):
            trained[(vid, s)] = v
            if cache:
                save_cached(ck, v, {"model": model.name, "seed": s, "purpose": "roar/kar retrain",
                                    "train_config": dataclasses.asdict(re_cfg)})

    # in-memory variants are pooled (up to `train_in_memory_mb` of distinct data sets at a time)
    # so that one train_many call keeps every worker busy: per variant, 3 seeds on 2 cores left
    # one core idle a quarter of the time (attrax-bench --roar-only, 258 retrains of cnn_a:
    # 3,082 -> 3,548 training images/s, 167 -> 145 s, 2026-12-03)
    pool: list[tuple[tuple, int, str]] = []
    pool_x: list[np.ndarray] = []
    pool_mb = 0.0
    xs = None
    for vid, todo in jobs.items():
        src, load = train_data(vid)
        if load is None:
            n_streamed += 1
            retrain([(vid, s, ck) for s, ck in todo], src, None)
            continue
        mb = src.nbytes / 2**20
        if pool and pool_mb + mb > train_in_memory_mb:  # train the pool before loading the next set
            retrain(pool, pool_x, y_train)
            pool, pool_x, pool_mb = [], [], 0.0
        xs = load()
        pool += [(vid, s, ck) for s, ck in todo]
        pool_x += [xs] * len(todo)  # the same array object per seed: train_many stores it once
        pool_mb += mb
    if pool:
        retrain(pool, pool_x, y_train)
    del pool_x, xs  # the host copies, before evaluation
    jax.block_until_ready(list(trained.values()))
    timings["train_s"] = time.perf_counter() - t0

    # 5. test accuracy on the modified test sets (shard by shard)
    t0 = time.perf_counter()
    acc: dict[tuple, float] = {}
    y_test = np.asarray(test_set.y)
    for vid, dig in variants.items():
        parts = ((np.asarray(test_set.x[a:b]) for a, b in chunks["test"]) if dig is None
                 else store.iter_split(dig, "test"))
        right = {s: 0 for s in seeds if (vid, s) in trained}
        at = 0
        for xt in parts:
            yt = y_test[at:at + len(xt)]
            for s in right:
                pred = np.asarray(jnp.argmax(forward(model, trained[(vid, s)], to_device(xt)), -1))
                right[s] += int((pred == yt).sum())
            at += len(xt)
        for s, r in right.items():
            acc[(vid, s)] = r / max(len(y_test), 1)
    timings["eval_s"] = time.perf_counter() - t0
    if tmp is not None:
        tmp.cleanup()

    rows = [
        {"protocol": p + ("_mask" if mask_only else ""), "x": f, "seed": int(s),
         "value": acc[(point_variant[(p, f)], s)]}
        for p in protocols for f in fractions for s in seeds
    ]
    df = pd.DataFrame(rows)
    df["metric"] = "test_accuracy"
    df["example"] = -1
    df["dataset"] = str(train_set.meta.get("name", ""))
    df["model"] = model.name
    df["model_seed"] = model_seed
    df["method"] = method
    df["method_hparams"] = hparams_json(hp)
    choices = dict(rank=rank, tie=tie, key=key, mask_only=mask_only,
                   replacement="0/1 mask images" if mask_only else "train channel mean",
                   target="predicted", fractions=list(fractions), seeds=list(seeds),
                   retrain_config=dataclasses.asdict(re_cfg), train_in_memory_mb=train_in_memory_mb)
    from attrax.results import with_metadata

    df = conform(with_metadata(df, "roar_kar", choices))
    df.attrs["timings"] = dict(timings, n_trained=sum(len(j) for j in jobs.values()), n_cached=n_cached,
                               n_data_written=n_written, n_data_reused=n_reused, n_streamed=n_streamed)
    df.attrs["choices"] = choices
    return df


RETRAIN_NEEDS = ("method", "method_hparams", "train_set", "test_set", "train_config", "model_seed", "progress")
_REG = dict(kind="retrain", category="retraining", version=VERSION, needs=RETRAIN_NEEDS,
            aggregation="mean_over_seeds", x_label="fraction replaced")
PROTOCOLS.register("roar_kar", run, higher_is_better={
    "roar/test_accuracy": False, "kar/test_accuracy": True, "roar_mask/test_accuracy": False,
    "kar_mask/test_accuracy": False}, **_REG)


def roar(method: str, model: Any, train_set, test_set, *, fractions: Sequence[float] = FRACTIONS,
         seeds: Sequence[int] = (0, 1, 2), rank: str = "value", tie: str = "random", key: int = 0,
         method_hparams: dict[str, Any] | None = None, model_seed: int = 0,
         train_config: TrainConfig | dict | None = None,
         retrain_config: TrainConfig | dict | None = None, mode: str = "auto", cache: bool = True,
         progress: bool = False, mask_only: bool = False, shard_images: int = 4096,
         train_in_memory_mb: float = 2048) -> pd.DataFrame:
    """ROAR only (Hooker et al. 2019): replace the most relevant fraction, retrain; see `run`."""
    return run(method, model, train_set, test_set, protocols=("roar",), fractions=fractions,
               seeds=seeds, rank=rank, tie=tie, key=key, method_hparams=method_hparams,
               model_seed=model_seed, train_config=train_config, retrain_config=retrain_config,
               mode=mode, cache=cache, progress=progress, mask_only=mask_only, shard_images=shard_images,
               train_in_memory_mb=train_in_memory_mb)


PROTOCOLS.register("roar", roar, higher_is_better={"test_accuracy": False, "roar_mask/test_accuracy": False},
                   **_REG)


def kar(method: str, model: Any, train_set, test_set, *, fractions: Sequence[float] = FRACTIONS,
        seeds: Sequence[int] = (0, 1, 2), rank: str = "value", tie: str = "random", key: int = 0,
        method_hparams: dict[str, Any] | None = None, model_seed: int = 0,
        train_config: TrainConfig | dict | None = None,
        retrain_config: TrainConfig | dict | None = None, mode: str = "auto", cache: bool = True,
        progress: bool = False, mask_only: bool = False, shard_images: int = 4096,
        train_in_memory_mb: float = 2048) -> pd.DataFrame:
    """KAR only (Hooker et al. 2019): keep the most relevant 1-t, replace the rest; see `run`."""
    return run(method, model, train_set, test_set, protocols=("kar",), fractions=fractions,
               seeds=seeds, rank=rank, tie=tie, key=key, method_hparams=method_hparams,
               model_seed=model_seed, train_config=train_config, retrain_config=retrain_config,
               mode=mode, cache=cache, progress=progress, mask_only=mask_only, shard_images=shard_images,
               train_in_memory_mb=train_in_memory_mb)


PROTOCOLS.register("kar", kar, higher_is_better={"test_accuracy": True, "kar_mask/test_accuracy": False},
                   **_REG)
