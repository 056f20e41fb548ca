"""Backprop-modified gradients: deconvnet and guided backprop.

Both keep the forward pass and change only how the ReLU passes gradients backward, by swapping
the model's activation (`Model.with_activation`) for a ReLU with a custom backward rule
(`jax.custom_vjp`). Max-pool switches (the positions that won in the forward pass) are kept, as
in the papers. Only ReLU activations are modified: a model whose activation is not ReLU is left
unchanged, so both methods equal the plain gradient there.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attrax.methods._core import METHODS, input_gradient

Array = jax.Array
_RELUS = (nn.relu, jax.nn.relu)


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


def _swap_relu(model, act):
    """The model with ReLU replaced by `act`; unchanged when its activation is not ReLU."""
    current = getattr(model.module, "act", None) if model.module is not None else None
    if model.module is not None and current is not None and current not in _RELUS:
        return model
    return model.with_activation(act)  # raises a clear AttraxError when there is no `act` field


@METHODS.register("guided_backprop", family="backprop", needs="activation", stochastic=False, cost=lambda hp: 1)
def guided_backprop(model, params, x, target, *, key=None, score: str = "logit") -> Array:
    """Guided backpropagation (Springenberg et al. 2015): at each ReLU the backward signal is
    g_in = g_out * [g_out > 0] * [z > 0]. Default target: the class logit."""
    m = _swap_relu(model, guided_relu)
    _, g = input_gradient(lambda xx: m(params, xx), x, target, score)
    return g


@METHODS.register("deconvnet", family="backprop", needs="activation", stochastic=False, cost=lambda hp: 1)
def deconvnet(model, params, x, target, *, key=None, score: str = "logit") -> Array:
    """Deconvnet (Zeiler & Fergus 2014): at each ReLU the backward signal is g_in = max(g_out, 0),
    ignoring the forward mask; max-pool switches are kept. Default target: the class logit."""
    m = _swap_relu(model, deconv_relu)
    _, g = input_gradient(lambda xx: m(params, xx), x, target, score)
    return g
