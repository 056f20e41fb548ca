"""Class activation maps: CAM, Grad-CAM, Grad-CAM++, Guided Grad-CAM and Score-CAM.

All five explain a class through spatial feature maps A (n, h, w, K) of a layer:

- `layer="features"` (default): the zoo model's `features` stage (the last spatial maps, after the
  activation) with `head(A) -> logits` as the rest of the network.
- `layer="<name>"`: the output of a named Flax submodule (`"conv1"`, `"pool1"`, or a path
  `"block2/conv1"`), found with `nn.intercept_methods`; the rest of the network is the model with
  that submodule's output replaced. Note that a zoo conv module's output is taken BEFORE its
  activation; name a pooling layer (or use `features`) for post-activation maps.

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
from attrax.methods._core import METHODS, class_score, input_gradient

Array = jax.Array
UPSAMPLE = ("bilinear", "nearest", "cubic")
GRAD_CAM_PP_VARIANTS = ("paper", "tutorial")


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
    if model.module is None:
        raise AttraxError(
            f"layer {layer!r} needs the model's Flax module; {model.name!r} is a plain apply_fn"
        )
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
    if not found:
        raise AttraxError(
            f"model {model.name!r} has no layer {layer!r}; "
            f"layers: {', '.join(dict.fromkeys(seen)) or 'none'}"
        )
    return found[0], logits


def spatial_stages(
    model, params: Any, x: Array, layer: str = "features"
) -> tuple[Array, Callable[[Array], Array]]:
    """(A, rest): A (n, h, w, K) the maps of `layer`, `rest(A) -> logits` the network above it."""
    if x.ndim != 4:
        raise AttraxError(f"class activation maps need NHWC images, got input shape {x.shape}")
    if layer == "features":
        if not model.has_stages:
            raise AttraxError(
                f"class activation maps need a model with `features`/`head` stages; "
                f"{model.name!r} has none (use a zoo model, give your Flax module "
                "`features(x)` and `head(A)`, or name a layer)"
            )
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
    w_kc / (h w) everywhere). On other heads this is the first-order estimate of the same weights.
    """
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
    net, as in the paper), set to 0 where the denominator vanishes (0/0 where g = 0), and the
    channel weights w_k = sum_ij alpha_ijk ReLU(g_ijk).

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
    if variant == "tutorial":
        alpha = _safe_div(jnp.ones_like(g), 2.0 + g * s)
    else:
        g2 = g * g
        alpha = _safe_div(g2, 2.0 * g2 + s * g2 * g)
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
) -> Array:
    """Score-CAM at feature resolution (Wang et al. 2020): ReLU(sum_k s_k A_k).

    s_k = f_c(x * H_k) with H_k the k-th map upsampled to the input size and min-max normalized to
    [0, 1] per image (a constant map gives H_k = 0); all n K masked images go through the model
    in one batched call. `subtract_baseline=True` uses the paper's increase of confidence
    s_k - f_c(0) instead.
    """
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
    return jax.nn.relu(jnp.einsum("nk,nhwk->nhw", s, a))


# ---------------------------------------------------------------------------------------------
# Registered methods: relevance with the input's shape


@METHODS.register("cam", family="cam", needs="stages", stochastic=False, cost=lambda hp: 1)
def cam(
    model, params, x, target, *, key=None, layer: str = "features", upsample: str = "bilinear"
) -> Array:
    """Class activation mapping (Zhou et al. 2016): M_c = sum_k w_kc A_k on a GAP -> linear head.

    Defaults: the `features` stage, bilinear upsampling; the map is not rectified, and its spatial
    mean at feature resolution equals the logit minus the bias on a GAP-linear head.
    """
    return upsample_map(cam_map(model, params, x, target, layer=layer), x, upsample)


@METHODS.register("grad_cam", family="cam", needs="stages", stochastic=False, cost=lambda hp: 1)
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


@METHODS.register("grad_cam_pp", family="cam", needs="stages", stochastic=False, cost=lambda hp: 1)
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
    "guided_grad_cam", family="cam", needs="stages", stochastic=False, cost=lambda hp: 2
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
    the upsampled Grad-CAM map, elementwise. Needs a zoo model (stages and a swappable ReLU)."""
    from attrax.methods.backprop import guided_backprop

    gb = guided_backprop(model, params, x, target, score=score)
    return gb * grad_cam(model, params, x, target, layer=layer, score=score, upsample=upsample)


@METHODS.register("score_cam", family="cam", needs="stages", stochastic=False, cost=lambda hp: 64)
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
) -> Array:
    """Score-CAM (Wang et al. 2020), see `score_cam_map`. Defaults: `features` stage, softmax
    probability as the class score (as the paper), no baseline subtraction, bilinear upsampling.
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
    )
    return upsample_map(m, x, upsample)
