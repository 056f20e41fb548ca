"""Combinators that wrap ANY method, the way optax chains transformations.

- `smooth(m)`: SmoothGrad (Smilkov et al. 2017): mean over `n_samples` noisy copies
  x + eps, eps ~ N(0, (sigma * (max(x) - min(x)))^2), the range taken per image. Defaults
  n_samples 50, sigma 0.15.
- `vargrad(m)`: VarGrad (Adebayo et al. 2018): the (population) variance of m over the same noisy
  copies. Defaults n_samples 50, sigma 0.15.
- `squared(m)`: m(x)^2, so `smooth(squared(gradient))` is SmoothGrad^2 (Hooker et al. 2019).
- `times_input(m)`: x * m(x) (e.g. `times_input(gradient)` is input x gradient).

Registered compositions: `smoothgrad` = smooth(gradient), `smoothgrad_sq` =
smooth(squared(gradient)), `vargrad` = vargrad(gradient). Any other composition is available by
name, e.g. `attrax.explain("smooth(integrated_gradients)", ..., n_samples=10, steps=16)` or as a
key of the `methods` config group; `resolve(name)` turns such a name into a registry entry whose
hyperparameters are the combinator's plus the wrapped method's.

Noise comes from the per-example keys (split into a noise key and a key for the wrapped method),
so an example's map does not depend on its batch; all n_samples copies of the batch go through the
wrapped method in ONE batched call.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attrax.errors import AttraxError, unknown_name
from attrax.methods import gradient as _gradient  # noqa: F401  (registers `gradient` before we wrap it)
from attrax.methods._core import METHODS, per_example_keys
from attrax.registry import Entry

Array = jax.Array
_COMPOSITE = re.compile(r"^\s*(\w+)\s*\((.+)\)\s*$")


def _as_entry(method: Any) -> Entry:
    """A registry entry for a method name (composite names included), an Entry or a function."""
    if isinstance(method, Entry):
        return method
    if isinstance(method, str):
        return resolve(method)
    if callable(method):
        meta = {"family": "custom", "needs": "apply", "stochastic": False, "cost": lambda hp: 1}
        return Entry(getattr(method, "__name__", "custom"), method, meta)
    raise AttraxError(f"cannot wrap {type(method).__name__}: give a method name or a method function")


def _signature(own: dict[str, Any], inner: dict[str, Any]) -> inspect.Signature:
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(p, pos) for p in ("model", "params", "x", "target")]
    params.append(inspect.Parameter("key", kw, default=None))
    params += [inspect.Parameter(k, kw, default=v) for k, v in {**own, **inner}.items()]
    return inspect.Signature(params)


def _wrap(
    comb: str,
    method: Any,
    own: dict[str, Any],
    body: Callable,
    *,
    stochastic: bool | None = None,
    cost_factor: Callable[[dict], int] = lambda hp: 1,
    doc: str = "",
) -> Entry:
    inner = _as_entry(method)
    inner_hp = inner.hparams()
    clash = set(own) & set(inner_hp)
    if clash:
        raise AttraxError(
            f"cannot compose {comb}({inner.name}): both take hyperparameter(s) {', '.join(sorted(clash))}"
        )
    inner_fn = inner.fn

    def fn(model, params, x, target, *, key=None, **hp):
        mine = {k: hp.pop(k, v) for k, v in own.items()}
        unknown = set(hp) - set(inner_hp)
        if unknown:
            raise AttraxError(f"{comb}({inner.name}) has no hyperparameter {', '.join(sorted(unknown))}")
        if key is None:
            key = per_example_keys(0, x.shape[0])
        return body(lambda xx, tt, kk: inner_fn(model, params, xx, tt, key=kk, **hp), x, target, key, **mine)

    name = f"{comb}({inner.name})"
    fn.__signature__ = _signature(own, inner_hp)
    fn.__name__ = name
    fn.__qualname__ = name
    fn.__doc__ = f"{doc}\n\nWraps {inner.name!r}: {inner.fn.__doc__ or ''}"
    inner_cost = inner.meta.get("cost", lambda hp: 1)
    meta = {
        **inner.meta,
        "family": inner.meta.get("family", "custom"),
        "stochastic": inner.meta.get("stochastic", False) if stochastic is None else stochastic,
        "cost": lambda hp: max(1, cost_factor(hp) * inner_cost(hp)),
        "composite": name,
    }
    return Entry(name, fn, meta)


def noisy_copies(x: Array, key: Array, n_samples: int, sigma: float) -> tuple[Array, Array]:
    """(x + eps of shape (n_samples, n, ...), keys (n_samples, n) for the wrapped method).

    eps ~ N(0, (sigma * (max(x_i) - min(x_i)))^2) per image i, drawn from that image's key.
    """
    n = x.shape[0]
    pairs = jax.vmap(lambda k: jax.random.split(k, 2))(key)  # (n, 2)
    eps = jax.vmap(lambda k: jax.random.normal(k, (n_samples,) + x.shape[1:], x.dtype))(pairs[:, 0])
    flat = x.reshape(n, -1)
    scale = (sigma * (flat.max(axis=1) - flat.min(axis=1))).reshape((n, 1) + (1,) * (x.ndim - 1))
    xs = jnp.swapaxes(x[:, None] + scale * eps, 0, 1)  # (S, n, ...)
    sub = jax.vmap(lambda k: jax.vmap(lambda s: jax.random.fold_in(k, s))(jnp.arange(n_samples)))(pairs[:, 1])
    return xs, jnp.swapaxes(sub, 0, 1)


def _sampled(inner: Callable, x: Array, target: Array, key: Array, n_samples: int, sigma: float) -> Array:
    """The wrapped method on all noisy copies in ONE batched call: (S, n, ...)."""
    if n_samples < 1:
        raise AttraxError(f"n_samples must be >= 1, got {n_samples}")
    xs, keys = noisy_copies(x, key, n_samples, sigma)
    s, n = xs.shape[:2]
    r = inner(xs.reshape((s * n,) + x.shape[1:]), jnp.tile(target, s), keys.reshape(s * n))
    return r.reshape(xs.shape)


def smooth(method: Any, *, n_samples: int = 50, sigma: float = 0.15) -> Entry:
    """SmoothGrad over any method (Smilkov et al. 2017): mean_n m(x + eps_n).

    eps ~ N(0, (sigma (max - min))^2) with the range per image. Defaults: n_samples 50, sigma 0.15.
    """

    def body(inner, x, target, key, *, n_samples, sigma):
        return _sampled(inner, x, target, key, n_samples, sigma).mean(axis=0)

    return _wrap(
        "smooth",
        method,
        {"n_samples": n_samples, "sigma": sigma},
        body,
        stochastic=True,
        cost_factor=lambda hp: hp["n_samples"],
        doc=smooth.__doc__,
    )


def vargrad(method: Any, *, n_samples: int = 50, sigma: float = 0.15) -> Entry:
    """VarGrad over any method (Adebayo et al. 2018): variance over n of m(x + eps_n).

    Population variance (divide by n_samples); noise as in `smooth`. Defaults: 50 samples, 0.15.
    """

    def body(inner, x, target, key, *, n_samples, sigma):
        return _sampled(inner, x, target, key, n_samples, sigma).var(axis=0)

    return _wrap(
        "vargrad",
        method,
        {"n_samples": n_samples, "sigma": sigma},
        body,
        stochastic=True,
        cost_factor=lambda hp: hp["n_samples"],
        doc=vargrad.__doc__,
    )


def squared(method: Any) -> Entry:
    """The square of a method's map, m(x)^2 (smooth(squared(gradient)) = SmoothGrad^2)."""

    def body(inner, x, target, key):
        r = inner(x, target, key)
        return r * r

    return _wrap("squared", method, {}, body, doc=squared.__doc__)


def times_input(method: Any) -> Entry:
    """The method's map times the input, x * m(x) (times_input(gradient) = input x gradient)."""

    def body(inner, x, target, key):
        return x * inner(x, target, key)

    return _wrap("times_input", method, {}, body, doc=times_input.__doc__)


def combinators() -> dict[str, Callable[..., Entry]]:
    """Combinator name -> factory."""
    return {"smooth": smooth, "vargrad": vargrad, "squared": squared, "times_input": times_input}


def resolve(name: str) -> Entry:
    """The registry entry of a method name, composite names such as "smooth(squared(gradient))"
    included. Unknown names raise the registry's "did you mean" error."""
    if name in METHODS:
        return METHODS.get(name)
    m = _COMPOSITE.match(name)
    if m is None:
        return METHODS.get(name)
    comb, inner = m.group(1), m.group(2).strip()
    factories = combinators()
    if comb not in factories:
        raise unknown_name("combinator", comb, factories)
    return factories[comb](inner)


def _register(name: str, entry: Entry) -> None:
    METHODS.register(
        name,
        entry.fn,
        **{k: v for k, v in entry.meta.items() if k != "composite"},
        composite=entry.name,
    )


_register("smoothgrad", smooth("gradient"))
_register("smoothgrad_sq", smooth(squared("gradient")))
_register("vargrad", vargrad("gradient"))
