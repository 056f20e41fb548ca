"""DeepLIFT with the rescale rule (Shrikumar et al. 2017) and DeepLIFT-SHAP (Lundberg & Lee 2017).

Mechanism (on the rule engine, `attrax.methods._engine`: any JAX model, no `act` field): one
forward pass of the reference records the input of every nonlinear equation of the trace
(ReLUs, other elementwise activations, normalization scalings, max pooling, products of two
activations); then one forward + backward pass of the input runs with each of them given a
`jax.custom_vjp` whose backward multiplies by the DeepLIFT multiplier:
- elementwise y = f(z): the rescale multiplier m = (f(z) - f(z')) / (z - z') (the gradient
  f'(z) where |z - z'| <= `tol`);
- products z = a (.) b of two activations (attention, gating): the exact Shapley split
  Delta z = Delta a (.) (b + b')/2 + (a + a')/2 (.) Delta b;
- max pooling (window = stride): the split rule below; overlapping windows (stride < window,
  e.g. a ResNet stem's 3x3 stride 2): the max's gradient (routing to the input's winner), the
  convention of Shrikumar et al. 2017 and of the zoo's DeepLIFT before the engine, whatever
  `max_pool` says; summation-to-delta is then approximate there.
Linear equations (dense, conv, BatchNorm in inference, reshape, additions, pooling sums) keep
their gradient, which is their exact multiplier, so the map (x - x') * multiplier sums to
f_c(x) - f_c(x') (summation-to-delta) up to float rounding on every model built from these.
Softmax keeps its gradient (not exact there).

Max pooling: y = max over a window. With y' the reference's output and y* = max(y, y'), the
difference y - y' = (y* - y') + (y - y*) is split into a part routed to the input's winner and
a part routed to the reference's winner; each input's multiplier is its routed difference
divided by its own Delta a (gradient fallback where Delta a ~ 0). This is the rule Captum uses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attrax.errors import AttraxError
from attrax.methods import _engine
from attrax.methods._core import METHODS, class_score

Array = jax.Array


def _rescale(fn, z: Array, zr: Array, tol: float) -> Array:
    """fn(z) with the rescale multiplier (fn(z) - fn(z')) / (z - z') as its backward pass."""

    @jax.custom_vjp
    def f(t, tr):
        return fn(t)

    def fwd(t, tr):
        y, slope = jax.jvp(fn, (t,), (jnp.ones_like(t),))
        return y, (t, tr, y, slope)

    def bwd(res, g):
        t, tr, y, slope = res
        dz = t - tr
        big = jnp.abs(dz) > tol
        m = jnp.where(big, (y - fn(tr)) / jnp.where(big, dz, 1.0), slope)
        return g * m, jnp.zeros_like(tr)

    f.defvjp(fwd, bwd)
    return f(z, zr)


def _rescale_max_pool(a6: Array, ar6: Array, tol: float, rule: str) -> Array:
    """Window max over (n, oh, k, ow, k, c) whose backward pass is the DeepLIFT max-pool rule.

    Routing uses one-hot winner masks (first maximum of each window) instead of the max's
    generic gradient, which is ~3x faster on CPU.
    """
    shape6 = a6.shape

    @jax.custom_vjp
    def f(a, ar):
        return a.max(axis=(2, 4))

    def fwd(a, ar):
        return a.max(axis=(2, 4)), (a, ar)

    def bwd(res, g):
        a, ar = res
        va = _engine.windows6(a)
        kk = va.shape[-1]
        win_a = jax.nn.one_hot(jnp.argmax(va, -1), kk, dtype=a.dtype)
        grad = win_a * g[..., None]
        if rule == "gradient":
            return _engine.unwindows6(grad, shape6), jnp.zeros_like(ar)
        vr = _engine.windows6(jnp.broadcast_to(ar, a.shape))
        win_r = jax.nn.one_hot(jnp.argmax(vr, -1), kk, dtype=a.dtype)
        y, yr = jnp.max(va, -1), jnp.max(vr, -1)
        ymax = jnp.maximum(y, yr)
        routed = win_a * (g * (ymax - yr))[..., None] + win_r * (g * (y - ymax))[..., None]
        da = va - vr  # padding (-inf - -inf = nan) falls to the gradient branch
        big = jnp.abs(da) > tol
        m = jnp.where(big, routed / jnp.where(big, da, 1.0), grad)
        return _engine.unwindows6(m, shape6), jnp.zeros_like(ar)

    f.defvjp(fwd, bwd)
    return f(a6, ar6)


def _shapley_product(op_fn, u: Array, v: Array, ur: Array, vr: Array) -> Array:
    """z = op(u, v), bilinear; backward: multipliers from the averaged other factor."""

    @jax.custom_vjp
    def f(a, b, ar, br):
        return op_fn(a, b)

    def fwd(a, b, ar, br):
        return op_fn(a, b), (a, b, ar, br)

    def bwd(res, g):
        a, b, ar, br = res
        bm, am = (b + br) / 2, (a + ar) / 2
        _, vja = jax.vjp(lambda t: op_fn(t, bm), a)
        _, vjb = jax.vjp(lambda t: op_fn(am, t), b)
        return vja(g)[0], vjb(g)[0], jnp.zeros_like(ar), jnp.zeros_like(br)

    f.defvjp(fwd, bwd)
    return f(u, v, ur, vr)


def _shapley_ratio(u: Array, v: Array, ur: Array, vr: Array, tol: float) -> Array:
    """u / v with the exact two-player Shapley split of Delta(u / v) as multipliers."""

    @jax.custom_vjp
    def f(a, b, ar, br):
        return a / b

    def fwd(a, b, ar, br):
        return a / b, (a, b, ar, br)

    def bwd(res, g):
        a, b, ar, br = res
        phi_a = 0.5 * ((a / br - ar / br) + (a / b - ar / b))
        phi_b = 0.5 * ((ar / b - ar / br) + (a / b - a / br))
        da, db = a - ar, b - br
        big_a, big_b = jnp.abs(da) > tol, jnp.abs(db) > tol
        ma = jnp.where(big_a, phi_a / jnp.where(big_a, da, 1.0), 1.0 / b)
        mb = jnp.where(big_b, phi_b / jnp.where(big_b, db, 1.0), -a / (b * b))
        ga = g * ma
        gb = g * mb
        # the denominator is broadcast: sum the cotangent over the broadcast axes
        gb = jnp.sum(gb, axis=tuple(i for i, d in enumerate(b.shape) if d == 1 and gb.shape[i] != 1), keepdims=True)
        return ga, gb, jnp.zeros_like(ar), jnp.zeros_like(br)

    f.defvjp(fwd, bwd)
    return f(u, v, ur, vr)


def _softmax(node, env, refs: list, tol: float) -> Array:
    """softmax = exp (rescale) -> sum (linear) -> ratio (Shapley): exact summation-to-delta.

    The max-shift of a stable softmax is taken common to input and reference (the larger of
    the two), so that Delta exp is the rescaled Delta of the logits themselves."""
    local, local_r = dict(env), dict(env)
    u, ur = env[node.ins[0]], refs[0]
    local_r[node.ins[0]] = ur
    pre = node.extra.get("pre")
    for op in node.ops:
        if op.pname == "exp" and pre is not None:
            m = jnp.maximum(_engine.read(env, node.extra["shift"]), refs[2])
            local[op.outs[0]] = _rescale(lambda t, m=m: jnp.exp(t - m), _engine.read(env, pre), refs[1], tol)
            local_r[op.outs[0]] = jnp.exp(refs[1] - m)
        elif op.pname == "exp":
            local[op.outs[0]] = _rescale(jnp.exp, u, ur, tol)
            local_r[op.outs[0]] = jnp.exp(ur)
        elif op.pname == "div":
            a, b = op.ins
            local[op.outs[0]] = _shapley_ratio(local[a], local[b], local_r[a], local_r[b], tol)
        else:
            _engine.run_ops([op], local)
            _engine.run_ops([op], local_r)
    return local[node.out]


_RECORDED = ("relu", "activation", "norm", "maxpool", "bilinear", "softmax")


def _record_ids(node) -> list:
    return list(node.ins) + [node.extra[k] for k in ("pre", "shift") if k in node.extra]


def _record(graph, params, ref: Array) -> dict[int, list]:
    """The reference's value of every input of a nonlinear node, by node position."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    out: dict[int, list] = {}

    def record(node, env):
        if node.kind in _RECORDED:
            out[index[id(node)]] = [jax.lax.stop_gradient(_engine.read(env, i)) for i in _record_ids(node)]
        return None

    _engine.evaluate(graph, params, ref, record)
    return out


def _broadcastable(graph, graph_r) -> bool:
    """Whether the batch-1 trace has the same nodes, with values that broadcast against the batch's."""
    if len(graph.nodes) != len(graph_r.nodes):
        return False
    for a, b in zip(graph.nodes, graph_r.nodes, strict=True):
        if a.kind != b.kind:
            return False
        for i, j in zip(_record_ids(a), _record_ids(b), strict=True):
            sa = graph.avals[i].shape if not isinstance(i, _engine.Lit) else ()
            sb = graph_r.avals[j].shape if not isinstance(j, _engine.Lit) else ()
            if len(sa) != len(sb) or any(p != q and q != 1 for p, q in zip(sa, sb, strict=True)):
                return False
    return True


def multipliers(model, params, x: Array, ref: Array, target: Array, *, tol: float = 1e-7,
                score: str = "logit", max_pool: str = "rescale", unknown: str = "error") -> Array:
    """DeepLIFT rescale multipliers of the target score w.r.t. the input, vs reference `ref`.

    `ref` has x's shape or a leading axis of 1 (broadcast to the batch).
    """
    if max_pool not in ("rescale", "gradient"):
        raise AttraxError(f"unknown max_pool rule {max_pool!r}: use rescale or gradient")
    graph = _engine.graph_of(model, params, x)
    _engine.check_unknown(graph, unknown)
    ref = jax.lax.stop_gradient(ref)
    recorded = None
    if ref.shape[0] == 1 and x.shape[0] > 1:  # one reference: its forward pass costs one image
        graph_r = _engine.graph_of(model, params, ref)
        if _broadcastable(graph, graph_r):
            try:
                recorded = _record(graph_r, params, ref)
            except (TypeError, ValueError):  # an equation that does not broadcast its batch of 1
                recorded = None
    if recorded is None:
        recorded = _record(graph, params, jnp.broadcast_to(ref, x.shape))
    index = {id(n): i for i, n in enumerate(graph.nodes)}

    def handle(node, env):
        refs = recorded.get(index[id(node)])
        if refs is None:
            return None
        ins = [_engine.read(env, i) for i in node.ins]
        if node.kind in ("relu", "activation", "norm"):
            return _rescale(_engine.region_fn(node, env), ins[0], refs[0], tol)
        if node.kind == "maxpool":
            if node.extra["form"] == "generic":
                return None
            return _rescale_max_pool(_engine.to6(node, ins[0]), _engine.to6(node, refs[0]), tol, max_pool)
        if node.kind == "bilinear":
            return _shapley_product(_engine.bind_fn(node.ops[0]), *ins, *refs)
        if node.kind == "softmax":
            return _softmax(node, env, refs, tol)
        return None

    def total(xx):
        return class_score(_engine.evaluate(graph, params, xx, handle), target, score).sum()

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


@METHODS.register("deeplift", family="relevance", needs="apply", stochastic=False, cost=lambda hp: 3)
def deeplift(model, params, x, target, *, key=None, reference: Any = "zero", score: str = "logit",
             max_pool: str = "rescale", tol: float = 1e-7, unknown: str = "error") -> Array:
    """DeepLIFT, rescale rule (Shrikumar et al. 2017): C = (x - x') * m, sum C = f_c(x) - f_c(x').

    `reference` x': "zero" (default), a number, one input-shaped array or a batch-shaped array.
    `max_pool`: "rescale" (default; the split rule in the module docstring, exact
    summation-to-delta) or "gradient" (the max's gradient, Shrikumar et al. 2017; this is what
    the Captum reference maps in tests/data/reference show, and it sums to the delta only
    approximately). Overlapping pooling windows (stride < window) always use the gradient.
    `tol`: |Delta z| at or below which the gradient replaces the multiplier.
    `unknown`: "error" (default) or "gradient" for primitives no rule covers.
    """
    ref = _reference(reference, x)
    return (x - ref) * multipliers(model, params, x, ref, target, tol=tol, score=score, max_pool=max_pool,
                                   unknown=unknown)


@METHODS.register("deeplift_shap", family="relevance", needs="apply", stochastic=True,
                  cost=lambda hp: 3 * hp.get("n_references", 8))
def deeplift_shap(model, params, x, target, *, key, references: Any = None, n_references: int = 8,
                  score: str = "logit", max_pool: str = "rescale", tol: float = 1e-7,
                  unknown: str = "error") -> Array:
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
    m = multipliers(model, params, xs, refs, jnp.repeat(target, k), tol=tol, score=score, max_pool=max_pool,
                    unknown=unknown)
    return ((xs - refs) * m).reshape((n, k) + x.shape[1:]).mean(axis=1)
