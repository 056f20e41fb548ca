"""FullGrad (Srinivas & Fleuret 2019): input-gradient x input plus every layer's bias-gradients.

For a ReLU network (max/avg pooling and residual sums included) the full-gradient decomposition
is exact: f_c(x) = sum(x * grad_x f_c) + sum over layers l of sum(b_l * grad_{b_l} f_c), where
grad_{b_l} f_c is the gradient w.r.t. the layer's bias at every output position. The bias
gradients come from the same single backward pass as the input gradient: every linear layer of
the traced computation with a bias (dense / conv, with a following BatchNorm in inference mode
folded in: its implicit bias is beta - scale * mean / sqrt(var + eps)) gets a zero offset added
to its output; the gradient w.r.t. that offset is the bias gradient. Works on any JAX model
(`attrax.methods._engine`: Flax linen or nnx, a plain apply_fn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.methods import _engine
from attrax.methods._core import METHODS, class_score

Array = jax.Array
VARIANTS = ("paper", "complete")
ORDERS = ("normalize_then_upsample", "upsample_then_normalize")


def full_gradients(model, params, x, target, score: str = "logit"):
    """(scores, grad_x, [(bias, grad_bias) per biased layer in execution order]) from one
    backward pass.

    The layers come from the rule engine's trace (`attrax.methods._engine`; any JAX model): every
    linear layer (dense / conv) with a bias, BatchNorm-like affine chains folded in (so a conv's
    bias and its BatchNorm's implicit bias beta - scale * mean / sqrt(var + eps) form the merged
    layer's one bias, whose bias-gradient term is their sum). Each gets a zero offset added to
    its output; the gradient w.r.t. that offset is the bias gradient. grad_bias has the layer
    output's shape (n, ..., channels); bias broadcasts against it.
    """
    graph = _engine.graph_of(model, params, x)
    biased = [n for n in graph.nodes if n.kind == "linear" and len(n.ops) > 1]
    slot = {id(n): i for i, n in enumerate(biased)}

    def run(xx, offsets):
        biases = [None] * len(biased)

        def handle(node, env):
            if id(node) not in slot:
                return None
            a = env[node.ins[0]]
            k, b, rest = _engine.linear_parts(node, env, True)
            out = _engine.finish_linear(node, env, rest, _engine.make_linear(node, a, k, b)(a))
            i = slot[id(node)]
            biases[i] = jax.lax.stop_gradient(b)
            return out + offsets[i]

        return _engine.evaluate(graph, params, xx, handle), biases

    def total(xx, offsets):
        logits, biases = run(xx, offsets)
        s = class_score(logits, target, score)
        return s.sum(), (s, biases)

    zeros = [jnp.zeros(graph.avals[n.out].shape, x.dtype) for n in biased]
    (_, (s, biases)), (gx, gb) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x, zeros)
    return s, gx, list(zip(biases, gb, strict=True))


def _nearest_index(src: int, dst: int) -> np.ndarray:
    return np.minimum((np.arange(dst) + 0.5) * src / dst, src - 1).astype(np.int64)


def _spread(m: Array, height: int, width: int) -> Array:
    """Mass-preserving nearest upsampling of (n, h, w) maps to (n, H, W): every source cell's
    value is shared equally by the input pixels that map to it."""
    n, h, w = m.shape
    rows, cols = _nearest_index(h, height), _nearest_index(w, width)
    counts = np.zeros((h, w))
    np.add.at(counts, (rows[:, None], cols[None, :]), 1.0)
    inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return (m * jnp.asarray(inv, m.dtype))[:, rows][:, :, cols]


def _resize_aligned(a: Array, height: int, width: int) -> Array:
    """Bilinear resize of (n, h, w, k) with aligned corners (corner pixels map onto corner pixels,
    as PyTorch's `interpolate(..., align_corners=True)` in the FullGrad authors' code)."""
    n, h, w, k = a.shape
    sy = (height - 1) / (h - 1) if h > 1 else float(height)
    sx = (width - 1) / (w - 1) if w > 1 else float(width)
    scale = jnp.array([sy, sx], jnp.float32)
    shift = jnp.array([0.5 * (1 - sy) if h > 1 else 0.0, 0.5 * (1 - sx) if w > 1 else 0.0], jnp.float32)
    return jax.image.scale_and_translate(
        a, (n, height, width, k), (1, 2), scale, shift, "linear", antialias=False
    )


def _minmax(a: Array) -> Array:
    """Min-max rescaling to [0, 1] per image over all positions and channels (0 where constant)."""
    flat = a.reshape(a.shape[0], -1)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (flat - lo) / jnp.where(span > 0, span, 1.0), 0.0).reshape(a.shape)


def _psi(t: Array, height: int, width: int, order: str = "normalize_then_upsample") -> Array:
    """FullGrad's post-processing of one (n, h, w, k) term, summed over channels -> (n, H, W).

    "normalize_then_upsample" (the authors' code, FullGrad-saliency): |.|, min-max rescaling to
    [0, 1] per image, then bilinear upsampling with aligned corners. "upsample_then_normalize":
    |.|, bilinear resize (half-pixel centres), then the min-max rescaling.
    """
    a = jnp.abs(t)
    same = a.shape[1:3] == (height, width)
    if order == "normalize_then_upsample":
        a = _minmax(a)
        return (a if same else _resize_aligned(a, height, width)).sum(-1)
    if not same:
        a = jax.image.resize(a, (a.shape[0], height, width, a.shape[-1]), "linear")
    return _minmax(a).sum(-1)


@METHODS.register("fullgrad", family="gradient", needs="apply", stochastic=False, cost=lambda hp: 1)
def fullgrad(
    model,
    params,
    x,
    target,
    *,
    key=None,
    variant: str = "paper",
    score: str = "logit",
    order: str = "normalize_then_upsample",
) -> Array:
    """FullGrad (Srinivas & Fleuret 2019). Default target: the class logit.

    variant "paper" (default): psi(x * grad_x) + sum over layers with spatial maps of
      psi(b * grad_b), psi = abs, min-max rescale per image, bilinear upsampling to the input
      size, summed over channels (the paper's saliency map; layers without spatial maps are left
      out, as in the paper). Same map in every channel. `order`: "normalize_then_upsample"
      (default: the authors' code, upsampling with aligned corners) or "upsample_then_normalize"
      (resize first, half-pixel centres; attrax's earlier default).
    variant "complete": the signed full-gradient decomposition, sum R = f_c(x) exactly on ReLU
      networks: x * grad_x plus each layer's bias term summed over its channels, spread over the
      input pixels by mass-preserving nearest upsampling (dense layers: uniformly), shared equally
      by the input channels.
    """
    if x.ndim != 4:
        raise AttraxError(f"fullgrad needs NHWC images, got shape {x.shape}")
    if variant not in VARIANTS:
        raise AttraxError(f"unknown fullgrad variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if order not in ORDERS:
        raise AttraxError(f"unknown fullgrad order {order!r}: use one of {', '.join(ORDERS)}")
    n, h, w, c = x.shape
    _, gx, layers = full_gradients(model, params, x, target, score)
    if variant == "paper":
        r = _psi(x * gx, h, w, order)
        for b, gb in layers:
            if gb.ndim == 4:
                r = r + _psi(gb * b, h, w, order)
        return jnp.broadcast_to(r[..., None], x.shape)
    r = x * gx
    extra = jnp.zeros((n, h, w), x.dtype)
    for b, gb in layers:
        t = gb * b
        if t.ndim == 4:
            extra = extra + _spread(t.sum(-1), h, w)
        else:
            extra = extra + (t.reshape(n, -1).sum(1) / (h * w))[:, None, None]
    return r + extra[..., None] / c
