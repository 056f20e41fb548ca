"""Evaluation protocols and metrics: pure batched functions registered by name.

Signature::

    fn(model, params, x, target, relevance, *, key, **choices) -> Scores

Every choice (score space, replacement, order, step grid, patch size, tie rule...) is a
keyword-only parameter with a default, recorded in `Scores.choices` and in the results.
Register with `@PROTOCOLS.register(name, category=..., higher_is_better={metric: bool}, version=1)`.

Retraining protocols (ROAR, KAR, data randomization) are registered in the same registry with
`kind="retrain"`; their function is `fn(method, model, train_set, test_set, *, **choices)`.
Every registration declares in `needs` the parameters the run loop supplies (the method, its
filled hyperparameters and the map's key, masks, channel mean, training config...), and the
metadata every result row carries: `higher_is_better`, `x_label`, `aggregation`, `version`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from attrax._plugins import import_submodules
from attrax.registry import Registry

PROTOCOLS = Registry("protocol")


@dataclasses.dataclass
class Scores:
    """A protocol's output for a batch.

    values: metric -> (n,) per-example scalars or (n, K) per-example curves.
    x:      metric -> (K,) positions of a curve's points (fraction removed, step, shift...).
    choices: every parameter the protocol used, recorded in the results.
    """

    values: dict[str, Any]
    x: dict[str, Any] = dataclasses.field(default_factory=dict)
    choices: dict[str, Any] = dataclasses.field(default_factory=dict)

    def mean(self) -> dict[str, float]:
        return {k: float(np.mean(np.asarray(v))) for k, v in self.values.items() if np.ndim(v) == 1}


def names(**filters) -> list[str]:
    return PROTOCOLS.names(**filters)


def get(name: str):
    return PROTOCOLS.get(name)


def higher_is_better(protocol: str, metric: str, choices: dict | None = None) -> bool | None:
    """The metric's better direction; least-relevant-first runs (`order="lerf"`) invert it."""
    return metric_meta(protocol, metric, choices)["higher_is_better"]


#: What the run loop can supply to a protocol (a registration's `needs` names a subset).
CONTEXT = ("method", "method_hparams", "method_key", "masks", "channel_mean", "train_set", "test_set",
           "train_config", "model_seed", "progress")
#: Context parameters of the per-batch protocols, filled from the run when the config leaves them null.
BATCH_NEEDS = {"method": ("method", "method_hparams", "method_key"), "masks": ("masks",),
               "channel_mean": ("channel_mean",)}


def needs(name: str) -> tuple[str, ...]:
    """The context parameters a protocol takes from the run (declared, or read from its signature)."""
    entry = PROTOCOLS.get(name)
    if "needs" in entry.meta:
        return tuple(entry.meta["needs"])
    return tuple(k for k in entry.hparams() if k in CONTEXT)


def is_retrain(name: str) -> bool:
    return PROTOCOLS.get(name).meta.get("kind") == "retrain"


def metric_meta(protocol: str, metric: str, choices: dict | None = None, sub: str | None = None,
                ) -> dict[str, Any]:
    """Metadata of one metric as the results rows carry it: direction (True = higher is better,
    None = not ranked), x-axis label, aggregation and protocol version. `protocol` is the
    registered name; a retraining protocol's sub-protocol (roar_mask...) is looked up in its
    `higher_is_better` as `"<sub>/<metric>"` (`sub`: the row's protocol) before `metric`. For a
    protocol registered with `directions_for="morf"`, `order="lerf"` flips every directed metric:
    removing the LEAST relevant first, a good map keeps the score high."""
    entry = PROTOCOLS.get(protocol)
    meta = entry.meta
    hib_map = meta.get("higher_is_better", {})
    hib = hib_map.get(f"{sub}/{metric}", hib_map.get(metric)) if sub else hib_map.get(metric)
    choices = choices or {}
    if hib is not None and meta.get("directions_for") == "morf" and choices.get("order") == "lerf":
        hib = not hib
    xl = meta.get("x_label", "")
    if isinstance(xl, dict):
        xl = xl.get(f"{sub}/{metric}", xl.get(metric, xl.get("", "")))
    agg = meta.get("aggregation", "mean")
    if isinstance(agg, dict):
        agg = agg.get(metric, agg.get("", "mean"))
    return {"higher_is_better": hib, "x_label": xl, "aggregation": agg, "version": int(meta.get("version", 1))}


import_submodules(__name__, __path__)
