"""Layer rules: relevance propagation through an unmodified Flax linen model.

The mechanism (shared by LRP, deep Taylor and PatternNet/PatternAttribution)
----------------------------------------------------------------------------
1. `layer_structure` traces the model once (`jax.eval_shape`, no compute) under
   `nn.intercept_methods` and lists every `nn.Dense` / `nn.Conv` call (the *linear layers*,
   by module path, in call order), every pooling module, and every `nn.BatchNorm` whose input is
   the output of a linear layer (the BatchNorm canonizer merges it into that layer).
2. `propagate` runs the forward pass again under an interceptor that replaces each linear layer
   by a `jax.custom_vjp` function: the forward is the layer's own output (with merged BatchNorm:
   unchanged logits), the backward implements the layer's rule. Pooling modules (`MaxPool`)
   get the selected pooling rule; everything else (ReLU, reshape, residual additions, average
   pooling) keeps its ordinary gradient, which is LRP-0 for linear ops and passes relevance
   through active ReLUs.
3. Convention: the cotangent flowing backwards is a *modified gradient* g with relevance
   R = a * g at every activation a (so relevance at a layer output z is z * g). Only the first
   linear layer returns its input relevance itself, so that input-dependent rules (z^B, flat,
   w^2) never divide by the input. The method's map is the cotangent at the input.

Rules are small frozen dataclasses with one method, `backward(layer, a, z, g, first)`; a
composite is a function from a `LayerInfo` (path, kind, position) to a rule. References:
Bach et al. 2015 (LRP), Montavon et al. 2017/2018 (deep Taylor, z^B, gamma), Kohlbrenner et al.
2020 (composites, flat), Montavon et al. 2019 "Layer-wise relevance propagation: an overview".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.models import MaxPool

Array = jax.Array

#: Denominator guard of the non-epsilon rules (only prevents 0/0; far below float32 resolution of z).
TINY = 1e-12
LINEAR_TYPES = (nn.Dense, nn.Conv)
STARTS = ("logit", "probability", "one", "relu_logit")
POOLINGS = ("winner", "proportional")


def stabilize(z: Array, eps: float) -> Array:
    """z + eps * sign(z) with sign(0) = +1."""
    return jnp.where(z >= 0, z + eps, z - eps)


# ---------------------------------------------------------------------------------------------
# Layer structure


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One linear layer of a model: where it is and what it is.

    `kind` is "dense" or "conv"; `index` its position among linear layers (call order); `first`
    / `last` mark the first and last linear layers; `bn` the path of a BatchNorm merged into it;
    `nonnegative_input` says the layer's input was >= 0 for random-normal probe inputs and
    random parameters, i.e. it follows a ReLU-like activation (rules then skip the negative-input
    terms, which are zero there).
    """

    path: tuple[str, ...]
    kind: str
    index: int
    first: bool
    last: bool
    bn: tuple[str, ...] | None = None
    nonnegative_input: bool = False  # input >= 0 for random probes (e.g. after a ReLU)

    @property
    def name(self) -> str:
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class Structure:
    layers: tuple[LayerInfo, ...]
    bn: Mapping[tuple[str, ...], dict]  # merged BatchNorm path -> its settings

    def by_path(self) -> dict[tuple[str, ...], LayerInfo]:
        return {info.path: info for info in self.layers}


def _is_call(ctx) -> bool:
    return ctx.method_name == "__call__" and ctx.module.path != ()


def layer_structure(model, params: Any, x: Array) -> Structure:
    """The linear layers of `model` in call order (traced abstractly; no compute)."""
    found: list[tuple[tuple[str, ...], str]] = []
    outputs: dict[int, tuple[str, ...]] = {}
    bns: dict[tuple[str, ...], dict] = {}
    merged: dict[tuple[str, ...], tuple[str, ...]] = {}

    def interceptor(next_fun, args, kwargs, ctx):
        if not _is_call(ctx):
            return next_fun(*args, **kwargs)
        mod = ctx.module
        out = next_fun(*args, **kwargs)
        if isinstance(mod, LINEAR_TYPES):
            found.append((mod.path, "dense" if isinstance(mod, nn.Dense) else "conv"))
            outputs[id(out)] = mod.path
        elif isinstance(mod, nn.BatchNorm) and args and id(args[0]) in outputs:
            src = outputs[id(args[0])]
            if src not in merged:
                merged[src] = mod.path
                bns[mod.path] = {"epsilon": mod.epsilon, "use_scale": mod.use_scale,
                                 "use_bias": mod.use_bias, "axis": mod.axis,
                                 "running": mod.use_running_average}
        return out

    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), (params, x))
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p, xx: model(p, xx), *spec)
    if not found:
        raise AttraxError(
            f"model {model.name!r} has no nn.Dense / nn.Conv layers for relevance rules to attach to"
        )
    paths = [p for p, _ in found]
    if len(set(paths)) != len(paths):
        raise AttraxError("relevance rules need each Dense/Conv layer to be called once per forward pass")
    n = len(found)
    nonneg = _nonnegative_inputs(model, *spec)
    layers = tuple(
        LayerInfo(p, k, i, i == 0, i == n - 1, merged.get(p), bool(nonneg.get(p, False)))
        for i, (p, k) in enumerate(found)
    )
    return Structure(layers, bns)


def _nonnegative_inputs(model, params_spec, x_spec) -> dict[tuple[str, ...], bool]:
    """Which linear layers see only non-negative inputs, from 4 random-normal probe inputs
    through random parameters (a structural property: the layer follows a ReLU-like map)."""
    rng = np.random.default_rng(0)
    flat, tree = jax.tree_util.tree_flatten_with_path(params_spec)
    leaves = []
    for path, s in flat:
        v = rng.normal(size=s.shape)
        if str(getattr(path[-1], "key", "")) == "var":
            v = np.abs(v) + 0.5
        leaves.append(np.asarray(v, s.dtype))
    probe_params = jax.tree.unflatten(tree, leaves)
    probe_x = np.asarray(rng.normal(size=(4,) + tuple(x_spec.shape[1:])), x_spec.dtype)

    def mins(p, xx):
        out: dict[tuple[str, ...], Array] = {}

        def interceptor(next_fun, args, kwargs, ctx):
            if _is_call(ctx) and isinstance(ctx.module, LINEAR_TYPES):
                out[ctx.module.path] = jnp.min(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model(p, xx)
        return out

    # one ahead-of-time compiled call: concrete even when called inside a jit trace
    compiled = jax.jit(mins).lower(probe_params, probe_x).compile()
    with jax.ensure_compile_time_eval():
        found = compiled(probe_params, probe_x)
        return {k: bool(np.asarray(v) >= 0) for k, v in found.items()}


def structure_of(model, params: Any, x: Array) -> Structure:
    """`layer_structure`, memoized on the model per input shape."""
    return model.cached(("layer_structure", tuple(x.shape[1:])), lambda: layer_structure(model, params, x))


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def effective_params(params: Any, info: LayerInfo, structure: Structure, canonize: bool = True):
    """(kernel, bias) of a linear layer, with its BatchNorm merged in when `canonize`.

    BatchNorm (inference mode) y = scale * (z - mean) / sqrt(var + eps) + beta merged into the
    preceding layer: kernel * s, (bias - mean) * s + beta with s = scale / sqrt(var + eps).
    """
    p = _get(params["params"], info.path)
    kernel = p["kernel"]
    bias = p.get("bias", jnp.zeros(kernel.shape[-1], kernel.dtype))
    if canonize and info.bn is not None:
        cfg = structure.bn[info.bn]
        bp = _get(params["params"], info.bn)
        st = _get(params["batch_stats"], info.bn)
        s = jax.lax.rsqrt(st["var"] + cfg["epsilon"])
        if cfg["use_scale"]:
            s = s * bp["scale"]
        kernel = kernel * s
        bias = (bias - st["mean"]) * s + (bp["bias"] if cfg["use_bias"] else 0.0)
    return kernel, bias


def _check_canonizable(structure: Structure) -> None:
    for path, cfg in structure.bn.items():
        if not cfg["running"]:
            raise AttraxError(f"BatchNorm {'/'.join(path)} runs in training mode; relevance needs inference mode")
        if cfg["axis"] not in (-1,):
            raise AttraxError(f"BatchNorm {'/'.join(path)} normalizes axis {cfg['axis']}; only -1 can be merged")


# ---------------------------------------------------------------------------------------------
# A linear layer as a function of (input, kernel)


@dataclasses.dataclass(frozen=True)
class Linear:
    """z = op(a, kernel) + bias for one Dense/Conv layer, with its transposes."""

    op: Callable[[Array, Array], Array]  # bias-free layer function
    a_spec: jax.ShapeDtypeStruct
    kernel: Array
    bias: Array
    groups: int = 1  # Conv feature_group_count (stacked kernels need 1)
    nonnegative_input: bool = False

    def __call__(self, a: Array, kernel: Array | None = None, bias: Array | None = None) -> Array:
        z = self.op(a, self.kernel if kernel is None else kernel)
        return z + (self.bias if bias is None else bias)

    def transpose(self, s: Array, kernel: Array | None = None) -> Array:
        """(d z / d a)^T s for the layer with `kernel` (the layer's own by default)."""
        k = self.kernel if kernel is None else kernel
        (t,) = jax.linear_transpose(lambda a: self.op(a, k), self.a_spec)(s)
        return t

    def op_stacked(self, aa: Array, *kernels: Array) -> Array:
        """sum_i op(a_i, k_i) for inputs stacked along the feature axis (one call)."""
        if self.groups != 1:
            parts = jnp.split(aa, len(kernels), -1)
            return sum(self.op(p, k) for p, k in zip(parts, kernels, strict=True))
        return self.op(aa, jnp.concatenate(kernels, -2))

    def transpose_stacked(self, s: Array, *kernels: Array) -> list[Array]:
        """[(d op(., k_i) / d a)^T s for each k_i], from one call when possible."""
        if self.groups != 1:
            return [self.transpose(s, k) for k in kernels]
        n = len(kernels)
        spec = jax.ShapeDtypeStruct(self.a_spec.shape[:-1] + (self.a_spec.shape[-1] * n,), self.a_spec.dtype)
        kk = jnp.concatenate(kernels, -2)
        (t,) = jax.linear_transpose(lambda u: self.op(u, kk), spec)(s)
        return jnp.split(t, n, -1)

    def kernel_transpose(self, a: Array, s: Array) -> Array:
        """sum over examples and positions of patch(a) * s: the kernel-shaped statistic."""
        spec = jax.ShapeDtypeStruct(self.kernel.shape, self.kernel.dtype)
        (t,) = jax.linear_transpose(lambda k: self.op(a, k), spec)(s)
        return t


def linear_from_module(mod: nn.Module, a: Array, kernel: Array, bias: Array, nonnegative_input: bool = False) -> Linear:
    """The layer as a pure function of (input, kernel); the kernel may have more outputs
    (kernels stacked along the last axis compute several modified layers in one call)."""

    def op(t, k):
        bare = mod.clone(parent=None, use_bias=False, features=k.shape[-1])
        return bare.apply({"params": {"kernel": k}}, t)

    groups = getattr(mod, "feature_group_count", 1)
    return Linear(op, jax.ShapeDtypeStruct(a.shape, a.dtype), kernel, bias, groups, nonnegative_input)


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


def composite(mapping: Mapping[str, Any], **rule_kw) -> Callable[[LayerInfo], Any]:
    """A rule map. Keys: a layer path ("dense1", "block1/conv1"), "first", "last", "conv",
    "dense" or "default"; the most specific key wins (path > first/last > type > default).
    Values: rule names or `{name: ..., <param>: value}` mappings. Unmapped layers get LRP-0.
    """
    mapping = dict(mapping)
    rules = {k: make_rule(v, **rule_kw) for k, v in mapping.items()}

    def pick(info: LayerInfo):
        for key in (info.name, "first" if info.first else None, "last" if info.last else None,
                    info.kind, "default"):
            if key is not None and key in rules:
                return rules[key]
        return Zero()

    return pick


def check_composite_keys(mapping: Mapping[str, Any], structure: Structure) -> None:
    names = {info.name for info in structure.layers}
    bad = [k for k in mapping if k not in SELECTORS and k not in names]
    if bad:
        raise AttraxError(
            f"rule map keys {bad} match no layer; use {', '.join(SELECTORS)} or a layer path: "
            f"{', '.join(sorted(names))}"
        )


# ---------------------------------------------------------------------------------------------
# Pooling


def windows(t: Array, k: int, padding: str) -> tuple[Array, Callable[[Array], Array]]:
    """Non-overlapping k x k windows of NHWC `t` as (n, Ho, Wo, C, k*k), padded like
    `nn.max_pool` (SAME: -inf before/after), and the map from window values back to `t`'s shape."""
    n, h, w, c = t.shape
    if padding == "SAME":
        ho, wo = -(-h // k), -(-w // k)
    elif padding == "VALID":
        ho, wo = h // k, w // k
    else:
        raise AttraxError(f"max pooling rules support SAME or VALID padding, got {padding!r}")
    ph, pw = ho * k - h, wo * k - w
    top, left = max(ph, 0) // 2, max(pw, 0) // 2
    tt = t[:, : ho * k, : wo * k] if padding == "VALID" else jnp.pad(
        t, ((0, 0), (top, ph - top), (left, pw - left), (0, 0)), constant_values=-jnp.inf)
    v = tt.reshape(n, ho, k, wo, k, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, k * k)

    def back(u: Array) -> Array:
        full = u.reshape(n, ho, wo, c, k, k).transpose(0, 1, 4, 2, 5, 3).reshape(n, ho * k, wo * k, c)
        if padding == "SAME":
            return full[:, top: top + h, left: left + w]
        return jnp.pad(full, ((0, 0), (0, h - ho * k), (0, w - wo * k), (0, 0)))

    return v, back


def max_pool_rule(mod, a: Array, out: Array, pooling: str) -> Array:
    """Max pooling (window = stride) with winner-take-all or proportional redistribution.

    "winner": all relevance of a window to its (first) maximum, i.e. the max's gradient;
    "proportional": R_j = a_j / sum_window(a) R (the window treated as a sum). Both route through
    one-hot / broadcast window views, which is ~3x faster on CPU than the max's generic gradient.
    """
    k = mod.window

    def pool(t):
        return nn.max_pool(t, (k, k), strides=(k, k), padding=mod.padding)

    @jax.custom_vjp
    def f(t):
        return pool(t)

    def fwd(t):
        return pool(t), t

    def bwd(t, g):
        v, back = windows(t, k, mod.padding)
        if pooling == "winner":
            share = jax.nn.one_hot(jnp.argmax(v, -1), k * k, dtype=t.dtype)
            return (back(share * g[..., None]),)
        v0 = jnp.where(jnp.isfinite(v), v, 0.0)
        y = jnp.max(v, -1)
        s = y * g / stabilize(v0.sum(-1), TINY)
        return (back(jnp.broadcast_to(s[..., None], v.shape)),)

    f.defvjp(fwd, bwd)
    return f(a)


# ---------------------------------------------------------------------------------------------
# The propagation pass


def ruled_linear(rule, mod: nn.Module, a: Array, kernel: Array, bias: Array, info: LayerInfo) -> Array:
    """The layer's output with `rule` as its backward pass."""
    first = info.first

    @jax.custom_vjp
    def f(t, k, b):
        return linear_from_module(mod, t, k, b)(t)

    def fwd(t, k, b):
        layer = linear_from_module(mod, t, k, b)
        z = layer(t)
        return z, (t, z, k, b)

    def bwd(res, g):
        t, z, k, b = res
        layer = linear_from_module(mod, t, k, b, info.nonnegative_input)
        return rule.backward(layer, t, z, g, first), jnp.zeros_like(k), jnp.zeros_like(b)

    f.defvjp(fwd, bwd)
    return f(a, kernel, bias)


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


def _interceptor(model, params, x, rule_for, pooling, canonize, kernel_for):
    if pooling not in POOLINGS:
        raise AttraxError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    st = structure_of(model, params, x)
    if canonize:
        _check_canonizable(st)
    infos = st.by_path()
    merged_bn = set(st.bn) if canonize else set()

    def interceptor(next_fun, args, kwargs, ctx):
        if not _is_call(ctx):
            return next_fun(*args, **kwargs)
        mod, path = ctx.module, ctx.module.path
        if path in infos:
            info = infos[path]
            kernel, bias = effective_params(params, info, st, canonize)
            if kernel_for is not None:
                return _pattern_linear(mod, args[0], kernel, bias, kernel_for(info, kernel, bias))
            return ruled_linear(rule_for(info), mod, args[0], kernel, bias, info)
        if path in merged_bn:
            return args[0]
        if isinstance(mod, MaxPool):
            return max_pool_rule(mod, args[0], next_fun(*args, **kwargs), pooling)
        return next_fun(*args, **kwargs)

    return interceptor


def canonized_forward(model, params: Any, x: Array, *, canonize: bool = True) -> Array:
    """The logits computed through the rule machinery (BatchNorm merged when `canonize`):
    equal to `model(params, x)` up to float rounding."""
    interceptor = _interceptor(model, params, x, lambda info: Zero(), "winner", canonize, None)
    with nn.intercept_methods(interceptor):
        return model(params, x)


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
) -> Array:
    """Cotangent at the input of one forward + one rule-modified backward pass.

    `cotangent(logits) -> array` seeds the backward pass; `rule_for(info)` picks a rule per
    linear layer; or `kernel_for(info, kernel, bias) -> kernel'` makes each linear layer's
    backward pass the plain transpose with kernel' (PatternNet/PatternAttribution, where the
    cotangent is the signal itself). The forward pass and logits are the model's own.
    """
    interceptor = _interceptor(model, params, x, rule_for, pooling, canonize, kernel_for)

    def fwd(xx):
        with nn.intercept_methods(interceptor):
            return model(params, xx)

    logits, vjp = jax.vjp(fwd, x)
    (r,) = vjp(cotangent(logits))
    return r


def _pattern_linear(mod, a, kernel, bias, back_kernel):
    """Forward: the layer; backward: transpose with `back_kernel` (no rule, no input factor)."""

    @jax.custom_vjp
    def f(t, k, b):
        return linear_from_module(mod, t, k, b)(t)

    def fwd(t, k, b):
        return linear_from_module(mod, t, k, b)(t), (t, k, b)

    def bwd(res, g):
        t, k, b = res
        layer = linear_from_module(mod, t, k, b)
        return layer.transpose(g, back_kernel), jnp.zeros_like(k), jnp.zeros_like(b)

    f.defvjp(fwd, bwd)
    return f(a, kernel, bias)
