"""Model zoo (Flax linen) and the `Model` wrapper every method and protocol receives.

Conventions
- `params` everywhere means the full Flax variables dict (`{"params": ..., "batch_stats": ...}`).
- Zoo modules expose two stages, `features(x) -> A` (the last spatial feature maps, after the
  activation) and `head(A) -> logits`, so the CAM family and Grad-CAM need no architecture
  knowledge. `__call__(x) == head(features(x))`.
- The activation is a field (`act`) for experiments that swap it (`Model.with_activation`);
  no method needs it: the structure methods read the traced computation
  (`attrax.methods._engine`), on zoo and user models alike. `use_bias=False` gives the
  bias-free nets that conservation tests need.
- `max_pool` is written as a reshape + window max with a fast backward pass; the engine uses
  the same form for `reduce_window_max` (`nn.max_pool`) when it is exact.
- Convolutions are `Conv` (`nn.Conv` with `attrax.fastconv.conv_general_dilated`): on CPU their
  kernel gradient and few-channel input gradient avoid XLA:CPU's slow convolution transposes
  (same parameters and values; training cnn_a ~1.3x faster per step). `ATTRAX_CONV_VJP=xla`
  (read when a function is first traced) gives XLA's own backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attrax import fastconv
from attrax.errors import AttraxError, unknown_name
from attrax.registry import Registry

Array = jax.Array
ZOO = Registry("model")


def _first_winner(x6: Array, out: Array) -> Array:
    """Mask (like x6) of the first position, in row-major window order, that equals the max."""
    eq = (x6 == out[:, :, None, :, None, :]).astype(x6.dtype)
    seen = jnp.zeros_like(out)
    rows = []
    for i in range(x6.shape[2]):
        cols = []
        for j in range(x6.shape[4]):
            e = eq[:, :, i, :, j, :]
            cols.append(e * (seen == 0))
            seen = seen + e
        rows.append(jnp.stack(cols, axis=3))
    return jnp.stack(rows, axis=2)


@jax.custom_jvp
def _window_max(x6: Array) -> Array:
    return x6.max(axis=(2, 4))


@_window_max.defjvp
def _window_max_jvp(primals, tangents):
    (x6,), (t,) = primals, tangents
    out = x6.max(axis=(2, 4))
    return out, (t * _first_winner(x6, out)).sum(axis=(2, 4))


def max_pool(x: Array, window: int = 2, padding: str = "SAME") -> Array:
    """Non-overlapping max pooling (stride = window) of NHWC `x` with a fast backward pass.

    Same values and the same gradient as `nn.max_pool(x, (k, k), strides=(k, k))` (the gradient
    goes to the first maximum of each window in row-major order, as XLA's select-and-scatter and
    PyTorch do), but written as a reshape + max whose derivative is elementwise: XLA's
    select-and-scatter took ~20x longer than the rest of the pooling on CPU and dominated the
    gradient of the reference CNN (see `attrax.perf`). SAME pads with -inf, VALID crops.
    """
    if x.ndim != 4:
        w = (window, window)
        return nn.max_pool(x, w, strides=w, padding=padding)
    n, h, w_, c = x.shape
    k = window
    if padding == "SAME":
        oh, ow = -(-h // k), -(-w_ // k)
        ph, pw = oh * k - h, ow * k - w_
        if ph or pw:
            pads = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
            x = jnp.pad(x, pads, constant_values=-jnp.inf)
    elif padding == "VALID":
        oh, ow = h // k, w_ // k
        x = x[:, : oh * k, : ow * k]
    else:
        return nn.max_pool(x, (k, k), strides=(k, k), padding=padding)
    return _window_max(x.reshape(n, oh, k, ow, k, c))


def Conv(features: int, kernel_size, **kwargs) -> nn.Conv:  # noqa: N802 (a module factory)
    """`flax.linen.Conv` whose convolution has the faster backward pass of `attrax.fastconv` on
    CPU (same parameters, values and gradients; `jax.jvp` through it is not available there)."""
    return nn.Conv(features, kernel_size, conv_general_dilated=fastconv.conv_general_dilated, **kwargs)


class MaxPool(nn.Module):
    """Max pooling as a module (window = stride), interceptable by relevance rules."""

    window: int = 2
    padding: str = "SAME"

    def __call__(self, x):
        return max_pool(x, self.window, self.padding)


class AvgPool(nn.Module):
    window: int = 2
    padding: str = "SAME"

    def __call__(self, x):
        w = (self.window, self.window)
        return nn.avg_pool(x, w, strides=w, padding=self.padding)


class GlobalAvgPool(nn.Module):
    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


@ZOO.register("mlp", family="dense")
class MLP(nn.Module):
    """784-512-512-10 style multilayer perceptron."""

    num_classes: int = 10
    hidden: tuple[int, ...] = (512, 512)
    act: Callable = nn.relu
    use_bias: bool = True

    def setup(self):
        for i, h in enumerate(self.hidden):
            setattr(self, f"dense{i + 1}", nn.Dense(h, use_bias=self.use_bias))
        self.out = nn.Dense(self.num_classes, use_bias=self.use_bias)

    def features(self, x):
        x = x.reshape((x.shape[0], -1))
        for i in range(len(self.hidden)):
            x = self.act(getattr(self, f"dense{i + 1}")(x))
        return x

    def head(self, a):
        return self.out(a)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x))


def _conv_pool_features(module: nn.Module, x: Array) -> Array:
    """conv{i}-act blocks with pool{i} between them (none after the last): cnn, cnn_a, camnet."""
    n = len(module.channels)
    for i in range(n):
        x = module.act(getattr(module, f"conv{i + 1}")(x))
        if i < n - 1:
            x = getattr(module, f"pool{i + 1}")(x)
    return x


@ZOO.register("cnn", family="conv")
class CNN(nn.Module):
    """The tutorial's network: three conv3x3-act-maxpool blocks (32/64/128), dense 625, dense 10.

    `features` is the activation of the last conv layer (before its pooling), so Grad-CAM sees
    the finest deep spatial maps.
    """

    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 128)
    dense: tuple[int, ...] = (625,)
    act: Callable = nn.relu
    use_bias: bool = True

    def setup(self):
        for i, c in enumerate(self.channels):
            setattr(self, f"conv{i + 1}", Conv(c, (3, 3), padding="SAME", use_bias=self.use_bias))
            setattr(self, f"pool{i + 1}", MaxPool(2))
        for i, d in enumerate((*self.dense, self.num_classes)):
            setattr(self, f"dense{i + 1}", nn.Dense(d, use_bias=self.use_bias))

    def features(self, x):
        return _conv_pool_features(self, x)

    def head(self, a):
        x = getattr(self, f"pool{len(self.channels)}")(a)
        x = x.reshape((x.shape[0], -1))
        nd = len(self.dense)
        for i in range(nd):
            x = self.act(getattr(self, f"dense{i + 1}")(x))
        return getattr(self, f"dense{nd + 1}")(x)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x))


@ZOO.register("cnn_a", family="conv")
class CNNA(CNN):
    """The reference CNN of ../shared/reference (conv32-pool-conv64-pool-dense128-dense10).

    Layer names match the reference weight file, so its weights load unchanged.
    """

    channels: tuple[int, ...] = (32, 64)
    dense: tuple[int, ...] = (128,)


@ZOO.register("allconv", family="conv")
class AllConv(nn.Module):
    """All-convolutional net (Springenberg 2015 style): strided convs instead of pooling, a 1x1
    conv to class maps and global average pooling."""

    num_classes: int = 10
    channels: tuple[int, ...] = (32, 32, 64, 64)
    act: Callable = nn.relu
    use_bias: bool = True

    def setup(self):
        for i, c in enumerate(self.channels):
            stride = 2 if i % 2 == 1 else 1
            setattr(self, f"conv{i + 1}", Conv(c, (3, 3), strides=stride, padding="SAME", use_bias=self.use_bias))
        self.classifier = Conv(self.num_classes, (1, 1), use_bias=self.use_bias)
        self.gap = GlobalAvgPool()

    def features(self, x):
        for i in range(len(self.channels)):
            x = self.act(getattr(self, f"conv{i + 1}")(x))
        return x

    def head(self, a):
        return self.gap(self.classifier(a))

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x))


@ZOO.register("camnet", family="conv")
class CAMNet(nn.Module):
    """Convs -> global average pooling -> one dense layer: the architecture CAM is defined on."""

    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 128)
    act: Callable = nn.relu
    use_bias: bool = True

    def setup(self):
        for i, c in enumerate(self.channels):
            setattr(self, f"conv{i + 1}", Conv(c, (3, 3), padding="SAME", use_bias=self.use_bias))
            if i < len(self.channels) - 1:
                setattr(self, f"pool{i + 1}", MaxPool(2))
        self.gap = GlobalAvgPool()
        self.out = nn.Dense(self.num_classes, use_bias=self.use_bias)

    def features(self, x):
        return _conv_pool_features(self, x)

    def head(self, a):
        return self.out(self.gap(a))

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x))


class _Block(nn.Module):
    channels: int
    stride: int
    act: Callable
    train: bool = False

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.BatchNorm(use_running_average=not self.train, momentum=0.9, name=name)  # noqa: E731
        y = Conv(self.channels, (3, 3), strides=self.stride, padding="SAME", use_bias=False, name="conv1")(x)
        y = self.act(norm("bn1")(y))
        y = Conv(self.channels, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
        y = norm("bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = Conv(self.channels, (1, 1), strides=self.stride, use_bias=False, name="proj")(x)
            x = norm("bn_proj")(x)
        return self.act(x + y)


@ZOO.register("resnet", family="conv")
class ResNet(nn.Module):
    """A small ResNet with BatchNorm (one basic block per stage) for CIFAR-10-sized inputs.

    `train=True` (a field, set by the trainer through `clone`) uses batch statistics.
    """

    num_classes: int = 10
    stages: tuple[int, ...] = (16, 32, 64)
    act: Callable = nn.relu
    use_bias: bool = True
    train: bool = False

    def setup(self):
        self.stem = Conv(self.stages[0], (3, 3), padding="SAME", use_bias=False)
        self.bn_stem = nn.BatchNorm(use_running_average=not self.train, momentum=0.9)
        for i, c in enumerate(self.stages):
            setattr(self, f"block{i + 1}", _Block(c, 1 if i == 0 else 2, self.act, self.train))
        self.gap = GlobalAvgPool()
        self.out = nn.Dense(self.num_classes, use_bias=self.use_bias)

    def features(self, x):
        x = self.act(self.bn_stem(self.stem(x)))
        for i in range(len(self.stages)):
            x = getattr(self, f"block{i + 1}")(x)
        return x

    def head(self, a):
        return self.out(self.gap(a))

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# The Model wrapper


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """What methods receive: `model(params, x) -> logits`, plus optional stages.

    Build with `as_model(obj)` from a zoo name, a Flax linen module or a plain `apply_fn`.
    Equality is identity, so a Model is a valid static argument / cache key for `jax.jit`.
    """

    name: str
    apply_fn: Callable[[Any, Array], Array]
    module: nn.Module | None = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __call__(self, params: Any, x: Array) -> Array:
        return self.apply_fn(params, x)

    @property
    def has_stages(self) -> bool:
        return self.module is not None and hasattr(self.module, "features") and hasattr(self.module, "head")

    def _need_stages(self, what: str) -> nn.Module:
        if not self.has_stages:
            raise AttraxError(
                f"{what} needs a model with `features`/`head` stages; {self.name!r} has none "
                "(use a zoo model or give your Flax module `features(x)` and `head(A)` methods)"
            )
        return self.module

    def features(self, params: Any, x: Array) -> Array:
        m = self._need_stages("features")
        return m.apply(params, x, method=type(m).features)

    def head(self, params: Any, a: Array) -> Array:
        m = self._need_stages("head")
        return m.apply(params, a, method=type(m).head)

    def with_activation(self, act: Callable) -> Model:
        """The same model with its activation function replaced (guided backprop, deconvnet)."""
        if self.module is None or not hasattr(self.module, "act"):
            raise AttraxError(
                f"model {self.name!r} has no swappable activation: give its Flax module an `act` field"
            )
        return module_model(self.module.clone(act=act), name=f"{self.name}[{getattr(act, '__name__', 'act')}]")

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Per-model memo for compiled functions (one compile per method, hparams and shape)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def module_model(module: nn.Module, name: str | None = None) -> Model:
    return Model(name or type(module).__name__.lower(), lambda p, x: module.apply(p, x), module)


def _nnx_model(obj: Any) -> Model | None:
    """A flax.nnx module as `apply_fn(state, x)`; its params are `nnx.state(module)`."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax without nnx
        return None
    if not isinstance(obj, nnx.Module):
        return None
    graphdef, _ = nnx.split(obj)
    return Model(type(obj).__name__.lower(), lambda state, x: nnx.merge(graphdef, state)(x), None)


#: Model wrappers of user objects (modules, apply_fns), so that handing the same object to every
#: `attrax.explain` call reuses one Model and with it its traces and compiled functions.
#: id -> (weak reference to the object, Model); an entry is valid only while its object lives.
_WRAPPED: dict[int, tuple[Any, Model]] = {}
_WRAPPED_MAX = 32


def _wrap_cached(obj: Any, build: Callable[[], Model]) -> Model:
    import weakref

    hit = _WRAPPED.get(id(obj))
    if hit is not None and hit[0]() is obj:
        return hit[1]
    model = build()
    try:
        ref = weakref.ref(obj)
    except TypeError:  # not weak-referenceable: no reuse
        return model
    for k in [k for k, (r, _) in _WRAPPED.items() if r() is None]:
        del _WRAPPED[k]
    while len(_WRAPPED) >= _WRAPPED_MAX:  # the Model holds its object: bound the memory
        del _WRAPPED[next(iter(_WRAPPED))]
    _WRAPPED[id(obj)] = (ref, model)
    return model


def as_model(obj: Any, **kwargs: Any) -> Model:
    """A zoo name, a Flax linen module, a flax.nnx module (params: `nnx.state(module)`), a
    `Model`, or a plain `apply_fn(params, x) -> logits`. The same module / apply_fn object gives
    the same Model (and so reuses its cached traces and compiled functions)."""
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, str):
        return module_model(ZOO.get(obj).fn(**kwargs), obj)
    return _wrap_cached(obj, lambda: _as_model_uncached(obj))


def _as_model_uncached(obj: Any) -> Model:
    if isinstance(obj, nn.Module):
        return module_model(obj)
    nnx_model = _nnx_model(obj)
    if nnx_model is not None:
        return nnx_model
    if callable(obj):
        return Model(getattr(obj, "__name__", "apply_fn"), obj, None)
    raise AttraxError(f"cannot use {type(obj).__name__} as a model: give a zoo name, a Flax module or apply_fn")


def create(name: str, **kwargs: Any) -> Model:
    """A zoo model by name ("did you mean" on typos)."""
    if name not in ZOO:
        raise unknown_name("model", name, ZOO)
    return as_model(name, **kwargs)


def _key_tree(v: Any) -> Any:
    """The nested key order of a variables dict (None at the leaves)."""
    if hasattr(v, "items"):  # dict or FrozenDict
        return [(k, _key_tree(sub)) for k, sub in v.items()]
    return None


def _in_order(v: Any, tree: Any) -> Any:
    return v if tree is None else {k: _in_order(v[k], sub) for k, sub in tree}


def init(model: Model, key: Array, sample_x: Array) -> Any:
    """Fresh variables for a module-backed model: the module's `init` as one compiled call per
    model and input shape (eager, every initializer of every parameter shape compiles on its own).
    The dicts come back in the order the forward pass creates the layers, as Flax's own eager
    init returns them: the model-randomization cascade reads that order as the layer order
    (tests/test_sanity.py), and a compiled call returns sorted keys, so the order is recorded when
    the init is traced and put back. The values equal the eager init's (tests/test_foundation.py)."""
    if model.module is None:
        raise AttraxError("init needs a Flax module; a plain apply_fn brings its own params")
    sample_x = jnp.asarray(sample_x)
    spec = ("init", sample_x.shape, str(sample_x.dtype), jnp.shape(key), str(key.dtype))

    def build():
        order: list = []
        module = model.module

        def traced(k, xx):
            v = module.init(k, xx)
            order[:] = [_key_tree(v)]  # runs at trace time: Python dicts still in creation order
            return v

        return jax.jit(traced), order

    fn, order = model.cached(spec, build)
    v = fn(key, sample_x)
    return _in_order(v, order[0])


def names() -> list[str]:
    return ZOO.names()
