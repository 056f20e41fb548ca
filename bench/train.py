"""Training with optax: jitted steps, deterministic per seed, cached by content hash.

Two epoch strategies (`loop`): "python" (a Python loop of jitted steps) and "scan" (one
`lax.scan` per epoch); three multi-model strategies (`train_many(mode=...)`): "sequential",
"vmap" (all models' parameters stacked and trained by one vmapped step) and "parallel" (one
worker thread per CPU core, each training whole models through the one compiled step). On this
CPU the Python loop was ~5x faster than scan; vmap was ~3x slower than sequential (XLA:CPU
lowers a vmapped convolution to a grouped convolution) and parallel ~0.55x of sequential (XLA:
CPU runs a convolution's backward pass on one thread, so one model leaves the other cores idle).
"auto" picks per backend (python/parallel on CPU, scan/vmap on GPU/TPU). The benchmark command
re-measures all of them (`attrax-bench`, training and ROAR grid sections).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attrax.errors import AttraxError, unknown_name
from attrax.models import Model, as_model, init

Array = jax.Array
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    loop: str = "auto"  # python | scan | auto


def cache_dir() -> Path:
    root = os.environ.get("ATTRAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attrax")
    return Path(root) / "models"


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    if cfg.optimizer == "adam":
        return optax.adamw(cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(cfg.lr)
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.lr, momentum=0.9)
    raise AttraxError(f"unknown optimizer {cfg.optimizer!r}: use adam or sgd")


def _has_batch_stats(variables) -> bool:
    return "batch_stats" in variables


def _make_step(model: Model, tx: optax.GradientTransformation):
    module = model.module
    train_module = module.clone(train=True) if hasattr(module, "train") else module

    def loss_fn(params, other, xb, yb):
        variables = {"params": params, **other}
        if other:
            logits, upd = train_module.apply(variables, xb, mutable=list(other))
        else:
            logits, upd = module.apply(variables, xb), {}
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, upd

    def step(state, xb, yb):
        params, other, opt_state = state
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params, other, xb, yb)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, {**other, **upd}, opt_state), loss

    return step


def _epoch_batches(n: int, batch: int, key: Array) -> np.ndarray:
    perm = np.asarray(jax.random.permutation(key, n))
    nb = n // batch
    return perm[: nb * batch].reshape(nb, batch)


def pick_loop(loop: str) -> str:
    if loop != "auto":
        return loop
    return "python" if jax.default_backend() == "cpu" else "scan"


def fit(
    model: Model, x: np.ndarray, y: np.ndarray, *, seed: int, cfg: TrainConfig, progress: bool = True,
    variables=None,
) -> tuple[Any, list[float]]:
    """Train from a fresh seeded init (or from `variables`); returns (variables, epoch losses)."""
    from tqdm.auto import tqdm

    key = jax.random.key(seed)
    k_init, k_data = jax.random.split(key)
    if variables is None:
        variables = init(model, k_init, jnp.asarray(x[:1]))
    params = variables["params"]
    other = {k: v for k, v in variables.items() if k != "params"}
    tx = _optimizer(cfg)
    state = (params, other, tx.init(params))
    step = _make_step(model, tx)
    xd, yd = jnp.asarray(x), jnp.asarray(y, jnp.int32)
    loop = pick_loop(cfg.loop)
    losses = []
    if loop == "python":
        jstep = jax.jit(step, donate_argnums=0)
    else:

        @jax.jit
        def epoch_scan(state, idx):
            def body(s, i):
                return step(s, xd[i], yd[i])

            return jax.lax.scan(body, state, idx)

    bar = tqdm(range(cfg.epochs), desc=f"train {model.name} seed {seed}", disable=not progress, leave=False)
    for ep in bar:
        idx = _epoch_batches(len(x), min(cfg.batch_size, len(x)), jax.random.fold_in(k_data, ep))
        if loop == "python":
            tot = 0.0
            for b in idx:
                state, loss = jstep(state, xd[b], yd[b])
                tot += loss
            ep_loss = float(tot) / len(idx)
        else:
            state, ls = epoch_scan(state, jnp.asarray(idx))
            ep_loss = float(ls.mean())
        losses.append(ep_loss)
        bar.set_postfix(loss=f"{ep_loss:.4f}")
    params, other, _ = state
    return {"params": params, **other}, losses


def accuracy(model: Model, variables, x: np.ndarray, y: np.ndarray) -> float:
    from attrax.harness import forward

    logits = forward(model, variables, jnp.asarray(x))
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


def cache_key(model: Model, dataset_fingerprint: str, cfg: TrainConfig, seed: int, extra: Any = None) -> str:
    desc = {
        "v": CACHE_VERSION,
        "model": model.name,
        "module": repr(model.module),
        "data": dataset_fingerprint,
        "train": dataclasses.asdict(cfg) | {"loop": None},  # the loop strategy does not change semantics
        "seed": seed,
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_cached(key: str, variables, info: dict) -> Path:
    d = cache_dir()
    blob = flax.serialization.to_bytes(variables)
    atomic_write_bytes(d / f"{key}.msgpack", blob)
    meta = dict(info, sha256=hashlib.sha256(blob).hexdigest(), key=key)
    atomic_write_bytes(d / f"{key}.json", json.dumps(meta, indent=1, default=str).encode())
    return d / f"{key}.msgpack"


def load_cached(key: str, template) -> tuple[Any, dict] | None:
    """The cached variables, or None when absent; a corrupt entry is reported and removed."""
    import warnings

    d = cache_dir()
    blob_p, meta_p = d / f"{key}.msgpack", d / f"{key}.json"
    if not (blob_p.exists() and meta_p.exists()):
        return None
    try:
        meta = json.loads(meta_p.read_text())
        blob = blob_p.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ValueError("checksum mismatch")
        return flax.serialization.from_bytes(template, blob), meta
    except Exception as e:  # noqa: BLE001 - any failure means the entry cannot be trusted
        warnings.warn(f"corrupt model cache entry {blob_p} ({e}); retraining", stacklevel=2)
        for p in (blob_p, meta_p):
            p.unlink(missing_ok=True)
        return None


def train(
    model: Any,
    train_set,
    *,
    seed: int = 0,
    cfg: TrainConfig | None = None,
    test_set=None,
    cache: bool = True,
    progress: bool = True,
    **model_kwargs: Any,
) -> tuple[Model, Any, dict]:
    """Train a zoo model (or a Flax-module Model) on a Dataset, or load it from the cache.

    Returns (model, variables, info) where info has `test_accuracy` (when `test_set` is given),
    `cached` (bool), `seconds` and `losses`.
    """
    cfg = cfg or TrainConfig()
    model = as_model(model, **model_kwargs) if isinstance(model, str) else as_model(model)
    if model.module is None:
        raise AttraxError("training needs a Flax module (a zoo name or an nn.Module), not a plain apply_fn")
    key = cache_key(model, train_set.fingerprint(), cfg, seed)
    if cache:
        template = init(model, jax.random.key(0), jnp.asarray(train_set.x[:1]))
        hit = load_cached(key, template)
        if hit is not None:
            variables, meta = hit
            return model, variables, dict(meta, cached=True)
    t0 = time.perf_counter()
    variables, losses = fit(model, train_set.x, train_set.y, seed=seed, cfg=cfg, progress=progress)
    jax.block_until_ready(variables)
    info: dict[str, Any] = {"seconds": time.perf_counter() - t0, "losses": losses, "seed": seed,
                            "model": model.name, "train_config": dataclasses.asdict(cfg)}
    info["train_accuracy"] = accuracy(model, variables, train_set.x, train_set.y)
    if test_set is not None:
        info["test_accuracy"] = accuracy(model, variables, test_set.x, test_set.y)
    if cache:
        save_cached(key, variables, info)
    return model, variables, dict(info, cached=False)


def train_module_accuracy(model: Model, variables, dataset) -> float:
    """Test accuracy of trained variables on a Dataset."""
    return accuracy(model, variables, dataset.x, dataset.y)


# ---------------------------------------------------------------------------------------------
# Several models at once (ROAR/KAR retrains, sanity checks)

MANY_MODES = ("auto", "vmap", "parallel", "sequential")


def cpu_workers() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pick_many_mode(mode: str) -> str:
    """"auto": vmap on GPU/TPU; on CPU parallel with 2+ cores, else sequential (measured, see the
    module docstring and `attrax-bench`)."""
    if mode not in MANY_MODES:
        raise unknown_name("train_many mode", mode, MANY_MODES)
    if mode != "auto":
        return mode
    if jax.default_backend() != "cpu":
        return "vmap"
    return "parallel" if cpu_workers() > 1 else "sequential"


def _per_model_data(x, m: int) -> tuple[list[Any], np.ndarray]:
    """(distinct arrays, model -> array index) for shared data or one array per model."""
    if isinstance(x, list | tuple):
        if len(x) != m:
            raise AttraxError(
                f"train_many got {len(x)} data arrays for {m} seeds: give one per seed or one"
            )
        uniq: dict[int, int] = {}
        arrays, index = [], []
        for a in x:
            if id(a) not in uniq:
                uniq[id(a)] = len(arrays)
                arrays.append(a)
            index.append(uniq[id(a)])
        shapes = {np.shape(a) for a in arrays}
        if len(shapes) != 1:
            raise AttraxError(f"train_many needs data arrays of equal shape, got {sorted(shapes)}")
        return arrays, np.asarray(index)
    return [x], np.zeros(m, dtype=int)


def train_many(
    model: Any, x, y, seeds, *, cfg: TrainConfig, mode: str = "auto", progress: bool = False,
    workers: int | None = None,
) -> tuple[list[Any], np.ndarray]:
    """Train one model per seed from fresh seeded inits; returns (variables list, losses).

    `x` (and `y`) is one array shared by all models, or a list with one array per seed (data
    variants of equal shape, e.g. the ROAR fractions; the same array object listed twice is
    stored once). Model i is exactly what `fit(model, x_i, y_i, seed=seeds[i], cfg=cfg)` trains:
    the same init, the same batch order (to float tolerance). `mode`: "sequential" (one model
    after another through one compiled step shared by all), "vmap" (parameters and optimizer
    states stacked, every step of all models one vmapped compiled call), "parallel" (`workers`
    threads, default one per CPU core, each training whole models through the same compiled
    step; results equal sequential) or "auto" (see `pick_many_mode`); `cfg.loop` still picks a
    Python loop of steps or one `lax.scan` per epoch. `losses` is (models, epochs) mean losses.
    """
    from tqdm.auto import tqdm

    model = as_model(model)
    if model.module is None:
        raise AttraxError("training needs a Flax module (a zoo name or an nn.Module)")
    seeds = [int(s) for s in seeds]
    m = len(seeds)
    if m == 0:
        return [], np.zeros((0, cfg.epochs))
    xs, xi = _per_model_data(x, m)
    ys, yi = _per_model_data(y, m)
    n = int(np.shape(xs[0])[0])
    if int(np.shape(ys[0])[0]) != n:
        raise AttraxError(f"train_many: {n} images but {np.shape(ys[0])[0]} labels")
    chosen = pick_many_mode(mode)
    batched = chosen == "vmap"
    tx = _optimizer(cfg)
    step = _make_step(model, tx)
    many = jax.vmap(step) if batched else step
    xd = jnp.stack([jnp.asarray(a) for a in xs])  # (variants, n, ...): each distinct array once
    yd = jnp.stack([jnp.asarray(a, jnp.int32) for a in ys])

    def one_step(state, data, vx, vy, idx):
        # data: all variants (arguments, never closed-over constants: XLA would fold them);
        # vx, vy: the model(s)' variant; idx: (batch,) or (models, batch) example indices
        xa, ya = data
        sel = (vx[:, None], idx) if batched else (vx, idx)
        sel_y = (vy[:, None], idx) if batched else (vy, idx)
        return many(state, xa[sel], ya[sel_y])

    loop = pick_loop(cfg.loop)
    if loop == "python":
        run_step = jax.jit(one_step, donate_argnums=0)
    else:

        @jax.jit
        def run_epoch(state, data, vx, vy, idx):  # idx: (batches, ...)
            return jax.lax.scan(lambda st, i: one_step(st, data, vx, vy, i), state, idx)

    keys = [jax.random.split(jax.random.key(s)) for s in seeds]  # (init, data) as in `fit`
    sample = jnp.asarray(xs[0][:1])
    batch = min(cfg.batch_size, n)
    n_batches = n // batch

    def initial_state(members: list[int]):
        inits = [init(model, keys[i][0], sample) for i in members]
        variables = jax.tree.map(lambda *a: jnp.stack(a), *inits) if batched else inits[0]
        params = variables["params"]
        other = {k: v for k, v in variables.items() if k != "params"}
        state = (params, other, (jax.vmap(tx.init) if batched else tx.init)(params))
        vx = jnp.asarray(xi[members] if batched else xi[members[0]])
        vy = jnp.asarray(yi[members] if batched else yi[members[0]])
        return state, vx, vy

    def compiled(members: list[int]):
        """The step (or epoch) compiled once, before any worker thread calls it (from the shapes of
        the members' initial state alone: no initialization is run)."""
        state, vx, vy = jax.eval_shape(lambda: initial_state(members))
        shape = (n_batches, len(members), batch) if loop == "scan" else (len(members), batch)
        idx = jax.ShapeDtypeStruct(shape if batched else shape[:-2] + shape[-1:], jnp.int32)
        fn = run_epoch if loop == "scan" else run_step
        return fn.lower(state, (xd, yd), vx, vy, idx).compile()

    def train_group(members: list[int], fn):
        state, vx, vy = initial_state(members)
        losses = []
        for ep in range(cfg.epochs):
            idx = [_epoch_batches(n, batch, jax.random.fold_in(keys[i][1], ep)) for i in members]
            idx = np.stack(idx, axis=1) if batched else idx[0]
            if loop == "python":
                tot = 0.0
                for b in idx:
                    state, loss = fn(state, (xd, yd), vx, vy, jnp.asarray(b))
                    tot += loss
                losses.append(np.asarray(tot) / len(idx))
            else:
                state, ls = fn(state, (xd, yd), vx, vy, jnp.asarray(idx))
                losses.append(np.asarray(ls).mean(axis=0))
        params, other, _ = state
        jax.block_until_ready(params)
        return {"params": params, **other}, np.asarray(losses, dtype=np.float64).reshape(cfg.epochs, -1)

    if batched:
        variables, losses = train_group(list(range(m)), compiled(list(range(m))))
        out = [jax.tree.map(lambda a, i=i: a[i], variables) for i in range(m)]
        return out, losses.T
    fn = compiled([0])
    bar = tqdm(total=m, desc=f"train {m} x {model.name} ({chosen})", disable=not progress, leave=False)
    results: list[Any] = [None] * m

    def job(i: int) -> None:
        results[i] = train_group([i], fn)
        bar.update(1)

    n_workers = min(m, workers or cpu_workers()) if chosen == "parallel" else 1
    if n_workers > 1:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="attrax-train") as pool:
            for f in [pool.submit(job, i) for i in range(m)]:
                f.result()  # re-raises a worker's exception
    else:
        for i in range(m):
            job(i)
    bar.close()
    return [r[0] for r in results], np.asarray([r[1][:, 0] for r in results])
