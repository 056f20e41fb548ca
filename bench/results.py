"""The results store: one tidy long table per run (`rows.parquet`) plus `run.json`.

Columns (SCHEMA): run_id, experiment, dataset, model, model_seed, method, method_hparams (JSON),
protocol, metric, x (curve position; NaN for scalars), value, example (index; -1 for an
aggregate), seed, and the metric's metadata as it was when the row was written: protocol_choices
(JSON of the protocol's recorded choices), direction ("higher" / "lower" / "none" = not ranked),
x_label, aggregation ("mean" over examples; "mean_over_seeds": the seed column is a replicate
such as a ROAR retrain), version (the protocol's), flag (a warning on the row, "" if none). Results
written before these columns existed load with them empty ("", -1 for version); the report then
falls back to the registry's metadata. Files are written atomically (temporary file + rename) and `run.json` is written
last with `"status": "complete"`, so a folder without it is an unfinished run, never read as done.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attrax.errors import AttraxError
from attrax.train import atomic_write_bytes

SCHEMA = {
    "run_id": "string",
    "experiment": "string",
    "dataset": "string",
    "model": "string",
    "model_seed": "int64",
    "method": "string",
    "method_hparams": "string",
    "protocol": "string",
    "metric": "string",
    "x": "float64",
    "value": "float64",
    "example": "int64",
    "seed": "int64",
    "protocol_choices": "string",
    "direction": "string",
    "x_label": "string",
    "aggregation": "string",
    "version": "int64",
    "flag": "string",
}
COLUMNS = list(SCHEMA)
ROWS_FILE, RUN_FILE = "rows.parquet", "run.json"


def _json_default(v: Any) -> Any:
    """Arrays (filled baselines, references, fitted patterns) as shape, dtype and content digest:
    `str` would abbreviate them, and two different arrays could be recorded alike."""
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        import hashlib

        a = np.asarray(v)
        return {"array": list(a.shape), "dtype": str(a.dtype), "sha1": hashlib.sha1(a.tobytes()).hexdigest()[:16]}
    if isinstance(v, dict):
        return {str(k): x for k, x in v.items()}
    return str(v)


def hparams_json(hp: dict[str, Any] | None) -> str:
    return json.dumps(hp or {}, sort_keys=True, default=_json_default)


#: Choices that are not the protocol's own (the method's identity, the run's data): not in
#: `protocol_choices`, which identifies the protocol's setting in the leaderboard.
RUN_SUPPLIED = ("method", "method_hparams", "method_key", "masks", "channel_mean", "train_set", "test_set",
                "train_config", "progress", "model_seed", "cache", "key", "seed")


def choices_json(choices: dict[str, Any] | None) -> str:
    """JSON of a protocol's recorded choices without run-supplied values and arrays."""
    keep = {k: v for k, v in (choices or {}).items()
            if k not in RUN_SUPPLIED and not hasattr(v, "shape") and not callable(v)}
    return hparams_json(keep)


def direction_word(hib: bool | None) -> str:
    return "higher" if hib is True else "lower" if hib is False else "none"


def with_metadata(df: pd.DataFrame, protocol: str, choices: dict[str, Any] | None = None) -> pd.DataFrame:
    """Fill every row's metric metadata from protocol `protocol`'s registration and the run's
    choices (`order="lerf"` inverts directions), and `protocol_choices`."""
    from attrax.protocols import metric_meta

    df = df.copy()
    cj = choices_json(choices)
    sub = df["protocol"] if "protocol" in df else pd.Series(protocol, index=df.index)
    meta = {(p, m): metric_meta(protocol, m, choices, sub=p) for p, m in set(zip(sub, df["metric"], strict=True))}
    pairs = list(zip(sub, df["metric"], strict=True))
    df["protocol_choices"] = cj
    df["direction"] = [direction_word(meta[k]["higher_is_better"]) for k in pairs]
    df["x_label"] = [meta[k]["x_label"] for k in pairs]
    df["aggregation"] = [meta[k]["aggregation"] for k in pairs]
    df["version"] = [meta[k]["version"] for k in pairs]
    return df


def scores_to_rows(scores, *, example_index: Iterable[int], **ids: Any) -> pd.DataFrame:
    """Tidy rows from a protocol's `Scores` (per-example scalars and curves); with `protocol` a
    registered name, every row carries the metric's metadata and the protocol's choices."""
    ex = np.asarray(list(example_index), dtype=np.int64)
    frames = []
    for metric, v in scores.values.items():
        v = np.asarray(v, dtype=np.float64)
        if v.ndim == 1:
            frames.append(pd.DataFrame({"metric": metric, "x": np.nan, "value": v, "example": ex}))
        elif v.ndim == 2:
            xs = np.asarray(scores.x.get(metric, np.arange(v.shape[1])), dtype=np.float64)
            frames.append(pd.DataFrame({
                "metric": metric,
                "x": np.tile(xs, v.shape[0]),
                "value": v.reshape(-1),
                "example": np.repeat(ex, v.shape[1]),
            }))
        elif v.ndim == 0:
            frames.append(pd.DataFrame({"metric": [metric], "x": [np.nan], "value": [float(v)], "example": [-1]}))
        else:
            raise AttraxError(f"metric {metric!r} has {v.ndim} dimensions; expected (n,) or (n, K)")
    df = pd.concat(frames, ignore_index=True)
    for k, val in ids.items():
        df[k] = hparams_json(val) if k == "method_hparams" and not isinstance(val, str) else val
    from attrax.protocols import PROTOCOLS

    if ids.get("protocol") in PROTOCOLS:
        df = with_metadata(df, ids["protocol"], getattr(scores, "choices", None))
    return conform(df)


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing schema columns (null) and fix dtypes and column order."""
    df = df.copy()
    for c, t in SCHEMA.items():
        if c not in df:
            df[c] = -1 if t == "int64" else (np.nan if t == "float64" else "")
        elif t == "string":
            df[c] = df[c].fillna("")
    return df[COLUMNS].astype(SCHEMA)


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import jax

    vers = {}
    for p in ("attrax", "jax", "jaxlib", "flax", "optax", "hydra-core", "pandas", "numpy"):
        try:
            vers[p] = md.version(p)
        except md.PackageNotFoundError:
            vers[p] = None
    return {
        "versions": vers,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "git_commit": git_commit(),
    }


def write_run(run_dir: str | Path, rows: pd.DataFrame, config: dict[str, Any], timings: dict[str, float],
              extra: dict[str, Any] | None = None) -> Path:
    """Write rows.parquet, then run.json (status complete) atomically into `run_dir`."""
    import io

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    conform(rows).to_parquet(buf, index=False)
    atomic_write_bytes(run_dir / ROWS_FILE, buf.getvalue())
    info = {"status": "complete", "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config,
            "timings": timings, "n_rows": int(len(rows)), **environment(), **(extra or {})}
    atomic_write_bytes(run_dir / RUN_FILE, json.dumps(info, indent=1, default=str).encode())
    return run_dir


def is_complete(run_dir: str | Path) -> bool:
    p = Path(run_dir) / RUN_FILE
    if not p.exists() or not (Path(run_dir) / ROWS_FILE).exists():
        return False
    try:
        return json.loads(p.read_text()).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    runs = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise AttraxError(f"no such results folder: {p}")
        runs += sorted({f.parent for f in ([p / RUN_FILE] if (p / RUN_FILE).exists() else p.rglob(RUN_FILE))})
        runs += sorted({f.parent for f in p.rglob(ROWS_FILE)} - set(runs))
    return sorted(set(runs))


def load(*paths: str | Path, strict: bool = True) -> pd.DataFrame:
    """The tidy table of one or more run folders (searched recursively).

    An unfinished or corrupt run raises (strict) or is skipped with a warning; never read silently.
    """
    import warnings

    frames = []
    for run in find_runs(paths):
        problem = None
        if not is_complete(run):
            problem = "unfinished (no complete run.json)"
        else:
            try:
                frames.append(conform(pd.read_parquet(run / ROWS_FILE)))
                continue
            except Exception as e:  # noqa: BLE001
                problem = f"unreadable rows.parquet ({type(e).__name__})"
        if strict:
            raise AttraxError(f"results folder {run}: {problem}")
        warnings.warn(f"skipping results folder {run}: {problem}", stacklevel=2)
    if not frames:
        raise AttraxError(f"no complete results under {', '.join(map(str, paths))}")
    return pd.concat(frames, ignore_index=True)


def run_info(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RUN_FILE).read_text())
