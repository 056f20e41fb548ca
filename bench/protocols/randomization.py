"""Random-logit class sensitivity (Sixt, Granz, Landgraf, ICML 2020; as Quantus' RandomLogit).

The map for the target class is compared with the map of the same method for a different,
randomly drawn class (seeded per image). Maps that do not depend on the class (the failure the
paper reports for several modified-backprop methods) have similarity 1. Similarity: Pearson
correlation of the channel-aggregated maps (Quantus uses SSIM). Lower is better.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attrax.harness import forward
from attrax.protocols import PROTOCOLS, Scores
from attrax.protocols._common import aggregate_channels, method_label, pearson, reexplainer


def other_classes(key, target, num_classes: int):
    """A uniformly drawn class != target for every example (seeded)."""
    off = jax.random.randint(key, target.shape, 1, num_classes)
    return ((target + off) % num_classes).astype(jnp.int32)


@PROTOCOLS.register(
    "random_logit",
    category="randomization",
    version=1,
    needs_method=True,
    higher_is_better={"similarity": False},
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
    aggregate: str = "sum",
    num_classes: int | None = None,
) -> Scores:
    """Similarity of the target-class map and a random other class's map (lower is better).

    `relevance` is the map for `target`; the other class's map is computed by re-explaining with
    `method` / `method_hparams`. `num_classes` defaults to the model's output width.
    """
    k_cls, k_expl = jax.random.split(key)
    c = num_classes or int(forward(model, params, x[:1]).shape[-1])
    other = other_classes(k_cls, target, c)
    r_other = reexplainer(method, method_hparams, model, params, "random_logit")(x, other, k_expl)
    n = x.shape[0]
    a = aggregate_channels(relevance, aggregate).reshape(n, -1)
    b = aggregate_channels(r_other, aggregate).reshape(n, -1)
    return Scores(
        values={"similarity": pearson(a, b)},
        choices=dict(
            method=method_label(method),
            method_hparams=method_hparams or {},
            aggregate=aggregate,
            similarity="pearson",
            num_classes=c,
            other_class="uniform among the other classes, seeded",
        ),
    )
