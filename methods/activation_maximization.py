"""Activation maximization: interpreting a MODEL (not an example) by the input it prefers.

- `activation_maximization` (Erhan et al. 2009; Simonyan et al. 2014; tutorial section 1.1):
  x*_u = argmax_x s_u(x) - lambda/2 ||x - m_u||^2 for every unit u (a class logit by default, or a
  channel of a layer), with the prior m_u the class-mean image (`class_means`) or zero.
- `activation_maximization_code` (Nguyen et al. 2016; tutorial section 1.3): the same in the code
  space of a decoder G trained by `train_decoder` to reconstruct images from the classifier's
  penultimate code: z*_u = argmax_z s_u(G(z)) - lambda/2 ||z - z_u||^2, z_u the class-mean code
  (`class_code_means`) or zero; the image is G(z*_u).

All units are optimized together: one compiled `lax.fori_loop` of Adam steps (optax) over the
batch of U images or codes, each step one forward and backward pass of the summed objectives (the
units do not interact). With a linear score w.x + b and this prior the optimum is m + w / lambda,
which the tests check.

These functions are deliberately NOT registered as attribution methods: their signature is
`fn(model, params, units, *, ...)`. `summarize` turns the images into tidy result rows (final
logit, probability, distance to the class mean) and `save_grid` draws them (matplotlib).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attrax.errors import AttraxError
from attrax.methods._core import class_score

Array = jax.Array
PRIORS = ("mean", "zero")
SCHEDULES = ("constant", "cosine")


# ---------------------------------------------------------------------------------------------
# Priors and objectives


def class_means(x: Any, y: Any, num_classes: int | None = None) -> Array:
    """Mean image of every class, (num_classes, H, W, C); a class without examples gets zeros."""
    x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    onehot = jax.nn.one_hot(y, k, dtype=x.dtype)  # (n, K)
    counts = onehot.sum(0)
    sums = jnp.tensordot(onehot, x, axes=(0, 0))
    return sums / jnp.maximum(counts, 1.0).reshape((k,) + (1,) * (x.ndim - 1))


def unit_scores(
    model, params, xs: Array, units: Array, *, layer: str = "logits", score: str = "logit"
) -> Array:
    """s_u(x_u) for a batch of images xs (U, ...) and units (U,).

    `layer="logits"`: the class score (`score`: logit, probability, log_probability);
    `"features"` or a named layer: the mean activation of channel u (last axis) of that layer.
    """
    if layer == "logits":
        return class_score(model(params, xs), units, score)
    if layer == "features":
        a = model.features(params, xs)
    else:
        from attrax.methods.cam import layer_output

        a, _ = layer_output(model, params, xs, layer)
    sel = jnp.take_along_axis(a, units.reshape((-1,) + (1,) * (a.ndim - 1)), axis=-1)[..., 0]
    return sel.reshape(sel.shape[0], -1).mean(axis=1)


def _optimizer(lr: float, steps: int, schedule: str) -> optax.GradientTransformation:
    if schedule == "constant":
        return optax.adam(lr)
    if schedule == "cosine":
        return optax.adam(optax.cosine_decay_schedule(lr, max(1, steps)))
    raise AttraxError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")


def maximize(
    objective: Callable[[Array], Array],
    prior: Array,
    *,
    lam: float,
    steps: int,
    lr: float,
    schedule: str = "constant",
    init: Array | None = None,
    bounds: tuple[float, float] | None = None,
) -> Array:
    """argmax_v objective(v)_u - lam/2 ||v_u - prior_u||^2 for every row u, with Adam.

    `objective(v) -> (U,)`; all rows in one compiled loop; `bounds` clips after every step.
    """
    opt = _optimizer(lr, steps, schedule)
    v0 = prior if init is None else init

    def loss(v):
        return -jnp.sum(objective(v)) + 0.5 * lam * jnp.sum((v - prior) ** 2)

    def step(_, state):
        v, opt_state = state
        updates, opt_state = opt.update(jax.grad(loss)(v), opt_state, v)
        v = optax.apply_updates(v, updates)
        if bounds is not None:
            v = jnp.clip(v, *bounds)
        return v, opt_state

    v, _ = jax.lax.fori_loop(0, steps, step, (v0, opt.init(v0)))
    return v


def _prior_rows(
    prior: str | Any, table: Any, units: Array, shape: Sequence[int] | None, what: str
) -> Array:
    """The prior of every unit: the unit's row of `table` ("mean"), zeros ("zero"), or the unit's
    row of an array given as `prior` (one row per class/unit)."""
    if isinstance(prior, str):
        if prior not in PRIORS:
            raise AttraxError(
                f"unknown prior {prior!r}: use one of {', '.join(PRIORS)} (or an array)"
            )
        if prior == "mean":
            if table is None:
                raise AttraxError(f"prior='mean' needs the class means ({what})")
            return jnp.asarray(table, jnp.float32)[units]
        if shape is None and table is None:
            raise AttraxError(
                "prior='zero' needs `shape` (or the class means to take the shape from)"
            )
        shape = tuple(shape) if shape is not None else jnp.asarray(table).shape[1:]
        return jnp.zeros((units.shape[0],) + tuple(shape), jnp.float32)
    return jnp.asarray(prior, jnp.float32)[units]


def _init(prior_rows: Array, key, init_std: float) -> Array:
    if init_std == 0.0:
        return prior_rows
    if key is None:
        raise AttraxError("init_std > 0 needs a `key`")
    key = jax.random.key(key) if isinstance(key, int) else key
    return prior_rows + init_std * jax.random.normal(key, prior_rows.shape, prior_rows.dtype)


def activation_maximization(
    model,
    params,
    units: Any,
    *,
    prior: str | Any = "mean",
    means: Any = None,
    shape: Sequence[int] | None = None,
    lam: float = 1.0,
    steps: int = 2000,
    lr: float = 1e-3,
    schedule: str = "constant",
    layer: str = "logits",
    score: str = "logit",
    bounds: tuple[float, float] | None = None,
    init_std: float = 0.0,
    key: Any = None,
) -> Array:
    """Images (U, H, W, C) maximizing each unit's score under an L2 prior (see module docs).

    `units`: class indices (or channel indices for a `layer`); `prior`: "mean" (with `means`
    (num_classes, H, W, C), see `class_means`), "zero" (with `shape`) or an array. Defaults:
    lambda 1, Adam lr 1e-3 for 2000 steps from the prior (`init_std` > 0 adds seeded noise),
    class logit, no clipping (`bounds=(0, 1)` keeps pixels valid).
    """
    from attrax.models import as_model

    model = as_model(model)
    units = jnp.atleast_1d(jnp.asarray(units, jnp.int32))
    prior_rows = _prior_rows(prior, means, units, shape, "see class_means")
    objective = lambda v: unit_scores(model, params, v, units, layer=layer, score=score)  # noqa: E731
    run = jax.jit(
        lambda p0, v0: maximize(
            objective, p0, lam=lam, steps=steps, lr=lr, schedule=schedule, init=v0, bounds=bounds
        )
    )
    return run(prior_rows, _init(prior_rows, key, init_std))


# ---------------------------------------------------------------------------------------------
# Code space: penultimate code, decoder, AM over codes


def penultimate_code(model, params, x: Array) -> Array:
    """The classifier's penultimate code: the input of its last Dense layer, flattened (n, d)."""
    from attrax.models import as_model

    model = as_model(model)
    if model.module is None:
        raise AttraxError(
            f"the penultimate code needs the model's Flax module; {model.name!r} is a plain "
            "apply_fn"
        )
    seen: list[Array] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.module.apply(params, x)
    if not seen:
        raise AttraxError(f"model {model.name!r} has no Dense layer, so no penultimate code")
    return seen[-1].reshape(x.shape[0], -1)


def class_code_means(model, params, x: Any, y: Any, num_classes: int | None = None) -> Array:
    """Mean penultimate code of every class, (num_classes, d)."""
    codes = jax.jit(lambda xx: penultimate_code(model, params, xx))(jnp.asarray(x))
    return class_means(codes, y, num_classes)


class MLPDecoder(nn.Module):
    """code (n, d) -> image (n, *shape): Dense-ReLU layers, then a Dense to the pixels with a
    sigmoid (images in [0, 1]) or no output activation (`output="linear"`)."""

    shape: tuple[int, ...]
    hidden: tuple[int, ...] = (256,)
    output: str = "sigmoid"

    @nn.compact
    def __call__(self, z):
        for h in self.hidden:
            z = nn.relu(nn.Dense(h)(z))
        y = nn.Dense(math.prod(self.shape))(z)
        y = nn.sigmoid(y) if self.output == "sigmoid" else y
        return y.reshape((z.shape[0],) + tuple(self.shape))


@dataclasses.dataclass(frozen=True, eq=False)
class Decoder:
    """A trained generator G: `decoder(z) -> images`, with its reconstruction losses."""

    module: nn.Module
    params: Any
    code_dim: int
    losses: tuple[float, ...] = ()

    def __call__(self, z: Array) -> Array:
        return self.module.apply(self.params, z)


def train_decoder(
    model,
    params,
    x: Any,
    *,
    hidden: tuple[int, ...] = (256,),
    steps: int = 500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> Decoder:
    """Train an `MLPDecoder` (optax Adam, mean squared error) to map the classifier's penultimate
    codes of `x` back to `x`. Defaults: one hidden layer of 256, 500 steps of batch 128, lr 1e-3."""
    x = jnp.asarray(x)
    codes = jax.jit(lambda xx: penultimate_code(model, params, xx))(x)
    module = MLPDecoder(tuple(x.shape[1:]), tuple(hidden))
    key = jax.random.key(seed)
    k_init, k_data = jax.random.split(key)
    dparams = module.init(k_init, codes[:1])
    tx = optax.adam(lr)

    @jax.jit
    def step(state, i):
        p, s = state
        idx = jax.random.randint(
            jax.random.fold_in(k_data, i), (min(batch_size, x.shape[0]),), 0, x.shape[0]
        )

        def loss_fn(pp):
            return jnp.mean((module.apply(pp, codes[idx]) - x[idx]) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = tx.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    state, losses = (dparams, tx.init(dparams)), []
    for i in range(steps):
        state, loss = step(state, i)
        losses.append(loss)
    return Decoder(
        module, state[0], int(codes.shape[1]), tuple(float(v) for v in jax.device_get(losses))
    )


def activation_maximization_code(
    model,
    params,
    units: Any,
    *,
    decoder: Decoder,
    prior: str | Any = "mean",
    code_means: Any = None,
    lam: float = 1.0,
    steps: int = 500,
    lr: float = 1e-2,
    schedule: str = "constant",
    layer: str = "logits",
    score: str = "logit",
    init_std: float = 0.0,
    key: Any = None,
) -> tuple[Array, Array]:
    """(images G(z*), codes z*) maximizing each unit's score in the decoder's code space.

    `prior`: "mean" (with `code_means`, see `class_code_means`), "zero" or an array of codes.
    Defaults: lambda 1, Adam lr 1e-2 for 500 steps from the prior, class logit.
    """
    from attrax.models import as_model

    model = as_model(model)
    units = jnp.atleast_1d(jnp.asarray(units, jnp.int32))
    prior_rows = _prior_rows(prior, code_means, units, (decoder.code_dim,), "see class_code_means")

    def objective(z):
        return unit_scores(model, params, decoder(z), units, layer=layer, score=score)

    run = jax.jit(
        lambda p0, v0: maximize(
            objective, p0, lam=lam, steps=steps, lr=lr, schedule=schedule, init=v0
        )
    )
    z = run(prior_rows, _init(prior_rows, key, init_std))
    return decoder(z), z


# ---------------------------------------------------------------------------------------------
# Results: tidy rows and an image grid


def summarize(
    model,
    params,
    images: Any,
    units: Any,
    *,
    means: Any = None,
    path: str | Path | None = None,
    titles: Sequence[str] | None = None,
    ids: dict[str, Any] | None = None,
):
    """Tidy result rows for class-unit images: final `logit`, `probability` (softmax) and, with
    `means`, `distance_to_mean` (L2 distance to the class-mean image). `example` is the unit index;
    `ids` fill further schema columns ({"model": ..., "method_hparams": {...}, "dataset": ...});
    `method` and `protocol` default to "activation_maximization". With `path` the image grid is
    saved there as well (`save_grid`)."""
    import pandas as pd

    from attrax.models import as_model
    from attrax.results import conform, hparams_json

    model = as_model(model)
    images = jnp.asarray(images)
    units_np = np.atleast_1d(np.asarray(units, np.int64))
    logits = model(params, images)
    idx = jnp.asarray(units_np)
    metrics = {
        "logit": class_score(logits, idx, "logit"),
        "probability": class_score(logits, idx, "probability"),
    }
    if means is not None:
        diff = images - jnp.asarray(means)[idx]
        metrics["distance_to_mean"] = jnp.sqrt(
            jnp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=1)
        )
    frames = [
        pd.DataFrame(
            {"metric": k, "x": np.nan, "value": np.asarray(v, np.float64), "example": units_np}
        )
        for k, v in metrics.items()
    ]
    df = pd.concat(frames, ignore_index=True)
    ids = dict(ids or {})
    ids.setdefault("method", "activation_maximization")
    ids.setdefault("protocol", "activation_maximization")
    for k, v in ids.items():
        df[k] = hparams_json(v) if k == "method_hparams" and not isinstance(v, str) else v
    if path is not None:
        save_grid(images, path, titles=titles or [f"{u}" for u in units_np])
    return conform(df)


def save_grid(
    images: Any, path: str | Path, *, titles: Sequence[str] | None = None, cols: int | None = None
) -> Path:
    """Save images (U, H, W, C) as one grid figure (matplotlib, Agg backend); returns the path.

    Every image is shown on its own min-max scale (gray for one channel)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    imgs = np.asarray(images, np.float32)
    u = imgs.shape[0]
    cols = cols or min(u, 10)
    rows = math.ceil(u / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= u:
            continue
        im = imgs[i]
        lo, hi = float(im.min()), float(im.max())
        im = (im - lo) / (hi - lo) if hi > lo else np.zeros_like(im)
        ax.imshow(
            im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None
        )
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
