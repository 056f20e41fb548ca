"""ImageNet-scale zoo models: ResNet-18/50 and VGG-16 (torchvision conventions), ViT (timm conventions).

Registered in `attrax.models.ZOO` as `resnet18`, `resnet50`, `vgg16` and `vit`; every size is a
field, so tests use tiny configurations (`create("resnet18", width=8, num_classes=5)`,
`create("vit", patch_size=4, embed_dim=24, depth=1, num_heads=2)`) and
`attrax.models.import_weights` builds the same modules from the shapes of a checkpoint.

Conventions (chosen so that torchvision / timm weights reproduce PyTorch's logits, see
`attrax.weights` and ../shared/reference/README.md "import/"):
- ResNet (He et al. 2016, torchvision v1.5): stem conv 7x7 stride 2 padded 3 on every side, BatchNorm
  (epsilon 1e-5, eval mode: running statistics), ReLU, max-pool 3x3 stride 2 padded 1 on every side
  with -inf; BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3 with the stride, 1x1 to 4x the width);
  `downsample` = 1x1 conv with the block's stride + BatchNorm where the shape changes; global average
  pool; `fc`. 3x3 convolutions pad 1 on every side (Flax "SAME" pads (0, 1) at stride 2).
- VGG-16 (Simonyan & Zisserman 2015, torchvision layout): 13 conv3x3 (pad 1) + ReLU in five stages
  separated by 2x2/2 max-pools (optionally with BatchNorm, torchvision's `vgg16_bn`), adaptive
  average pool to `pool_size` x `pool_size` (7), flatten (NHWC order; the importer permutes
  torchvision's C,H,W rows), fc-ReLU-fc-ReLU-fc. Dropout is omitted (eval mode is the identity).
- ViT (Dosovitskiy et al. 2021, timm `VisionTransformer` naming): patch conv p x p stride p, tokens in
  row-major patch order, class token prepended, learned `pos_embed` including the class token's
  position; pre-norm blocks x + attn(norm1(x)), x + mlp(norm2(x)); `qkv` reshaped to (n, t, 3, heads,
  d) with q, k, v in that order; exact (erf) GELU; LayerNorm epsilon 1e-6; final norm, head on the
  class token.

Input normalisation is part of the model (`normalize`: None, "imagenet" = torchvision's
mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225), or "inception" = 0.5 / 0.5 as many timm ViTs),
so data sets stay in [0, 1] as the data contract says, attributions are with respect to [0, 1]
pixels and a "zero" baseline is a black image. The default is None (the model sees x as given).

Zoo contract (see `attrax.models`): the convolutional nets expose `features(x)` (the last spatial
feature maps, after the activation) and `head(A)`, an `act` field (guided backprop / deconvnet swap
it) and a `train` field (the trainer uses batch statistics through `clone(train=True)`). The ViT has
no spatial feature maps (its head reads the class token), so it offers no stages: the CAM family says
so in a one-line error. The structure methods (LRP, DeepLIFT, guided backprop) read any model's
computation through the rule engine (`attrax.methods._engine`) and run on all four (checked on the
tiny configurations).
Pooling is functional (`max_pool` below: `nn.max_pool` values with a faster backward pass; a mean for
the global pool).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attrax.errors import AttraxError
from attrax.models import ZOO

Array = jax.Array

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
PAD1 = ((1, 1), (1, 1))


def normalize_input(x: Array, normalize: str | None) -> Array:
    """(x - mean) / std per channel for a named normalisation (None: x unchanged)."""
    if normalize is None:
        return x
    if normalize not in NORMALIZATIONS:
        raise AttraxError(f"unknown normalize {normalize!r}: use None, {', '.join(map(repr, NORMALIZATIONS))}")
    mean, std = (jnp.asarray(v, x.dtype) for v in NORMALIZATIONS[normalize])
    if x.shape[-1] != mean.shape[0]:
        raise AttraxError(f"normalize={normalize!r} expects {mean.shape[0]} channels, got {x.shape[-1]}")
    return (x - mean) / std


def _window_views(xp: Array, k: int, stride: int) -> list[Array]:
    n, hp, wp, c = xp.shape
    oh, ow = (hp - k) // stride + 1, (wp - k) // stride + 1
    return [xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            for i in range(k) for j in range(k)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: Array, window: int = 3, stride: int = 2, pad: int = 1) -> Array:
    """`nn.max_pool(x, (k, k), (s, s), padding=((p, p), (p, p)))` (padded with -inf), with a fast backward.

    The forward IS `nn.max_pool` (one `reduce_window_max`, which the rule engine maps to its max-pool
    rules); the derivative is a custom JVP with the same values (the first maximum of each window in
    row-major order gets the gradient, as select-and-scatter and torch do), written as k x k strided
    views and a masked sum: on the ResNet stem (8 x 112 x 112 x 64) the gradient took 0.16 s against
    0.84 s for XLA:CPU's select-and-scatter.
    """
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


@max_pool.defjvp
def _max_pool_jvp(window, stride, pad, primals, tangents):
    (x,), (t,) = primals, tangents
    out = max_pool(x, window, stride, pad)
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    xp = jnp.pad(x, widths, constant_values=-jnp.inf) if pad else x
    tp = jnp.pad(t, widths) if pad else t
    seen = jnp.zeros(out.shape, bool)
    t_out = jnp.zeros_like(out)
    for v, tv in zip(_window_views(xp, window, stride), _window_views(tp, window, stride), strict=True):
        win = (v == out) & ~seen  # the first maximum in row-major window order
        seen = seen | win
        t_out = t_out + jnp.where(win, tv, 0)
    return out, t_out


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv(features: int, k: int, stride: int = 1, groups: int = 1, name: str | None = None) -> nn.Conv:
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    return nn.Conv(features, (k, k), strides=stride, padding=pad, use_bias=False, feature_group_count=groups,
                   name=name)


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    act: Callable = nn.relu
    train: bool = False

    @nn.compact
    def __call__(self, x):
        y = self.act(_bn(self.train, "bn1")(_conv(self.planes, 3, self.stride, name="conv1")(x)))
        y = _bn(self.train, "bn2")(_conv(self.planes, 3, name="conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = _bn(self.train, "downsample_bn")(_conv(self.planes, 1, self.stride, name="downsample_conv")(x))
        return self.act(x + y)


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    mid: int | None = None  # bottleneck width (torchvision: planes * width_per_group / 64 * groups)
    groups: int = 1
    act: Callable = nn.relu
    train: bool = False
    expansion: int = 4

    @nn.compact
    def __call__(self, x):
        mid, out = self.mid or self.planes, self.planes * self.expansion
        y = self.act(_bn(self.train, "bn1")(_conv(mid, 1, name="conv1")(x)))
        y = self.act(_bn(self.train, "bn2")(_conv(mid, 3, self.stride, self.groups, name="conv2")(y)))
        y = _bn(self.train, "bn3")(_conv(out, 1, name="conv3")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = _bn(self.train, "downsample_bn")(_conv(out, 1, self.stride, name="downsample_conv")(x))
        return self.act(x + y)


class TorchResNet(nn.Module):
    """torchvision-style ResNet. `layers` blocks per stage, stage widths `width` * (1, 2, 4, 8).

    Parameter names mirror torchvision's: `conv1`, `bn1`, `layer{i}_{j}/{conv1,bn1,...,downsample_conv,
    downsample_bn}`, `fc`.
    """

    num_classes: int = 1000
    layers: tuple[int, ...] = (2, 2, 2, 2)
    block: str = "basic"  # basic | bottleneck
    width: int = 64
    mid_ratio: float = 1.0  # bottleneck width / planes (2.0 for wide_resnet50_2)
    groups: int = 1  # grouped 3x3 convolutions (ResNeXt)
    normalize: str | None = None
    act: Callable = nn.relu
    train: bool = False

    def setup(self):
        if self.block not in ("basic", "bottleneck"):
            raise AttraxError(f"unknown ResNet block {self.block!r}: use basic or bottleneck")
        self.conv1 = nn.Conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False)
        self.bn1 = _bn(self.train, "bn1")
        blocks = []
        for i, n in enumerate(self.layers):
            planes = self.width * 2**i
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                name = f"layer{i + 1}_{j}"
                if self.block == "basic":
                    blocks.append(BasicBlock(planes, stride, self.act, self.train, name=name))
                else:
                    mid = int(round(planes * self.mid_ratio))
                    blocks.append(Bottleneck(planes, stride, mid, self.groups, self.act, self.train, name=name))
        self.blocks = blocks
        self.fc = nn.Dense(self.num_classes)

    def features(self, x):
        x = normalize_input(x, self.normalize)
        x = self.act(self.bn1(self.conv1(x)))
        x = max_pool(x, 3, 2, 1)  # torchvision MaxPool2d(3, 2, padding=1): -inf padding
        for b in self.blocks:
            x = b(x)
        return x

    def head(self, a):
        return self.fc(jnp.mean(a, axis=(1, 2)))

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x))


@ZOO.register("resnet18", family="conv", scale="imagenet")
class ResNet18(TorchResNet):
    """ResNet-18 (BasicBlock, layers 2, 2, 2, 2), torchvision layout; `width` 64 is the published size."""


@ZOO.register("resnet50", family="conv", scale="imagenet")
class ResNet50(TorchResNet):
    """ResNet-50 (Bottleneck, layers 3, 4, 6, 3), torchvision layout; `width` 64 is the published size."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    block: str = "bottleneck"


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def adaptive_avg_pool(x: Array, size: int) -> Array:
    """torch `AdaptiveAvgPool2d(size)` on NHWC: bin k averages rows floor(k h / s) .. ceil((k + 1) h / s) - 1."""

    def weights(n: int) -> np.ndarray:
        w = np.zeros((size, n), np.float32)
        for k in range(size):
            lo, hi = (k * n) // size, -(-((k + 1) * n) // size)
            w[k, lo:hi] = 1.0 / (hi - lo)
        return w

    h, w_ = x.shape[1], x.shape[2]
    if h == size and w_ == size:
        return x
    return jnp.einsum("ah,nhwc,bw->nabc", weights(h), x, weights(w_))


@ZOO.register("vgg16", family="conv", scale="imagenet")
class VGG(nn.Module):
    """VGG-16 (torchvision layout): `cfg` lists conv widths and "M" (max-pool); `batch_norm` = vgg16_bn.

    Parameter names: `conv{k}` (k = 0, 1, ... in order), `bn{k}` when `batch_norm`, `fc1`, `fc2`, `fc3`.
    Tiny configurations: `cfg=(8, "M", 16, "M")`, `hidden=32`, `pool_size=2`.
    """

    num_classes: int = 1000
    cfg: tuple[Any, ...] = VGG16_CFG
    batch_norm: bool = False
    hidden: int = 4096
    pool_size: int = 7
    normalize: str | None = None
    act: Callable = nn.relu
    train: bool = False

    def setup(self):
        widths = [c for c in self.cfg if c != "M"]
        self.convs = [nn.Conv(c, (3, 3), padding=PAD1, name=f"conv{k}") for k, c in enumerate(widths)]
        self.bns = [_bn(self.train, f"bn{k}") for k in range(len(widths))] if self.batch_norm else None
        self.fc1 = nn.Dense(self.hidden)
        self.fc2 = nn.Dense(self.hidden)
        self.fc3 = nn.Dense(self.num_classes)

    def features(self, x):
        """The last conv block's activation (before its max-pool), as Grad-CAM uses on VGG."""
        x = normalize_input(x, self.normalize)
        k = 0
        for i, c in enumerate(self.cfg):
            if c == "M":
                if i < len(self.cfg) - 1:
                    x = max_pool(x, 2, 2, 0)
                continue
            x = self.convs[k](x)
            if self.bns is not None:
                x = self.bns[k](x)
            x = self.act(x)
            k += 1
        return x

    def head(self, a):
        if self.cfg[-1] == "M":
            a = max_pool(a, 2, 2, 0)
        a = adaptive_avg_pool(a, self.pool_size)
        a = a.reshape((a.shape[0], -1))
        a = self.act(self.fc1(a))
        a = self.act(self.fc2(a))
        return self.fc3(a)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x))


class Attention(nn.Module):
    dim: int
    num_heads: int
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x):
        n, t, d = x.shape
        hd = d // self.num_heads
        qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, name="qkv")(x)
        qkv = qkv.reshape(n, t, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)  # (3, n, heads, t, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = jax.nn.softmax((q * hd**-0.5) @ k.swapaxes(-2, -1), axis=-1)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
        return nn.Dense(d, name="proj")(out)


class Mlp(nn.Module):
    hidden: int
    dim: int

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        return nn.Dense(self.dim, name="fc2")(x)


class Block(nn.Module):
    dim: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.dim, self.num_heads, self.qkv_bias, name="attn")(nn.LayerNorm(1e-6, name="norm1")(x))
        return x + Mlp(self.mlp_dim, self.dim, name="mlp")(nn.LayerNorm(1e-6, name="norm2")(x))


@ZOO.register("vit", family="transformer", scale="imagenet")
class ViT(nn.Module):
    """Vision transformer, timm `VisionTransformer` layout; defaults are ViT-B/16 at 224 x 224.

    `mlp_dim` None = 4 x `embed_dim`. `pos_embed` has 1 + (img/patch)^2 rows and is created from the
    input size at init; a different input size later is an error (no interpolation).
    """

    num_classes: int = 1000
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None
    qkv_bias: bool = True
    normalize: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.embed_dim % self.num_heads:
            raise AttraxError(f"vit: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        x = normalize_input(x, self.normalize)
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=p, padding="VALID", name="patch_embed")(x)
        n, gh, gw, d = x.shape
        x = x.reshape(n, gh * gw, d)  # row-major patch order (timm: NCHW flatten(2).transpose(1, 2))
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
        if self.has_variable("params", "pos_embed"):
            have = self.get_variable("params", "pos_embed").shape[1] - 1
            if have != gh * gw:
                raise AttraxError(
                    f"vit: pos_embed has {have} patch positions, a {gh * p}x{gw * p} input gives {gh * gw} "
                    f"(patch {p}): use the input size the weights were made for"
                )
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + gh * gw, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)).astype(x.dtype), x], axis=1) + pos
        for i in range(self.depth):
            x = Block(d, self.num_heads, self.mlp_dim or 4 * d, self.qkv_bias, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(1e-6, name="norm")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


def tiny(name: str, num_classes: int = 10, **overrides: Any) -> nn.Module:
    """A tiny configuration of a large zoo model (for tests and quick runs on 32 x 32 inputs)."""
    base: dict[str, dict[str, Any]] = {
        "resnet18": {"width": 8},
        "resnet50": {"width": 4, "layers": (1, 1, 1, 1)},
        "vgg16": {"cfg": (8, "M", 16, "M", 16, "M"), "hidden": 32, "pool_size": 2},
        "vit": {"patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2},
    }
    return ZOO.get(name).fn(num_classes=num_classes, **{**base[name], **overrides})


__all__: Sequence[str] = ("TorchResNet", "ResNet18", "ResNet50", "VGG", "ViT", "adaptive_avg_pool", "max_pool", "tiny",
                          "normalize_input", "NORMALIZATIONS", "VGG16_CFG")
