"""Random-logit class sensitivity (Sixt, Granz, Landgraf, ICML 2020; the RandomLogit metric of
the Quantus library).

The map for the target class is compared with the map of the same method for a different,
randomly drawn class (seeded per image), re-explained with the map's own key (`method_key`), so a
stochastic method draws the same noise and only the class differs. Maps that do not depend on the
class (the failure the paper reports for several modified-backprop methods, and the class-blind
`random` control) have similarity 1. Similarity (recorded): `ssim` by default, as Quantus uses -
SSIM of the normalized absolute maps (`attrax.protocols.sanity.similarity`); also `spearman`,
`spearman_abs`, `hog`, or `pearson` of the channel-aggregated signed maps. Lower = less alike =
better. Beside it, per image, the method's `noise_ceiling`: the same similarity between two runs
for the target class with two keys (1 for deterministic methods).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.harness import forward
from attrax.protocols import PROTOCOLS, Scores
from attrax.protocols._common import (
    aggregate_channels,
    example_keys,
    is_stochastic,
    method_label,
    other_keys,
    pearson,
    reexplainer,
)

SIMILARITIES = ("ssim", "spearman", "spearman_abs", "hog", "pearson")


def other_classes(key, target, num_classes: int):
    """A uniformly drawn class != target for every example (seeded)."""
    off = jax.random.randint(key, target.shape, 1, num_classes)
    return ((target + off) % num_classes).astype(jnp.int32)


def map_similarity(a, b, how: str, aggregate: str = "sum") -> np.ndarray:
    """Per-image similarity of two batches of maps (1 = identical)."""
    if how == "pearson":
        n = a.shape[0]
        return np.asarray(pearson(aggregate_channels(a, aggregate).reshape(n, -1),
                                  aggregate_channels(b, aggregate).reshape(n, -1)))
    from attrax.protocols.sanity import similarity

    return similarity(a, b, metrics=[how])[how]


@PROTOCOLS.register(
    "random_logit",
    category="randomization",
    version=2,
    needs_method=True,
    higher_is_better={"similarity": False, "noise_ceiling": None},
)
def random_logit(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    method=None,
    method_hparams: dict | None = None,
    method_key=None,
    similarity: str = "ssim",
    aggregate: str = "sum",
    num_classes: int | None = None,
) -> Scores:
    """Similarity of the target-class map and a random other class's map (lower is better).

    `relevance` is the map for `target` computed with `method_key` (None: key 0, explain's
    default); the other class's map re-explains with `method` / `method_hparams` and the same
    per-example keys. `key` draws the other class. `similarity`: ssim (default), spearman,
    spearman_abs, hog (on normalized absolute maps) or pearson (signed, channel-aggregated with
    `aggregate`). `num_classes` defaults to the model's output width. Metrics: `similarity` and
    `noise_ceiling` (same class, two keys; 1 for deterministic methods).
    """
    if similarity not in SIMILARITIES:
        raise AttraxError(f"unknown similarity {similarity!r}: use one of {', '.join(SIMILARITIES)}")
    c = num_classes or int(forward(model, params, x[:1]).shape[-1])
    other = other_classes(key, target, c)
    run = reexplainer(method, method_hparams, model, params, "random_logit")
    keys = example_keys(method_key, x.shape[0])
    r_other = run(x, other, keys)
    values = {"similarity": map_similarity(relevance, r_other, similarity, aggregate)}
    if is_stochastic(method):
        values["noise_ceiling"] = map_similarity(run(x, target, keys), run(x, target, other_keys(keys)),
                                                 similarity, aggregate)
    else:
        values["noise_ceiling"] = np.ones(x.shape[0])
    return Scores(
        values=values,
        choices=dict(
            method=method_label(method),
            method_hparams=method_hparams or {},
            aggregate=aggregate,
            similarity=similarity,
            num_classes=c,
            other_class="uniform among the other classes, seeded",
            method_key="the map's per-example keys",
        ),
    )
