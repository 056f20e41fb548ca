"""Running methods and protocols: validation, targets, jit caching and memory-bounded chunks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.models import Model, as_model

Array = jax.Array

#: Model evaluations (image x forward/backward) per compiled chunk when no budget is given.
DEFAULT_EVALS_PER_CHUNK = 4096
TARGET_MODES = ("label", "predicted")


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, np.ndarray | jax.Array):
        return ("array", v.shape, str(v.dtype), hash(np.asarray(v).tobytes()))
    return v


def check_batch(x: Any, target: Any | None = None) -> tuple[Array, Array | None]:
    """Validate a batch: float array with a leading batch axis, int targets of shape (n,)."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise AttraxError(f"x must be a batch with a leading axis (e.g. NHWC), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise AttraxError(f"x must be floating point (float32 in [0, 1]), got {x.dtype}")
    if target is None:
        return x, None
    target = jnp.asarray(target)
    if target.ndim == 0:
        target = jnp.full((x.shape[0],), target)
    if target.shape != (x.shape[0],) or not jnp.issubdtype(target.dtype, jnp.integer):
        raise AttraxError(
            f"target must be int class indices of shape ({x.shape[0]},), got {target.dtype} {target.shape}"
        )
    return x, target.astype(jnp.int32)


def check_relevance(r: Any, x: Array, name: str = "relevance") -> Array:
    r = jnp.asarray(r)
    if r.shape != x.shape:
        raise AttraxError(f"{name} has shape {r.shape}, expected the input's shape {x.shape}")
    if not bool(jnp.all(jnp.isfinite(r))):
        bad = int(jnp.sum(~jnp.isfinite(r)))
        raise AttraxError(f"{name} contains {bad} NaN/inf values")
    return r


def resolve_target(model: Model, params: Any, x: Array, y: Any, mode: str = "label") -> Array:
    """Explicit target choice: the true `label` or the model's `predicted` class."""
    if mode == "label":
        return jnp.asarray(y, jnp.int32)
    if mode == "predicted":
        return jnp.argmax(forward(model, params, x), axis=-1).astype(jnp.int32)
    raise AttraxError(f"unknown target mode {mode!r}: use one of {', '.join(TARGET_MODES)}")


def chunk_size_for(cost: int, n: int, evals_per_chunk: int | None = None) -> int:
    """Images per compiled call so that images x evaluations-per-image stays within the budget."""
    budget = evals_per_chunk or DEFAULT_EVALS_PER_CHUNK
    return int(max(1, min(n, budget // max(1, cost))))


def map_chunks(fn: Callable, n: int, chunk: int, *arrays: Array) -> Array:
    """Apply a compiled `fn(*batch_arrays, offset)` over fixed-size chunks (last one padded).

    Padding keeps one shape, so a second chunk never retraces.
    """
    outs = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        parts = []
        for a in arrays:
            part = a[start:stop]
            if stop - start < chunk:
                pad = [(0, chunk - (stop - start))] + [(0, 0)] * (part.ndim - 1)
                part = jnp.pad(part, pad) if not jnp.issubdtype(part.dtype, jax.dtypes.prng_key) else jnp.concatenate(
                    [part, jnp.repeat(part[:1], chunk - (stop - start), axis=0)]
                )
            parts.append(part)
        out = fn(*parts)
        outs.append(jax.tree.map(lambda o, k=stop - start: o[:k], out))
    if len(outs) == 1:
        return outs[0]
    return jax.tree.map(lambda *o: jnp.concatenate(o), *outs)


def forward(model: Model, params: Any, x: Array, chunk: int = 1024) -> Array:
    """Logits of a batch through one cached compiled forward, in chunks."""
    model = as_model(model)
    f = model.cached(("forward", x.shape[1:], chunk), lambda: jax.jit(lambda p, xx: model(p, xx)))
    return map_chunks(lambda xx: f(params, xx), x.shape[0], min(chunk, x.shape[0]), x)


def explain(
    method: str,
    model: Any,
    params: Any,
    x: Any,
    target: Any,
    *,
    key: Array | int | None = 0,
    chunk_size: int | None = None,
    evals_per_chunk: int | None = None,
    jit: bool = True,
    **hparams: Any,
) -> Array:
    """Relevance maps of `method` for a batch (the Python API's `attrax.explain`).

    `model` may be a zoo `Model`, any Flax linen module, or a plain `apply_fn(params, x)`.
    Hyperparameters are static (one compile per method, hyperparameters and chunk shape); the
    batch runs in chunks of `chunk_size` images (default: from `evals_per_chunk` and the method's
    cost), and per-example keys make the result independent of the chunking.
    """
    from attrax.methods import per_example_keys
    from attrax.methods.combinators import resolve

    entry = resolve(method)  # registered names and compositions such as "smooth(gradient)"
    model = as_model(model)
    x, target = check_batch(x, target)
    allowed = entry.hparams()
    unknown = set(hparams) - set(allowed)
    if unknown:
        raise AttraxError(
            f"method {method!r} has no hyperparameter {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(allowed)) or 'none'}"
        )
    needs = entry.meta.get("needs", "apply")
    if needs != "apply" and model.module is None:
        raise AttraxError(
            f"method {method!r} needs the model's layer structure ({needs}); a plain apply_fn has none. "
            "Pass the Flax module instead."
        )
    n = x.shape[0]
    keys = per_example_keys(key if key is not None else 0, n)
    cost = entry.meta.get("cost", lambda hp: 1)({**allowed, **hparams})
    chunk = chunk_size or chunk_size_for(cost, n, evals_per_chunk)

    def run(p, xx, tt, kk):
        return entry.fn(model, p, xx, tt, key=kk, **hparams)

    if jit:
        run = model.cached(("explain", method, _freeze(hparams), x.shape[1:], chunk), lambda: jax.jit(run))
    return map_chunks(lambda xx, tt, kk: run(params, xx, tt, kk), n, chunk, x, target, keys)


def evaluate(
    protocol: str,
    model: Any,
    params: Any,
    x: Any,
    target: Any,
    relevance: Any,
    *,
    key: Array | int | None = 0,
    **hparams: Any,
):
    """Score relevance maps with a registered protocol (the Python API's `attrax.evaluate`)."""
    from attrax.protocols import PROTOCOLS

    entry = PROTOCOLS.get(protocol)
    model = as_model(model)
    x, target = check_batch(x, target)
    relevance = check_relevance(relevance, x)
    allowed = entry.hparams()
    unknown = set(hparams) - set(allowed)
    if unknown:
        raise AttraxError(
            f"protocol {protocol!r} has no parameter {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(allowed)) or 'none'}"
        )
    if isinstance(key, int):
        key = jax.random.key(key)
    return entry.fn(model, params, x, target, relevance, key=key, **hparams)


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
