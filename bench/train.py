"""Training with optax: jitted steps, deterministic per seed, cached by content hash.

The data go to the device once; each epoch's seeded permutation is drawn on the device and every
step gathers its batch inside the compiled step (no host index arrays, no separate gather call);
parameters and optimizer state are donated; the epoch's loss is summed on the device and read
once per epoch; compiled steps are shared by every call with the same model and optimizer (each
call used to recompile). Measured back to back on the shared 2-core machine (load 6-8.5), cnn_a,
4,000 images, batch 64, one epoch per call: 1.65x the previous `fit` (456 vs 249 images/s). On
CPU a step of a model without mutable state sums the gradients of 2 sub-batches (`split_parts`):
with cnn_a at batch 64, ~10% less CPU time per step and, confined to one core, 0.64x the step
time (no clear wall-clock gain on the loaded machine: 1.13x, within noise). With 2+ cores the two
sub-batch gradients come from two threads and one compiled update follows (`_ThreadedStep`):
1.18x the fused split step's images/s on the idle machine; side by side with torch's loop 1.43x.

Two epoch strategies (`loop`): "python" (a Python loop of compiled steps) and "scan" (one
`lax.scan` per epoch). Why scan is 5-10x slower on XLA:CPU: inside a while loop body the
kernel- and input-gradient convolutions keep their non-canonical dimension labels
(`f01b_i01o->01bf`, a reversed kernel) instead of being rewritten to the `b01f_01io->b01f` form
the fast convolution path takes (compare `compiled.as_text()` of one step and of a 1-step
`fori_loop`), so they run through the slow generic loop emitter; k steps per call unrolled into
straight-line code avoid it, but gain nothing over one step per call (dispatch is ~0.1% of a
cnn_a step), so the Python loop stays. Three multi-model strategies (`train_many(mode=...)`):
"sequential", "vmap" (all models' parameters stacked and trained by one vmapped step) and
"parallel" (one worker thread per CPU core, each training whole models through the one compiled
step). On this CPU vmap was ~3x slower than sequential (XLA:CPU lowers a vmapped convolution to a
grouped convolution) and parallel ~0.55x of sequential. "auto" picks per backend (python/parallel
on CPU, scan/vmap on GPU/TPU). The benchmark command re-measures all of them (`attrax-bench`,
training and ROAR grid sections).

Streamed training (`fit_stream`, `StreamSource`): for train sets that do not fit in memory (ROAR/KAR
retrains on ImageNet-sized modified sets, an image_folder split) the rows stay on disk in
memory-mapped `.npy` shards (or are decoded from image files); each epoch's permutation is the
one `fit` draws, pulled to the host once, and a background thread gathers and puts each batch on
the device a few batches ahead of the compiled step. Same parameters as `fit`, bit for bit on
this CPU; speed within noise of the in-memory fit (see `fit_stream`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attrax._arrays import to_device
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


def split_parts(variables, batch: int) -> int:
    """How many independent sub-batch gradients one training step computes (their sum is the
    batch gradient, to float rounding). On CPU 2: XLA:CPU runs one model's convolution backward
    on about one core; the two parts run from two threads where there are chunk threads
    (`_ThreadedStep`), else fused in one compiled step. 1 on GPU/TPU, for models with
    state updated by the forward pass (BatchNorm statistics: a split would change them) and for
    small batches."""
    if jax.default_backend() != "cpu" or any(k != "params" for k in variables) or batch < 32:
        return 1
    return 2


def _part_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """The `parts` contiguous sub-batches [a, b) of a batch of n."""
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _summed_loss_grad(module):
    """(params, xb, yb) -> (summed cross-entropy, its gradient): one sub-batch's share of a step
    (models without mutable state)."""
    def sum_loss(params, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(module.apply({"params": params}, xb), yb).sum()

    return jax.value_and_grad(sum_loss)


def _mean_of_parts(outs, n: int):
    """(mean loss, mean gradient) of a batch of n from its sub-batches' summed (loss, gradient)."""
    loss = sum(o[0] for o in outs) / n
    return loss, jax.tree.map(lambda *a: sum(a) / n, *(o[1] for o in outs))


def _make_step(model: Model, tx: optax.GradientTransformation, parts: int = 1):
    """The training step (state, xb, yb) -> (state, mean loss). `parts` > 1 sums the losses and
    gradients of that many contiguous sub-batches (same math as one batch: the mean over the
    batch; only for models without mutable state)."""
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

    part_grad = _summed_loss_grad(module)

    def step(state, xb, yb):
        params, other, opt_state = state
        if parts > 1 and not other:
            outs = [part_grad(params, xb[a:b], yb[a:b]) for a, b in _part_bounds(xb.shape[0], parts)]
            loss, g = _mean_of_parts(outs, xb.shape[0])
            upd = {}
        else:
            (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params, other, xb, yb)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, {**other, **upd}, opt_state), loss

    return step


def images_trained(n: int, batch_size: int, epochs: int) -> int:
    """Images one model's training steps go through: `fit` and `train_many` drop the last
    n % batch examples of every epoch (a full batch per step, one compiled shape), so an images/s
    figure counts these, not n * epochs (the PyTorch loop of ../shared/anchors keeps its short
    last batch and trains all n)."""
    b = min(int(batch_size), int(n))
    return (int(n) // b) * b * int(epochs) if b > 0 else 0


def _epoch_batches(n: int, batch: int, key: Array) -> Array:
    """(batches, batch) example indices of one epoch, on the device: a seeded permutation, the last
    n % batch examples of it dropped."""
    nb = n // batch
    return jax.random.permutation(key, n)[: nb * batch].reshape(nb, batch)


def pick_loop(loop: str) -> str:
    if loop != "auto":
        return loop
    return "python" if jax.default_backend() == "cpu" else "scan"


def _batch(data, idx, i):
    """Batch i of an epoch: the rows idx[i] of every array in `data` (a gather inside the step)."""
    rows = jax.lax.dynamic_index_in_dim(idx, i, axis=0, keepdims=False)
    return tuple(a[rows] for a in data)


@functools.lru_cache(maxsize=64)
def _epoch_idx_fn(n: int, batch: int, models: int = 0):
    """Compiled (data keys, epoch) -> batch indices: (batches, batch), or (batches, models, batch)
    for `models` stacked data keys (each model's permutation, the same as alone)."""
    def one(key, ep):
        return _epoch_batches(n, batch, jax.random.fold_in(key, ep))

    if models:
        return jax.jit(lambda keys, ep: jnp.swapaxes(jax.vmap(one, (0, None))(keys, ep), 0, 1))
    return jax.jit(one)


# Compiled training functions, shared by every fit / train_many call with the same model,
# optimizer, split and loop (ROAR, KAR and sanity checks train many models of one architecture:
# each call used to recompile its step, seconds per call on this CPU).
_RUNNERS: dict[Any, Any] = {}


def _model_key(model: Model, cfg: TrainConfig) -> tuple:
    return (model.name, type(model.module), repr(model.module), cfg.optimizer, cfg.lr, cfg.weight_decay)


def _memo(key, make):
    fn = _RUNNERS.get(key)
    if fn is None:
        while len(_RUNNERS) >= 64:
            _RUNNERS.pop(next(iter(_RUNNERS)))
        fn = _RUNNERS[key] = make()
    return fn


def _fit_runner(model: Model, cfg: TrainConfig, parts: int, loop: str):
    """The jitted (carry, data, idx, i) -> carry step ("python") or (carry, data, idx) -> carry
    epoch ("scan"); carry = (state, loss sum), donated."""
    def make():
        step = _make_step(model, _optimizer(cfg), parts)

        def one(carry, data, idx, i):
            state, tot = carry
            state, loss = step(state, *_batch(data, idx, i))
            return state, tot + loss

        if loop == "python":
            return jax.jit(one, donate_argnums=0)

        @functools.partial(jax.jit, donate_argnums=0)
        def run(carry, data, idx):
            return jax.lax.scan(lambda c, i: (one(c, data, idx, i), None), carry, jnp.arange(idx.shape[0]))[0]

        return run

    return _memo(("fit", _model_key(model, cfg), parts, loop), make)


def _start(model: Model, cfg: TrainConfig, seed: int, sample_x, variables):
    """(variables, training state, data key) of a fit from `seed`: a fresh seeded init, or copies
    of the caller's `variables` (they stay valid: the steps donate their state)."""
    k_init, k_data = jax.random.split(jax.random.key(seed))
    if variables is None:
        variables = init(model, k_init, to_device(sample_x))
    else:
        variables = jax.tree.map(jnp.copy, variables)
    params = variables["params"]
    other = {k: v for k, v in variables.items() if k != "params"}
    return variables, (params, other, _optimizer(cfg).init(params)), k_data


def fit(
    model: Model, x: np.ndarray, y: np.ndarray, *, seed: int, cfg: TrainConfig, progress: bool = True,
    variables=None,
) -> tuple[Any, list[float]]:
    """Train from a fresh seeded init (or from `variables`); returns (variables, epoch losses).

    Every epoch visits a seeded permutation of the examples in batches of `cfg.batch_size` (the
    last n % batch_size of the permutation are left out that epoch). The data go to the device
    once; the permutation is drawn there and each step gathers its batch inside the compiled
    step; the epoch's loss is summed on the device and read once per epoch. `cfg.loop`: "python"
    (one compiled step per call, parameters and optimizer state donated) or "scan" (one
    `lax.scan` over the epoch: ~5-10x slower on XLA:CPU, whose while loops run their body's
    convolutions far slower than the same step compiled alone; faster on GPU). Two steps per
    compiled call (unrolled, no while loop) were measured and not kept: cnn_a, 2,000 digits, batch
    64 on the shared 2-core CPU, 927 vs 888 images/s wall, the same process CPU time (1.58 vs
    1.53 s), the epoch loss different in the 7th digit.

    `x` a StreamSource (memory-mapped shards; `y` ignored, its labels are used): trained by
    `fit_stream`, the same parameters with only a few batches in memory.
    """
    from tqdm.auto import tqdm

    if isinstance(x, StreamSource):
        return fit_stream(model, x, seed=seed, cfg=cfg, progress=progress, variables=variables)
    variables, state, k_data = _start(model, cfg, seed, x[:1], variables)
    n = len(x)
    batch = min(cfg.batch_size, n)
    n_batches = n // batch
    data = (to_device(x), to_device(y, jnp.int32))
    loop = pick_loop(cfg.loop)
    parts = split_parts(variables, batch)
    threaded = _threaded(model, cfg, parts) if loop == "python" and not uses_lapack(model, variables, x[:1]) else None
    run = threaded.fit_call if threaded else _fit_runner(model, cfg, parts, loop)
    epoch_idx = _epoch_idx_fn(n, batch)
    losses = []
    bar = tqdm(range(cfg.epochs), desc=f"train {model.name} seed {seed}", disable=not progress, leave=False)
    for ep in bar:
        idx = epoch_idx(k_data, ep)
        carry = (state, jnp.zeros((), jnp.float32))
        if loop == "python":
            for i in range(n_batches):
                carry = run(carry, data, idx, i)
        else:
            carry = run(carry, data, idx)
        state, tot = carry
        ep_loss = float(tot) / n_batches  # the one host sync of the epoch
        losses.append(ep_loss)
        bar.set_postfix(loss=f"{ep_loss:.4f}")
    params, other, _ = state
    return {"params": params, **other}, losses


# ---------------------------------------------------------------------------------------------
# Streamed training: the rows come from disk (memory-mapped .npy shards) batch by batch


def open_npy(path: str | os.PathLike, *, mmap: bool = True, what: str = "data shard",
             hint: str = "") -> np.ndarray:
    """A `.npy` file, memory-mapped (rows are read from disk when indexed) or loaded; a missing,
    damaged or truncated file is a one-line AttraxError naming it (`what` and `hint` word it)."""
    path = Path(path)
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if not isinstance(a, np.ndarray) or a.ndim < 1:
            raise ValueError(f"not an array of rows: {type(a).__name__} of shape {np.shape(a)}")
    except (OSError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AttraxError(f"cannot read {what} {path} ({reason}){hint}") from None
    return a


class StreamSource:
    """The rows of a training set for `fit_stream`: consecutive parts (memory-mapped `.npy`
    shards, in-memory arrays, or any array-like with `shape` whose `[index array]` returns those
    rows, such as an image_folder's lazily decoded images) plus the labels, held in memory (n
    int32). `rows(idx)` gathers any rows, in the order given, touching only the parts they fall
    in; nothing ever reads a whole part (`np.asarray(part)` is never called).

    `StreamSource.from_files(paths, y)` memory-maps the shards (a bad or truncated file: a
    one-line AttraxError naming it); `StreamSource([x], y)` serves in-memory arrays through the
    same code path."""

    def __init__(self, parts: Any, y: Any, *, names: Sequence[str] | None = None):
        parts = list(parts) if isinstance(parts, list | tuple) else [parts]
        if not parts:
            raise AttraxError("a stream source needs at least one part (shard) of rows")
        shapes = [tuple(np.shape(p) if isinstance(p, np.ndarray) else p.shape) for p in parts]
        names = list(names) if names is not None else [f"part {k}" for k in range(len(parts))]
        for s, nm in zip(shapes, names, strict=True):
            if len(s) < 1 or s[1:] != shapes[0][1:]:
                raise AttraxError(f"stream source: {nm} has rows of shape {s[1:]}, the first part {shapes[0][1:]}")
        self.parts, self.names = parts, names
        self.offsets = np.cumsum([0] + [s[0] for s in shapes])
        self.y = np.asarray(y, dtype=np.int32)
        if self.y.shape != (int(self.offsets[-1]),):
            raise AttraxError(f"stream source: {int(self.offsets[-1])} rows but labels of shape {self.y.shape}")
        self.row_shape = shapes[0][1:]
        self.dtype = np.dtype(getattr(parts[0], "dtype", np.float32))

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], y: Any, *, what: str = "data shard",
                   hint: str = "") -> StreamSource:
        paths = [Path(p) for p in paths]
        return cls([open_npy(p, what=what, hint=hint) for p in paths], y, names=[str(p) for p in paths])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, idx: Any) -> np.ndarray:
        """The rows `idx` (a 1-d int array, any order, repeats allowed) as one host array."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][idx])
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx), *self.row_shape), self.dtype)
        for k in np.unique(part):
            sel = np.flatnonzero(part == k)
            local = idx[sel] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # read each part front to back
            out[sel[order]] = self.parts[k][local[order]]
        return out

    def labels(self, idx: Any) -> np.ndarray:
        return self.y[np.asarray(idx, dtype=np.int64)]


def as_source(x: Any, y: Any = None) -> StreamSource:
    """`x` itself when it is a StreamSource, else one over the array(-like) `x` and labels `y`."""
    if isinstance(x, StreamSource):
        return x
    if y is None:
        raise AttraxError("training data: give labels with the images (or a StreamSource)")
    return StreamSource([x], y)


def _stream_runner(model: Model, cfg: TrainConfig, parts: int):
    """The jitted streamed step (carry, xb, yb) -> (carry, loss): the batch comes from the host;
    carry = (state, loss sum) donated, the step's loss returned apart (not donated: it tells the
    loop when a step has run, to bound the batches in flight)."""
    def make():
        step = _make_step(model, _optimizer(cfg), parts)

        def one(carry, xb, yb):
            state, tot = carry
            state, loss = step(state, xb, yb)
            return (state, tot + loss), loss

        return jax.jit(one, donate_argnums=0)

    return _memo(("stream", _model_key(model, cfg), parts), make)


class _ThreadedStep:
    """`fit`'s split step (`split_parts` = 2) with its sub-batch gradients computed by two Python
    threads at once, then one compiled update: on CPU one thread's compiled calls run one after
    another and sub-batches inside one call barely overlap (see `harness.chunk_workers`), while
    calls from two threads run on both cores. The same sums as `_make_step` (`_summed_loss_grad`
    and `_mean_of_parts`: each sub-batch's summed loss and gradient, added and divided by the
    batch), the optimizer state untouched until both are done; parameters and optimizer state
    donated to the update.

    `fit_call(carry, data, idx, i) -> carry` gathers batch i inside each half's call (as `fit`'s
    step); `stream_call(carry, xb, yb) -> (carry, loss)` takes host batches (as `fit_stream`'s).
    Measured (cnn_a, 2,000 digits, batch 64, idle 2-core CPU, two rounds): 2,091 / 1,985 images/s
    against 1,683 / 1,768 for the fused split step, process CPU time per image the same
    (0.87-0.91 vs 0.83-0.85 ms)."""

    def __init__(self, model: Model, cfg: TrainConfig, parts: int):
        tx = _optimizer(cfg)
        self.parts = parts
        grad = _summed_loss_grad(model.module)

        @functools.partial(jax.jit, static_argnums=(4, 5))
        def gather_half(params, data, idx, i, a, b):
            rows = jax.lax.dynamic_index_in_dim(idx, i, axis=0, keepdims=False)[a:b]
            return grad(params, *(d[rows] for d in data))

        @functools.partial(jax.jit, static_argnums=(3, 4))
        def host_half(params, xb, yb, a, b):
            return grad(params, xb[a:b], yb[a:b])

        @functools.partial(jax.jit, donate_argnums=0, static_argnums=2)
        def update(carry, outs, n):
            (params, other, opt_state), tot = carry
            loss, g = _mean_of_parts(outs, n)
            updates, opt_state = tx.update(g, opt_state, params)
            return ((optax.apply_updates(params, updates), other, opt_state), tot + loss), loss

        self._gather, self._host, self._update = gather_half, host_half, update

    def _halves(self, call, n: int):
        from attrax.harness import in_threads

        return tuple(in_threads([functools.partial(call, a, b) for a, b in _part_bounds(n, self.parts)], self.parts))

    def fit_call(self, carry, data, idx, i):
        params = carry[0][0]
        outs = self._halves(lambda a, b: self._gather(params, data, idx, i, a, b), idx.shape[1])
        return self._update(carry, outs, idx.shape[1])[0]

    def stream_call(self, carry, xb, yb):
        params = carry[0][0]
        outs = self._halves(lambda a, b: self._host(params, xb, yb, a, b), xb.shape[0])
        return self._update(carry, outs, xb.shape[0])


def uses_lapack(model: Model, variables, sample_x) -> bool:
    """Whether the model's training gradient calls LAPACK (`harness.LAPACK_PRIMITIVES`: eigh, svd,
    ... in a whitening or orthogonalizing layer): such steps must not run from two threads at
    once (jaxlib's LAPACK kernels wait on the shared intra-op pool; two of them deadlock), so
    fit's threaded sub-batches and train_many's parallel mode run one at a time. Traced once per
    model and input shape."""
    from attrax.harness import lapack_primitives

    shape = tuple(np.shape(sample_x)[1:])

    def check():  # the un-split training step itself, traced from shapes
        tx = _optimizer(TrainConfig())
        params = variables["params"]
        state = (params, {k: v for k, v in variables.items() if k != "params"}, jax.eval_shape(tx.init, params))
        x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        y = jax.ShapeDtypeStruct((2,), jnp.int32)
        return bool(lapack_primitives(jax.make_jaxpr(_make_step(model, tx))(state, x, y)))

    return _memo(("lapack", _model_key(model, TrainConfig()), shape), check)


def _threaded(model: Model, cfg: TrainConfig, parts: int) -> _ThreadedStep | None:
    """The threaded split step where it applies: a split step (CPU, no mutable state, see
    `split_parts`) and as many chunk threads (`harness.chunk_workers`, `ATTRAX_CHUNK_THREADS`)."""
    from attrax.harness import chunk_workers

    if parts < 2 or chunk_workers() < parts:  # (chunk_workers is 1 inside the pool's own threads)
        return None
    return _memo(("threaded", _model_key(model, cfg), parts), lambda: _ThreadedStep(model, cfg, parts))


class _Prefetch:
    """Batches gathered on the host and put on the device by a background thread, `depth` ahead
    of the consumer (the disk read and gather overlap the compiled steps); an error in the thread
    is re-raised by the consumer; `close()` stops the thread."""

    def __init__(self, make_batch, n: int, depth: int):
        import queue
        import threading

        self._q: Any = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()

        def work():
            try:
                for i in range(n):
                    item = make_batch(i)
                    while not self._stop.is_set():
                        try:
                            self._q.put(("ok", item), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                self._q.put(("error", e))

        self._thread = threading.Thread(target=work, name="attrax-prefetch", daemon=True)
        self._thread.start()

    def get(self):
        kind, item = self._q.get()
        if kind == "error":
            raise item
        return item

    def close(self) -> None:
        import queue

        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def fit_stream(
    model: Model, source: Any, y: Any = None, *, seed: int, cfg: TrainConfig, progress: bool = True,
    variables=None, parts: int | None = None, prefetch: int = 2,
) -> tuple[Any, list[float]]:
    """`fit` over a StreamSource (or any array-like of rows with labels `y`): the same parameters
    as `fit` on the same rows and seed, with only a few batches in host memory.

    Per epoch the seeded permutation `fit` draws is computed on the device as there and pulled to
    the host once (n int32s); a background thread gathers each batch's rows from the source (a
    memory-mapped shard reads only those rows) and puts them on the device `prefetch` batches
    ahead; each step is `fit`'s step compiled for host batches (parameters and optimizer state
    donated). The loop waits for step i - `prefetch` - 1 before queueing another, so at most
    about 2 * `prefetch` + 2 batches exist at once (host and device). Always a Python loop of steps
    (`cfg.loop` does not apply). `parts`: the sub-batch split of the step (default
    `split_parts`, as `fit`). The progress bar counts images (images/s, ETA).

    Measured on the shared 2-core machine (load 7-10), cnn_a, 4,000 digits in 4 memory-mapped
    shards, batch 64, one epoch per call, calls alternating back to back after a warm-up (three
    runs of 6-8 repeats, medians): in-memory `fit` 799 / 1085 / 1145 images/s, `fit_stream` 717 /
    1013 / 1107 (0.90 / 0.93 / 0.97 of it; single calls range 650-1700 on both), process CPU time
    per epoch 2.81 vs 2.56, 2.55 vs 2.47, 2.57 vs 2.50 s (+3-10%); the parameters bit for bit
    equal. Over in-memory arrays 0.92 of `fit` (1051 vs 1145). A plain loop without the thread
    (gather, put, step in turn) took 5.00 s wall per epoch vs 4.56 with it and 4.66 for `fit`.
    """
    from collections import deque

    from tqdm.auto import tqdm

    model = as_model(model)
    if model.module is None:
        raise AttraxError("training needs a Flax module (a zoo name or an nn.Module)")
    src = as_source(source, y)
    n = len(src)
    if n == 0:
        raise AttraxError("fit_stream: the stream source has no rows")
    first = src.rows(np.arange(1))
    variables, state, k_data = _start(model, cfg, seed, first, variables)
    batch = min(cfg.batch_size, n)
    n_batches = n // batch
    parts = split_parts(variables, batch) if parts is None else int(parts)
    threaded = None if uses_lapack(model, variables, first) else _threaded(model, cfg, parts)
    run = threaded.stream_call if threaded else _stream_runner(model, cfg, parts)
    epoch_idx = _epoch_idx_fn(n, batch)
    losses: list[float] = []
    bar = tqdm(total=cfg.epochs * n_batches * batch, desc=f"train {model.name} seed {seed} (streamed)",
               unit="img", unit_scale=True, disable=not progress, leave=False)
    try:
        for ep in range(cfg.epochs):
            idx = np.asarray(epoch_idx(k_data, ep))  # the epoch's (batches, batch) rows, to the host once

            def make_batch(i, idx=idx):
                return jax.device_put(src.rows(idx[i])), jax.device_put(src.labels(idx[i]))

            feed = _Prefetch(make_batch, n_batches, prefetch)
            carry = (state, jnp.zeros((), jnp.float32))
            pending: deque = deque()
            try:
                for _ in range(n_batches):
                    xb, yb = feed.get()
                    carry, loss = run(carry, xb, yb)
                    del xb, yb
                    pending.append(loss)
                    if len(pending) > prefetch + 1:
                        pending.popleft().block_until_ready()
                        bar.update(batch)
                jax.block_until_ready(carry)
                bar.update(len(pending) * batch)
            finally:
                feed.close()
            state, tot = carry
            ep_loss = float(tot) / n_batches
            losses.append(ep_loss)
            bar.set_postfix(epoch=ep + 1, loss=f"{ep_loss:.4f}")
    finally:
        bar.close()
    params, other, _ = state
    return {"params": params, **other}, losses


def accuracy(model: Model, variables, x: np.ndarray, y: np.ndarray) -> float:
    from attrax.harness import forward

    logits = np.asarray(forward(model, variables, to_device(x)))  # (n, classes): on the host, no
    return float(np.mean(np.argmax(logits, -1) == np.asarray(y)))  # program per test-set size


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
        template = init(model, jax.random.key(0), to_device(train_set.x[:1]))
        hit = load_cached(key, template)
        if hit is not None:
            variables, meta = hit
            return model, variables, dict(meta, cached=True)
    from attrax.streaming import accuracy as batched_accuracy

    t0 = time.perf_counter()
    streamed = streams_from_files(train_set)  # an image_folder split: batches decoded from its files
    x = StreamSource([train_set.x], train_set.y) if streamed else train_set.x
    variables, losses = fit(model, x, train_set.y, seed=seed, cfg=cfg, progress=progress)
    jax.block_until_ready(variables)
    info: dict[str, Any] = {"seconds": time.perf_counter() - t0, "losses": losses, "seed": seed,
                            "model": model.name, "train_config": dataclasses.asdict(cfg), "streamed": streamed}
    info["train_accuracy"] = batched_accuracy(model, variables, train_set)
    if test_set is not None:
        info["test_accuracy"] = batched_accuracy(model, variables, test_set)
    if cache:
        save_cached(key, variables, info)
    return model, variables, dict(info, cached=False)


def streams_from_files(ds) -> bool:
    """A lazily decoded data set (an image_folder split) bigger than its own `max_memory_mb`."""
    x = ds.x
    if isinstance(x, np.ndarray) or not callable(getattr(ds, "batches", None)):
        return False
    return getattr(x, "nbytes", 0) / 2**20 > getattr(x, "max_memory_mb", 0)


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


def _many_runner(model: Model, cfg: TrainConfig, parts: int, batched: bool, loop: str):
    """train_many's jitted step (carry, data, vx, vy, idx, i) or scanned epoch (no i)."""
    step = _make_step(model, _optimizer(cfg), parts)
    many = jax.vmap(step) if batched else step

    def one_step(carry, data, vx, vy, idx, i):
        # data: all variants (arguments, never closed-over constants: XLA would fold them);
        # vx, vy: the model(s)' variant; idx: the epoch's (batches, batch) or (batches, models,
        # batch) example indices, on the device; i: the step
        state, tot = carry
        xa, ya = data
        rows = jax.lax.dynamic_index_in_dim(idx, i, axis=0, keepdims=False)
        sel = (vx[:, None], rows) if batched else (vx, rows)
        sel_y = (vy[:, None], rows) if batched else (vy, rows)
        state, loss = many(state, xa[sel], ya[sel_y])
        return state, tot + loss

    if loop == "python":
        return jax.jit(one_step, donate_argnums=0)

    @functools.partial(jax.jit, donate_argnums=0)
    def run_epoch(carry, data, vx, vy, idx):  # all of the epoch's steps in one lax.scan
        steps = jnp.arange(idx.shape[0])
        return jax.lax.scan(lambda c, i: (one_step(c, data, vx, vy, idx, i), None), carry, steps)[0]

    return run_epoch


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

    Streamed: `x` a StreamSource (or a list with one per seed; `y` may then be None: the
    sources' labels are used) trains each model with `fit_stream`, never holding a data set in
    memory: "parallel" runs whole models in `workers` threads (one un-split step each, as the
    in-memory parallel mode), "sequential" (also what "vmap" and "auto" off CPU give: a vmapped
    step would need every model's batch gathered at once) one after another with `fit`'s step.
    """
    from tqdm.auto import tqdm

    model = as_model(model)
    if model.module is None:
        raise AttraxError("training needs a Flax module (a zoo name or an nn.Module)")
    seeds = [int(s) for s in seeds]
    m = len(seeds)
    if m == 0:
        return [], np.zeros((0, cfg.epochs))
    if isinstance(x, StreamSource) or (isinstance(x, list | tuple) and any(isinstance(a, StreamSource) for a in x)):
        return _train_many_stream(model, x, y, seeds, cfg=cfg, mode=mode, progress=progress, workers=workers)
    xs, xi = _per_model_data(x, m)
    ys, yi = _per_model_data(y, m)
    n = int(np.shape(xs[0])[0])
    if int(np.shape(ys[0])[0]) != n:
        raise AttraxError(f"train_many: {n} images but {np.shape(ys[0])[0]} labels")
    chosen = pick_many_mode(mode)
    batched = chosen == "vmap"
    tx = _optimizer(cfg)
    batch = min(cfg.batch_size, n)
    n_batches = n // batch
    sample = to_device(xs[0][:1])
    # the step `fit` would use for one model alone (the same sub-batch split), except where models
    # already share the cores (parallel) or one vmapped step (vmap)
    shapes = jax.eval_shape(lambda: init(model, jax.random.key(0), sample))
    parts = split_parts(shapes, batch)
    xd = jnp.stack([to_device(a) for a in xs])  # (variants, n, ...): each distinct array once
    yd = jnp.stack([to_device(a, jnp.int32) for a in ys])
    loop = pick_loop(cfg.loop)
    runner_key = ("many", _model_key(model, cfg), parts if chosen == "sequential" else 1, batched, loop)
    runner = _memo(runner_key, lambda: _many_runner(model, cfg, runner_key[2], batched, loop))
    keys = [jax.random.split(jax.random.key(s)) for s in seeds]  # (init, data) as in `fit`

    def initial_state(members: list[int]):
        inits = [init(model, keys[i][0], sample) for i in members]
        variables = jax.tree.map(lambda *a: jnp.stack(a), *inits) if batched else inits[0]
        params = variables["params"]
        other = {k: v for k, v in variables.items() if k != "params"}
        state = (params, other, (jax.vmap(tx.init) if batched else tx.init)(params))
        vx = to_device(xi[members] if batched else xi[members[0]])
        vy = to_device(yi[members] if batched else yi[members[0]])
        return state, vx, vy

    def compiled(members: list[int]):
        """The step (or epoch) compiled once, before any worker thread calls it (from the shapes of
        the members' initial state alone: no initialization is run)."""
        state, vx, vy = jax.eval_shape(lambda: initial_state(members))
        tot = jax.ShapeDtypeStruct((len(members),) if batched else (), jnp.float32)
        idx = jax.eval_shape(_epoch_idx_fn(n, batch, len(members) if batched else 0),
                             jnp.stack([keys[i][1] for i in members]) if batched else keys[members[0]][1], 0)
        args = ((state, tot), (xd, yd), vx, vy, idx) + ((0,) if loop == "python" else ())
        sig = str(jax.tree.map(lambda a: (getattr(a, "shape", ()), str(getattr(a, "dtype", type(a)))), args))
        return _memo((runner_key, sig), lambda: runner.lower(*args).compile())

    def train_group(members: list[int], fn):
        state, vx, vy = initial_state(members)
        data_keys = jnp.stack([keys[i][1] for i in members]) if batched else keys[members[0]][1]
        epoch_idx = _epoch_idx_fn(n, batch, len(members) if batched else 0)
        totals = []
        for ep in range(cfg.epochs):
            idx = epoch_idx(data_keys, ep)
            carry = (state, jnp.zeros((len(members),) if batched else (), jnp.float32))
            if loop == "python":
                for i in range(n_batches):
                    carry = fn(carry, (xd, yd), vx, vy, idx, i)
            else:
                carry = fn(carry, (xd, yd), vx, vy, idx)
            state, tot = carry
            totals.append(tot)  # on the device: read once, after the last epoch
        params, other, _ = state
        jax.block_until_ready(params)
        losses = np.asarray([np.asarray(t) for t in totals], dtype=np.float64) / n_batches
        return {"params": params, **other}, losses.reshape(cfg.epochs, -1)

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

    parallel = chosen == "parallel" and not uses_lapack(model, shapes, xs[0][:1])
    _run_jobs(job, m, min(m, workers or cpu_workers()) if parallel else 1)
    bar.close()
    return [r[0] for r in results], np.asarray([r[1][:, 0] for r in results])


def _run_jobs(job, m: int, n_workers: int) -> None:
    """job(0) ... job(m - 1): in `n_workers` threads when more than one, else in turn; a job's
    exception is re-raised here."""
    if n_workers > 1:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="attrax-train") as pool:
            for f in [pool.submit(job, i) for i in range(m)]:
                f.result()
    else:
        for i in range(m):
            job(i)


def _train_many_stream(model: Model, x, y, seeds: list[int], *, cfg: TrainConfig, mode: str, progress: bool,
                       workers: int | None) -> tuple[list[Any], np.ndarray]:
    """train_many over StreamSources: one `fit_stream` per seed (see `train_many`)."""
    m = len(seeds)
    xs, xi = _per_model_data(x, m)
    if y is None:
        sources = [as_source(xs[xi[i]]) for i in range(m)]
    else:
        ys, yi = _per_model_data(y, m)
        sources = [as_source(xs[xi[i]], ys[yi[i]]) for i in range(m)]
    if len({len(s) for s in sources}) != 1:
        raise AttraxError(f"train_many needs data sets of equal size, got {sorted({len(s) for s in sources})}")
    chosen = pick_many_mode(mode)
    n_workers = min(m, workers or cpu_workers()) if chosen == "parallel" else 1
    if n_workers > 1:
        sample = np.zeros((1, *sources[0].shape[1:]), np.float32)  # its shape only: no read
        if uses_lapack(model, jax.eval_shape(lambda: init(model, jax.random.key(0), to_device(sample))), sample):
            n_workers = 1
    parts = 1 if chosen == "parallel" else None  # as the in-memory modes: no split where models share the cores
    results: list[Any] = [None] * m

    def job(i: int) -> None:
        results[i] = fit_stream(model, sources[i], seed=seeds[i], cfg=cfg, progress=progress, parts=parts)

    _run_jobs(job, m, n_workers)
    return [r[0] for r in results], np.asarray([r[1] for r in results], dtype=np.float64).reshape(m, cfg.epochs)
