"""Input invariance (Kindermans, Hooker, Adebayo, Alber, Schuett, Daehne, Erhan, Kim, "The
(Un)reliability of saliency methods", 2017/2019).

f1 is the trained model on inputs x; its twin f2 has the same weights and the first-layer bias
b2 = b1 - W1 m, so f2(x + m) = f1(x) for every x. A method is input invariant when
E(f2, x + m) == E(f1, x). The twin is the same Flax module with modified params, so methods that
need layer structure (LRP, guided backprop, CAM) see an ordinary model.

The compensation is exact when the first linear layer is Dense (Kindermans used an MLP). For a
first Conv layer with zero ("SAME") padding, a per-channel bias can only compensate the
interior: border outputs differ. The protocol therefore also reports `twin_error` =
max |f1(x) - f2(x + m)| per image; read the verdicts only where it is ~0.

Speed: the logits for `twin_error` come from the two explain calls themselves
(`return_score="logits"`) instead of two separate forwards: cnn_a, 100 digits, gradient, idle
2-core EPYC, 77 -> 54-61 ms per protocol call (two explains 25 ms each, a forward 12-14 ms).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.models import Model, as_model
from attrax.protocols import PROTOCOLS, Scores
from attrax.protocols._common import example_keys, method_label, reexplainer


def first_linear_layer(model: Model, params: Any, x: jax.Array) -> tuple[tuple[str, ...], str]:
    """(params path, "dense" | "conv") of the first Dense/Conv layer called in a forward pass.

    Memoized per model, input shape and parameter tree (tracing the model with an interceptor
    took a few ms per call, a noticeable part of the protocol on a batch of 100 digits)."""
    if model.module is None:
        raise AttraxError("input_invariance builds a bias-shifted twin: it needs a Flax module model")
    key = ("first_linear_layer", x.shape[1:], str(x.dtype), jax.tree.structure(params))
    found = model.cached(key, lambda: _first_linear_layer(model, params, x))
    if isinstance(found, str):
        raise AttraxError(found)
    return found


def _first_linear_layer(model: Model, params: Any, x: jax.Array):
    found: list = []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense | nn.Conv):
            if not found:
                kind = "dense" if isinstance(context.module, nn.Dense) else "conv"
                found.append((tuple(context.module.scope.path), kind, context.module.use_bias))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        jax.eval_shape(lambda p, xx: model(p, xx), params, x[:1])
    if not found:
        return "input_invariance found no Dense/Conv layer in the model"
    path, kind, use_bias = found[0]
    if not use_bias:
        return "input_invariance needs a first layer with a bias to compensate the shift"
    return path, kind


def shifted_twin(model: Model, params: Any, x: jax.Array, shift: Any = -1.0) -> tuple[Any, str]:
    """Params of the twin f2 with b2 = b1 - W1 m, so f2(x + m) = f1(x); and the layer kind.

    `shift` m: a scalar, a per-channel vector, or (Dense first layer only) an image (H, W, C).
    """
    model = as_model(model)
    path, kind = first_linear_layer(model, params, x)
    layer = params["params"]
    for name in path:
        layer = layer[name]
    k, b = layer["kernel"], layer["bias"]
    m = jnp.asarray(shift, x.dtype)
    if kind == "dense":
        delta = jnp.broadcast_to(m, x.shape[1:]).reshape(-1)
        if delta.shape[0] != k.shape[0]:
            raise AttraxError("input_invariance: the first Dense layer does not see the flattened input")
        correction = delta @ k
    else:
        if m.ndim > 1:
            raise AttraxError("input_invariance on a Conv first layer needs a scalar or per-channel shift")
        mc = jnp.broadcast_to(m, (k.shape[-2],))
        correction = jnp.einsum("hwio,i->o", k, mc)
    new_layer = {**layer, "bias": b - correction}
    twin = jax.tree.map(lambda a: a, params)  # shallow structural copy
    node = twin["params"]
    for name in path[:-1]:
        node[name] = dict(node[name])
        node = node[name]
    node[path[-1]] = new_layer
    return twin, kind


@PROTOCOLS.register(
    "input_invariance",
    category="invariance",
    version=2,
    needs_method=True,
    higher_is_better={"passed": True, "distance": False, "twin_error": None},
)
def input_invariance(
    model,
    params,
    x,
    target,
    relevance,
    *,
    key,
    method=None,
    method_hparams: dict | None = None,
    method_key=None,
    shift: Any = -1.0,
    tol: float = 1e-3,
    twin_method_hparams: dict | None = None,
) -> Scores:
    """Kindermans et al. input invariance: does the method's map survive a compensated shift?

    Both maps are recomputed with the map's key (`method_key`; stochastic methods then share
    their noise):
    R1 = E(f1, x), R2 = E(f2, x + m). Scores per image: `distance` = ||R1 - R2||_1 / ||R1||_1,
    `passed` = distance <= tol (1.0 / 0.0), `twin_error` = max |f1(x) - f2(x + m)|.
    Defaults: m = -1 per pixel (inputs in [0, 1] become [-1, 0]), tol = 1e-3.
    `twin_method_hparams` (default: the same as `method_hparams`) sets the twin's run apart,
    e.g. integrated gradients with a reference that moves with the data (baseline = m).
    """
    model = as_model(model)
    twin, kind = shifted_twin(model, params, x, shift)
    m = jnp.broadcast_to(jnp.asarray(shift, x.dtype), x.shape[1:])
    xs = x + m
    keys = example_keys(method_key, x.shape[0])
    # each map comes with the logits of its inputs from the same call (`return_score`)
    r1, f1 = reexplainer(method, method_hparams, model, params, "input_invariance", "logits")(x, target, keys)
    hp2 = method_hparams if twin_method_hparams is None else twin_method_hparams
    r2, f2 = reexplainer(method, hp2, model, twin, "input_invariance", "logits")(xs, target, keys)
    n = x.shape[0]
    diff = jnp.abs(r1 - r2).reshape(n, -1).sum(-1)
    norm = jnp.abs(r1).reshape(n, -1).sum(-1)
    dist = diff / jnp.maximum(norm, 1e-12)  # a zero map R1 with R2 != 0 gives a huge distance
    err = jnp.abs(f1 - f2).max(-1)
    shift_rec = float(shift) if np.ndim(shift) == 0 else np.asarray(shift).tolist()
    return Scores(
        values={"passed": (dist <= tol).astype(jnp.float32), "distance": dist, "twin_error": err},
        choices=dict(
            method=method_label(method),
            method_hparams=method_hparams or {},
            twin_method_hparams=hp2 or {},
            shift=shift_rec,
            tol=tol,
            distance="relative L1",
            twin=f"first {kind} bias",
        ),
    )
