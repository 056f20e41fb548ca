"""The main job over an iterator of batches: explain and score shard by shard, resumable.

A data set bigger than memory (an `image_folder` split of ImageNet) is never held whole: the
selected test images are cut into SHARDS of `stream.shard_size` images (the unit of results on
disk and of resuming), each shard is read in BATCHES of `stream.batch_size` images (the unit the
harness sees: `attrax.explain` and `attrax.evaluate` are called once per batch, and chunk the
batch further by the memory budget). `image_folder` batches are decoded from disk by its Grain
pipeline; in-memory data sets are sliced.

Results are the same as one call on the whole selection: example i of the selection is
explained with the per-example key `fold_in(method_key, i)` whatever batch it falls in (what
`explain(..., key=method_key)` gives a single batch), and the protocols get those keys as
`method_key`, so a re-explanation draws the map's noise. Every batch gets the run's protocol key
(`key`): what it draws for the whole model (the re-initialized weights of a sanity check) is the
same for all images, as in one batch; what a protocol draws per position in the batch (random tie
breaks, random subsets) repeats from batch to batch, so those scores depend on the batch layout,
and aggregate metrics (rows with example -1) are one row per batch.

On disk (`<run>/shards/`): per (method, shard) `<m>-<method>-<shard>.parquet` (the tidy rows),
`.npz` (the maps of the shard's heatmap images) and `.json` written last (a digest of everything
that determines the shard, timings, the protocols' choices). Every file is written atomically, so
an interrupted run resumes without redoing a finished shard; a shard whose digest does not match
(a changed setting) is recomputed. `stream.shards=[k, ...]` computes only those shards: one job
per (method, shard) of a sweep, merged by the report (`attrax report SWEEP_DIR`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attrax._arrays import to_device
from attrax.errors import AttraxError
from attrax.train import atomic_write_bytes

#: images per batch for data sets that stream from disk when `stream.batch_size` is not set
STREAMED_BATCH = 64
SHARD_DIR = "shards"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """`stream:` of the config. batch_size: images per explain/evaluate call (None: a whole shard
    for in-memory data, `STREAMED_BATCH` for streamed data); shard_size: images per result shard
    (None: one shard); shards: compute only these shard indices (None: all); progress_s: seconds
    between progress lines."""

    batch_size: int | None = None
    shard_size: int | None = None
    shards: tuple[int, ...] | None = None
    progress_s: float = 10.0

    @classmethod
    def from_config(cls, cfg: dict | None) -> StreamConfig:
        cfg = dict(cfg or {})
        unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise AttraxError(f"stream has no setting {', '.join(sorted(unknown))}: use batch_size, shard_size, "
                              "shards, progress_s")
        for k in ("batch_size", "shard_size"):
            v = cfg.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise AttraxError(f"stream.{k} must be a positive integer or null, got {v!r}")
        shards = cfg.get("shards")
        if shards is not None:
            shards = (shards,) if isinstance(shards, int) else tuple(shards)
            if not all(isinstance(s, int) and s >= 0 for s in shards):
                raise AttraxError(f"stream.shards must be shard indices (integers >= 0), got {shards!r}")
        return cls(cfg.get("batch_size"), cfg.get("shard_size"), shards, float(cfg.get("progress_s", 10.0)))


def is_streamed(ds) -> bool:
    """True for data sets that decode batches from disk (`image_folder`)."""
    return callable(getattr(ds, "batches", None))


def shard_ranges(n: int, shard_size: int | None) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive shards of `shard_size` images covering n (one if None)."""
    size = shard_size or max(n, 1)
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def batch_size_for(ds, settings: StreamConfig, shard_len: int) -> int:
    if settings.batch_size:
        return settings.batch_size
    return STREAMED_BATCH if is_streamed(ds) else max(1, shard_len)


def iter_batches(ds, batch_size: int, start: int = 0, stop: int | None = None
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, x, y) of consecutive batches of images start..stop of `ds`: decoded from disk by
    the data set's own pipeline where it streams, sliced where it is in memory."""
    stop = len(ds) if stop is None else min(stop, len(ds))
    if is_streamed(ds):
        part = ds.subset(np.arange(start, stop))
        at = start
        for xb, yb in part.batches(batch_size):
            yield at, xb, yb
            at += len(yb)
        return
    for s in range(start, stop, batch_size):
        e = min(stop, s + batch_size)
        yield s, np.asarray(ds.x[s:e]), np.asarray(ds.y[s:e])


def accuracy(model, params, ds, batch_size: int = 256) -> float:
    """Test accuracy over batches (a streamed set is never decoded whole)."""
    from attrax.harness import forward

    if not is_streamed(ds):
        from attrax.train import train_module_accuracy

        return train_module_accuracy(model, params, ds)
    right = total = 0
    for _, xb, yb in iter_batches(ds, batch_size):
        pred = np.asarray(jnp.argmax(forward(model, params, to_device(xb)), -1))
        right += int((pred == yb).sum())
        total += len(yb)
    return right / max(total, 1)


def evals_within_budget(method: str, model, params, x, *, memory_mb: float, tries: int = 6, **hparams) -> int:
    """Model evaluations per chunk whose compiled chunk fits `memory_mb`, checked by XLA's memory
    analysis: `attrax.harness.evals_per_chunk_for_memory` (which now compiles its estimate and
    shrinks it until it fits), kept under this name for the run's callers."""
    from attrax.harness import evals_per_chunk_for_memory

    return evals_per_chunk_for_memory(method, model, params, x, memory_mb=memory_mb, tries=tries, **hparams)


class Progress:
    """Progress lines of a long explain: images done, images/s, ETA (at most every `every_s`)."""

    def __init__(self, label: str, total: int, log: Callable[[str], Any], every_s: float = 10.0,
                 enabled: bool = True):
        self.label, self.total, self.log, self.every_s, self.enabled = label, total, log, every_s, enabled
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else float("inf")

    def line(self, extra: str = "") -> str:
        r = self.rate()
        left = self.total - self.done
        eta = left / r if r > 0 and np.isfinite(r) else float("nan")
        return (f"[attrax] {self.label}: {self.done}/{self.total} images, {r:.1f} images/s, "
                f"ETA {_duration(eta)}{extra}")

    def update(self, n: int, *, force: bool = False, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (force or now - self.last >= self.every_s):
            self.last = now
            self.log(self.line(extra))


def _duration(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---------------------------------------------------------------------------------------------
# Shards on disk


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", name)[:60]


def digest(desc: Any) -> str:
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclasses.dataclass
class ShardResult:
    rows: pd.DataFrame
    maps: dict[int, np.ndarray]  # selection position -> map (heatmap images of this shard)
    timings: dict[str, float]
    choices: dict[str, dict]
    cached: bool = False


class ShardStore:
    """The per-(method, shard) files of one run folder (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / SHARD_DIR

    def stem(self, mi: int, method: str, shard: int) -> Path:
        return self.dir / f"{mi:02d}-{_safe(method)}-{shard:05d}"

    def load(self, mi: int, method: str, shard: int, want: str) -> ShardResult | None:
        """The finished shard with digest `want`, or None (missing, unfinished, other settings)."""
        stem = self.stem(mi, method, shard)
        meta_path = stem.with_suffix(".json")
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("digest") != want or meta.get("status") != "complete":
                return None
            rows = pd.read_parquet(stem.with_suffix(".parquet"))
            with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
                maps = {int(i): z["maps"][k] for k, i in enumerate(z["positions"])}
        except Exception as e:  # noqa: BLE001 - a damaged finished shard is reported, not silently redone
            raise AttraxError(f"results shard {stem}.* cannot be read ({type(e).__name__}): delete its files "
                              "to recompute it") from None
        return ShardResult(rows, maps, meta.get("timings", {}), meta.get("choices", {}), cached=True)

    def save(self, mi: int, method: str, shard: int, want: str, res: ShardResult) -> None:
        stem = self.stem(mi, method, shard)
        buf = io.BytesIO()
        res.rows.to_parquet(buf, index=False)
        atomic_write_bytes(stem.with_suffix(".parquet"), buf.getvalue())
        pos = np.asarray(sorted(res.maps), np.int64)
        buf = io.BytesIO()
        np.savez(buf, positions=pos, maps=np.stack([res.maps[int(i)] for i in pos]) if len(pos) else np.zeros(0))
        atomic_write_bytes(stem.with_suffix(".npz"), buf.getvalue())
        meta = {"status": "complete", "digest": want, "version": VERSION, "method": method, "shard": shard,
                "timings": res.timings, "choices": res.choices, "n_rows": int(len(res.rows))}
        atomic_write_bytes(stem.with_suffix(".json"), json.dumps(meta, default=str).encode())


# ---------------------------------------------------------------------------------------------
# One method over the shards of a selection


def shard_digest(cfg: dict, method: str, hparams: dict, start: int, stop: int) -> str:
    """Everything that determines a shard's rows: the run's config (less what only changes the
    output around them and the shard selection), the method, the shard's range."""
    from attrax.results import hparams_json

    skip = ("progress", "figures", "out_dir", "stream")
    c = {k: v for k, v in cfg.items() if k not in skip}
    st = dict(cfg.get("stream") or {})
    c["stream"] = {k: st.get(k) for k in ("batch_size", "shard_size")}
    return digest({"v": VERSION, "cfg": c, "method": method, "hparams": hparams_json(hparams),
                   "range": [start, stop]})


def run_method(
    *,
    method: str,
    mi: int,
    hparams: dict,
    filled: dict,
    sub,
    model,
    params,
    method_key,
    protocol_key,
    pspecs: dict,
    run_context: dict,
    heat_positions: np.ndarray,
    row_ids: dict,
    cfg: dict,
    settings: StreamConfig,
    store: ShardStore | None,
    log: Callable[[str], Any] = print,
    explain_kw: dict | None = None,
) -> tuple[list[pd.DataFrame], dict[int, np.ndarray], dict[str, float], dict[str, dict], dict]:
    """Explain `sub` with one method and score every batch with every protocol, shard by shard.

    Returns (row frames, {selection position: map} of the heatmap images, timings (explain_s,
    protocol_<name>_s), the protocols' choices, shard info (computed / resumed / left to other
    jobs)). Raises the method's AttraxError (the caller decides whether to skip the method).
    """
    n = len(sub)
    ranges = shard_ranges(n, settings.shard_size)
    chosen = range(len(ranges)) if settings.shards is None else [s for s in settings.shards if s < len(ranges)]
    if settings.shards is not None and not chosen:
        raise AttraxError(f"stream.shards={list(settings.shards)}: the selection of {n} images has only "
                          f"{len(ranges)} shard(s) of {settings.shard_size or n} (indices 0..{len(ranges) - 1})")
    example_index = np.asarray(sub.meta.get("index", np.arange(n)))
    masks = sub.meta.get("masks")
    heat = set(int(i) for i in heat_positions)
    frames, maps, choices = [], {}, {}
    timings: dict[str, float] = {"explain_s": 0.0}
    total = sum(ranges[s][1] - ranges[s][0] for s in chosen)
    info = {"shards": len(ranges), "images": total, "computed": [], "resumed": []}
    prog = Progress(method, total, log, settings.progress_s,
                    enabled=bool(cfg.get("progress")) and (len(ranges) > 1 or total > batch_size_for(sub, settings, n)))
    for s in chosen:
        start, stop = ranges[s]
        want = shard_digest(cfg, method, hparams, start, stop)
        res = store.load(mi, method, s, want) if store is not None else None
        if res is None:
            res = _compute_shard(method, filled, sub, start, stop, model, params, method_key, protocol_key, pspecs,
                                 run_context, heat, example_index, masks, row_ids,
                                 batch_size_for(sub, settings, stop - start), prog, explain_kw or {})
            if store is not None:
                store.save(mi, method, s, want, res)
            info["computed"].append(s)
        else:
            prog.update(stop - start)
            info["resumed"].append(s)
        if prog.enabled and len(ranges) > 1:
            prog.log(prog.line(f" (shard {s + 1}/{len(ranges)} {'resumed' if res.cached else 'done'})"))
        frames.append(res.rows)
        maps.update(res.maps)
        for k, v in res.timings.items():
            timings[k] = timings.get(k, 0.0) + float(v)
        choices.update(res.choices)
    return frames, maps, timings, choices, info


def _compute_shard(method, filled, sub, start, stop, model, params, method_key, protocol_key, pspecs, run_context,
                   heat, example_index, masks, row_ids, batch, prog, explain_kw) -> ShardResult:
    """One shard: per batch, the maps (per-example keys of the selection's positions) and every
    protocol's scores; the rows, the heatmap images' maps, timings and choices."""
    import attrax
    from attrax import results
    from attrax.main import run_protocol, supply
    from attrax.methods import per_example_keys

    frames, maps, choices = [], {}, {}
    timings: dict[str, float] = {"explain_s": 0.0}
    for b0, xb, yb in iter_batches(sub, batch, start, stop):
        nb = len(yb)
        x = to_device(xb)
        target = attrax.resolve_target(model, params, x, yb, row_ids["target_mode"])
        keys = per_example_keys(method_key, nb, offset=b0)  # example i: fold_in(method_key, i)
        t = time.perf_counter()
        r = attrax.explain(method, model, params, x, target, key=keys, **explain_kw, **filled)
        r = jax.block_until_ready(r)
        timings["explain_s"] += time.perf_counter() - t
        context = {**run_context, "method": method, "method_hparams": filled, "method_key": keys,
                   "masks": None if masks is None else to_device(np.asarray(masks)[b0:b0 + nb])}
        for pi, (pname, pcfg) in enumerate(pspecs.items()):
            pk = protocol_key(pi)  # the same in every batch: one randomized model for all images
            t = time.perf_counter()
            scores = run_protocol(pname, supply(pname, pcfg, context), model, params, x, target, r, pk)
            timings[f"protocol_{pname}_s"] = timings.get(f"protocol_{pname}_s", 0.0) + time.perf_counter() - t
            frames.append(results.scores_to_rows(
                scores, example_index=example_index[b0:b0 + nb], protocol=pname,
                **{k: v for k, v in row_ids.items() if k != "target_mode"}))
            choices[pname] = {**pcfg, **{k: v for k, v in scores.choices.items() if not hasattr(v, "shape")}}
        ra = np.asarray(r)
        for i in range(b0, b0 + nb):
            if i in heat:
                maps[i] = ra[i - b0]
        prog.update(nb)
    rows = pd.concat(frames, ignore_index=True) if frames else results.conform(pd.DataFrame())
    return ShardResult(rows, maps, timings, json.loads(json.dumps(choices, default=str)))
