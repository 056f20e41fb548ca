"""Example models written the way users write them: NOT zoo models, no `act` field, no stages.

Five families that the rule engine (issue 13) must handle from the traced computation alone:

- `nonzoo_cnn`: plain linen CNN: `nn.Conv`, functional `nn.relu`, `nn.max_pool`, `nn.avg_pool`, mean head;
- `nonzoo_resnet`: linen ResNet: `nn.BatchNorm(use_running_average=True)` with random statistics,
  identity and 1x1 stride-2 skips;
- `vit_tiny`: small vision transformer: patch conv, class token, position embedding, attention
  written out, LayerNorm, exact GELU, MLP;
- `jnp_mlp`: plain `jax.numpy` `apply_fn(params, x)`: no Flax; `jax.nn.relu` and `jnp.maximum(h, 0)`;
- `nnx_cnn`: flax.nnx module, handed over as a user does: `nnx.split` to (graphdef, state) and a
  user-written apply function.

`build(name, key, sample_x, num_classes=10, **kwargs) -> (model, params)`: `model` is what a user
passes to `attrax.as_model` / `attrax.explain` (a linen module or a plain function), `params` its
variables. Used by the benchmark (`attrax-bench --model nonzoo_cnn,vit_tiny`) and the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attrax._arrays import to_device
from attrax.errors import AttraxError

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Flax linen


class PlainCNN(nn.Module):
    """conv -> relu -> max pool -> conv -> relu -> avg pool -> spatial mean -> dense."""

    channels: tuple[int, int] = (8, 16)
    num_classes: int = 10
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.channels[0], (3, 3), use_bias=self.use_bias, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(self.channels[1], (3, 3), use_bias=self.use_bias, name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="dense")(x)


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + skip (identity, or 1x1 conv-BN when the shape changes), ReLU.

    `batchnorm=False` drops the BatchNorms (a bias-free residual block)."""

    features: int
    strides: int = 1
    batchnorm: bool = True

    @nn.compact
    def __call__(self, x):
        def bn(name):
            return nn.BatchNorm(use_running_average=True, name=name) if self.batchnorm else (lambda t: t)

        pad = ((1, 1), (1, 1))
        y = nn.Conv(self.features, (3, 3), strides=self.strides, padding=pad, use_bias=False, name="conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = bn("bn2")(nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, padding="VALID", use_bias=False,
                        name="short_conv")(x)
            x = bn("short_bn")(x)
        return nn.relu(y + x)


class BNResNet(nn.Module):
    """stem conv-BN-ReLU -> block (identity skip) -> block (stride 2, 1x1 shortcut) -> GAP -> dense."""

    width: int = 8
    num_classes: int = 10
    batchnorm: bool = True  # False (with use_bias=False): a bias-free residual net
    use_bias: bool = True   # of the dense head

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.width, (3, 3), use_bias=False, name="conv1")(x)
        if self.batchnorm:
            x = nn.BatchNorm(use_running_average=True, name="bn1")(x)
        x = nn.relu(x)
        x = ResBlock(self.width, batchnorm=self.batchnorm, name="block1")(x)
        x = ResBlock(2 * self.width, strides=2, batchnorm=self.batchnorm, name="block2")(x)
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="dense")(x.mean(axis=(1, 2)))


class Attention(nn.Module):
    """Multi-head self-attention written out: qkv projection, softmax(q k^T / sqrt(d)) v, proj."""

    dim: int
    heads: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        n, t, _ = x.shape
        d = self.dim // self.heads
        qkv = nn.Dense(3 * self.dim, use_bias=self.use_bias, name="qkv")(x)
        qkv = qkv.reshape(n, t, 3, self.heads, d).transpose(2, 0, 3, 1, 4)  # (3, n, heads, t, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = jax.nn.softmax(jnp.einsum("nhqd,nhkd->nhqk", q, k) / math.sqrt(d), axis=-1)
        o = jnp.einsum("nhqk,nhkd->nhqd", a, v).transpose(0, 2, 1, 3).reshape(n, t, self.dim)
        return nn.Dense(self.dim, use_bias=self.use_bias, name="proj")(o)


class Block(nn.Module):
    dim: int
    heads: int
    mlp: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        ln = lambda name: nn.LayerNorm(epsilon=1e-6, use_bias=self.use_bias, name=name)  # noqa: E731
        x = x + Attention(self.dim, self.heads, self.use_bias, name="attn")(ln("norm1")(x))
        h = nn.gelu(nn.Dense(self.mlp, use_bias=self.use_bias, name="fc1")(ln("norm2")(x)), approximate=False)
        return x + nn.Dense(self.dim, use_bias=self.use_bias, name="fc2")(h)


class ViT(nn.Module):
    """Patch conv -> tokens (+ class token) + position embedding -> pre-norm blocks -> LN -> head.

    `pool="cls"` reads the class token (timm's default), `pool="mean"` averages the patch tokens;
    `use_bias=False` with `pool="mean"` and `pos_embed=False` leaves no additive constant anywhere
    (the network whose CP-LRP relevance must be conserved).
    """

    patch: int = 4
    dim: int = 16
    heads: int = 2
    depth: int = 1
    mlp: int = 32
    num_classes: int = 10
    pool: str = "cls"
    use_bias: bool = True
    pos_embed: bool = True

    @nn.compact
    def __call__(self, x):
        p = self.patch
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", use_bias=self.use_bias, name="patch_embed")(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c))
            x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c)), x], axis=1)
        if self.pos_embed:
            x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], c))
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.mlp, self.use_bias, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-6, use_bias=self.use_bias, name="norm")(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="head")(x)


# ---------------------------------------------------------------------------------------------
# Plain jax.numpy and flax.nnx


def jnp_mlp_init(seed: int, n_in: int, hidden: tuple[int, ...] = (32, 16), num_classes: int = 10,
                 use_bias: bool = True) -> dict[str, Array]:
    """He-initialized weights {"w0", "b0", ...} of a plain MLP (NumPy draws)."""
    rng = np.random.default_rng(seed)
    sizes = (n_in, *hidden, num_classes)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = to_device(rng.standard_normal((a, b)) * math.sqrt(2.0 / a), jnp.float32)
        if use_bias:
            params[f"b{i}"] = to_device(0.1 * rng.standard_normal(b), jnp.float32)
    return params


def jnp_mlp_apply(params: dict[str, Array], x: Array) -> Array:
    """flatten -> (dense -> relu)* -> dense; relu alternates `jax.nn.relu` and `jnp.maximum(h, 0)`."""
    h = x.reshape(x.shape[0], -1)
    n = sum(k.startswith("w") for k in params)
    for i in range(n):
        h = h @ params[f"w{i}"]
        if f"b{i}" in params:
            h = h + params[f"b{i}"]
        if i < n - 1:
            h = jax.nn.relu(h) if i % 2 == 0 else jnp.maximum(h, 0.0)
    return h


class NNXCNN(nnx.Module):
    """conv -> relu -> conv -> relu -> spatial mean -> linear, as a flax.nnx module."""

    def __init__(self, in_features: int, channels: tuple[int, int] = (8, 16), num_classes: int = 10, *,
                 rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_features, channels[0], (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), strides=(2, 2), rngs=rngs)
        self.head = nnx.Linear(channels[1], num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.head(x.mean(axis=(1, 2)))


def nnx_apply(module: nnx.Module) -> tuple[Callable[[Any, Array], Array], Any]:
    """What a user writes to hand an nnx module to a params-first API: (apply_fn, state)."""
    graphdef, state = nnx.split(module)

    def apply_fn(state, x):
        return nnx.merge(graphdef, state)(x)

    return apply_fn, state


# ---------------------------------------------------------------------------------------------
# Building


def _perturb_batchnorm(variables: dict, seed: int) -> dict:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are mean 0, var 1).

    NumPy draws: no small XLA compilations per parameter shape."""
    rng = np.random.default_rng(seed)

    def draw(path, v):
        names = [str(getattr(p, "key", "")) for p in path]
        bn = any(n.startswith(("bn", "short_bn")) for n in names)
        if names[0] == "batch_stats" and names[-1] == "mean":
            return to_device(0.3 * rng.standard_normal(v.shape), v.dtype)
        if names[0] == "batch_stats" and names[-1] == "var":
            return to_device(rng.uniform(0.5, 2.0, v.shape), v.dtype)
        if bn and names[-1] == "scale":
            return to_device(rng.uniform(0.5, 1.5, v.shape), v.dtype)
        if bn and names[-1] == "bias":
            return to_device(0.1 * rng.standard_normal(v.shape), v.dtype)
        return v

    return jax.tree_util.tree_map_with_path(draw, variables)


def _fill(path, leaf, rng: np.random.Generator) -> Array:
    """A value for an abstract parameter: LeCun-normal kernels, zero biases, unit scales/variances."""
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    name = names[-2] if names[-1] == "value" and len(names) > 1 else names[-1]  # nnx: Param.value
    shape = leaf.shape
    if name == "kernel":
        v = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    elif name in ("scale", "var"):
        v = np.ones(shape)
    elif name in ("cls_token", "pos_embed"):
        v = 0.02 * rng.standard_normal(shape)
    else:  # bias, mean
        v = np.zeros(shape)
    return to_device(v, leaf.dtype)


def init_variables(module: nn.Module, seed: int, sample_x: Array) -> Any:
    """Variables of a linen module drawn with NumPy from `jax.eval_shape(module.init)`: no XLA
    compilation of JAX's random-bit generator (seconds per shape on a loaded CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), sample_x)
    return jax.tree_util.tree_map_with_path(lambda p, leaf: _fill(p, leaf, rng), shapes)


def _init_nnx(make_module: Callable[[nnx.Rngs], nnx.Module], seed: int) -> nnx.Module:
    """An nnx module with NumPy-drawn parameters (same reason as `init_variables`)."""
    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make_module(nnx.Rngs(0))))
    state = jax.tree_util.tree_map_with_path(lambda p, leaf: _fill(p, leaf, rng), abstract)
    return nnx.merge(graphdef, state)


FAMILIES = ("nonzoo_cnn", "nonzoo_resnet", "vit_tiny", "jnp_mlp", "nnx_cnn")


def names() -> list[str]:
    return list(FAMILIES)


def build(name: str, key: Array | int, sample_x: Array, num_classes: int = 10, **kwargs: Any) -> tuple[Any, Any]:
    """(model, params) of an example family for inputs shaped like `sample_x` (NHWC)."""
    seed = int(key) if isinstance(key, int) else int(jax.random.randint(key, (), 0, 2**31 - 1))
    sample_x = to_device(sample_x)[:1]
    if name == "nonzoo_cnn":
        module = PlainCNN(num_classes=num_classes, **kwargs)
        return module, init_variables(module, seed, sample_x)
    if name == "nonzoo_resnet":
        module = BNResNet(num_classes=num_classes, **kwargs)
        variables = init_variables(module, seed, sample_x)
        return module, (_perturb_batchnorm(variables, seed + 1) if "batch_stats" in variables else variables)
    if name == "vit_tiny":
        module = ViT(num_classes=num_classes, **kwargs)
        return module, init_variables(module, seed, sample_x)
    if name == "jnp_mlp":
        return jnp_mlp_apply, jnp_mlp_init(seed, math.prod(sample_x.shape[1:]), num_classes=num_classes, **kwargs)
    if name == "nnx_cnn":
        c = sample_x.shape[-1]
        return nnx_apply(_init_nnx(lambda rngs: NNXCNN(c, num_classes=num_classes, rngs=rngs, **kwargs), seed))
    raise AttraxError(f"unknown example model {name!r}: use one of {', '.join(FAMILIES)}")
