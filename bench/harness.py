"""Running methods and protocols: validation, targets, jit caching and memory-bounded chunks."""

from __future__ import annotations

import difflib
import functools
import math
import threading
import weakref
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from attrax._arrays import to_device
from attrax.errors import AttraxError
from attrax.methods._core import SCORES, class_score
from attrax.models import Model, as_model

Array = jax.Array

#: Model evaluations (image x forward/backward) per compiled chunk when no budget is given, per
#: backend. Measured on the 2-core CPU (cnn_a, batch 100): ~128 evaluations per chunk keep the
#: activations in cache (integrated gradients with 50 steps cost 1.12x of 50 batched gradients at
#: 128, 1.8x at 4096); accelerators want large chunks.
DEFAULT_EVALS_PER_CHUNK = MappingProxyType({"cpu": 128})
ACCELERATOR_EVALS_PER_CHUNK = 4096
#: Bytes of one image's traced forward intermediates (batch 1, `activation_bytes`) of the model
#: the CPU budget above was measured on (cnn_a on 28x28x1: 654,840). A model with smaller
#: activations gets a proportionally larger default budget (up to ACCELERATOR_EVALS_PER_CHUNK):
#: the same bytes per chunk, so a tiny model's batch of 100 is one call, not 2-3 chunks each
#: paying a dispatch (jnp_mlp: 4 KB per image).
REFERENCE_ACTIVATION_BYTES = 654_840


#: CPU budget multiplier for forward-only methods (registry metadata `forward_only=True`:
#: occlusion, RISE): a forward keeps no residuals for a backward pass, so more evaluations fit
#: in cache. Measured (2026-12-03, idle 2-core CPU, cnn_a, batch 100, 5 interleaved rounds,
#: medians): occlusion 4x4 550 ms at 128 evaluations per chunk, 421 at 512, 579 at 1,024, 673
#: at 2,048; RISE (1,000 masks) 10.3 vs 9.2 s at 128 / 512. Gradient methods lost at 512
#: (integrated gradients 50 steps 1.35 vs 1.66 s, SmoothGrad 50 1.27 vs 1.73 s) and the
#: surrogates were even (KernelSHAP, LIME), so they keep the base budget.
FORWARD_ONLY_SCALE = 4


def default_evals_per_chunk(activation_bytes: int | None = None, forward_only: bool = False) -> int:
    """Model evaluations per chunk: the backend's budget, scaled up on CPU for a model whose
    per-image activations (`activation_bytes`) are smaller than the reference model's, and by
    `FORWARD_ONLY_SCALE` for a forward-only method."""
    backend = jax.default_backend()
    base = DEFAULT_EVALS_PER_CHUNK.get(backend, ACCELERATOR_EVALS_PER_CHUNK)
    if forward_only and backend in DEFAULT_EVALS_PER_CHUNK:
        base = min(ACCELERATOR_EVALS_PER_CHUNK, base * FORWARD_ONLY_SCALE)
    if activation_bytes and backend in DEFAULT_EVALS_PER_CHUNK and activation_bytes < REFERENCE_ACTIVATION_BYTES:
        base = int(min(ACCELERATOR_EVALS_PER_CHUNK, base * REFERENCE_ACTIVATION_BYTES / activation_bytes))
    return base
TARGET_MODES = ("label", "predicted")
#: Hyperparameters that may be batch-shaped (one value per image, shape == x.shape): `explain`
#: slices them with each chunk. A method can name its own with the metadata `batch_hparams`.
BATCH_HPARAMS = ("reference", "baseline")


#: id(jax.Array) -> (weak reference, content hash): a jax.Array is immutable, so an array
#: hyperparameter (e.g. DeepLIFT-SHAP's reference bank) is hashed once, not on every call.
_ARRAY_HASHES: dict[int, tuple[Any, int]] = {}


def _array_hash(v: Any) -> int:
    if isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer):
        hit = _ARRAY_HASHES.get(id(v))
        if hit is not None and hit[0]() is v:
            return hit[1]
        h = hash(np.asarray(v).tobytes())
        if len(_ARRAY_HASHES) > 256:
            _ARRAY_HASHES.clear()
        try:
            _ARRAY_HASHES[id(v)] = (weakref.ref(v), h)
        except TypeError:  # pragma: no cover - an array type without weak references
            pass
        return h
    return hash(np.asarray(v).tobytes())  # NumPy arrays are mutable: hashed every call


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, np.ndarray | jax.Array):
        return ("array", v.shape, str(v.dtype), _array_hash(v))
    return v


@functools.lru_cache(maxsize=64)
def _int_key(seed: int) -> Array:
    """jax.random.key(seed), made once per seed (it costs a dispatch, ~0.1-1 ms, per call)."""
    return jax.random.key(seed)


def check_batch(x: Any, target: Any | None = None) -> tuple[Array, Array | None]:
    """Validate a batch: float array with a leading batch axis, int targets of shape (n,)."""
    x = to_device(x)
    if x.ndim < 2:
        raise AttraxError(f"x must be a batch with a leading axis (e.g. NHWC), got shape {x.shape}")
    if x.shape[0] == 0:
        raise AttraxError(f"empty batch: x has shape {x.shape} (no examples to explain or score)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise AttraxError(f"x must be floating point (float32 in [0, 1]), got {x.dtype}")
    if target is None:
        return x, None
    if not isinstance(target, jax.Array):
        target = np.asarray(target)
    def bad(t):
        return AttraxError(f"target must be int class indices of shape ({x.shape[0]},) or 'predicted', "
                           f"got {t.dtype} {t.shape}")

    if target.dtype.kind not in "iu":  # before jnp.full, which fails deep inside JAX on strings
        raise bad(target)
    if target.ndim == 0:
        target = jnp.full((x.shape[0],), target)
    if target.shape != (x.shape[0],):
        raise bad(target)
    if isinstance(target, jax.Array) and target.dtype == jnp.int32:
        return x, target
    return x, to_device(target, jnp.int32)


def named_target(model: Model, params: Any, x: Any, target: Any) -> Any:
    """`target` as class indices where it names a target mode: "predicted" is the model's argmax
    class of each input (one forward); "label" needs the labels themselves, so it is a one-line
    error; any other string gets the did-you-mean error of `check_target_mode`. Arrays pass
    through unchanged."""
    if not isinstance(target, str):
        return target
    check_target_mode(target)
    if target != "predicted":
        raise AttraxError("target='label' needs the labels: pass the class indices (shape (n,)) as target, "
                          "or target='predicted' for the model's own class")
    x, _ = check_batch(x)
    return resolve_target(model, params, x, None, "predicted")


def _concrete(*arrays: Any) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _count_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        subs = [j for j in eqn.params.values() if isinstance(j, jcore.ClosedJaxpr | jcore.Jaxpr)]
        if subs:  # a nested call: count its equations instead of its outputs
            total += sum(_count_bytes(j.jaxpr if hasattr(j, "consts") else j) for j in subs)
            continue
        for v in eqn.outvars:
            a = v.aval
            if hasattr(a, "shape") and hasattr(a, "dtype"):
                total += math.prod(a.shape) * np.dtype(a.dtype).itemsize
    return total


def model_probe(model: Model, params: Any, x: Array) -> tuple[tuple[int, ...] | None, int | None]:
    """(output shape, bytes of forward intermediates) for ONE input shaped like x[0]: the model is
    traced abstractly once per input shape (memoized on the model). (None, None) when it cannot
    be traced (the method itself then reports the failure)."""

    def build():
        try:
            probe = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
            closed = jax.make_jaxpr(lambda p, xx: model(p, xx))(params, probe)
            return tuple(closed.out_avals[0].shape), _count_bytes(closed.jaxpr)
        except Exception:  # noqa: BLE001 - the method itself reports a model that cannot run
            return None, None

    return model.cached(("model_probe", x.shape[1:], str(x.dtype)), build)


def activation_bytes(model: Model, params: Any, x: Array) -> int | None:
    """Bytes of the traced forward intermediates of one input (from `model_probe`)."""
    return model_probe(model, params, x)[1]


def check_target_range(model: Model, params: Any, x: Array, target: Array) -> None:
    """Every target must index one of the model's outputs (read from the output's shape)."""
    if target is None or not _concrete(target):
        return
    shape = model_probe(model, params, x)[0]
    if shape is None or len(shape) != 2:
        return
    classes = shape[1]
    t = np.asarray(target)  # a host check: no device dispatch per call
    bad = (t < 0) | (t >= classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise AttraxError(
            f"target {int(t[i])} (example {i}) is outside the model's {classes} outputs "
            f"(valid: 0..{classes - 1}); {int(bad.sum())} of {bad.size} targets are out of range"
        )


def check_output_finite(r: Array, method: str, model: Model, params: Any, x: Array) -> Array:
    """A method's maps must be finite; name the model as the cause when its logits are not."""
    if not _concrete(r, x):
        return r
    finite = jnp.isfinite(r).reshape(r.shape[0], -1).all(axis=1)
    if bool(finite.all()):
        return r
    bad = int((~finite).sum())
    logits = forward(model, params, x[~np.asarray(finite)])
    nan_logits = int((~jnp.isfinite(logits).reshape(logits.shape[0], -1).all(axis=1)).sum())
    if nan_logits:
        raise AttraxError(
            f"the model returns NaN/inf logits for {nan_logits} of {r.shape[0]} images, so method "
            f"{method!r} gives NaN/inf relevance: check the model's parameters and inputs"
        )
    raise AttraxError(f"method {method!r} gave NaN/inf relevance for {bad} of {r.shape[0]} images")


def check_relevance(r: Any, x: Array, name: str = "relevance") -> Array:
    r = to_device(r)
    if r.shape != x.shape:
        raise AttraxError(f"{name} has shape {r.shape}, expected the input's shape {x.shape}")
    if not bool(jnp.all(jnp.isfinite(r))):
        bad = int(jnp.sum(~jnp.isfinite(r)))
        raise AttraxError(f"{name} contains {bad} NaN/inf values")
    return r


def resolve_target(model: Model, params: Any, x: Array, y: Any, mode: str = "label") -> Array:
    """Explicit target choice: the true `label` or the model's `predicted` class."""
    check_target_mode(mode)
    if mode == "predicted":
        return jnp.argmax(forward(model, params, x), axis=-1).astype(jnp.int32)
    return to_device(y, jnp.int32)


def check_target_mode(mode: Any) -> None:
    """One-line error (with a did-you-mean) for a target mode other than `label` / `predicted`."""
    if mode not in TARGET_MODES:
        close = difflib.get_close_matches(str(mode), TARGET_MODES, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AttraxError(f"unknown target mode {mode!r}: use one of {', '.join(TARGET_MODES)}{hint}")


def chunk_size_for(cost: int, n: int, evals_per_chunk: int | None = None) -> int:
    """Images per compiled call so that images x evaluations-per-image stays within the budget.

    Chunks are balanced (100 images at most 81 per chunk -> 2 x 50, not 81 + 19 padded to 81),
    so the padded last chunk wastes little work.
    """
    budget = evals_per_chunk or default_evals_per_chunk()
    most = int(max(1, min(n, budget // max(1, cost))))
    return int(math.ceil(n / math.ceil(n / most))) if n > 0 else most


def compiled_memory_bytes(compiled: Any) -> int | None:
    """Bytes one call of a compiled function holds at its peak, from XLA's memory analysis.

    arguments + outputs + temporaries - aliased (donated) bytes; None where the backend gives no
    analysis. This is XLA's static buffer assignment for the call, not a process measurement.
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without an analysis
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


#: The largest chunk (images) `evals_per_chunk_for_memory` proposes: past a few thousand images a
#: chunk gains nothing, and a method whose memory barely grows with its images (RISE, whose
#: forwards have a fixed size) must not be extrapolated to billions of them.
MAX_BUDGET_IMAGES = 1 << 16


def evals_per_chunk_for_memory(
    method: str,
    model: Any,
    params: Any,
    x: Any,
    *,
    memory_mb: float,
    probe_images: tuple[int, int] = (2, 4),
    max_images: int = MAX_BUDGET_IMAGES,
    tries: int = 6,
    **hparams: Any,
) -> int:
    """Model evaluations per chunk that keep one compiled chunk of `method` within `memory_mb`.

    Pass the result to `explain(..., evals_per_chunk=...)`. The memory of a chunk is measured,
    not guessed: the method is compiled (not run, abstract inputs) and XLA's memory analysis
    (`compiled_memory_bytes`) gives its bytes. Two small probe chunks give a linear estimate
    (fixed part + bytes per image, at most `max_images` images); XLA's buffers are not exactly
    linear in the chunk (the estimate overshot by 0.6-10% for occlusion, RISE and a ResNet
    gradient), so the estimated chunk is compiled too and, while it does not fit, shrunk along
    the line through the two nearest measurements (at most `tries` compiles). The result is
    images x the method's cost (evaluations per image) for a chunk whose analysis fits. Raises
    when not even one image fits. `x` gives the image shape and dtype only. When `max_images` is
    no larger than the second probe, that chunk is compiled first and, if it fits, is the answer.
    """
    from attrax.methods import per_example_keys
    from attrax.methods.combinators import resolve

    if not isinstance(memory_mb, int | float) or not memory_mb > 0:
        raise AttraxError(f"memory_mb must be a positive number of MB, got {memory_mb!r}")
    entry = resolve(method)
    model = as_model(model)
    shape = tuple(np.shape(x)[1:])
    dtype = jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    cost = max(1, int(entry.meta.get("cost", lambda hp: 1)({**entry.hparams(), **hparams})))
    fn = jax.jit(lambda p, xx, tt, kk: entry.fn(model, p, xx, tt, key=kk, **hparams))
    budget = memory_mb * 2**20
    measured: dict[int, int] = {}

    def measure(k: int) -> int:
        if k not in measured:
            keys = jax.eval_shape(lambda: per_example_keys(0, k))
            compiled = fn.lower(params, jax.ShapeDtypeStruct((k, *shape), dtype),
                                jax.ShapeDtypeStruct((k,), jnp.int32), keys).compile()
            b = compiled_memory_bytes(compiled)
            if b is None:
                raise AttraxError(f"the {jax.default_backend()} backend reports no compiled memory analysis")
            measured[k] = b
        return measured[k]

    def too_small() -> AttraxError:
        return AttraxError(f"memory budget {memory_mb} MB is too small for {method!r}: one image needs "
                           f"{measure(1) / 2**20:.1f} MB")

    (k1, k2) = probe_images
    if max_images <= k2 and measure(max_images) <= budget:
        return max_images * cost  # the largest chunk asked for fits: one compile, no line needed
    b1, b2 = measure(k1), measure(k2)
    per_image = max(1.0, (b2 - b1) / (k2 - k1))
    fixed = max(0.0, b1 - per_image * k1)
    images = int(max(1, min(max_images, (budget - fixed) // per_image)))
    for _ in range(tries):
        used = measure(images)
        if used <= budget:
            return images * cost
        if images == 1:
            raise too_small()
        # the line through this chunk and the largest smaller measured chunk that needs fewer bytes
        lower = [k for k in measured if k < images and measured[k] < used]
        if lower:
            lo = max(lower)
            slope = (used - measured[lo]) / (images - lo)
            guess = int(lo + (budget - measured[lo]) // slope)
        else:
            guess = int(images * budget / used)
        images = max(1, min(images - 1, guess))
    fits = [k for k, b in measured.items() if b <= budget]
    if fits:
        return max(fits) * cost
    if measure(1) > budget:
        raise too_small()
    return cost


def batch_sharding(n: int):
    """Sharding of a batch of n over all local devices (a 1-D mesh), or None on one device.

    Used by `map_chunks`: with several devices (GPUs, TPU cores, or CPU devices forced with
    XLA_FLAGS=--xla_force_host_platform_device_count=N) every chunk is split along its batch
    axis and jit partitions the computation; per-example results do not change.
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devs = jax.local_devices()
    if len(devs) < 2 or n % len(devs):
        return None
    return NamedSharding(Mesh(np.asarray(devs), ("batch",)), PartitionSpec("batch"))


def device_multiple(chunk: int) -> int:
    """Round a chunk size up to a multiple of the local device count (for batch sharding)."""
    d = jax.local_device_count()
    return int(math.ceil(chunk / d) * d)


def chunk_workers() -> int:
    """Threads `map_chunks` runs chunks in: on a CPU backend with one local device, one per core
    this process may use (`ATTRAX_CHUNK_THREADS` overrides, 1 = in turn); elsewhere 1, and 1
    inside the pool's own threads (a nested call there would wait on the pool it occupies).

    Why: XLA:CPU runs one compiled call of a small model (cnn_a's batch-100 input gradient) on
    about 1.2 cores, and one thread's calls run one after another; calls from two threads run
    at the same time. Measured on the 2-core CPU (`bench/perf.py` docstring): the batch-100
    gradient as two 50-image calls in two threads took 24-25 ms against 40-45 ms for one call
    and 41-47 ms for two calls from one thread; process CPU time the same (47 vs 50-56 ms).
    """
    import os

    if getattr(_IN_POOL, "active", False):
        return 1
    env = os.environ.get("ATTRAX_CHUNK_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise AttraxError(f"ATTRAX_CHUNK_THREADS must be a whole number, got {env!r}") from None
    if jax.default_backend() != "cpu" or jax.local_device_count() > 1:
        return 1
    from attrax.train import cpu_workers

    return cpu_workers()


_POOL: dict[int, Any] = {}
_POOL_LOCK = threading.Lock()
_IN_POOL = threading.local()  # set in the pool's threads: a nested map_chunks runs in turn there


def _mark_pool_thread() -> None:
    _IN_POOL.active = True


def _pool(workers: int):
    """The process's thread pool of `workers` threads (made once, shared by every caller)."""
    from concurrent.futures import ThreadPoolExecutor

    with _POOL_LOCK:
        if workers not in _POOL:
            _POOL[workers] = ThreadPoolExecutor(workers, thread_name_prefix="attrax-chunk",
                                                initializer=_mark_pool_thread)
        return _POOL[workers]


def in_threads(calls: list[Callable[[], Any]], workers: int) -> list[Any]:
    """[call() for call in calls] from the shared pool of `workers` threads, results in order.
    Each thread waits for its result (`jax.block_until_ready`), so the next call starts only when
    a core is free; a call's exception is re-raised here."""
    pool = _pool(workers)
    futures = [pool.submit(lambda c=c: jax.block_until_ready(c())) for c in calls]
    return [f.result() for f in futures]


#: Primitives that XLA:CPU runs as LAPACK custom calls. jaxlib's LAPACK kernels spread a batch
#: over the intra-op thread pool and wait for it from a pool thread: two such calls from two chunk
#: threads at once each hold one of the pool's threads and wait for the other forever (seen with
#: KernelSHAP's `pinv(hermitian=True)` -> `eigh` on a small user CNN, 2026-12-04). Computations
#: holding one run their chunks in turn.
LAPACK_PRIMITIVES = frozenset({"eigh", "svd", "cholesky", "lu", "qr", "geqrf", "geqp3", "householder_product",
                               "orgqr", "eig", "schur", "hessenberg", "tridiagonal", "tridiagonal_solve"})


def lapack_primitives(jaxpr) -> set[str]:
    """The LAPACK-backed primitives (`LAPACK_PRIMITIVES`) anywhere in a (closed) jaxpr,
    sub-computations (jit, custom derivatives, loops, conditionals) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found: set[str] = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in LAPACK_PRIMITIVES:
            found.add(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in (v if isinstance(v, list | tuple) else (v,)):
                if isinstance(sub, jcore.ClosedJaxpr | jcore.Jaxpr):
                    found |= lapack_primitives(sub)
    return found


def splits_chunks(n: int, chunk: int, workers: int) -> bool:
    """Whether `map_chunks` cuts each chunk for `workers` threads: a chunk of one image stays one
    (its memory)."""
    return workers > 1 and min(chunk, n) >= 2


def effective_chunk(n: int, chunk: int, workers: int) -> int:
    """The images per compiled call `map_chunks` runs: a chunk of two or more images cut into
    `workers` equal chunks, rounded up to a multiple of the device count."""
    if splits_chunks(n, chunk, workers):
        chunk = -(-min(chunk, n) // workers)
    return device_multiple(chunk)


def map_chunks(fn: Callable, n: int, chunk: int, *arrays: Array, threads: bool = True) -> Array:
    """Apply a compiled `fn(*batch_arrays)` over fixed-size chunks (last one padded).

    Padding keeps one shape, so a second chunk never retraces. With several local devices the
    chunk is rounded up to a multiple of the device count and sharded along the batch axis.
    With `chunk_workers()` > 1 threads (one per core on CPU) a chunk of two or more images is cut
    into that many equal chunks (the same images in flight at once, so the same memory) and the
    chunks run in the threads, their results in order; chunks of one image run in turn. `fn` must
    be per-example (every registered method is: the conformance suite checks it), so the result
    does not depend on the split. `threads=False` runs the chunks in turn (computations with LAPACK
    calls: `lapack_primitives`).
    """
    workers = chunk_workers() if threads else 1
    threaded = splits_chunks(n, chunk, workers)
    chunk = effective_chunk(n, chunk, workers)
    sharding = batch_sharding(chunk)
    # on one CPU device the chunks are cut, padded and joined in NumPy (views of the same host
    # memory): done with jax ops, each slice, pad and join shape was a compiled program of its own
    host = sharding is None and jax.default_backend() == "cpu"
    on_host = [host and _host_array(a) for a in arrays]  # per input, once (not per chunk)

    def cut(a, a_on_host: bool, start: int, stop: int):
        part = a if (start == 0 and stop == a.shape[0]) else None
        if a_on_host:
            part = np.asarray(a)[start:stop] if part is None else part
            if stop - start < chunk:
                part = np.pad(np.asarray(part), [(0, chunk - (stop - start))] + [(0, 0)] * (part.ndim - 1))
            return to_device(part)  # a transfer, not a compiled program: `fn` gets jax arrays as before
        part = a[start:stop] if part is None else part
        if stop - start < chunk:
            extra = chunk - (stop - start)
            if jnp.issubdtype(part.dtype, jax.dtypes.prng_key):
                part = jnp.concatenate([part, jnp.repeat(part[:1], extra, axis=0)])
            else:
                part = jnp.pad(part, [(0, extra)] + [(0, 0)] * (part.ndim - 1))
        if sharding is not None:
            part = jax.device_put(part, sharding)
        return part

    def piece(start: int):
        stop = min(n, start + chunk)
        out = fn(*[cut(a, h, start, stop) for a, h in zip(arrays, on_host, strict=True)])
        k = stop - start
        if k == chunk:
            return out
        return jax.tree.map(lambda o: np.asarray(o)[:k] if host and _host_array(o) else o[:k], out)

    starts = range(0, n, chunk)
    if threaded and len(starts) > 1:
        outs = in_threads([functools.partial(piece, s) for s in starts], workers)
    else:
        outs = [piece(s) for s in starts]
    if len(outs) == 1:
        return jax.tree.map(lambda o: to_device(o) if isinstance(o, np.ndarray) else o, outs[0])
    return jax.tree.map(lambda *o: to_device(np.concatenate([np.asarray(a) for a in o]))
                        if host and all(_host_array(a) for a in o) else jnp.concatenate(o), *outs)


def _host_array(a: Any) -> bool:
    """A NumPy array, or a concrete jax array (not PRNG keys) held in CPU memory."""
    if isinstance(a, np.ndarray):
        return a.dtype != object
    if not isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer):
        return False
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        return False
    try:
        return a.is_fully_addressable and all(d.platform == "cpu" for d in a.devices())
    except Exception:  # noqa: BLE001 - deleted or otherwise unreadable buffers: the jax path
        return False


def forward(model: Model, params: Any, x: Array, chunk: int = 1024) -> Array:
    """Logits of a batch through one cached compiled forward, in chunks."""
    model = as_model(model)
    f = model.cached(("forward", x.shape[1:], chunk), lambda: jax.jit(lambda p, xx: model(p, xx)))
    return map_chunks(lambda xx: f(params, xx), x.shape[0], min(chunk, x.shape[0]), x)


RETURN_SCORES = (*SCORES, "logits")


def check_return_score(return_score: str | None) -> None:
    if return_score is not None and return_score not in RETURN_SCORES:
        raise AttraxError(f"unknown return_score {return_score!r}: use one of {', '.join(RETURN_SCORES)}")


def score_of(model, params, x: Array, target: Array, return_score: str) -> Array:
    """What `explain(..., return_score=)` returns next to the maps: f_c(x) (n,) or the logits."""
    logits = model(params, x)
    return logits if return_score == "logits" else class_score(logits, target, return_score)


def explain(
    method: str,
    model: Any,
    params: Any,
    x: Any,
    target: Any,
    *,
    key: Array | int | None = 0,
    chunk_size: int | None = None,
    evals_per_chunk: int | None = None,
    jit: bool = True,
    return_score: str | None = None,
    **hparams: Any,
) -> Array | tuple[Array, Array]:
    """Relevance maps of `method` for a batch (the Python API's `attrax.explain`).

    `model` may be a zoo `Model`, any Flax linen module, or a plain `apply_fn(params, x)`.
    `target`: the class explained per input, int indices of shape (n,) (or one int for all), or
    "predicted" (each input's argmax class). Hyperparameters are static (one compile per method,
    hyperparameters and chunk shape); the batch runs in chunks of `chunk_size` images (default:
    from `evals_per_chunk` and the method's cost), and per-example keys make the result
    independent of the chunking.

    `return_score="logit"` (or "probability", "log_probability"): return `(relevance, f_c(x))`,
    the target score of each input computed in the same compiled call ("logits": the model's
    whole output (n, classes)). For protocols that score the very inputs they re-explain: XLA
    merges that forward with the method's own forward where the two are the same computation
    (gradient methods), so the score costs nothing there.
    """
    from attrax.methods.combinators import resolve

    entry = resolve(method)  # registered names and compositions such as "smooth(gradient)"
    model = as_model(model)
    target = named_target(model, params, x, target)
    x, target = check_batch(x, target)
    allowed = entry.hparams()
    unknown = set(hparams) - set(allowed)
    if unknown:
        raise AttraxError(
            f"method {method!r} has no hyperparameter {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(allowed)) or 'none'}"
        )
    needs = entry.meta.get("needs", "apply")
    if needs != "apply" and model.module is None:
        raise AttraxError(
            f"method {method!r} needs the model's layer structure ({needs}); a plain apply_fn has none. "
            "Pass the Flax module instead."
        )
    check_target_range(model, params, x, target)
    n = x.shape[0]
    base = key if key is not None else 0
    if isinstance(base, int):
        base = _int_key(base)
    elif not jnp.issubdtype(base.dtype, jax.dtypes.prng_key):
        base = jax.random.wrap_key_data(base)
    given = base.ndim == 1  # the caller passed per-example keys
    if given and base.shape[0] != n:
        raise AttraxError(f"got {base.shape[0]} per-example keys for a batch of {n}")
    # per-example keys fold_in(key, i) are derived inside the compiled call from example indices
    chunked_keys = base if given else np.arange(n, dtype=np.int32)
    cost = entry.meta.get("cost", lambda hp: 1)({**allowed, **hparams})
    if chunk_size is None and evals_per_chunk is None:
        evals_per_chunk = default_evals_per_chunk(activation_bytes(model, params, x),
                                                  forward_only=bool(entry.meta.get("forward_only")))
    chunk = chunk_size or chunk_size_for(cost, n, evals_per_chunk)
    # batch-shaped hyperparameters (a per-image reference of x's shape) travel with their chunk
    per_image = [k for k in entry.meta.get("batch_hparams", BATCH_HPARAMS)
                 if k in hparams and not isinstance(hparams[k], str) and np.shape(hparams[k]) == x.shape]
    sliced = [to_device(hparams[k], x.dtype) for k in per_image]
    static = {k: v for k, v in hparams.items() if k not in per_image}

    def run(p, xx, tt, kk, kb, *bb):
        keys = kk if given else jax.vmap(lambda i: jax.random.fold_in(kb, i))(kk)
        r = entry.fn(model, p, xx, tt, key=keys, **static, **dict(zip(per_image, bb, strict=True)))
        # the finiteness check runs inside the call (one flag per example, no extra dispatch)
        finite = jnp.isfinite(r).reshape(r.shape[0], -1).all(axis=1)
        if return_score is None:
            return r, finite
        return r, finite, score_of(model, p, xx, tt, return_score)

    check_return_score(return_score)
    cache_key = ("explain", method, _freeze(static), tuple(per_image), x.shape[1:], chunk, given,
                 return_score)

    if jit:
        run = model.cached(cache_key, lambda: jax.jit(run))

    def threadable() -> bool:
        """No LAPACK call in the method (see `LAPACK_PRIMITIVES`): traced at the threaded chunk
        shape, the trace the first threaded call then reuses (jit caches it by shape)."""
        size = effective_chunk(n, chunk, chunk_workers())

        def spec(a):
            return jax.ShapeDtypeStruct((size,) + tuple(a.shape[1:]), a.dtype)

        args = (params, spec(x), spec(target), spec(chunked_keys), base, *map(spec, sliced))
        jaxpr = run.trace(*args).jaxpr if jit else jax.make_jaxpr(run)(*args)
        return not lapack_primitives(jaxpr)

    threads = not splits_chunks(n, chunk, chunk_workers()) or model.cached(("threadable",) + cache_key, threadable)
    out, finite, *scores = map_chunks(lambda xx, tt, kk, *bb: run(params, xx, tt, kk, base, *bb), n, chunk, x,
                                      target, chunked_keys, *sliced, threads=threads)
    if _concrete(out, x) and not np.asarray(finite).all():
        return check_output_finite(out, method, model, params, x)  # raises, naming the cause
    return out if return_score is None else (out, scores[0])


def evaluate(
    protocol: str,
    model: Any,
    params: Any,
    x: Any,
    target: Any,
    relevance: Any,
    *,
    key: Array | int | None = 0,
    **hparams: Any,
):
    """Score relevance maps with a registered protocol (the Python API's `attrax.evaluate`)."""
    from attrax.protocols import PROTOCOLS

    entry = PROTOCOLS.get(protocol)
    if entry.meta.get("kind") == "retrain":
        raise AttraxError(f"protocol {protocol!r} retrains models and takes no relevance batch: call "
                          f"attrax.protocols.get({protocol!r}).fn(method, model, train_set, test_set, ...) "
                          f"or run it with `attrax protocol={protocol}`")
    model = as_model(model)
    target = named_target(model, params, x, target)
    x, target = check_batch(x, target)
    check_target_range(model, params, x, target)
    relevance = check_relevance(relevance, x)
    allowed = entry.hparams()
    unknown = set(hparams) - set(allowed)
    if unknown:
        raise AttraxError(
            f"protocol {protocol!r} has no parameter {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(allowed)) or 'none'}"
        )
    if isinstance(key, int):
        key = jax.random.key(key)
    return entry.fn(model, params, x, target, relevance, key=key, **hparams)
