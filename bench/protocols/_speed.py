"""Speed of the protocols, for the benchmark command (`from attrax.protocols._speed import ...`).

- `curve_vs_forward`: a pixel-flipping curve with K steps against K + 1 batched forward passes
  of the same images, measured in the same run (the issue's bar: ratio <= 1.5).
- `seconds_per_image`: wall seconds per image of every protocol on one batch (warm: the first,
  compiling call is run and discarded).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from attrax.harness import evaluate, forward
from attrax.models import as_model
from attrax.protocols import PROTOCOLS
from attrax.protocols.sensitivity import perturbation_curve, rank_locations


def _best_of(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile / warm
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def curve_vs_forward(
    model, params, x, target, relevance, *, steps: int = 28, repeats: int = 5, key: int = 0
) -> dict[str, float]:
    """Seconds of one K-step pixel-flipping curve vs K+1 batched forwards of the same images.

    Both are warm (compiled) and timed alternately; the best of `repeats` is kept.
    """
    model = as_model(model)
    idx = rank_locations(relevance, jax.random.key(key))
    fwd = model.cached(("speed_forward", x.shape), lambda: jax.jit(lambda p, xx: model(p, xx)))

    def k_forwards():
        return [fwd(params, x) for _ in range(steps + 1)]

    def curve():
        return perturbation_curve(model, params, x, target, idx, steps=steps)[0]

    jax.block_until_ready(k_forwards())
    jax.block_until_ready(curve())
    t_fwd = t_curve = float("inf")
    for _ in range(repeats):  # interleaved: load changes on a shared machine hit both alike
        t = time.perf_counter()
        jax.block_until_ready(k_forwards())
        t_fwd = min(t_fwd, time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(curve())
        t_curve = min(t_curve, time.perf_counter() - t)
    return {
        "images": int(x.shape[0]),
        "steps": steps,
        "forward_passes_s": t_fwd,
        "curve_s": t_curve,
        "ratio": t_curve / t_fwd,
        "curve_ms_per_image": 1e3 * t_curve / x.shape[0],
    }


def seconds_per_image(
    model,
    params,
    x,
    target,
    relevance,
    *,
    names: Iterable[str] | None = None,
    method: str = "gradient",
    masks: Any = None,
    repeats: int = 1,
    overrides: dict[str, dict] | None = None,
) -> dict[str, float]:
    """Warm wall seconds per image of each protocol (re-explaining ones use `method`)."""
    out = {}
    overrides = overrides or {}
    for name in names or PROTOCOLS.names():
        entry = PROTOCOLS.get(name)
        hp = dict(overrides.get(name, {}))
        if entry.meta.get("needs_method"):
            hp.setdefault("method", method)
        if entry.meta.get("needs_masks"):
            if masks is None:
                continue
            hp.setdefault("masks", masks)
        if "relevance" not in inspect.signature(entry.fn).parameters:
            continue  # protocols with another signature (e.g. retraining) are timed elsewhere

        def run(hp=hp, name=name):
            s = evaluate(name, model, params, x, target, relevance, key=0, **hp)
            return jax.tree.map(jnp.asarray, s.values)

        out[name] = _best_of(run, repeats) / x.shape[0]
    return out


def forward_seconds_per_image(model, params, x, repeats: int = 3) -> float:
    return _best_of(lambda: forward(as_model(model), params, x), repeats) / x.shape[0]
