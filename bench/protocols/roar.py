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
hyperparameters, key); per-image rank positions keyed by (maps, rank, tie, key) - every modified
data set is a cheap deterministic function of them; retrained models by the content hash of
their modified train set, config and seed. A sweep over methods or fractions never recomputes a
model, a map or a ranking.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attrax.errors import AttraxError
from attrax.harness import explain, forward
from attrax.methods import per_example_keys
from attrax.models import as_model, init
from attrax.protocols import PROTOCOLS
from attrax.results import conform, hparams_json
from attrax.train import (
    TrainConfig,
    atomic_write_bytes,
    cache_dir,
    cache_key,
    load_cached,
    save_cached,
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
    r = jnp.abs(jnp.asarray(relevance))
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
    `fold_in(key, i)`; "index": lower flat index first).
    """
    mag = magnitude(relevance, rank)
    n, d = mag.shape
    if tie == "random":
        keys = per_example_keys(key, n)
        tiebreak = jax.vmap(lambda k: jax.random.uniform(k, (d,)))(keys)
    elif tie == "index":
        tiebreak = jnp.broadcast_to(jnp.arange(d, dtype=jnp.float32), (n, d))
    else:
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
    return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(keys) < fraction


def apply_mask(x: Array, mask: Array, fill: Any, rank: str = "value") -> Array:
    """Replace the masked units of `x` (NHWC) by `fill` (per-channel values, broadcast)."""
    x = jnp.asarray(x)
    n, h, w, c = x.shape
    m = mask.reshape(n, h, w, c) if rank == "value" else mask.reshape(n, h, w, 1)
    return jnp.where(m, jnp.asarray(fill, x.dtype).reshape(1, 1, 1, -1), x)


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
    """
    protocols = tuple(protocols)
    fractions = tuple(float(f) for f in fractions)
    _check(protocols, fractions, rank, tie)
    hp = dict(method_hparams or {})
    as_cfg = lambda c: TrainConfig(**c) if isinstance(c, dict) else c  # noqa: E731
    base_cfg = as_cfg(train_config) or TrainConfig()
    re_cfg = as_cfg(retrain_config) or base_cfg
    model = as_model(model)
    timings = {"maps_s": 0.0, "rank_s": 0.0, "train_s": 0.0, "eval_s": 0.0}

    model, variables, _ = train(model, train_set, seed=model_seed, cfg=base_cfg, cache=cache,
                                progress=progress)
    base_key = cache_key(model, train_set.fingerprint(), base_cfg, model_seed)
    fill = channel_mean(train_set)
    splits = {"train": train_set, "test": test_set}

    # 1-2. maps and rank positions of every train and test image (cached)
    t0 = time.perf_counter()
    positions: dict[str, np.ndarray] = {}
    if method != RANDOM_CONTROL:
        for i, (split, ds) in enumerate(splits.items()):
            desc = {"v": VERSION, "model": base_key, "data": ds.fingerprint(), "method": method,
                    "hparams": hparams_json(hp), "key": key, "split": i, "target": "predicted"}

            def build_map(ds=ds, i=i):
                logits = forward(model, variables, jnp.asarray(ds.x))
                target = jnp.argmax(logits, -1).astype(jnp.int32)
                k = jax.random.fold_in(jax.random.key(key), i)
                return explain(method, model, variables, ds.x, target, key=k, **hp)

            t1 = time.perf_counter()
            maps, _ = _cached_array(desc, build_map, cache)
            timings["maps_s"] += time.perf_counter() - t1
            pdesc = {"maps": desc, "rank": rank, "tie": tie, "tie_key": key}
            k_tie = jax.random.fold_in(jax.random.key(key + 1), i)
            def build_positions(m=maps, k=k_tie):
                return _compact(rank_positions(m, key=k, rank=rank, tie=tie))

            positions[split], _ = _cached_array(pdesc, build_positions, cache)
    timings["rank_s"] = time.perf_counter() - t0 - timings["maps_s"]

    # 3. modified data sets, one per distinct replacement rule
    def modified(split: str, protocol: str, f: float) -> np.ndarray:
        ds = splits[split]
        d = ds.x.shape[1] * ds.x.shape[2] * (ds.x.shape[3] if rank == "value" else 1)
        if method == RANDOM_CONTROL:
            k = jax.random.fold_in(jax.random.fold_in(jax.random.key(key), 1 + (split == "test")),
                                   int(round(f * 1e6)))
            mask = random_mask(k, (len(ds), d), f)
        else:
            mask = replace_mask(jnp.asarray(positions[split]), f, protocol)
        if mask_only:
            return np.asarray(apply_mask(np.zeros_like(ds.x), mask, np.ones_like(fill), rank))
        return np.asarray(apply_mask(ds.x, mask, fill, rank))

    variants: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    point_variant: dict[tuple[str, float], tuple] = {}
    for p in protocols:
        for f in fractions:
            if f == 0.0:
                vid = ("none",)
            else:
                vid = (RANDOM_CONTROL, f) if method == RANDOM_CONTROL else (p, f)
            if vid not in variants:
                if vid == ("none",) and not mask_only:
                    variants[vid] = (train_set.x, test_set.x)
                else:
                    variants[vid] = (modified("train", p, f), modified("test", p, f))
            point_variant[(p, f)] = vid

    # 4. retrain every (variant, seed) missing from the cache, all together
    t0 = time.perf_counter()
    template = init(model, jax.random.key(0), jnp.asarray(train_set.x[:1]))
    trained: dict[tuple, Any] = {}
    jobs = []
    for vid, (xtr, _) in variants.items():
        fp = train_set.replace(x=xtr).fingerprint()
        for s in seeds:
            ck = cache_key(model, fp, re_cfg, int(s), extra="retrain")
            hit = load_cached(ck, template) if cache else None
            if hit is not None:
                trained[(vid, s)] = hit[0]
            else:
                jobs.append((vid, int(s), ck))
    n_cached = len(trained)
    if jobs:
        out, _ = train_many(model, [variants[v][0] for v, _, _ in jobs], train_set.y,
                            [s for _, s, _ in jobs], cfg=re_cfg, mode=mode, progress=progress)
        for (vid, s, ck), v in zip(jobs, out, strict=True):
            trained[(vid, s)] = v
            if cache:
                save_cached(ck, v, {"model": model.name, "seed": s, "purpose": "roar/kar retrain",
                                    "train_config": dataclasses.asdict(re_cfg)})
    jax.block_until_ready(list(trained.values()))
    timings["train_s"] = time.perf_counter() - t0

    # 5. test accuracy on the modified test sets
    t0 = time.perf_counter()
    acc: dict[tuple, float] = {}
    y_test = jnp.asarray(test_set.y)
    for (vid, s), v in trained.items():
        logits = forward(model, v, jnp.asarray(variants[vid][1]))
        acc[(vid, s)] = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    timings["eval_s"] = time.perf_counter() - t0

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
                   retrain_config=dataclasses.asdict(re_cfg))
    from attrax.results import with_metadata

    df = conform(with_metadata(df, "roar_kar", choices))
    df.attrs["timings"] = dict(timings, n_trained=len(jobs), n_cached=n_cached)
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
         progress: bool = False, mask_only: bool = False) -> pd.DataFrame:
    """ROAR only (Hooker et al. 2019): replace the most relevant fraction, retrain; see `run`."""
    return run(method, model, train_set, test_set, protocols=("roar",), fractions=fractions,
               seeds=seeds, rank=rank, tie=tie, key=key, method_hparams=method_hparams,
               model_seed=model_seed, train_config=train_config, retrain_config=retrain_config,
               mode=mode, cache=cache, progress=progress, mask_only=mask_only)


PROTOCOLS.register("roar", roar, higher_is_better={"test_accuracy": False, "roar_mask/test_accuracy": False},
                   **_REG)


def kar(method: str, model: Any, train_set, test_set, *, fractions: Sequence[float] = FRACTIONS,
        seeds: Sequence[int] = (0, 1, 2), rank: str = "value", tie: str = "random", key: int = 0,
        method_hparams: dict[str, Any] | None = None, model_seed: int = 0,
        train_config: TrainConfig | dict | None = None,
        retrain_config: TrainConfig | dict | None = None, mode: str = "auto", cache: bool = True,
        progress: bool = False, mask_only: bool = False) -> pd.DataFrame:
    """KAR only (Hooker et al. 2019): keep the most relevant 1-t, replace the rest; see `run`."""
    return run(method, model, train_set, test_set, protocols=("kar",), fractions=fractions,
               seeds=seeds, rank=rank, tie=tie, key=key, method_hparams=method_hparams,
               model_seed=model_seed, train_config=train_config, retrain_config=retrain_config,
               mode=mode, cache=cache, progress=progress, mask_only=mask_only)


PROTOCOLS.register("kar", kar, higher_is_better={"test_accuracy": True, "kar_mask/test_accuracy": False},
                   **_REG)
