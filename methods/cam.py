"""Class activation maps: CAM, Grad-CAM, Grad-CAM++, Guided Grad-CAM and Score-CAM.

All five explain a class through spatial feature maps A (n, h, w, K) of a layer:

- `layer="features"` (default): the zoo model's `features` stage (the last spatial maps, after the
  activation) with `head(A) -> logits` as the rest of the network.
- `layer="<name>"`: the output of a named Flax submodule (`"conv1"`, `"pool1"`, or a path
  `"block2/conv1"`), found with `nn.intercept_methods`; the rest of the network is the model with
  that submodule's output replaced. Note that a zoo conv module's output is taken BEFORE its
  activation; name a pooling layer (or use `features`) for post-activation maps. On any other
  model (plain apply_fn, nnx) and for names that are not submodules, the layer is read off the
  rule engine's trace (`attrax.methods._engine.find_layer`): a module path, a linear layer
  ("conv_1"), or an intermediate such as "relu_1" / "maxpool_0".
- a model without `features`/`head` and `layer="features"` (default): the last spatial
  activation of the trace (`_engine.last_spatial_layer`).

The low-resolution map (n, h, w) is upsampled to the input size with `jax.image.resize`
(`upsample="bilinear"` by default) and broadcast over the input's channels, so the relevance has
the input's shape with the same value in every channel (sum over channels multiplies it by C).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attrax.errors import AttraxError
from attrax.methods import _engine
from attrax.methods._core import METHODS, class_score, input_gradient

Array = jax.Array
UPSAMPLE = ("bilinear", "nearest", "cubic")
GRAD_CAM_PP_VARIANTS = ("paper", "tutorial")
SCORE_CAM_WEIGHTINGS = ("scores", "softmax")


# ---------------------------------------------------------------------------------------------
# Layers: the spatial maps A and the rest of the network as a function of A


def _matches(module: nn.Module, layer: str) -> bool:
    path = "/".join(str(p) for p in module.path)
    return bool(path) and (path == layer or path.endswith("/" + layer) or module.name == layer)


def layer_output(
    model, params: Any, x: Array, layer: str, replace: Array | None = None
) -> tuple[Array, Array]:
    """(output of the named submodule, logits), optionally with that output replaced by `replace`.

    The submodule is the first `__call__` whose path (`"conv1"`, `"block2/conv1"`) or name equals
    `layer`. With `replace` the logits are those of the network downstream of the layer, evaluated
    at `replace` (gradients flow into it); everything upstream is dead code that XLA removes.
    """
    if model.module is None:  # any JAX model: the layer is read off the trace
        return _engine.layer_value(model, params, x, layer, replace)
    found: list[Array] = []
    seen: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or found or not _matches(context.module, layer):
            if context.method_name == "__call__" and context.module.path:
                seen.append("/".join(str(p) for p in context.module.path))
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        found.append(out)
        return out if replace is None else replace

    with nn.intercept_methods(interceptor):
        logits = model.module.apply(params, x)
    if not found:  # not a submodule: an intermediate of the trace ("relu_1", "maxpool_0", ...)
        try:
            return _engine.layer_value(model, params, x, layer, replace)
        except AttraxError:
            raise AttraxError(
                f"model {model.name!r} has no layer {layer!r}; "
                f"layers: {', '.join(dict.fromkeys(seen)) or 'none'}; or an intermediate: "
                f"{', '.join(_engine.graph_of(model, params, x).labels)}"
            ) from None
    return found[0], logits


def spatial_stages(
    model, params: Any, x: Array, layer: str = "features"
) -> tuple[Array, Callable[[Array], Array]]:
    """(A, rest): A (n, h, w, K) the maps of `layer`, `rest(A) -> logits` the network above it."""
    if x.ndim != 4:
        raise AttraxError(f"class activation maps need NHWC images, got input shape {x.shape}")
    if layer == "features" and not model.has_stages:
        # any other model: the last spatial activation of the trace (ReLU, activation, max
        # pooling or conv output), e.g. the last conv block's ReLU
        layer = _engine.last_spatial_layer(model, params, x)
    if layer == "features":
        a = model.features(params, x)
        rest = lambda aa: model.head(params, aa)  # noqa: E731
    else:
        a, _ = layer_output(model, params, x, layer)
        rest = lambda aa: layer_output(model, params, x, layer, replace=aa)[1]  # noqa: E731
    if a.ndim != 4:
        raise AttraxError(
            f"layer {layer!r} of {model.name!r} gives shape {a.shape}; class activation maps need "
            "spatial maps (n, h, w, K): choose a convolutional layer"
        )
    return a, rest


def upsample_map(m: Array, x: Array, method: str = "bilinear") -> Array:
    """Resize maps (n, h, w) to the input's (n, H, W) and broadcast them over its channels."""
    if method not in UPSAMPLE:
        raise AttraxError(f"unknown upsample {method!r}: use one of {', '.join(UPSAMPLE)}")
    n, h, w = x.shape[:3]
    up = m if m.shape[1:3] == (h, w) else jax.image.resize(m, (n, h, w), method)
    return jnp.broadcast_to(up[..., None], x.shape).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# CAM's head check: the network above the maps must be global average pooling -> linear

_LINEAR = {"convert_element_type", "copy", "copy_p", "neg", "reshape", "squeeze", "expand_dims",
           "broadcast_in_dim", "transpose", "reduce_sum", "dot_general", "add", "sub", "mul", "div",
           "add_any"}
_WORDS = {"max": "a maximum (a ReLU or max pooling)", "reduce_max": "max pooling",
          "pad": "padding (of a pooling or convolution window)", "select_n": "a selection (e.g. ReLU)",
          "reduce_window_max": "max pooling", "reduce_window_sum": "windowed (local) pooling"}
_PER_POSITION = {"add", "sub", "add_any", "neg", "convert_element_type", "copy", "copy_p"}


def _sub_jaxpr(eqn):
    """The inner jaxpr of a call-like equation (pjit, closed_call, custom_jvp/vjp, remat)."""
    for v in eqn.params.values():
        inner = getattr(v, "jaxpr", v)
        if hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
            return inner
    return None


def _head_problem(jaxpr, states) -> tuple[list, str | None]:
    """Follow the maps A through `jaxpr` with a state per value: None (does not depend on A), "S"
    (affine in A, per position: before pooling) or "P" (affine in A, after the spatial pooling).

    Returns (the outputs' states, the first operation that breaks GAP -> linear, or None).
    """
    env = dict(zip(jaxpr.invars, states, strict=True))

    def get(v):
        return None if isinstance(v, jax.extend.core.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if all(s is None for s in ins):
            continue
        inner = _sub_jaxpr(eqn)
        if inner is not None:
            outs, why = _head_problem(inner, ins)
        else:
            out, why = _head_step(eqn, ins)
            outs = [out] * len(eqn.outvars)
        if why:
            return [], why
        env.update(zip(eqn.outvars, outs, strict=True))
    return [get(v) for v in jaxpr.outvars], None


def _head_step(eqn, ins) -> tuple[str | None, str | None]:
    """The state after one primitive some of whose inputs depend on A (see `_head_problem`)."""
    name = eqn.primitive.name
    if "P" in ins and "S" in ins:
        return None, f"`{name}` to pooled and unpooled maps together"
    stage = "P" if "P" in ins else "S"
    if name not in _LINEAR and not (name == "conv_general_dilated" and stage == "S"):
        return None, _WORDS.get(name, f"`{name}`")
    if name in ("mul", "div", "dot_general", "conv_general_dilated") and ins.count(stage) > 1:
        return None, f"`{name}` of the maps with themselves (not linear)"
    if name == "div" and ins[1] is not None:
        return None, "a division by the maps (not linear)"
    if stage == "P":
        return "P", None
    # before the pooling: only per-position affine maps and the global spatial sum
    i = ins.index("S")
    if name == "reduce_sum":
        axes = set(eqn.params["axes"])
        if {1, 2} <= axes and 0 not in axes:
            return "P", None
        return None, f"a sum over axes {sorted(axes)} (not a global spatial pooling)"
    if name in _PER_POSITION:
        return "S", None
    if name in ("mul", "div"):
        other = eqn.invars[1 - i].aval.shape
        if len(other) == 0 or (len(other) == 4 and other[1] == other[2] == 1):
            return "S", None
        return None, f"`{name}` by a spatially varying weight"
    if name == "dot_general":
        (lc, _), (lb, _) = eqn.params["dimension_numbers"]
        if i == 0 and tuple(lc) == (eqn.invars[0].aval.ndim - 1,) and not lb:
            return "S", None
        return None, "a dense layer across positions (flatten -> dense)"
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec
        if (i == 0 and all(rhs[d] == 1 for d in spec[2:]) and eqn.params["feature_group_count"] == 1
                and all(s == 1 for s in eqn.params["window_strides"])):
            return "S", None
        return None, "a convolution wider than 1x1 or strided"
    return None, f"`{name}` before the global pooling"


def check_gap_linear_head(model, params, x, layer: str = "features") -> None:
    """Raise a one-line AttraxError unless the network above `layer` is global average pooling ->
    linear (per-position affine maps such as 1x1 convolutions before the pooling are allowed:
    they commute with it). Read off the traced computation, so it works under jit."""
    abstract = lambda t: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), t)  # noqa: E731
    a_shape = jax.eval_shape(lambda p, xx: spatial_stages(model, p, xx, layer)[0], params, x)
    closed = jax.make_jaxpr(lambda p, xx, aa: spatial_stages(model, p, xx, layer)[1](aa))(
        abstract(params), abstract(x), a_shape
    )
    n_other = len(closed.jaxpr.invars) - 1
    outs, why = _head_problem(closed.jaxpr, [None] * n_other + ["S"])
    if why is None and "P" not in outs:
        why = "no global spatial pooling"
    if why:
        raise AttraxError(
            f"cam needs a global-average-pooling -> linear head above {layer!r}, but the head of "
            f"{model.name!r} applies {why}; use grad_cam, which is defined on any head"
        )


def _grads(model, params, x, target, layer, score):
    a, rest = spatial_stages(model, params, x, layer)
    _, g = input_gradient(rest, a, target, score)
    return a, g


# ---------------------------------------------------------------------------------------------
# Low-resolution maps (n, h, w): public so that tests and protocols can use them directly


def cam_map(model, params, x, target, *, layer: str = "features") -> Array:
    """CAM at feature resolution: M_c = sum_k w_kc A_k.

    The class weights are read off the network as w_kc = sum_ij d f_c / d A_ijk, which on a
    global-average-pooling -> linear head equals that layer's weights exactly (the gradient is
    w_kc / (h w) everywhere). Other heads are refused with an AttraxError
    (`check_gap_linear_head`): CAM is defined on GAP -> linear heads only (use Grad-CAM there).
    """
    check_gap_linear_head(model, params, x, layer)
    a, g = _grads(model, params, x, target, layer, "logit")
    return jnp.einsum("nk,nhwk->nhw", g.sum(axis=(1, 2)), a)


def grad_cam_map(
    model, params, x, target, *, layer: str = "features", score: str = "logit"
) -> Array:
    """Grad-CAM at feature resolution: ReLU(sum_k alpha_k A_k), alpha_k = mean_ij df_c/dA_ijk."""
    a, g = _grads(model, params, x, target, layer, score)
    return jax.nn.relu(jnp.einsum("nk,nhwk->nhw", g.mean(axis=(1, 2)), a))


def _safe_div(num: Array, den: Array) -> Array:
    ok = jnp.abs(den) > 1e-12
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def grad_cam_pp_map(
    model,
    params,
    x,
    target,
    *,
    layer: str = "features",
    score: str = "logit",
    variant: str = "paper",
) -> Array:
    """Grad-CAM++ at feature resolution (Chattopadhay et al. 2018).

    With g = d f_c / d A and S_k = sum_ab A_abk, the pixel weights are
    alpha_ijk = g^2 / (2 g^2 + S_k g^3) (the higher derivatives of exp(f_c) of a piecewise-linear
    net, as in the paper), evaluated as the equal 1 / (2 + S_k g) wherever g != 0 so that small
    gradients do not underflow, and 0 only where g == 0 or the denominator is exactly 0 (as the
    authors' code; no absolute cut-off on small gradients); the channel weights are
    w_k = sum_ij alpha_ijk ReLU(g_ijk).

    - `variant="paper"`: the paper's reference implementation additionally normalizes alpha_k to
      sum to 1 over the positions with positive gradient.
    - `variant="tutorial"`: the tutorial's simplified alpha = 1 / (2 + g S_k), unnormalized
      (equal to the paper's unnormalized alpha wherever g != 0).

    The constant factor exp(f_c) that both apply to the gradient only scales the map (and
    overflows for large logits), so it is omitted.
    """
    if variant not in GRAD_CAM_PP_VARIANTS:
        raise AttraxError(
            f"unknown Grad-CAM++ variant {variant!r}: use one of {', '.join(GRAD_CAM_PP_VARIANTS)}"
        )
    a, g = _grads(model, params, x, target, layer, score)
    s = a.sum(axis=(1, 2), keepdims=True)
    den = 2.0 + g * s
    ok = (den != 0) & ((g != 0) | (variant == "tutorial"))
    alpha = jnp.where(ok, 1.0 / jnp.where(ok, den, 1.0), 0.0)
    if variant == "paper":
        pos = g > 0
        total = jnp.where(pos, alpha, 0.0).sum(axis=(1, 2), keepdims=True)
        alpha = jnp.where(total != 0, alpha / jnp.where(total != 0, total, 1.0), alpha)
    w = (alpha * jax.nn.relu(g)).sum(axis=(1, 2))
    return jax.nn.relu(jnp.einsum("nk,nhwk->nhw", w, a))


def score_cam_map(
    model,
    params,
    x,
    target,
    *,
    layer: str = "features",
    score: str = "probability",
    upsample: str = "bilinear",
    subtract_baseline: bool = False,
    weighting: str = "scores",
) -> Array:
    """Score-CAM at feature resolution (Wang et al. 2020): ReLU(sum_k w_k A_k).

    s_k = f_c(x * H_k) with H_k the k-th map upsampled to the input size and min-max normalized to
    [0, 1] per image (a constant map gives H_k = 0); all n K masked images go through the model
    in one batched call. `subtract_baseline=True` uses the paper's increase of confidence
    s_k - f_c(0) instead. The channel weights w_k:

    - `weighting="scores"`: w_k = s_k, the form of the authors' repository (haofanwang/Score-CAM,
      with the softmax probability as the score).
    - `weighting="softmax"`: w = softmax over the channels k of s, the paper's Algorithm 1 and
      pytorch-grad-cam's ScoreCAM (which scores with the logit: set `score="logit"` to match it).
    """
    if weighting not in SCORE_CAM_WEIGHTINGS:
        raise AttraxError(
            f"unknown Score-CAM weighting {weighting!r}: use one of {', '.join(SCORE_CAM_WEIGHTINGS)}"
        )
    a, _ = spatial_stages(model, params, x, layer)
    n, k = a.shape[0], a.shape[-1]
    h, w = x.shape[1:3]
    up = a if a.shape[1:3] == (h, w) else jax.image.resize(a, (n, h, w, k), upsample)
    lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    masks = _safe_div(up - lo, hi - lo)  # (n, H, W, K)
    masked = x[:, None] * jnp.moveaxis(masks, -1, 1)[..., None]  # (n, K, H, W, C)
    logits = model(params, masked.reshape((n * k,) + x.shape[1:]))
    s = class_score(logits, jnp.repeat(target, k), score).reshape(n, k)
    if subtract_baseline:
        s = s - class_score(model(params, jnp.zeros_like(x)), target, score)[:, None]
    if weighting == "softmax":
        s = jax.nn.softmax(s, axis=-1)
    return jax.nn.relu(jnp.einsum("nk,nhwk->nhw", s, a))


# ---------------------------------------------------------------------------------------------
# Registered methods: relevance with the input's shape


@METHODS.register("cam", family="cam", needs="apply", stochastic=False, cost=lambda hp: 1)
def cam(
    model, params, x, target, *, key=None, layer: str = "features", upsample: str = "bilinear"
) -> Array:
    """Class activation mapping (Zhou et al. 2016): M_c = sum_k w_kc A_k on a GAP -> linear head.

    Defaults: the `features` stage, bilinear upsampling; the map is not rectified, and its spatial
    mean at feature resolution equals the logit minus the bias on a GAP-linear head.
    """
    return upsample_map(cam_map(model, params, x, target, layer=layer), x, upsample)


@METHODS.register("grad_cam", family="cam", needs="apply", stochastic=False, cost=lambda hp: 1)
def grad_cam(
    model,
    params,
    x,
    target,
    *,
    key=None,
    layer: str = "features",
    score: str = "logit",
    upsample: str = "bilinear",
) -> Array:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of
    d f_c / d A_k. Defaults: `features` stage, logit score, bilinear upsampling."""
    return upsample_map(
        grad_cam_map(model, params, x, target, layer=layer, score=score), x, upsample
    )


@METHODS.register("grad_cam_pp", family="cam", needs="apply", stochastic=False, cost=lambda hp: 1)
def grad_cam_pp(
    model,
    params,
    x,
    target,
    *,
    key=None,
    layer: str = "features",
    score: str = "logit",
    variant: str = "paper",
    upsample: str = "bilinear",
) -> Array:
    """Grad-CAM++ (Chattopadhay et al. 2018), see `grad_cam_pp_map`. Defaults: `features` stage,
    logit score, the paper's normalized weights (`variant="paper"`; or "tutorial"), bilinear."""
    m = grad_cam_pp_map(model, params, x, target, layer=layer, score=score, variant=variant)
    return upsample_map(m, x, upsample)


@METHODS.register(
    "guided_grad_cam", family="cam", needs="apply", stochastic=False, cost=lambda hp: 2
)
def guided_grad_cam(
    model,
    params,
    x,
    target,
    *,
    key=None,
    layer: str = "features",
    score: str = "logit",
    upsample: str = "bilinear",
) -> Array:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop (Springenberg et al. 2015) times
    the upsampled Grad-CAM map, elementwise; any JAX model (guided ReLUs and `layer=` from the trace)."""
    from attrax.methods.backprop import guided_backprop

    gb = guided_backprop(model, params, x, target, score=score)
    return gb * grad_cam(model, params, x, target, layer=layer, score=score, upsample=upsample)


@METHODS.register("score_cam", family="cam", needs="apply", stochastic=False, cost=lambda hp: 64)
def score_cam(
    model,
    params,
    x,
    target,
    *,
    key=None,
    layer: str = "features",
    score: str = "probability",
    upsample: str = "bilinear",
    subtract_baseline: bool = False,
    weighting: str = "scores",
) -> Array:
    """Score-CAM (Wang et al. 2020), see `score_cam_map`. Defaults: `features` stage, softmax
    probability as the class score, no baseline subtraction, the raw scores as channel weights
    (`weighting="scores"`, the authors' repository; "softmax": the paper's channel softmax, as
    pytorch-grad-cam), bilinear upsampling.
    Cost: one forward per channel of the layer (the registered cost assumes 64 channels)."""
    m = score_cam_map(
        model,
        params,
        x,
        target,
        layer=layer,
        score=score,
        upsample=upsample,
        subtract_baseline=subtract_baseline,
        weighting=weighting,
    )
    return upsample_map(m, x, upsample)
