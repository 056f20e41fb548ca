"""Complexity of a map: sparseness (Gini index) and complexity (entropy).

- Sparseness (Chalasani, Chen, Chowdhury, Wu, Jha, ICML 2020): the Gini index of |R| over all
  features; 0 for a constant map, (d - 1) / d for a one-hot map. Higher = sparser.
- Complexity (Bhatt, Weller, Moura, IJCAI 2020): the entropy of the fractional contributions
  p_i = |R_i| / sum_j |R_j|; 0 for a one-hot map, log d for a constant one. Lower = simpler.

Both are computed on the channel-aggregated map (`aggregate`, default abs_sum: |R| summed over
channels), as Quantus does after taking absolute values. An all-zero map scores 0 on both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attrax._arrays import to_device
from attrax.protocols import PROTOCOLS, Scores
from attrax.protocols._common import aggregate_channels

Array = jax.Array


def _sorted_rows(a: Array) -> Array:
    """`jnp.sort(a, axis=-1)`; on CPU a concrete array is sorted by NumPy (the same values):
    XLA:CPU's sort took 11.4 ms (jitted) for 100 maps of 784 values, NumPy's 0.32 ms."""
    if jax.default_backend() == "cpu" and not isinstance(a, jax.core.Tracer):
        return to_device(np.sort(np.asarray(a), axis=-1))
    return jnp.sort(a, axis=-1)


def gini(a: Array) -> Array:
    """Gini index of each row of non-negative values (n, d)."""
    s = _sorted_rows(a)
    d = s.shape[-1]
    i = jnp.arange(1, d + 1, dtype=s.dtype)
    total = s.sum(-1)
    g = ((2 * i - d - 1) * s).sum(-1) / (d * jnp.where(total > 0, total, 1.0))
    return jnp.where(total > 0, g, 0.0)


def entropy(a: Array) -> Array:
    """Shannon entropy (nats) of each row of non-negative values, normalized to a distribution."""
    total = a.sum(-1, keepdims=True)
    p = a / jnp.where(total > 0, total, 1.0)
    return -(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)).sum(-1)


def _flat_abs(relevance, aggregate):
    a = jnp.abs(aggregate_channels(relevance, aggregate))
    return a.reshape(a.shape[0], -1)


@PROTOCOLS.register(
    "sparseness", category="complexity", version=1, higher_is_better={"sparseness": True}
)
def sparseness(model, params, x, target, relevance, *, key, aggregate: str = "abs_sum") -> Scores:
    """Sparseness = Gini index of |R| (Chalasani et al. 2020); default aggregation abs_sum."""
    return Scores(
        values={"sparseness": gini(_flat_abs(relevance, aggregate))},
        choices=dict(aggregate=aggregate, measure="gini"),
    )


@PROTOCOLS.register(
    "complexity", category="complexity", version=1, higher_is_better={"complexity": False}
)
def complexity(model, params, x, target, relevance, *, key, aggregate: str = "abs_sum") -> Scores:
    """Complexity = entropy of |R| / sum |R| (Bhatt et al. 2020); default aggregation abs_sum."""
    return Scores(
        values={"complexity": entropy(_flat_abs(relevance, aggregate))},
        choices=dict(aggregate=aggregate, measure="entropy (nats)"),
    )
