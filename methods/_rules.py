"""Layer rules: relevance propagation through any JAX model, on the rule engine.

The mechanism (shared by LRP, deep Taylor and PatternNet/PatternAttribution)
----------------------------------------------------------------------------
1. `attrax.methods._engine` traces `model(params, x)` once (cached on the model) and finds the
   *linear layers* (`dot_general` / `conv_general_dilated` with one parameter-derived operand,
   with their bias and a BatchNorm-like affine chain that the canonizer folds in), ReLUs,
   max pooling, softmax, normalizations and products of two activations.
2. `propagate` re-evaluates the computation with each linear layer as a `jax.custom_vjp`
   function: the forward is the layer's own output (with folded BatchNorm: unchanged logits),
   the backward implements the layer's rule. Max pooling gets the selected pooling rule
   (`pooling=`: "winner" takes all, or "proportional", the z-rule over each window; also for
   overlapping windows such as 3x3 stride 2, where each input sums its shares of every window);
   transformers get CP-LRP or AttnLRP rules (`transformer=`); everything else (ReLU, reshape,
   residual additions, average pooling, means) keeps its ordinary gradient, which is LRP-0 /
   the z-rule for linear ops and passes relevance through active ReLUs.
3. Convention: the cotangent flowing backwards is a *modified gradient* g with relevance
   R = a * g at every activation a (so relevance at a layer output z is z * g). Only a linear
   layer that reads the model input returns its input relevance itself, so that input-dependent
   rules (z^B, flat, w^2) never divide by the input. The method's map is the cotangent at the input.

Rules are small frozen dataclasses with one method, `backward(layer, a, z, g, first)`; a
composite is a function from a `LayerInfo` (path, kind, position) to a rule. References:
Bach et al. 2015 (LRP), Montavon et al. 2017/2018 (deep Taylor, z^B, gamma), Kohlbrenner et al.
2020 (composites, flat), Montavon et al. 2019 "Layer-wise relevance propagation: an overview",
Ali et al. 2022 (CP-LRP), Achtibat et al. 2024 (AttnLRP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.methods import _engine
from attrax.methods._engine import LayerInfo, Linear  # noqa: F401 - re-exported

Array = jax.Array

#: Denominator guard of the non-epsilon rules (only prevents 0/0; far below float32 resolution of z).
TINY = 1e-12
STARTS = ("logit", "probability", "one", "relu_logit")
POOLINGS = ("winner", "proportional")
TRANSFORMER_RULES = ("attn_lrp", "cp_lrp", "gradient")


def stabilize(z: Array, eps: float) -> Array:
    """z + eps * sign(z) with sign(0) = +1."""
    return jnp.where(z >= 0, z + eps, z - eps)


# ---------------------------------------------------------------------------------------------
# Layer structure (read from the trace)


@dataclasses.dataclass(frozen=True)
class Structure:
    layers: tuple[LayerInfo, ...]

    @property
    def bn(self) -> dict:
        return {info.bn: info.name for info in self.layers if info.bn is not None}

    def by_path(self) -> dict[tuple[str, ...], LayerInfo]:
        return {info.path: info for info in self.layers}


def layer_structure(model, params: Any, x: Array) -> Structure:
    """The linear layers of `model` in execution order (from its cached trace)."""
    graph = _engine.graph_of(model, params, x)
    if not graph.layers:
        raise AttraxError(
            f"model {getattr(model, 'name', model)!r} has no linear layers (dot_general / conv with a "
            "parameter operand) for relevance rules to attach to"
        )
    return Structure(graph.layers)


structure_of = layer_structure


# ---------------------------------------------------------------------------------------------
# Rules. backward(layer, a, z, g, first) -> cotangent of the input:
#   first layer: the input relevance R_in; other layers: g_in with R_in = a * g_in.
# R_out = z * g is the relevance at the layer output.


def _finish(a: Array, g_in: Array, first: bool) -> Array:
    return a * g_in if first else g_in


@dataclasses.dataclass(frozen=True)
class Zero:
    """LRP-0: R_j = sum_k a_j w_jk / z_k R_k (Bach et al. 2015): exactly the gradient."""

    def backward(self, layer, a, z, g, first):
        return _finish(a, layer.transpose(g), first)


@dataclasses.dataclass(frozen=True)
class Epsilon:
    """LRP-epsilon: denominator z_k + eps * sign(z_k), sign(0) = +1."""

    eps: float = 1e-6

    def backward(self, layer, a, z, g, first):
        s = z * g / stabilize(z, self.eps)
        return _finish(a, layer.transpose(s), first)


@dataclasses.dataclass(frozen=True)
class Gamma:
    """LRP-gamma: w -> w + gamma w+, b -> b + gamma b+ (Montavon et al. 2019), eps-stabilized."""

    gamma: float = 0.25
    eps: float = 1e-6

    def backward(self, layer, a, z, g, first):
        k = layer.kernel + self.gamma * jnp.maximum(layer.kernel, 0)
        b = layer.bias + self.gamma * jnp.maximum(layer.bias, 0)
        s = z * g / stabilize(layer(a, k, b), self.eps)
        return _finish(a, layer.transpose(s, k), first)


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
    """LRP-alpha-beta (Bach et al. 2015): alpha * positive - beta * negative contributions.

    Positive contributions a_j w_jk > 0 (a+ w+ and a- w-) plus the positive bias; negative ones
    likewise. Conserves relevance (bias-free) only where both parts are non-zero; a neuron with
    only positive contributions passes alpha * R_k (the documented 2x failure for alpha=2).
    alpha = 1, beta = 0 is the z+ rule.
    """

    alpha: float = 1.0
    beta: float = 0.0

    def __post_init__(self):
        if abs(self.alpha - self.beta - 1.0) > 1e-9:
            raise AttraxError(f"alpha-beta rule needs alpha - beta = 1, got alpha={self.alpha}, beta={self.beta}")

    def backward(self, layer, a, z, g, first):
        wp, wn = jnp.maximum(layer.kernel, 0), jnp.minimum(layer.kernel, 0)
        bp, bn = jnp.maximum(layer.bias, 0), jnp.minimum(layer.bias, 0)
        r = z * g

        # z+ (positive contributions, no bias) costs one call; z- = (z - b) - z+ costs none.
        if layer.nonnegative_input:  # after a ReLU: positive contributions are a w+
            zp = layer.op(a, wp)
        else:  # a+ w+ and a- w-, as one call on (a+, a-) stacked along the feature axis
            zp = layer.op_stacked(jnp.concatenate([jnp.maximum(a, 0), jnp.minimum(a, 0)], -1), wp, wn)
        s = self.alpha * r / stabilize(zp + bp, TINY)
        s_neg = -self.beta * r / stabilize(z - layer.bias - zp + bn, TINY) if self.beta else None
        # inputs a > 0: T(s, w+) + T(s_neg, w-);  a < 0: T(s, w-) + T(s_neg, w+). (Rewriting w- as
        # w - w+ would save nothing and cancel catastrophically where z- ~ 0 makes s_neg huge.)
        if layer.nonnegative_input:
            g_in = layer.transpose(s, wp)
            if s_neg is not None:
                g_in = g_in + layer.transpose(s_neg, wn)
        else:
            tp, tn = layer.transpose_stacked(s, wp, wn)
            if s_neg is not None:
                np_, nn_ = layer.transpose_stacked(s_neg, wn, wp)
                tp, tn = tp + np_, tn + nn_
            g_in = (a > 0) * tp + (a < 0) * tn
        return _finish(a, g_in, first)


def ZPlus() -> AlphaBeta:  # noqa: N802 - a rule constructor, named like the rule
    """z+ rule (Montavon et al. 2017): positive contributions only (alpha=1, beta=0)."""
    return AlphaBeta(1.0, 0.0)


@dataclasses.dataclass(frozen=True)
class ZBox:
    """z^B rule for the input layer with bounds low <= x <= high (Montavon et al. 2017).

    R_i = sum_k (x_i w_ik - l_i w+_ik - h_i w-_ik) / z_k R_k; relevance >= 0 inside the box when
    R_k >= 0. Bounds are scalars or arrays broadcastable to one input.
    """

    low: Any = 0.0
    high: Any = 1.0

    def backward(self, layer, a, z, g, first):
        if not first:
            raise AttraxError("the z^B (box) rule applies only to the first layer")
        one = (1,) + a.shape[1:]  # the bounds are the same for every example
        lo = jnp.broadcast_to(jnp.asarray(self.low, a.dtype), one)
        hi = jnp.broadcast_to(jnp.asarray(self.high, a.dtype), one)
        k, wp = layer.kernel, jnp.maximum(layer.kernel, 0)
        wn = k - wp
        zz = (z - layer.bias) - layer.op_stacked(jnp.concatenate([lo, hi], -1), wp, wn)
        s = z * g / stabilize(zz, TINY)
        # a T(s, w) - l T(s, w+) - h T(s, w-) with T(s, w-) = T(s, w) - T(s, w+)
        t_w, t_p = layer.transpose_stacked(s, k, wp)
        return (a - hi) * t_w - (lo - hi) * t_p


def _input_independent(layer, a, z, g, first, k):
    den = layer.op(jnp.ones_like(a[:1]), k)  # the same for every example
    r_in = layer.transpose(z * g / stabilize(den, TINY), k)
    if first:
        return r_in
    # hidden layer: R = a * g_in; relevance on exactly-zero activations is dropped (a ReLU
    # in front of this layer would mask it anyway).
    return jnp.where(a != 0, r_in / jnp.where(a != 0, a, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class WSquare:
    """w^2 rule (Montavon et al. 2017): R_i = sum_k w_ik^2 / sum_i' w_i'k^2 R_k."""

    def backward(self, layer, a, z, g, first):
        return _input_independent(layer, a, z, g, first, layer.kernel**2)


@dataclasses.dataclass(frozen=True)
class Flat:
    """flat rule (Lapuschkin et al. 2019): relevance spread uniformly over the receptive field."""

    def backward(self, layer, a, z, g, first):
        return _input_independent(layer, a, z, g, first, jnp.ones_like(layer.kernel))


RULES = ("zero", "epsilon", "gamma", "alpha_beta", "alpha1beta0", "alpha2beta1", "zplus", "zbox",
         "wsquare", "flat")


def make_rule(spec: Any, *, eps: float = 1e-6, gamma: float = 0.25, alpha: float = 1.0,
              beta: float = 0.0, low: Any = 0.0, high: Any = 1.0):
    """A rule from a name or a mapping `{name: ..., <param>: value}`; method hparams fill defaults."""
    if hasattr(spec, "backward"):
        return spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        name = spec.pop("name", None) or spec.pop("rule", None)
        kw = {"eps": eps, "gamma": gamma, "alpha": alpha, "beta": beta, "low": low, "high": high}
        unknown = set(spec) - set(kw)
        if unknown:
            raise AttraxError(f"rule {name!r} got unknown settings {sorted(unknown)}")
        return make_rule(name, **{**kw, **spec})
    build = {
        "zero": lambda: Zero(),
        "epsilon": lambda: Epsilon(eps),
        "gamma": lambda: Gamma(gamma, eps),
        "alpha_beta": lambda: AlphaBeta(alpha, beta),
        "alpha1beta0": lambda: AlphaBeta(1.0, 0.0),
        "alpha2beta1": lambda: AlphaBeta(2.0, 1.0),
        "zplus": ZPlus,
        "zbox": lambda: ZBox(low, high),
        "wsquare": lambda: WSquare(),
        "flat": lambda: Flat(),
    }
    if spec not in build:
        from attrax.errors import unknown_name

        raise unknown_name("LRP rule", str(spec), build)
    return build[spec]()


# ---------------------------------------------------------------------------------------------
# Composites: map layers to rules by path, position and type


SELECTORS = ("first", "last", "conv", "dense", "default")


def _prefixes(name: str) -> list[str]:
    """'a/b/c' -> ['a/b/c', 'a/b', 'a'] (and the name without an '@k' call suffix)."""
    base = name.split("@")[0]
    parts = base.split("/")
    out = [name] if name != base else []
    return out + ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def composite(mapping: Mapping[str, Any], **rule_kw) -> Callable[[LayerInfo], Any]:
    """A rule map. Keys: a layer path ("dense1", "block1/conv1") or a module path prefix
    ("block2", "Block_0/MlpBlock_0": every layer inside), "first", "last", "conv", "dense" or
    "default"; the most specific key wins (path > longer prefix > first/last > type > default).
    Values: rule names or `{name: ..., <param>: value}` mappings. Unmapped layers get LRP-0.
    """
    mapping = dict(mapping)
    rules = {k: make_rule(v, **rule_kw) for k, v in mapping.items()}

    def pick(info: LayerInfo):
        for key in (*_prefixes(info.name), "first" if info.first else None, "last" if info.last else None,
                    info.kind, "default"):
            if key is not None and key in rules:
                return rules[key]
        return Zero()

    return pick


def check_composite_keys(mapping: Mapping[str, Any], structure: Structure) -> None:
    names = {info.name for info in structure.layers}
    known = {p for n in names for p in _prefixes(n)}
    bad = [k for k in mapping if k not in SELECTORS and k not in known]
    if bad:
        raise AttraxError(
            f"rule map keys {bad} match no layer; use {', '.join(SELECTORS)} or a layer path: "
            f"{', '.join(sorted(names))}"
        )


# ---------------------------------------------------------------------------------------------
# The propagation pass


def start_cotangent(logits: Array, target: Array, start: str, eps: float = 1e-6) -> Array:
    """Cotangent at the logits for a start relevance R_c (R = logit * cotangent).

    "logit": R_c = f_c (default); "probability": R_c = softmax_c (the tutorial's start);
    "one": R_c = 1 (Zennit's one-hot start); "relu_logit": R_c = max(f_c, 0) (deep Taylor).
    """
    onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
    logits = jax.lax.stop_gradient(logits)
    f = jnp.sum(logits * onehot, axis=-1, keepdims=True)
    if start == "logit":
        return onehot
    if start == "relu_logit":
        return onehot * (f > 0)
    if start == "one":
        return onehot / stabilize(f, eps)
    if start == "probability":
        p = jnp.sum(jax.nn.softmax(logits, axis=-1) * onehot, axis=-1, keepdims=True)
        return onehot * p / stabilize(f, eps)
    raise AttraxError(f"unknown start {start!r}: use one of {', '.join(STARTS)}")




def ruled_linear(rule, layer: Linear, a: Array, info: LayerInfo) -> Array:
    """The layer's output with `rule` as its backward pass (kernel and bias: constants)."""
    first = info.at_input

    @jax.custom_vjp
    def f(t, k, b):
        return dataclasses.replace(layer, kernel=k, bias=b)(t)

    def fwd(t, k, b):
        lay = dataclasses.replace(layer, kernel=k, bias=b)
        z = lay(t)
        return z, (t, z, k, b)

    def bwd(res, g):
        t, z, k, b = res
        lay = dataclasses.replace(layer, kernel=k, bias=b, a_spec=jax.ShapeDtypeStruct(t.shape, t.dtype))
        return rule.backward(lay, t, z, g, first), jnp.zeros_like(k), jnp.zeros_like(b)

    f.defvjp(fwd, bwd)
    return f(a, layer.kernel, layer.bias)


def _pattern_linear(layer: Linear, a: Array, back_kernel: Array) -> Array:
    """Forward: the layer; backward: transpose with `back_kernel` (no rule, no input factor)."""

    @jax.custom_vjp
    def f(t, k, b, bk):
        return dataclasses.replace(layer, kernel=k, bias=b)(t)

    def fwd(t, k, b, bk):
        return f(t, k, b, bk), (t, k, b, bk)

    def bwd(res, g):
        t, k, b, bk = res
        lay = dataclasses.replace(layer, kernel=k, bias=b, a_spec=jax.ShapeDtypeStruct(t.shape, t.dtype))
        return lay.transpose(g, bk), jnp.zeros_like(k), jnp.zeros_like(b), jnp.zeros_like(bk)

    f.defvjp(fwd, bwd)
    return f(a, layer.kernel, layer.bias, back_kernel)


def max_pool_rule(x6: Array, pooling: str) -> Array:
    """Max pooling over (n, oh, k, ow, k, c) windows with winner-take-all or proportional
    redistribution.

    "winner": all relevance of a window to its (first) maximum, i.e. the max's gradient;
    "proportional": R_j = a_j / sum_window(a) R (the window treated as a sum; -inf padding
    gets nothing).
    """
    if pooling == "winner":
        return _engine.window_max(x6)

    @jax.custom_vjp
    def f(t):
        return t.max(axis=(2, 4))

    def fwd(t):
        y = t.max(axis=(2, 4))
        return y, (t, y)

    def bwd(res, g):
        t, y = res
        t0 = jnp.where(jnp.isfinite(t), t, 0.0)
        s = y * g / stabilize(t0.sum(axis=(2, 4)), TINY)
        return (jnp.broadcast_to(s[:, :, None, :, None, :], t.shape) * (jnp.isfinite(t)),)

    f.defvjp(fwd, bwd)
    return f(x6)


def window_pool_rule(op, t: Array, pooling: str) -> Array:
    """Any `reduce_window_max` equation `op` (overlapping windows, stride < window, e.g. the
    3x3 stride-2 pooling of ResNets; any padding or dilation) applied to `t`, with the pooling rule.

    "winner": the max's own gradient (JAX routes each window's relevance to its first maximum),
    i.e. winner-take-all; "proportional": the z-rule over every window,
    R_j = sum_{windows w containing j} a_j / sum_{i in w} a_i R_w, so overlapping windows
    accumulate (padding contributes nothing). Both conserve relevance window by window.
    """
    maxf = _engine.bind_fn(op)
    if pooling == "winner":
        return maxf(t)
    p = op.params

    def wsum(u):
        return jax.lax.reduce_window(u, np.zeros((), u.dtype), jax.lax.add, p["window_dimensions"],
                                     p["window_strides"], p["padding"], p["base_dilation"], p["window_dilation"])

    @jax.custom_vjp
    def f(u):
        return maxf(u)

    def fwd(u):
        y = maxf(u)
        return y, (u, y)

    def bwd(res, g):
        u, y = res
        s, vjp = jax.vjp(wsum, u)
        (g_in,) = vjp(y * g / stabilize(s, TINY))  # R_j / a_j: the window shares, summed over windows
        return (g_in,)

    f.defvjp(fwd, bwd)
    return f(t)


def _identity_rule(fn: Callable[[Array], Array], v: Array, eps: float) -> Array:
    """Elementwise y = fn(v) passing relevance unchanged (AttnLRP's identity rule)."""

    @jax.custom_vjp
    def f(t):
        return fn(t)

    def fwd(t):
        y = fn(t)
        return y, (t, y)

    def bwd(res, g):
        t, y = res
        return (g * y / stabilize(t, eps),)

    f.defvjp(fwd, bwd)
    return f(v)


def _uniform_product(op_fn: Callable, a: Array, b: Array, eps: float) -> Array:
    """z = a (.) b (matmul or elementwise) splitting relevance half-half between the factors,
    each half by the epsilon rule (AttnLRP's uniform rule for bilinear products)."""

    @jax.custom_vjp
    def f(u, v):
        return op_fn(u, v)

    def fwd(u, v):
        z, vjp = jax.vjp(op_fn, u, v)
        return z, (z, vjp)

    def bwd(res, g):
        z, vjp = res
        gu, gv = vjp(g * z / stabilize(z, eps))
        return 0.5 * gu, 0.5 * gv

    f.defvjp(fwd, bwd)
    return f(a, b)


def _stabilized_sum(op_fn: Callable, ins: list, eps: float) -> Array:
    """y = a sum of activations (residual add, pooling sum, mean) with the z-rule
    R_i = x_i / (y + eps sign(y)) R as its backward pass."""

    @jax.custom_vjp
    def f(*xs):
        return op_fn(*xs)

    def fwd(*xs):
        y, vjp = jax.vjp(op_fn, *xs)
        return y, (y, vjp)

    def bwd(res, g):
        y, vjp = res
        return vjp(g * y / stabilize(y, eps))

    f.defvjp(fwd, bwd)
    return f(*ins)


def lrp_handler(rule_for, *, pooling: str = "winner", canonize: bool = True, kernel_for=None,
                transformer: str = "attn_lrp", eps: float = 1e-6, sum_eps: float = 0.0):
    """The engine handler of LRP (and of PatternNet with `kernel_for`)."""
    if pooling not in POOLINGS:
        raise AttraxError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    if transformer not in TRANSFORMER_RULES:
        raise AttraxError(f"unknown transformer rules {transformer!r}: use one of {', '.join(TRANSFORMER_RULES)}")

    def handle(node, env):
        kind = node.kind
        if kind == "linear":
            a = env[node.ins[0]]
            k, b, rest = _engine.linear_parts(node, env, canonize)
            layer = _engine.make_linear(node, a, k, b)
            if kernel_for is not None:
                z = _pattern_linear(layer, a, kernel_for(node.info, k, b))
            elif rule_for is None:
                z = layer(a)
            else:
                z = ruled_linear(rule_for(node.info), layer, a, node.info)
            return _engine.finish_linear(node, env, rest, z)
        if kind == "maxpool":
            if node.extra["form"] == "generic":  # overlapping (or otherwise irregular) windows
                return window_pool_rule(node.ops[0], env[node.ins[0]], pooling)
            return max_pool_rule(_engine.to6(node, env[node.ins[0]]), pooling)
        if kind == "sum":
            if not sum_eps:
                return None
            acts = [_engine.read(env, i) for i in node.ins if not isinstance(i, _engine.Lit)]
            return _stabilized_sum(_engine.sum_fn(node, env), acts, sum_eps)
        if transformer == "gradient":
            return None
        if kind == "norm" or (kind == "softmax" and transformer == "cp_lrp"):
            return jax.lax.stop_gradient(_engine.region_fn(node, env)(env[node.ins[0]]))
        if kind == "activation":
            return _identity_rule(_engine.region_fn(node, env), env[node.ins[0]], eps)
        if kind == "bilinear" and transformer == "attn_lrp":
            detached = [f == "norm" for f in node.extra.get("factors", [])]
            if not any(detached):
                u, v = (_engine.read(env, i) for i in node.ins)
                return _uniform_product(_engine.bind_fn(node.ops[0]), u, v, eps)
        return None

    return handle


def canonized_forward(model, params: Any, x: Array, *, canonize: bool = True) -> Array:
    """The logits computed through the rule machinery (BatchNorm folded when `canonize`):
    equal to `model(params, x)` up to float rounding."""
    graph = _engine.graph_of(model, params, x)
    return _engine.evaluate(graph, params, x, lrp_handler(None, canonize=canonize, transformer="gradient"))


def propagate(
    model,
    params: Any,
    x: Array,
    cotangent: Callable[[Array], Array],
    rule_for: Callable[[LayerInfo], Any] | None,
    *,
    pooling: str = "winner",
    canonize: bool = True,
    kernel_for: Callable[[LayerInfo, Array, Array], Array] | None = None,
    transformer: str = "attn_lrp",
    eps: float = 1e-6,
    sum_eps: float = 0.0,
    unknown: str = "error",
) -> Array:
    """Cotangent at the input of one forward + one rule-modified backward pass.

    `cotangent(logits) -> array` seeds the backward pass; `rule_for(info)` picks a rule per
    linear layer; or `kernel_for(info, kernel, bias) -> kernel'` makes each linear layer's
    backward pass the plain transpose with kernel' (PatternNet/PatternAttribution, where the
    cotangent is the signal itself). `transformer`: "attn_lrp" (default; AttnLRP, Achtibat et
    al. 2024: normalization scaling constant, softmax by its gradient x input, products of two
    activations split half-half by the epsilon rule), "cp_lrp" (Ali et al. 2022: normalization
    scaling and softmax constant in the backward pass, products then linear in the other
    factor) or "gradient" (every such equation keeps its gradient). With both transformer rule
    sets, elementwise nonlinearities other than ReLU (gelu, tanh, silu...) pass relevance
    unchanged (identity rule). The forward pass and logits are the model's own.
    """
    graph = _engine.graph_of(model, params, x)
    _engine.check_unknown(graph, unknown)
    handle = lrp_handler(rule_for, pooling=pooling, canonize=canonize, kernel_for=kernel_for,
                         transformer=transformer, eps=eps, sum_eps=sum_eps)
    logits, vjp = jax.vjp(lambda xx: _engine.evaluate(graph, params, xx, handle), x)
    (r,) = vjp(cotangent(logits))
    return r
