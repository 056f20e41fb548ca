"""Shared test models that are NOT in the zoo (issue 13): the five example families of
`attrax.examples`, built tiny (batch 2, 8x8x3 inputs, 3 classes) for fast CPU compiles.

Import from a test module (pytest puts tests/ on sys.path) and wrap in a module-scoped fixture:

    from nonzoo import FAMILIES, make
    @pytest.fixture(scope="module", params=FAMILIES)
    def fam(request): return make(request.param)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import attrax
from attrax import examples

FAMILIES = examples.names()
SHAPE = (2, 8, 8, 3)
NUM_CLASSES = 3


class Family(NamedTuple):
    name: str
    model: attrax.models.Model  # built once, so its jit cache is shared by a module's tests
    params: object
    x: jax.Array
    target: jax.Array
    raw: object  # what the user handed over (linen module or apply_fn)


def nonzero_biases(params, seed: int, scale: float = 0.05):
    """Add noise to every 1-D parameter except BatchNorm statistics: zero-initialized biases hide
    bugs (e.g. positive-homogeneity shortcuts). NumPy draws: no per-shape XLA compiles."""
    rng = np.random.default_rng(seed)

    def perturb(path, v):
        if v.ndim != 1 or any(getattr(p, "key", None) == "batch_stats" for p in path):
            return v
        return v + jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


@functools.cache
def make(name: str, shape: tuple[int, ...] = SHAPE, seed: int = 1, **kwargs) -> Family:
    x = jnp.asarray(np.random.default_rng(0).uniform(size=shape), jnp.float32)
    raw, params = examples.build(name, seed, x, num_classes=NUM_CLASSES, **kwargs)
    params = nonzero_biases(params, 2)
    target = jnp.arange(shape[0], dtype=jnp.int32) % NUM_CLASSES
    return Family(name, attrax.as_model(raw), params, x, target, raw)
