"""DeepLIFT with the rescale rule (Shrikumar et al. 2017) and DeepLIFT-SHAP (Lundberg & Lee 2017).

Mechanism: one forward pass of the reference records the pre-activation of every activation
call and the input of every `MaxPool` module (in call order); then one forward + backward pass
of the input runs with the model's activation swapped (`Model.with_activation`) for a
`jax.custom_vjp` whose backward multiplies by the rescale multiplier
m = (act(z) - act(z')) / (z - z') (the gradient act'(z) where |z - z'| <= `tol`), and with every
`MaxPool` given a rescale rule. Linear layers, BatchNorm (inference), reshape and additions keep
their gradient, which is their exact multiplier. The map is (x - x') * multiplier, so
sum C = f_c(x) - f_c(x') (summation-to-delta) holds exactly up to float rounding.

Max pooling: y = max over a window. With y' the reference's output and y* = max(y, y'), the
difference y - y' = (y* - y') + (y - y*) is split into a part routed to the input's winner and
a part routed to the reference's winner; each input's multiplier is its routed difference
divided by its own Delta a (gradient fallback where Delta a ~ 0). This is the rule Captum uses.

Requires a model whose Flax module has a swappable `act` field (all zoo models do).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attrax.errors import AttraxError
from attrax.methods._core import METHODS, class_score
from attrax.methods._rules import windows
from attrax.models import MaxPool

Array = jax.Array


def _is_call(ctx) -> bool:
    return ctx.method_name == "__call__" and ctx.module.path != ()


def _rescale_act(act, tol: float):
    """act with the rescale multiplier as its backward pass: f(z, z_ref)."""

    @jax.custom_vjp
    def f(z, zr):
        return act(z)

    def fwd(z, zr):
        return act(z), (z, zr)

    def bwd(res, g):
        z, zr = res
        dz = z - zr
        dy = act(z) - act(zr)
        _, slope = jax.jvp(act, (z,), (jnp.ones_like(z),))
        big = jnp.abs(dz) > tol
        m = jnp.where(big, dy / jnp.where(big, dz, 1.0), slope)
        return g * m, jnp.zeros_like(zr)

    f.defvjp(fwd, bwd)
    return f


def _rescale_max_pool(mod, tol: float, rule: str):
    """Max pooling (window = stride) whose backward pass is the DeepLIFT max-pool rule.

    Routing uses one-hot winner masks (first maximum of each window) instead of the max's
    generic gradient, which is ~3x faster on CPU.
    """
    k = mod.window

    def pool(t):
        return nn.max_pool(t, (k, k), strides=(k, k), padding=mod.padding)

    @jax.custom_vjp
    def f(a, ar):
        return pool(a)

    def fwd(a, ar):
        return pool(a), (a, ar)

    def bwd(res, g):
        a, ar = res
        va, back = windows(a, k, mod.padding)
        win_a = jax.nn.one_hot(jnp.argmax(va, -1), k * k, dtype=a.dtype)
        grad = win_a * g[..., None]
        if rule == "gradient":
            return back(grad), jnp.zeros_like(ar)
        vr, _ = windows(ar, k, mod.padding)  # the reference's own batch (often 1)
        win_r = jax.nn.one_hot(jnp.argmax(vr, -1), k * k, dtype=a.dtype)
        y, yr = jnp.max(va, -1), jnp.max(vr, -1)
        ymax = jnp.maximum(y, yr)
        routed = win_a * (g * (ymax - yr))[..., None] + win_r * (g * (y - ymax))[..., None]
        da = va - vr  # window space; padding (-inf - -inf = nan) falls to the gradient branch
        big = jnp.abs(da) > tol
        m = jnp.where(big, routed / jnp.where(big, da, 1.0), grad)
        return back(m), jnp.zeros_like(ar)

    f.defvjp(fwd, bwd)
    return f


def multipliers(model, params, x: Array, ref: Array, target: Array, *, tol: float = 1e-7,
                score: str = "logit", max_pool: str = "rescale") -> Array:
    """DeepLIFT rescale multipliers of the target score w.r.t. the input, vs reference `ref`.

    `ref` has x's shape or a leading axis of 1 (one reference for the whole batch: its forward
    pass then costs one image).
    """
    if max_pool not in ("rescale", "gradient"):
        raise AttraxError(f"unknown max_pool rule {max_pool!r}: use rescale or gradient")
    module = model.module
    if module is None or not hasattr(module, "act"):
        raise AttraxError(
            f"deeplift needs a Flax module with a swappable `act` field; {model.name!r} has none"
        )
    base = module.act
    acts: list[Array] = []
    pools: list[Array] = []

    def record_act(z):
        acts.append(z)
        return base(z)

    def record_pool(next_fun, args, kwargs, ctx):
        if _is_call(ctx) and isinstance(ctx.module, MaxPool):
            pools.append(args[0])
        return next_fun(*args, **kwargs)

    ref = jax.lax.stop_gradient(ref)
    with nn.intercept_methods(record_pool):
        model.with_activation(record_act)(params, ref)
    acts = [jax.lax.stop_gradient(a) for a in acts]
    pools = [jax.lax.stop_gradient(a) for a in pools]
    act_it, pool_it = iter(acts), iter(pools)
    rescale = _rescale_act(base, tol)

    def swapped_act(z):
        return rescale(z, next(act_it))

    def swapped_pool(next_fun, args, kwargs, ctx):
        if _is_call(ctx) and isinstance(ctx.module, MaxPool):
            return _rescale_max_pool(ctx.module, tol, max_pool)(args[0], next(pool_it))
        return next_fun(*args, **kwargs)

    swapped = model.with_activation(swapped_act)

    def total(xx):
        with nn.intercept_methods(swapped_pool):
            return class_score(swapped(params, xx), target, score).sum()

    return jax.grad(total)(x)


def _reference(reference: Any, x: Array) -> Array:
    if isinstance(reference, str):
        if reference in ("zero", "black"):
            return jnp.zeros((1,) + x.shape[1:], x.dtype)
        raise AttraxError(f"unknown reference {reference!r}: use 'zero', a number or an array")
    r = jnp.asarray(reference, x.dtype)
    if r.ndim == 0:
        return jnp.full((1,) + x.shape[1:], r)
    if r.shape == x.shape[1:]:
        return r[None]
    if r.shape == x.shape:
        return r
    raise AttraxError(f"reference of shape {r.shape} fits neither one input {x.shape[1:]} nor the batch {x.shape}")


@METHODS.register("deeplift", family="relevance", needs="layers", stochastic=False, cost=lambda hp: 2)
def deeplift(model, params, x, target, *, key=None, reference: Any = "zero", score: str = "logit",
             max_pool: str = "rescale", tol: float = 1e-7) -> Array:
    """DeepLIFT, rescale rule (Shrikumar et al. 2017): C = (x - x') * m, sum C = f_c(x) - f_c(x').

    `reference` x': "zero" (default), a number, one input-shaped array or a batch-shaped array.
    `max_pool`: "rescale" (default; the split rule in the module docstring, exact
    summation-to-delta) or "gradient" (the max's gradient, Shrikumar et al. 2017; this is what
    the Captum reference maps in tests/data/reference show, and it sums to the delta only
    approximately). `tol`: |Delta z| at or below which the gradient replaces the multiplier.
    """
    ref = _reference(reference, x)
    return (x - ref) * multipliers(model, params, x, ref, target, tol=tol, score=score, max_pool=max_pool)


@METHODS.register("deeplift_shap", family="relevance", needs="layers", stochastic=True,
                  cost=lambda hp: 2 * hp.get("n_references", 8))
def deeplift_shap(model, params, x, target, *, key, references: Any = None, n_references: int = 8,
                  score: str = "logit", max_pool: str = "rescale", tol: float = 1e-7) -> Array:
    """DeepLIFT-SHAP (Lundberg & Lee 2017): DeepLIFT averaged over references drawn from data.

    `references`: an array (m, *input_shape) of background inputs (e.g. training images); each
    example draws `n_references` (default 8) of them with its own key. Without `references`
    (default None) the background is uniform noise in [0, 1), drawn per example.
    All n x n_references pairs go through one batched pass.
    """
    n, k = x.shape[0], n_references
    if references is None:
        refs = jax.vmap(lambda kk: jax.random.uniform(kk, (k,) + x.shape[1:], x.dtype))(key)
    else:
        bank = jnp.asarray(references, x.dtype)
        if bank.shape[1:] != x.shape[1:]:
            raise AttraxError(f"references must have shape (m, {', '.join(map(str, x.shape[1:]))}), got {bank.shape}")
        idx = jax.vmap(lambda kk: jax.random.randint(kk, (k,), 0, bank.shape[0]))(key)
        refs = bank[idx]  # (n, k, ...)
    xs = jnp.repeat(x[:, None], k, axis=1).reshape((n * k,) + x.shape[1:])
    refs = refs.reshape(xs.shape)
    m = multipliers(model, params, xs, refs, jnp.repeat(target, k), tol=tol, score=score, max_pool=max_pool)
    return ((xs - refs) * m).reshape((n, k) + x.shape[1:]).mean(axis=1)
