"""Sanity checks for saliency maps (Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim, NeurIPS 2018).

Model randomization: re-initialize the model's layers with their own initializers (a fresh
`module.init` with a new key; the layer's subtree of every variable collection is swapped in)
and compare the maps of the randomized and the trained model.
- cascading: from the logits down, one more layer at each step (step j: the top j layers random);
- independent: one layer at a time, the others trained.
A method whose maps stay similar does not depend on the learned parameters: it FAILS the check
(lower similarity is better). The per-batch protocol `sanity_model_randomization` (registered)
returns curves over the steps; `model_randomization(...)` returns tidy rows with a `layer` column
and `summarize(df)` gives mean and std per layer.

Data randomization (`sanity_data_randomization`, a function: it retrains): train the same
architecture on randomly permuted labels until it fits the training set (the train accuracy
reached is reported), then compare its maps with those of the true-label model.

Similarities per image (all in [-1, 1], 1 = identical):
- `spearman`: Spearman rank correlation of the raw maps summed over channels;
- `spearman_abs`: of the normalized absolute maps: sum |R| over channels, clip at the 99th
  percentile, scale to [0, 1] (Adebayo's visualization normalization);
- `ssim`: SSIM of the normalized absolute maps (scikit-image, Gaussian weights sigma 1.5,
  data range 1);
- `hog`: Pearson correlation of HOG features of the normalized absolute maps (scikit-image,
  9 orientations, `hog_cell` pixels per cell, 2x2 cells per block).
A constant map has no rank order: correlations with it are reported as 0, unless both maps are
identical (then every similarity is 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attrax._arrays import to_device
from attrax.errors import AttraxError
from attrax.harness import check_batch, explain, forward
from attrax.methods import per_example_keys
from attrax.models import as_model, init
from attrax.protocols import PROTOCOLS, Scores
from attrax.results import conform, hparams_json
from attrax.train import TrainConfig, accuracy, cache_key, fit, load_cached, save_cached, train

Array = jax.Array
MODES = ("cascading", "independent")
SIMILARITIES = ("spearman", "spearman_abs", "ssim", "hog")


# ---------------------------------------------------------------------------------------------
# Layers and their re-initialization


def layer_names(variables) -> list[str]:
    """Top-level parameterized layers in the order of the dict: forward order for the output of
    `module.init` (Flax creates them in call order); tree maps, optax updates and training sort
    keys, so `randomized_variables` takes the order from a fresh init."""
    return list(variables["params"].keys())


def swap_layers(variables, fresh, layers: Sequence[str]):
    """`variables` with the subtree of every named layer taken from `fresh`, in every collection."""
    out = {}
    for col, tree in variables.items():
        tree = dict(tree)
        for name in layers:
            if name in tree:
                if col not in fresh or name not in fresh[col]:
                    raise AttraxError(f"fresh variables lack {col}/{name}")
                tree[name] = fresh[col][name]
        out[col] = tree
    return out


def randomized_variables(
    model, variables, x, *, key, mode: str = "cascading", layers: Sequence[str] | None = None,
) -> tuple[list[str], list[Any]]:
    """(layer per step, variables per step) of a randomization schedule.

    `layers` are given from the logits down (default: every parameterized top-level layer,
    reversed forward order). Re-initialization runs the module's own `init` with `key`, so each
    layer gets its own initializer (and BatchNorm its fresh statistics).
    """
    model = as_model(model)
    if model.module is None:
        raise AttraxError("model randomization needs a Flax module to re-initialize its layers")
    if mode not in MODES:
        raise AttraxError(f"unknown randomization mode {mode!r}: use one of {', '.join(MODES)}")
    fresh = init(model, key, to_device(x[:1]))
    forward_order = [n for n in layer_names(fresh) if n in variables["params"]]
    top_down = list(layers) if layers is not None else forward_order[::-1]
    unknown = set(top_down) - set(forward_order)
    if unknown:
        raise AttraxError(
            f"unknown layer(s) {sorted(unknown)}; the model has {', '.join(forward_order)}"
        )
    if mode == "cascading":
        steps = [swap_layers(variables, fresh, top_down[: j + 1]) for j in range(len(top_down))]
    else:
        steps = [swap_layers(variables, fresh, [name]) for name in top_down]
    return top_down, steps


# ---------------------------------------------------------------------------------------------
# Similarity of two batches of maps


def _channel_sum(r) -> np.ndarray:
    r = np.asarray(r, np.float64)
    return r.sum(-1) if r.ndim == 4 else r


def normalize_abs(r, pct: float = 99.0) -> np.ndarray:
    """(n, H, W): sum |R| over channels, clip at the `pct` percentile per image, scale to [0, 1]."""
    a = np.abs(np.asarray(r, np.float64))
    a = a.sum(-1) if a.ndim == 4 else a
    flat = a.reshape(a.shape[0], -1)
    hi = np.percentile(flat, pct, axis=1)
    lo = flat.min(1)
    hi = np.where(hi > lo, hi, flat.max(1))
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (np.minimum(flat, hi[:, None]) - lo[:, None]) / span[:, None]
    return out.reshape(a.shape)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of every row pair (average ranks for ties; 0 for a constant row)."""
    from scipy.stats import rankdata

    ra = rankdata(a.reshape(a.shape[0], -1), axis=1)
    rb = rankdata(b.reshape(b.shape[0], -1), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), 0.0)


def _ssim_sigma(h: int, w: int) -> float:
    # the Gaussian window 2 * int(3.5 sigma + 0.5) + 1 must fit the image (sigma 1.5 from 23 px up)
    return min(1.5, ((min(h, w) - 1) // 2) / 3.5)


def _ssim_one(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    sigma = _ssim_sigma(*a.shape)
    return float(structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=sigma,
                                       use_sample_covariance=False))


def ssim_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`_ssim_one` of every image pair of two (n, H, W) float64 batches at once: the same
    Gaussian-weighted SSIM (scikit-image's `structural_similarity` with data_range 1, Gaussian
    weights, population covariance, K1 0.01, K2 0.03, truncate 3.5, reflected borders, the mean
    over the window-cropped map), its five Gaussian filters run over the whole batch (no filtering
    along the batch axis). Equal to the per-image call to float64 rounding (tested); ~1 ms per
    28x28 pair saved (random logit spent most of its time in the per-image loop)."""
    from scipy.ndimage import gaussian_filter

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    sigma = _ssim_sigma(*a.shape[1:])
    truncate = 3.5
    pad = int(truncate * sigma + 0.5)  # (win_size - 1) // 2 with win_size = 2 * radius + 1

    def g(z):
        return gaussian_filter(z, sigma=(0.0, sigma, sigma), mode="reflect", truncate=truncate)

    ux, uy = g(a), g(b)
    vx = g(a * a) - ux * ux
    vy = g(b * b) - uy * uy
    vxy = g(a * b) - ux * uy
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    h, w = a.shape[1:]
    return s[:, pad:h - pad, pad:w - pad].reshape(a.shape[0], -1).mean(1, dtype=np.float64)


def _hog_one(a: np.ndarray, cell: int) -> np.ndarray:
    from skimage.feature import hog

    return hog(a, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2),
               feature_vector=True)


def similarity(r0, r1, *, metrics: Sequence[str] = SIMILARITIES, hog_cell: int | None = None,
               ) -> dict[str, np.ndarray]:
    """Per-image similarities of two batches of maps (n, H, W[, C]): metric -> (n,)."""
    bad = set(metrics) - set(SIMILARITIES)
    if bad:
        raise AttraxError(f"unknown similarity {sorted(bad)}: use {', '.join(SIMILARITIES)}")
    r0, r1 = np.asarray(r0), np.asarray(r1)
    if r0.shape != r1.shape:
        raise AttraxError(f"maps to compare have shapes {r0.shape} and {r1.shape}")
    out: dict[str, np.ndarray] = {}
    if "spearman" in metrics:
        out["spearman"] = spearman_rows(_channel_sum(r0), _channel_sum(r1))
    if {"spearman_abs", "ssim", "hog"} & set(metrics):
        a0, a1 = normalize_abs(r0), normalize_abs(r1)
        if "spearman_abs" in metrics:
            out["spearman_abs"] = spearman_rows(a0, a1)
        if "ssim" in metrics:
            out["ssim"] = ssim_batch(a0, a1)
        if "hog" in metrics:
            cell = hog_cell or max(2, min(a0.shape[1:]) // 7)
            f0 = np.stack([_hog_one(p, cell) for p in a0])
            f1 = np.stack([_hog_one(q, cell) for q in a1])
            f0 -= f0.mean(1, keepdims=True)
            f1 -= f1.mean(1, keepdims=True)
            den = np.sqrt((f0 * f0).sum(1) * (f1 * f1).sum(1))
            out["hog"] = np.where(den > 0, (f0 * f1).sum(1) / np.where(den > 0, den, 1.0), 0.0)
    # identical maps are identical, also where a map is constant (no rank order, correlations 0):
    # a deterministic method re-run on the same model scores 1, its noise ceiling
    same = np.all(r0.reshape(r0.shape[0], -1) == r1.reshape(r1.shape[0], -1), axis=1)
    return {m: np.where(same, 1.0, out[m]) for m in metrics}


# ---------------------------------------------------------------------------------------------
# Model randomization


def _explainer(method: str | Callable, method_hparams: dict | None, model) -> Callable:
    hp = dict(method_hparams or {})
    if callable(method):
        fn = jax.jit(lambda p, xx, tt, kk: method(model, p, xx, tt, key=kk, **hp))
        return lambda p, x, t, k: fn(p, x, t, per_example_keys(k, x.shape[0]))
    return lambda p, x, t, k: explain(method, model, p, x, t, key=k, **hp)


def noise_ceiling(method, run, params, x, target, keys, *, metrics, hog_cell=None, maps=None,
                  ) -> dict[str, np.ndarray]:
    """The method's own noise ceiling: per-image similarity of two runs of the same method with the
    same settings on the same model, with two different keys (nothing randomized). A deterministic
    registered method gets 1 (its two runs are the same map). A similarity below it is not evidence
    that the model or the class mattered."""
    from attrax.protocols._common import is_stochastic, other_keys

    n = x.shape[0]
    if not is_stochastic(method):
        return {m: np.ones(n) for m in metrics}
    r_a = run(params, x, target, keys) if maps is None else maps
    r_b = run(params, x, target, other_keys(keys))
    return similarity(r_a, r_b, metrics=metrics, hog_cell=hog_cell)


@PROTOCOLS.register(
    "sanity_model_randomization", category="randomization", version=2, needs_method=True,
    higher_is_better={f"{m}_{s}": False for m in MODES for s in SIMILARITIES},
    x_label="randomized layer",
)
def sanity_model_randomization(
    model, params, x, target, relevance, *, key, method=None, method_hparams: dict | None = None,
    method_key=None, modes: Sequence[str] = MODES, layers: Sequence[str] | None = None,
    metrics: Sequence[str] = SIMILARITIES, hog_cell: int | None = None,
) -> Scores:
    """Similarity of the trained model's maps (`relevance`) and the randomized models' maps.

    Metrics `<mode>_<similarity>` (e.g. `cascading_spearman_abs`) are (n, L) curves over the
    steps x = 1..L (step j: cascading - the top j layers re-initialized; independent - only the
    j-th layer from the top). `key` draws the re-initialization; the maps of every randomized
    model use `method_key`, the key `relevance` was computed with (`None`: key 0, `explain`'s
    default), so a stochastic method draws the same noise and only the weights differ. Lower
    similarity = the method depends on the weights (passes).

    Beside the curves, per image: `unrandomized_<similarity>` - the map re-explained with nothing
    randomized (1 when the re-explanation reproduces `relevance`, i.e. it ran the same method
    with the same hyperparameters and key), and `noise_ceiling_<similarity>` - two keys, nothing
    randomized (`noise_ceiling`; 1 for deterministic methods).
    """
    if method is None:
        raise AttraxError("sanity_model_randomization re-explains: pass method=<name> (and "
                          "method_hparams) of the method being checked")
    from attrax.protocols._common import example_keys

    model = as_model(model)
    x, target = check_batch(x, target)
    run = _explainer(method, method_hparams, model)
    keys = example_keys(method_key, x.shape[0])
    values, xs, order = {}, {}, {}
    for mode in modes:
        names, steps = randomized_variables(model, params, x, key=key, mode=mode, layers=layers)
        order[mode] = names
        sims = [similarity(relevance, run(v, x, target, keys), metrics=metrics,
                           hog_cell=hog_cell) for v in steps]
        for m in metrics:
            values[f"{mode}_{m}"] = np.stack([s[m] for s in sims], axis=1)
            xs[f"{mode}_{m}"] = np.arange(1, len(names) + 1, dtype=np.float64)
    r_same = run(params, x, target, keys)
    same = similarity(relevance, r_same, metrics=metrics, hog_cell=hog_cell)
    ceiling = noise_ceiling(method, run, params, x, target, keys, metrics=metrics, hog_cell=hog_cell,
                            maps=r_same)
    for m in metrics:
        values[f"unrandomized_{m}"] = same[m]
        values[f"noise_ceiling_{m}"] = ceiling[m]
    label = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
    return Scores(values=values, x=xs, choices=dict(
        method=label, method_hparams=method_hparams or {}, method_key=method_key,
        modes=list(modes), layers=order, metrics=list(metrics), hog_cell=hog_cell,
        reinit="module.init with a fresh key, layer subtree swapped", abs_normalization="p99",
        noise_ceiling="same method and settings, a second key, nothing randomized"))


def model_randomization(
    method: str, model, params, x, target, *, key: int = 0, method_hparams: dict | None = None,
    modes: Sequence[str] = MODES, layers: Sequence[str] | None = None,
    metrics: Sequence[str] = SIMILARITIES, hog_cell: int | None = None, dataset: str = "",
    model_seed: int = -1,
) -> pd.DataFrame:
    """Tidy rows of the cascading and independent randomization (one row per image, step,
    mode and similarity; x = step, extra column `layer`; protocol `sanity_<mode>`)."""
    model = as_model(model)
    x, target = check_batch(x, target)
    r0 = _explainer(method, method_hparams, model)(params, x, target, key)
    k_init = jax.random.fold_in(jax.random.key(key), 1)
    s = sanity_model_randomization(model, params, x, target, r0, key=k_init, method=method,
                                   method_hparams=method_hparams, method_key=key, modes=modes,
                                   layers=layers, metrics=metrics, hog_cell=hog_cell)
    frames = []
    n = x.shape[0]
    for mode in modes:
        names = s.choices["layers"][mode]
        for m in metrics:
            v = np.asarray(s.values[f"{mode}_{m}"])
            frames.append(pd.DataFrame({
                "protocol": f"sanity_{mode}", "metric": m,
                "x": np.tile(np.arange(1, len(names) + 1, dtype=np.float64), n),
                "layer": np.tile(np.asarray(names, dtype=object), n),
                "value": v.reshape(-1), "example": np.repeat(np.arange(n), len(names)),
            }))
    df = pd.concat(frames, ignore_index=True)
    layer = df["layer"].to_numpy()
    df = conform(df.assign(dataset=dataset, model=model.name, model_seed=model_seed,
                           method=method if isinstance(method, str) else s.choices["method"],
                           method_hparams=hparams_json(method_hparams), seed=key))
    df["layer"] = layer  # not in the results schema: `conform` drops it when rows are stored
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over images per (method, protocol, metric, step, layer)."""
    keys = [k for k in ("method", "protocol", "metric", "x", "layer") if k in df]
    grouped = df.groupby(keys, sort=False, dropna=False)["value"]
    return grouped.agg(["mean", "std", "count"]).reset_index()


# ---------------------------------------------------------------------------------------------
# Data randomization


def fit_until(model, x, y, *, seed: int, cfg: TrainConfig, fit_accuracy: float, max_epochs: int,
              ) -> tuple[Any, int, float]:
    """Train in rounds of `cfg.epochs` epochs until train accuracy >= `fit_accuracy` or
    `max_epochs`; returns (variables, epochs, train accuracy). Round r shuffles with seed
    (seed, r) and restarts the optimizer state."""
    variables, epochs, acc = None, 0, 0.0
    r = 0
    while epochs < max_epochs and acc < fit_accuracy:
        variables, _ = fit(model, x, y, seed=int(seed * 1000 + r), cfg=cfg, progress=False,
                           variables=variables)
        epochs += cfg.epochs
        acc = accuracy(model, variables, x, y)
        r += 1
    return variables, epochs, acc


def sanity_data_randomization(
    method: str, model, train_set, test_set, *, model_seed: int = 0, label_seed: int = 0,
    train_config: TrainConfig | dict | None = None, round_epochs: int = 5, max_epochs: int = 100,
    fit_accuracy: float = 0.95, n_explain: int = 100, target: str = "label",
    method_hparams: dict | None = None, key: int = 0, metrics: Sequence[str] = SIMILARITIES,
    cache: bool = True,
) -> pd.DataFrame:
    """Maps of a true-label model vs a model trained on permuted labels (Adebayo 2018, sec. 5).

    The random-label model trains in rounds of `round_epochs` until its train accuracy reaches
    `fit_accuracy` (or `max_epochs`); both models (seed `model_seed`) are cached. Maps of the
    first `n_explain` test images, target = the true `label` (or each model's `predicted`
    class), both with the same `key` and `method_hparams` (filled hyperparameters such as
    baselines or fitted patterns are used as given for both models). Rows: per-image
    similarities (protocol `sanity_data_randomization`), the method's noise ceiling per image
    (`noise_ceiling_<similarity>`: the true-label model's maps with two keys; 1 for deterministic
    methods) and scalars `train_accuracy_true`, `train_accuracy_random`, `epochs_random`,
    `test_accuracy_true`, `test_accuracy_random`, `fit_reached` (1/0). When the permuted-label
    model did not reach `fit_accuracy`, every row carries a `flag` saying so: its similarities do
    not compare with a model that memorized the labels.
    """
    from attrax.protocols._common import example_keys

    if target not in ("label", "predicted"):
        raise AttraxError(f"unknown target {target!r}: use label or predicted")
    cfg = TrainConfig(**train_config) if isinstance(train_config, dict) else train_config
    cfg = cfg or TrainConfig()
    model, v_true, info_true = train(model, train_set, seed=model_seed, cfg=cfg, cache=cache,
                                     progress=False)
    perm = np.random.default_rng(label_seed).permutation(len(train_set))
    shuffled = train_set.replace(y=np.asarray(train_set.y)[perm])
    round_cfg = dataclasses.replace(cfg, epochs=round_epochs)
    ck = cache_key(model, shuffled.fingerprint(), round_cfg, model_seed,
                   extra={"fit_accuracy": fit_accuracy, "max_epochs": max_epochs})
    template = init(model, jax.random.key(0), to_device(train_set.x[:1]))
    hit = load_cached(ck, template) if cache else None
    if hit is not None:
        v_rand, meta = hit
        epochs, acc_rand = int(meta["epochs"]), float(meta["train_accuracy"])
    else:
        v_rand, epochs, acc_rand = fit_until(model, shuffled.x, shuffled.y, seed=model_seed,
                                             cfg=round_cfg, fit_accuracy=fit_accuracy,
                                             max_epochs=max_epochs)
        if cache:
            save_cached(ck, v_rand, {"model": model.name, "seed": model_seed, "epochs": epochs,
                                     "train_accuracy": acc_rand, "purpose": "random labels"})
    sub = test_set.take(n_explain)
    x = to_device(sub.x)
    run = _explainer(method, method_hparams, model)
    keys = example_keys(key, len(sub))
    maps, targets = [], []
    for v in (v_true, v_rand):
        t = to_device(sub.y) if target == "label" else jnp.argmax(forward(model, v, x), -1)
        targets.append(t.astype(jnp.int32))
        maps.append(run(v, x, targets[-1], keys))
    sims = similarity(maps[0], maps[1], metrics=metrics)
    ceiling = noise_ceiling(method, run, v_true, x, targets[0], keys, metrics=metrics, maps=maps[0])
    n = len(sub)
    frames = [pd.DataFrame({"metric": m, "value": v, "example": np.arange(n)})
              for m, v in sims.items()]
    frames += [pd.DataFrame({"metric": f"noise_ceiling_{m}", "value": v, "example": np.arange(n)})
               for m, v in ceiling.items()]
    reached = acc_rand >= fit_accuracy
    scalars = {
        "train_accuracy_true": info_true.get("train_accuracy",
                                             accuracy(model, v_true, train_set.x, train_set.y)),
        "train_accuracy_random": acc_rand,
        "epochs_random": epochs,
        "test_accuracy_true": accuracy(model, v_true, test_set.x, test_set.y),
        "test_accuracy_random": accuracy(model, v_rand, test_set.x, test_set.y),
        "fit_reached": float(reached),
    }
    frames.append(pd.DataFrame({"metric": list(scalars), "value": list(scalars.values()),
                                "example": -1}))
    flag = "" if reached else (f"permuted-label model did not reach fit_accuracy {fit_accuracy:g} "
                               f"(train accuracy {acc_rand:.3f} after {epochs} epochs)")
    df = pd.concat(frames, ignore_index=True).assign(
        protocol="sanity_data_randomization", dataset=str(train_set.meta.get("name", "")),
        model=model.name, model_seed=model_seed, method=method,
        method_hparams=hparams_json(method_hparams), seed=label_seed, flag=flag)
    choices = dict(label_seed=label_seed, round_epochs=round_epochs, max_epochs=max_epochs,
                   fit_accuracy=fit_accuracy, n_explain=n_explain, target=target, metrics=list(metrics))
    from attrax.results import with_metadata

    return conform(with_metadata(df, "sanity_data_randomization", choices))


PROTOCOLS.register(
    "sanity_data_randomization", sanity_data_randomization, kind="retrain", category="randomization",
    version=2, needs=("method", "method_hparams", "train_set", "test_set", "train_config", "model_seed"),
    higher_is_better={m: False for m in SIMILARITIES})
