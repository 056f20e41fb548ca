"""Attribution methods: pure JAX functions registered by name.

Signature (the contract every method follows)::

    fn(model, params, x, target, *, key, **hparams) -> relevance   # relevance.shape == x.shape

- `model` is an `attrax.models.Model` (`model(params, x) -> logits`, optional stages).
- `x` is a batch (leading axis n), `target` an int32 array (n,) of class indices.
- `key` is an array of n per-example PRNG keys (`per_example_keys`), so a stochastic method's
  output for an example does not depend on the batch it was computed in.
- Hyperparameters are keyword-only with documented defaults; the harness (`attrax.explain`)
  treats them as static, jits the function and runs it in memory-bounded chunks.
- Gradients of a batch come from ONE backward pass of the summed selected scores
  (`input_gradient`), not from `vmap` of per-example gradients (1.7x faster on CPU).

Register with `@METHODS.register(name, family=..., needs=..., stochastic=..., cost=...)` where
`needs` is "apply" (gradients only: works on a plain apply_fn), "stages", "activation" or
"layers", and `cost(hparams) -> int` is the number of model evaluations per image (used to size
chunks for the memory budget).
"""

from __future__ import annotations

from attrax._plugins import import_submodules
from attrax.methods._core import (  # noqa: F401
    METHODS,
    class_score,
    input_gradient,
    per_example_keys,
)


def names(**filters) -> list[str]:
    return METHODS.names(**filters)


def get(name: str):
    """A registered method, or a composition such as "smooth(integrated_gradients)"."""
    from attrax.methods.combinators import resolve

    return resolve(name)


import_submodules(__name__, __path__)
