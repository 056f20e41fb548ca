"""Evaluation protocols and metrics: pure batched functions registered by name.

Signature::

    fn(model, params, x, target, relevance, *, key, **choices) -> Scores

Every choice (score space, replacement, order, step grid, patch size, tie rule...) is a
keyword-only parameter with a default, recorded in `Scores.choices` and in the results.
Register with `@PROTOCOLS.register(name, category=..., higher_is_better={metric: bool}, version=1)`.
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


def higher_is_better(protocol: str, metric: str) -> bool | None:
    return PROTOCOLS.get(protocol).meta.get("higher_is_better", {}).get(metric)


import_submodules(__name__, __path__)
