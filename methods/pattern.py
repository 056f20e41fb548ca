"""PatternNet and PatternAttribution (Kindermans et al. 2018, "Learning how to explain neural
networks: PatternNet and PatternAttribution").

For a linear layer y = w^T x (per output neuron), a signal estimator with pattern a gives the
signal s = a y. Patterns are fitted per layer from training activations:

- "linear" estimator S_a: a = cov(x, y) / (w^T cov(x, y));
- "relu" estimator S_a+ (default; the positive regime of a following ReLU):
  a+ = (E+[x y] - E+[x] E+[y]) / (w^T (E+[x y] - E+[x] E+[y])), E+ over samples with y > 0.
  The last layer (the logits, no ReLU) always uses the linear estimator.

PatternNet backpropagates the signal: starting from y_c at the target logit, each linear layer
maps back with its pattern instead of its weights (ReLUs gate as in the gradient, max pooling
routes to the winner); the map is the signal estimate at the input. PatternAttribution
backpropagates with w * a (elementwise) instead; on a linear model it is w * a * y, which sums
to y (relevance conservation).

Statistics for Conv layers are over all patches (every position is a sample). BatchNorm is
merged into the preceding layer first. `fit_patterns` caches fitted patterns on disk like
trained parameters (keyed by a hash of model, parameters, data and settings). Without patterns
(`patterns=None`) the methods fall back to the naive estimator S_w: a = w / (w^T w).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attrax._arrays import to_device
from attrax.errors import AttraxError
from attrax.methods import _engine, _rules
from attrax.methods._core import METHODS

Array = jax.Array
PATTERN_VERSION = 1
ESTIMATORS = ("relu", "linear")


def _in_axes(kernel: Array) -> tuple[int, ...]:
    return tuple(range(kernel.ndim - 1))


def _statistics(model, params, x: Array, weights: Array, estimator: str, canonize: bool):
    """Per-layer sums over one batch: count, sum y, sum x, sum x*y (masked for "relu").

    `weights` (n,) is 1 for real examples and 0 for padding rows. The layers and their inputs
    come from the engine's trace of the model (any JAX model).
    """
    graph = _engine.graph_of(model, params, x)
    stats: dict[str, dict[str, Array]] = {}

    def handle(node, env):
        if node.kind != "linear":
            return None
        info = node.info
        a = env[node.ins[0]]
        kernel, bias, rest = _engine.linear_parts(node, env, canonize)
        layer = _engine.make_linear(node, a, kernel, bias)
        y = layer(a)
        m = jnp.ones_like(y) if (estimator == "linear" or info.last) else (y > 0).astype(y.dtype)
        m = m * weights.reshape((-1,) + (1,) * (y.ndim - 1))
        red = tuple(range(y.ndim - 1))
        stats[info.name] = {
            "count": m.sum(red),
            "sy": (m * y).sum(red),
            "sx": layer.kernel_transpose(a, m),
            "sxy": layer.kernel_transpose(a, m * y),
        }
        return _engine.finish_linear(node, env, rest, y)

    _engine.evaluate(graph, params, x, handle)
    return stats


def patterns_from_statistics(stats: dict[str, dict[str, Array]], kernels: dict[str, Array]) -> dict[str, Array]:
    """Patterns a = cov / (w^T cov) per output neuron (0 where w^T cov vanishes)."""
    out = {}
    for name, s in stats.items():
        k = kernels[name]
        cnt = jnp.maximum(s["count"], 1.0)
        ex, ey, exy = s["sx"] / cnt, s["sy"] / cnt, s["sxy"] / cnt
        cov = exy - ex * ey
        den = jnp.sum(k * cov, axis=_in_axes(k))
        ok = jnp.abs(den) > 1e-12
        out[name] = jnp.where(ok, cov / jnp.where(ok, den, 1.0), 0.0)
    return out


def _kernels(model, params, x, canonize: bool) -> dict[str, Array]:
    graph = _engine.graph_of(model, params, x)
    out: dict[str, Array] = {}

    def handle(node, env):
        if node.kind == "linear":
            out[node.info.name] = _engine.linear_parts(node, env, canonize)[0]
        return None

    _engine.evaluate(graph, params, x, handle)
    return out


def _digest(tree: Any) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fit_patterns(
    model, params, x_train, *, estimator: str = "relu", batch_size: int = 256, canonize: bool = True,
    cache: bool = True,
) -> dict[str, Array]:
    """Fit PatternNet signal estimators on training inputs (Kindermans et al. 2018).

    Returns {layer path: pattern} (kernel-shaped), to pass as `patterns=` to `pattern_net` /
    `pattern_attribution`. Statistics accumulate over chunks of `batch_size` images through one
    compiled function. With `cache` (default) the result is stored in the model cache folder,
    keyed by a hash of (model, parameters, data, estimator, canonize).
    """
    from attrax.models import as_model
    from attrax.train import load_cached, save_cached

    if estimator not in ESTIMATORS:
        raise AttraxError(f"unknown pattern estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}")
    model = as_model(model)
    x_train = np.asarray(x_train, np.float32)
    if x_train.ndim < 2 or x_train.shape[0] == 0:
        raise AttraxError(f"x_train must be a non-empty batch, got shape {x_train.shape}")
    kernels = _kernels(model, params, to_device(x_train[:1]), canonize)
    desc = {"v": PATTERN_VERSION, "model": model.name, "module": repr(model.module),
            "params": _digest(params), "data": _digest(x_train), "estimator": estimator,
            "canonize": canonize}
    key = "patterns-" + hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]
    template = {k: np.zeros(v.shape, np.float32) for k, v in kernels.items()}
    if cache:
        hit = load_cached(key, template)
        if hit is not None:
            return {k: to_device(v) for k, v in hit[0].items()}
    chunk = min(batch_size, x_train.shape[0])
    step = jax.jit(lambda p, xx, w: _statistics(model, p, xx, w, estimator, canonize))
    total = None
    for start in range(0, x_train.shape[0], chunk):
        part = x_train[start:start + chunk]
        w = np.zeros((chunk,), np.float32)
        w[: len(part)] = 1.0
        if len(part) < chunk:
            part = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], part.dtype)])
        s = step(params, to_device(part), to_device(w))
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    patterns = patterns_from_statistics(total, kernels)
    if cache:
        save_cached(key, {k: np.asarray(v) for k, v in patterns.items()},
                    {"kind": "patterns", **desc, "n_train": int(x_train.shape[0])})
    return patterns


def _backward_kernels(patterns, attribution: bool):
    def kernel_for(info, kernel, bias):
        if patterns is None:  # naive estimator S_w: a = w / (w^T w)
            a = kernel / jnp.maximum(jnp.sum(kernel**2, axis=_in_axes(kernel)), 1e-12)
        else:
            if info.name not in patterns:
                raise AttraxError(f"no fitted pattern for layer {info.name!r}; refit with fit_patterns")
            a = to_device(patterns[info.name], kernel.dtype)
            if a.shape != kernel.shape:
                raise AttraxError(f"pattern for {info.name} has shape {a.shape}, the layer's kernel {kernel.shape}")
        return kernel * a if attribution else a

    return kernel_for


def _signal_backprop(model, params, x, target, patterns, attribution: bool, canonize: bool,
                     unknown: str = "error"):
    def cotangent(logits):
        onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
        return onehot * jax.lax.stop_gradient(logits)

    return _rules.propagate(model, params, x, cotangent, None, canonize=canonize, transformer="gradient",
                            kernel_for=_backward_kernels(patterns, attribution), unknown=unknown)


@METHODS.register("pattern_net", family="relevance", needs="apply", stochastic=False, cost=lambda hp: 2)
def pattern_net(model, params, x, target, *, key=None, patterns: Any = None, canonize: bool = True,
                unknown: str = "error") -> Array:
    """PatternNet (Kindermans et al. 2018): the signal y_c backpropagated through the patterns.

    `patterns`: {layer path: pattern} from `fit_patterns` (default None: naive estimator S_w).
    """
    return _signal_backprop(model, params, x, target, patterns, False, canonize, unknown)


@METHODS.register("pattern_attribution", family="relevance", needs="apply", stochastic=False,
                  cost=lambda hp: 2)
def pattern_attribution(model, params, x, target, *, key=None, patterns: Any = None,
                        canonize: bool = True, unknown: str = "error") -> Array:
    """PatternAttribution (Kindermans et al. 2018): y_c backpropagated through w * a.

    `patterns`: {layer path: pattern} from `fit_patterns` (default None: naive estimator S_w).
    """
    return _signal_backprop(model, params, x, target, patterns, True, canonize, unknown)
