"""Backprop-modified gradients: deconvnet and guided backprop.

Both keep the forward pass and change only how every ReLU of the traced computation passes
gradients backward (`jax.nn.relu` / `flax.linen.relu` or `max(x, 0)`, wherever it occurs: any
JAX model, no `act` field; see `attrax.methods._engine`): each becomes a ReLU with a custom
backward rule (`jax.custom_vjp`). Max-pool switches (the positions that won in the forward
pass) are kept, as in the papers. Only ReLUs are modified: a model without ReLUs is left
unchanged, so both methods equal the plain gradient there. On CPU the convolutions of the
trace run in the form of `attrax.fastconv` (same values, faster input gradient of few-channel
layers; `ATTRAX_CONV_VJP=xla` turns it off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attrax import fastconv
from attrax.methods import _engine
from attrax.methods._core import METHODS, input_gradient

Array = jax.Array


@jax.custom_vjp
def guided_relu(z: Array) -> Array:
    """ReLU whose backward pass is g_in = g_out * [g_out > 0] * [z > 0] (guided backprop)."""
    return jnp.maximum(z, 0)


def _guided_fwd(z):
    return jnp.maximum(z, 0), z


def _guided_bwd(z, g):
    return (jnp.where((g > 0) & (z > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_fwd, _guided_bwd)


@jax.custom_vjp
def deconv_relu(z: Array) -> Array:
    """ReLU whose backward pass is g_in = max(g_out, 0), ignoring the forward mask (deconvnet)."""
    return jnp.maximum(z, 0)


def _deconv_fwd(z):
    return jnp.maximum(z, 0), None


def _deconv_bwd(_, g):
    return (jnp.maximum(g, 0),)


deconv_relu.defvjp(_deconv_fwd, _deconv_bwd)


def _fast_linear(node, env):
    """The linear node's ops with its convolution in the fast form (`attrax.fastconv`)."""
    for op in node.ops:
        vals = [_engine.read(env, i) for i in op.ins]
        out = fastconv.bind_conv(op.params, *vals) if op.pname == "conv_general_dilated" else None
        if out is None:
            _engine.run_ops([op], env)
        else:
            env[op.outs[0]] = out
    return env[node.out]


def _relu_swapped(model, params, x, relu, unknown: str = "error"):
    """x -> logits with every ReLU of the trace replaced by `relu`."""
    graph = _engine.graph_of(model, params, x)
    _engine.check_unknown(graph, unknown)

    fast = fastconv.use_fast()

    def handle(node, env):
        if node.kind == "relu":
            return relu(env[node.ins[0]])
        if fast and node.kind == "linear" and any(op.pname == "conv_general_dilated" for op in node.ops):
            return _fast_linear(node, env)
        return None

    return lambda xx: _engine.evaluate(graph, params, xx, handle)


@METHODS.register("guided_backprop", family="backprop", needs="apply", stochastic=False, cost=lambda hp: 1)
def guided_backprop(model, params, x, target, *, key=None, score: str = "logit", unknown: str = "error") -> Array:
    """Guided backpropagation (Springenberg et al. 2015): at each ReLU the backward signal is
    g_in = g_out * [g_out > 0] * [z > 0]. Default target: the class logit. `unknown`: "error"
    (default) or "gradient" for primitives the engine does not know."""
    _, g = input_gradient(_relu_swapped(model, params, x, guided_relu, unknown), x, target, score)
    return g


@METHODS.register("deconvnet", family="backprop", needs="apply", stochastic=False, cost=lambda hp: 1)
def deconvnet(model, params, x, target, *, key=None, score: str = "logit", unknown: str = "error") -> Array:
    """Deconvnet (Zeiler & Fergus 2014): at each ReLU the backward signal is g_in = max(g_out, 0),
    ignoring the forward mask; max-pool switches are kept. Default target: the class logit.
    `unknown`: "error" (default) or "gradient" for primitives the engine does not know."""
    _, g = input_gradient(_relu_swapped(model, params, x, deconv_relu, unknown), x, target, score)
    return g
