"""The benchmark command: speed and memory of every method and protocol against the bound.

    attrax-bench [--config default] [--methods a,b] [--protocols a,b] [--batch 100] [--out DIR]
    attrax bench ...                      (the same; argparse, not Hydra)

For every registered method (`attrax.methods.names()`) and protocol (`attrax.protocols.names()`)
on one dataset/model/batch (default: mnist_sample, the `cnn_a` reference CNN, batch 100, trained
one quick epoch) it measures

- `images_per_s`: steady state, the median of several timed calls after warm-up, each ended by
  `jax.block_until_ready`; methods run through `attrax.explain` (the user's path: jit cache,
  chunking, per-example keys), protocols through `attrax.evaluate` on gradient maps;
- `compile_s`: first call minus a steady call (tracing + XLA compilation);
- `peak_mb`: XLA's compiled memory analysis of one chunk of the method (arguments + outputs +
  temporaries; `attrax.harness.compiled_memory_bytes`), a static figure that does not depend on
  other processes; protocols (several compiled calls each) report none;
- `bound_ratio`: time / the time of the raw batched evaluations the computation needs at least,
  measured in the same run: a gradient-family (gradient, backprop, relevance, CAM) method is
  bounded by `cost(hparams)` batched gradients of the same images, a perturbation or surrogate
  method by `cost` batched forwards (`cost` = the registered model evaluations per image); a
  protocol with K steps/runs/samples by K + 1 forwards (or K re-explanations).

Beside them: the figures of the performance work (XLA's select-and-scatter max pooling vs the
reshape max pooling of `attrax.models.max_pool`, chunk sizes, optional XLA flags in
subprocesses), `lax.scan` vs Python-loop training and vmapped vs sequential retraining (both
numbers kept), and the memory-bounded chunking check (10,000 images x IG 256 steps within a
budget, chunk size from `attrax.harness.evals_per_chunk_for_memory`). Output: a tidy table
(`attrax.results` schema, protocol="bench", one metric per row) in `<out>/rows.parquet` +
`run.json`, and `<out>/performance.md` with the PyTorch-stack bar side by side.

Model families (issue 13): `--model` also takes the user-style models of `attrax.examples`
(`nonzoo_cnn`, `nonzoo_resnet`, `vit_tiny`, `jnp_mlp`, `nnx_cnn`; random weights) and
comma-separated lists; the families section then times `families.methods` (LRP-epsilon, DeepLIFT,
guided backprop) on every listed model as a ratio to one raw batched gradient of the same batch,
measured in the same run (goal <= 2x): `attrax-bench --families-only --model nonzoo_cnn,vit_tiny`.
Settings and per-method benchmark hyperparameters: conf/bench/default.yaml.

Against the PyTorch stack (issue 17): `attrax-bench --against PATH/torch_cpu.json` reads the JSON
of ../shared/anchors/torch_anchor.py (run just before, on the same machine) and adds a row per
anchor workload: the attrax counterpart named in the config's `against:` table, run with those
settings, and the ratio of images/s; a workload without a counterpart, or one that failed in the
anchor, says so. `bench/anchor_side_by_side.sh OUT` runs both back to back into one folder, then
the anchor a second time: `attrax-bench --from-run OUT/attrax --against-after OUT/torch_cpu_after.json`
re-scores the run against the geometric mean of the two anchor runs and shows each run's ratio and
the anchor's drift (after / before), which separates the machine's own drift from a real gap.

What did not help (measured on the shared 2-core CPU, process CPU time, jaxlib 0.10.2):
- XLA_FLAGS, each in a fresh process (`--flags`, the `probe` figures, two rounds under load
  7-12; wall figures were meaningless, CPU estimates of the batch-100 gradient moved within
  +-15% between rounds for every flag): --xla_cpu_use_onednn=true, --xla_cpu_use_xnnpack=true,
  --xla_cpu_experimental_xnn_fusion_type=dot,eltwise, --xla_cpu_experimental_onednn_custom_call=true,
  --xla_cpu_multi_thread_eigen=false gave no gain outside that noise (onednn and xnnpack made the
  training step 10-25% slower in both rounds); --xla_cpu_experimental_ynn_fusion_type=dot,eltwise
  halved the gradient and failed in the second round; --xla_cpu_enable_fast_math=true changes
  the numbers and is not an option. None is set.
- NCHW/OIHW convolutions (torch's layout) instead of NHWC/HWIO: cnn_a's batch-100 input gradient
  1.8x slower (127 vs 70 ms CPU), the forward 1.5x slower (27 vs 18 ms) on XLA:CPU.
- Convolution backward rewrites (attrax.fastconv keeps the two that won: the kernel gradient as
  scanned im2col + dot, the few-input-channel input gradient as dot + col2im; see its docstring
  for all figures): the input gradient of wide layers as an explicit convolution of the
  cotangent with the flipped, transposed kernel (XLA already emits that canonical form: same
  11.2 ms for cnn_a's conv2 at batch 100) or as col2im (16.3 ms); the forward as im2col + dot
  (53 vs 10.5 ms) or 9 tap dots; one patch matrix for the whole batch (1.7x slower than XLA's
  kernel gradient from ~100 images on).
- Two halves of a batch in ONE compiled call (or two calls from one thread): on the idle 2-core
  CPU the cnn_a batch-100 gradient took 45-47 ms as halves in one call and 41-47 ms as two calls
  from one thread against 40-54 ms for one call: XLA:CPU runs a thread's calls one after another
  and barely overlaps independent halves inside one program. What paid: the halves from two
  Python threads (`harness.map_chunks`, `chunk_workers`), 24-25 ms; per explain call (threads 1
  vs 2, batch 100): gradient 45-58 vs 24-34 ms, input x gradient 58-60 vs 31-32, guided backprop
  53-55 vs 33, LRP epsilon-plus-flat 74-77 vs 46-47; process CPU time 5-15% lower. Not better
  on top of it (gradient, 100 real digits, ms): explain's chunk_size 100 / 64 / 50 / 32 / 20 ->
  35.9 / 45.5 / 37.4 / 42.2 / 49.0; 4 threads on the 2 cores 31.2 (noise); explain adds nothing
  over the raw threaded call (33.8 vs 35.5).
- Guided Grad-CAM from one forward (the guided network's forward giving the layer's maps, the
  plain head evaluated at them with a zero probe, one backward for both; 2026-12-03, equal maps
  on cnn_a, resnet and user models): 20.7 / 21.3 ms against 20.4 / 21.5 for guided backprop times
  Grad-CAM in one compiled call (cnn_a, batch 100, two rounds; guided backprop alone 17.3-17.8):
  XLA already merges the two forwards, so the simpler form stays.
- The training step's arithmetic is at matrix-product speed (2026-12-03, one core, batch 64,
  cnn_a's conv2 14x14x32 -> 64): attrax's kernel gradient 7.45 ms against 6.12 ms for the bare
  (288, 12,544) @ (12,544, 64) dot it contains (XLA's own kernel gradient 14.3 ms), the forward
  6.1 ms, forward + both gradients 14.4 ms (XLA's 20.8). What did not beat it: Winograd F(2x2, 3x3)
  (16 channel products of 49 tiles per image, 2.25x fewer multiplications, error ~1e-6): forward
  6.9 ms, forward + both gradients 32.5 ms (the K = 32 products and the tile transforms are
  memory-bound on XLA:CPU); max pooling's backward as strided first-winner slices (5x faster
  alone, 0.57 vs 2.85 ms at 50 x 28 x 28 x 32) as a custom_vjp or custom_jvp: the whole training
  gradient 30.3-33.3 / 35.8-41.9 ms against 29.5-30.8 ms (XLA already fuses the pooling
  backward with its neighbours). Profile of the whole step (jax.profiler trace, one pinned
  core, batch 32, 15.0 ms per step, 2026-12-03 pm): conv2's forward 2.90 ms, its input gradient
  3.37 ms, its kernel gradient 3.69 ms (the four scanned dots 2.56 of it, ~90 GFLOP/s), i.e. 2/3
  of the step in conv2's three matrix-product-shaped passes; everything else (conv1, pooling,
  dense layers, loss, Adam's 0.6 ms) is the other third. Even at zero cost for the rest the step
  would be 1.5x faster, not the 2x over the PyTorch loop the grid asks for. So the ROAR + KAR
  grid's 2x needs fewer operations per step, not a faster kernel; it stays at the per-core step's
  speed. What did pay for the grid: pooling the retrains of all in-memory variants of a method
  into one `train_many` call (protocols/roar.py; per variant, 3 seeds on 2 worker threads left a
  core idle a quarter of the time): 3,082 -> 3,548 training images/s, 167 -> 145 s.
- Protocols: one compiled call per selectivity step (re-explain + removal + score) was 0.84x of
  separate calls; all steps in one call compiled for ~60 s (unrolled) or ran 1.5x slower
  (`fori_loop`: XLA:CPU runs convolutions in while loops slower). What paid: scoring in CPU-sized
  chunks instead of padded 1,024-image chunks, then taking f_c of each re-explained state from
  the explain call itself (`explain(return_score=)`: XLA merges it with the gradient's forward;
  selectivity 1.66x, continuity 1.6x; see protocols/selectivity.py, continuity.py).
- (2026-12-03 evening, idle 2-core AMD EPYC, AVX2 only) The first layer's forward as a sum of 9
  shifted, scaled copies of the one-channel input: alone (28x28x1 -> 32, batch 50, + bias +
  ReLU) 0.44 ms against XLA's 1.24 ms, but inside cnn_a the forward got slower (8.4 vs 6.8 ms at
  batch 50, one pinned core; XLA fuses the sum into the pooling's consumers), the input gradient
  even; with an optimization barrier after it the rounds spread +-20% with no clear gain. Not kept.
- One process per core instead of one thread per core (cnn_a loss + gradient, batch 32): two
  threads 3,650-3,900 images/s in all, two pinned processes 3,700-4,100 (one pinned process
  alone ~3,000): equal within noise that day, so the threads stay (an earlier probe had
  2,000-2,900 against 2,900-3,300 on a slower machine state). `explain`'s fixed cost per call
  (target checks, key indices, the cut, two threads' hand-off, the finiteness flag) is ~1.7 ms
  (batch 2: 2.67 ms against 0.93 ms for the bare jitted gradient), 5-9% of a batch-100 gradient.
- (2026-12-04, another 2-core AMD EPYC: 33.5-34.8 GFLOP/s per core for a float32 matrix
  product, ~67 for both at once; the PyTorch loop 1,139-1,231 training images/s, attrax
  `train_many` parallel 1,707-1,769) conv -> ReLU -> max-pool blocks as one custom_vjp for
  training that keeps the pool's winner index (int8) instead of the convolution's output and
  scatters the cotangent by it: the pooling alone 2-4x faster (28x28x32 at batch 64: forward +
  backward 3.2 vs 6.3 ms; 14x14x64: 0.8 vs 2.8 ms), the first block's forward with the 3x3
  convolution as 9 shifted products fused into the pooling 1.9 vs 3.9 ms, but every whole block
  no faster (conv1: 10.7 vs 10.4-11.2 ms forward + parameter gradient; conv2: 55.5 vs 48.3 ms
  with the input gradient) and the whole gradient slower (70 vs 63.5 ms): XLA already fuses the
  pooling backward with the ReLU mask and the transposed products, and the scattered cotangent
  is written once more in full. Not kept. The step's share of the arithmetic bound
  (`arithmetic_bound`: 23.4 MFLOP per image, XLA's count) was 60% for `train_many` and 42% for
  the PyTorch loop on that machine: a 2x ROAR + KAR grid would need 84% of it.
- What paid (same evening): 4x the CPU evaluations per chunk for forward-only methods
  (occlusion, RISE; `attrax.harness.FORWARD_ONLY_SCALE`): occlusion 4x4 at batch 100, medians
  of 5 interleaved rounds, 550 ms at 128 evaluations per chunk, 421 at 512, 579 at 1,024, 673 at
  2,048; RISE 10.3 -> 9.2 s. Integrated gradients and SmoothGrad lost at 512 (1.35 -> 1.66 s,
  1.27 -> 1.73 s), KernelSHAP and LIME were even, so they keep 128.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from attrax._arrays import to_device
from attrax.errors import AttraxError

GRADIENT_FAMILIES = ("gradient", "backprop", "relevance", "cam")


# ---------------------------------------------------------------------------------------------
# Settings


def load_config(name: str = "default", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The benchmark settings: conf/bench/<name>.yaml (or a path to a YAML file) + overrides."""
    import yaml

    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        text = p.read_text()
    else:
        f = resources.files("attrax.conf") / "bench" / f"{name}.yaml"
        if not f.is_file():
            raise AttraxError(f"no benchmark config {name!r}: give a name under conf/bench/ or a YAML path")
        text = f.read_text()
    cfg = yaml.safe_load(text) or {}
    cfg.setdefault("methods", {})
    cfg.setdefault("protocols", {})
    for k, v in (overrides or {}).items():
        if v is not None:
            cfg[k] = v
    return cfg


# ---------------------------------------------------------------------------------------------
# Timing


def steady_calls(fn: Callable[[], Any], n: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of `n` calls, each ended by `jax.block_until_ready`."""
    times, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def time_calls(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
               max_seconds: float = 15.0) -> dict[str, float]:
    """First-call seconds (compile + run) and the median of `repeats` steady calls.

    Every call ends with `jax.block_until_ready`. When one call is slow, fewer repeats run
    (at least 2) so that an entry takes about `max_seconds`.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(0, warmup)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    one = times[-1] if times else first
    n = int(max(2, min(repeats, max_seconds // max(one, 1e-9))))
    times, cpu = steady_calls(fn, n)
    med = statistics.median(times)
    return {"first_s": first, "median_s": med, "compile_s": max(0.0, first - med), "repeats": n,
            "min_s": min(times), "cpu_s": statistics.median(cpu)}


def cpu_equivalent_s(cpu_s: float) -> float:
    """Wall seconds the call's CPU time would take spread over all cores of an idle machine.

    On a shared machine wall time mostly measures the other processes; the process's CPU time
    (all its threads) barely depends on them. This is an estimate (perfect use of every core),
    reported beside the wall-clock figures, never instead of them.
    """
    return cpu_s / max(1, os.cpu_count() or 1)


class count_compilations:  # noqa: N801 - used as a context manager, like a function
    """Counts XLA backend compilations inside a `with` block (`.count`), e.g. to check that a
    second batch of the same shape compiles nothing, and sums the seconds of tracing, lowering and
    compiling (`.seconds`, from JAX's events: a method's compile time apart from its run time)."""

    EVENT = "/jax/core/compile/backend_compile_duration"
    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration", EVENT)

    def __init__(self):
        self.count = 0
        self.seconds = 0.0

    def _listener(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in self.EVENTS:
            self.seconds += duration
            self.count += event == self.EVENT

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)
        return False


def rss_peak_mb() -> float:
    """The process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Setup


def setup(cfg: dict[str, Any]):
    """(model, params, x, target, info) for the configured dataset, model and batch."""
    import attrax

    test = attrax.datasets.load(cfg["dataset"], split="test")
    n = int(cfg["batch"])
    if len(test.x) < n:
        reps = -(-n // len(test.x))
        x_np, y_np = np.concatenate([test.x] * reps)[:n], np.concatenate([test.y] * reps)[:n]
    else:
        x_np, y_np = test.x[:n], test.y[:n]
    info: dict[str, Any] = {}
    from attrax import examples

    if cfg["model"] in examples.names():  # a user-style model (not in the zoo): random weights
        raw, params = examples.build(cfg["model"], int(cfg.get("seed", 0)), to_device(x_np[:1]),
                                     num_classes=int(y_np.max()) + 1 if len(y_np) else 10)
        model = attrax.models.Model(cfg["model"], attrax.as_model(raw).apply_fn, attrax.as_model(raw).module)
        return model, params, to_device(x_np), to_device(y_np, jnp.int32), {"example": True}
    if int(cfg.get("train_epochs", 0)) > 0:
        train_set = attrax.datasets.load(cfg["dataset"], split="train").take(int(cfg.get("train_images", 2000)))
        model, params, tinfo = attrax.train(cfg["model"], train_set, seed=0, progress=False,
                                            cfg=attrax.TrainConfig(epochs=int(cfg["train_epochs"])))
        info = {"train_cached": tinfo.get("cached"), "train_accuracy": tinfo.get("train_accuracy")}
    else:
        model = attrax.models.create(cfg["model"])
        params = attrax.models.init(model, jax.random.key(0), to_device(x_np[:1]))
    return model, params, to_device(x_np), to_device(y_np, jnp.int32), info


def reference_times(model, params, x, target, *, repeats: int, max_seconds: float,
                    batches: list[int] | None = None) -> dict[str, Any]:
    """Seconds of one raw batched forward and one batched input gradient, per batch of len(x).

    With `batches` (the config's `bound_batches`) each is also timed at those batch sizes (the
    batch tiled or cut) and the bound is the FASTEST per-image rate at any of them, scaled to a
    batch of len(x): a method that beats the batch-size-n figure by running small cache-friendly
    chunks then does not look faster than its bound. With chunk threads (CPU, `harness.chunk_workers`)
    each size is also timed as explain runs it (equal chunks in threads) and the faster form counts
    (`*_one_call` keeps the single call's seconds). `sweep` keeps every size's figures;
    `forward_batch` / `gradient_batch` the seconds at len(x) itself.
    """
    from attrax.harness import chunk_workers, map_chunks
    from attrax.methods import input_gradient

    threads = chunk_workers()
    fwd = jax.jit(lambda p, xx: model(p, xx))
    grad = jax.jit(lambda p, xx, tt: input_gradient(lambda z: model(p, z), xx, tt)[1])
    kw = {"repeats": max(repeats, 7), "warmup": 2, "max_seconds": max_seconds}
    n = x.shape[0]
    sizes = sorted({int(b) for b in (batches or [])} | {n})
    sweep, best = [], {}
    for b in sizes:
        reps = -(-b // n)
        xb = x if b == n else jnp.concatenate([x] * reps)[:b]
        tb = target if b == n else jnp.concatenate([target] * reps)[:b]
        f = time_calls(lambda xb=xb: fwd(params, xb), **kw)
        g = time_calls(lambda xb=xb, tb=tb: grad(params, xb, tb), **kw)
        row = {"batch": b, "forward": f["median_s"], "gradient": g["median_s"],
               "forward_cpu": cpu_equivalent_s(f["cpu_s"]), "gradient_cpu": cpu_equivalent_s(g["cpu_s"])}
        if threads > 1 and b >= 2:
            # the batch as `threads` chunks in threads, as attrax.explain runs it on CPU: the
            # bound is the fastest form this machine reaches, one call or several at once
            ft = time_calls(lambda xb=xb, b=b: map_chunks(lambda z: fwd(params, z), b, b, xb), **kw)
            gt = time_calls(lambda xb=xb, tb=tb, b=b: map_chunks(lambda z, u: grad(params, z, u), b, b, xb, tb),
                            **kw)
            row.update(forward_one_call=row["forward"], gradient_one_call=row["gradient"],
                       forward=min(row["forward"], ft["median_s"]), gradient=min(row["gradient"], gt["median_s"]),
                       forward_cpu=min(row["forward_cpu"], cpu_equivalent_s(ft["cpu_s"])),
                       gradient_cpu=min(row["gradient_cpu"], cpu_equivalent_s(gt["cpu_s"])))
        sweep.append(row)
        for k in ("forward", "gradient", "forward_cpu", "gradient_cpu"):
            per_image = row[k] / b
            if k not in best or per_image < best[k][0]:
                best[k] = (per_image, b)
        if b == n:
            at_n = row
    out: dict[str, Any] = {k: v[0] * n for k, v in best.items()}
    out.update({f"{k}_best_batch": v[1] for k, v in best.items()},
               forward_batch=at_n["forward"], gradient_batch=at_n["gradient"], sweep=sweep)
    return out


# ---------------------------------------------------------------------------------------------
# Methods


def method_bound(name: str, hp: dict[str, Any], entry_cfg: dict[str, Any]) -> tuple[str, float]:
    """(kind, evaluations per image) of the lower bound of a method."""
    from attrax.methods import get

    entry = get(name)
    if "bound" in entry_cfg:
        b = entry_cfg["bound"]
        return b["kind"], float(b["evals"])
    cost = float(entry.meta.get("cost", lambda h: 1)({**entry.hparams(), **hp}))
    kind = "gradient" if entry.meta.get("family") in GRADIENT_FAMILIES else "forward"
    return kind, cost


def _explain_memory_mb(model, name: str, params, x, target) -> float | None:
    """Compiled memory of the chunk that `attrax.explain` just ran for `name`."""
    from attrax.harness import compiled_memory_bytes
    from attrax.methods import per_example_keys

    for key, fn in list(model._cache.items()):
        # harness.explain's key: ("explain", method, static hparams, per-image hparam names, shape, chunk, given,
        # return_score); the maps alone (return_score None) are what the method costs
        if isinstance(key, tuple) and len(key) == 8 and key[0] == "explain" and key[1] == name and key[7] is None:
            per_image, chunk, given = key[3], key[5], key[6]
            xx = jnp.zeros((chunk, *x.shape[1:]), x.dtype)
            kk = per_example_keys(0, chunk) if given else jnp.arange(chunk, dtype=jnp.int32)
            bb = [xx] * len(per_image)  # per-image hyperparameters travel with the chunk, shaped like x
            try:
                compiled = fn.lower(params, xx, jnp.zeros((chunk,), jnp.int32), kk, jax.random.key(0), *bb).compile()
            except Exception:  # noqa: BLE001 - a figure we cannot get is reported as missing
                return None
            b = compiled_memory_bytes(compiled)
            return None if b is None else b / 2**20
    return None


def bench_method(name: str, model, params, x, target, ref: dict[str, float], cfg: dict[str, Any]) -> dict:
    import attrax

    ecfg = dict(cfg["methods"].get(name) or {})
    hp = dict(ecfg.get("hparams") or {})
    rec: dict[str, Any] = {"kind": "method", "name": name, "hparams": hp, "bar": None}
    kind, evals = method_bound(name, hp, ecfg)
    model = attrax.as_model(model)
    # a fresh wrapper per method: its jit cache holds only this method's compiled chunks
    model = attrax.models.Model(model.name, model.apply_fn, model.module)

    def call():
        return attrax.explain(name, model, params, x, target, key=0, **hp)

    t = time_calls(call, repeats=cfg["repeats"], warmup=cfg["warmup"], max_seconds=cfg["max_seconds"])
    n = x.shape[0]
    bound_s = evals * ref[kind]
    rec.update(
        images_per_s=n / t["median_s"], compile_s=t["compile_s"], seconds=t["median_s"], repeats=t["repeats"],
        bound_kind=kind, bound_evals=evals, bound_s=bound_s,
        bound_ratio=(t["median_s"] / bound_s) if bound_s > 0 else float("nan"),
        peak_mb=_explain_memory_mb(model, name, params, x, target),
    )
    _add_cpu_figures(rec, t, n, evals * ref[f"{kind}_cpu"])
    return rec


def _add_cpu_figures(rec: dict, t: dict, n: int, bound_cpu_s: float | None) -> None:
    """CPU-time equivalents (see `cpu_equivalent_s`) of images/s and the bound ratio."""
    c = cpu_equivalent_s(t["cpu_s"])
    rec["cpu_images_per_s"] = n / c if c > 0 else None
    if bound_cpu_s:
        rec["cpu_bound_ratio"] = c / bound_cpu_s


# ---------------------------------------------------------------------------------------------
# Protocols


def bench_families(cfg: dict[str, Any], models: list[str], log=lambda *a: None) -> list[dict]:
    """Per model: `families.methods` (default LRP-epsilon, DeepLIFT, guided backprop) and the
    gradient through `attrax.explain`, each as a ratio to ONE raw batched gradient of the same
    batch measured in the same run (issue 13's goal: <= `families.target_ratio`, 2x)."""
    fcfg = dict(cfg.get("families") or {})
    names = ["gradient", *[m for m in fcfg.get("methods", ["lrp_epsilon", "deeplift", "guided_backprop"])
                           if m != "gradient"]]
    out = []
    for mname in models:
        mcfg = {**cfg, "model": mname}
        model, params, x, target, _ = setup(mcfg)
        ref = reference_times(model, params, x, target, repeats=cfg["repeats"], max_seconds=cfg["max_seconds"])
        explained_gradient_s = None
        for name in names:
            try:
                rec = bench_method(name, model, params, x, target, ref, mcfg)
                rec["gradient_ratio"] = rec["seconds"] / ref["gradient"]
                if name == "gradient":
                    explained_gradient_s = rec["seconds"]
                if explained_gradient_s:  # the same per-call path (jit cache, chunking, keys) on both sides
                    rec["explain_gradient_ratio"] = rec["seconds"] / explained_gradient_s
                c = x.shape[0] / rec["cpu_images_per_s"] if rec.get("cpu_images_per_s") else 0.0
                rec["cpu_gradient_ratio"] = c / ref["gradient_cpu"] if ref["gradient_cpu"] > 0 and c > 0 else None
            except Exception as e:  # noqa: BLE001 - one failing entry must not stop the benchmark
                rec = {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            rec.update(kind="family", model=mname, ref_gradient_s=ref["gradient"],
                       target_ratio=float(fcfg.get("target_ratio", 2.0)))
            log(f"family    {mname + ':' + name:32s} " + (f"{rec['gradient_ratio']:6.2f} x gradient"
                                                            if rec.get("gradient_ratio") else rec.get("error", "")))
            out.append(rec)
    return out


def protocol_bound(name: str, choices: dict[str, Any], entry_cfg: dict[str, Any],
                   method_evals: float) -> tuple[str, float] | None:
    """(kind, evaluations per image) of a protocol's lower bound, or None (no model evaluation)."""
    from attrax.protocols import PROTOCOLS

    if "bound" in entry_cfg:
        b = entry_cfg["bound"]
        return b["kind"], float(b["evals"])
    entry = PROTOCOLS.get(name)
    hp = {**entry.hparams(), **choices}
    if entry.meta.get("needs_masks") or entry.meta.get("category") == "complexity":
        return None
    if entry.meta.get("needs_method"):
        k = hp.get("n_samples") or hp.get("steps") or 1
        if isinstance(hp.get("max_shift"), int):  # one re-explanation per shift -max..+max
            k = 2 * hp["max_shift"] + 1
        return "gradient", float(k) * method_evals
    curves = 1 + int(hp.get("random_runs") or 0)  # random-order reference curves are computed too
    for key in ("steps", "n_runs", "n_samples"):
        if isinstance(hp.get(key), int):
            return "forward", float((hp[key] + 1) * curves)
    return "forward", 1.0


def bench_protocol(name: str, model, params, x, target, relevance, ref: dict[str, float], cfg: dict[str, Any],
                   masks) -> dict:
    import attrax
    from attrax.protocols import PROTOCOLS

    entry = PROTOCOLS.get(name)
    ecfg = dict(cfg["protocols"].get(name) or {})
    choices = dict(ecfg.get("choices") or {})
    rec: dict[str, Any] = {"kind": "protocol", "name": name, "hparams": choices, "bar": None}
    if "relevance" not in inspect.signature(entry.fn).parameters:
        rec["note"] = "retraining protocol (no relevance argument): see the training figures"
        return rec
    if entry.meta.get("needs_method"):
        choices.setdefault("method", cfg["relevance_method"])
    if entry.meta.get("needs_masks"):
        choices.setdefault("masks", masks)
    method_evals = method_bound(cfg["relevance_method"], {}, {})[1]
    bound = protocol_bound(name, {k: v for k, v in choices.items() if k != "masks"}, ecfg, method_evals)

    def call():
        s = attrax.evaluate(name, model, params, x, target, relevance, key=0, **choices)
        return jax.tree.map(to_device, s.values)

    t = time_calls(call, repeats=cfg["repeats"], warmup=cfg["warmup"], max_seconds=cfg["max_seconds"])
    rec["hparams"] = {k: v for k, v in choices.items() if k != "masks"}
    rec.update(images_per_s=x.shape[0] / t["median_s"], compile_s=t["compile_s"], seconds=t["median_s"],
               repeats=t["repeats"], peak_mb=None)
    if bound is not None:
        kind, evals = bound
        rec.update(bound_kind=kind, bound_evals=evals, bound_s=evals * ref[kind],
                   bound_ratio=t["median_s"] / (evals * ref[kind]))
    _add_cpu_figures(rec, t, x.shape[0], evals * ref[f"{kind}_cpu"] if bound is not None else None)
    return rec


# ---------------------------------------------------------------------------------------------
# The performance work: each step's figure


def _select_and_scatter_pooling():
    """An interceptor that runs every MaxPool module through `flax.linen.max_pool` (XLA's
    reduce-window forward, select-and-scatter backward): the state before `attrax.models.max_pool`."""
    import flax.linen as nn

    from attrax.models import MaxPool

    def interceptor(next_fun, args, kwargs, ctx):
        if isinstance(ctx.module, MaxPool) and ctx.method_name == "__call__":
            w = (ctx.module.window, ctx.module.window)
            return nn.max_pool(args[0], w, strides=w, padding=ctx.module.padding)
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def bench_steps(model, params, x, target, cfg: dict[str, Any]) -> list[dict]:
    """Figures of the optimizations, measured in this run (before / after each step)."""
    import attrax
    from attrax.methods import input_gradient

    recs = []
    kw = {"repeats": max(cfg["repeats"], 5), "warmup": 1, "max_seconds": cfg["max_seconds"]}
    n = x.shape[0]

    def grad_fn(p, xx, tt):
        return input_gradient(lambda z: model(p, z), xx, tt)[1]

    def ig_fn(p, xx, tt):
        return attrax.methods.get("integrated_gradients").fn(model, p, xx, tt, key=None, steps=50)

    def slow_pool(f):
        def g(*a):
            with _select_and_scatter_pooling():
                return f(*a)
        return g

    for label, fn in (("gradient", grad_fn), ("integrated_gradients(steps=50)", ig_fn)):
        for variant, f in (("max pool: XLA select-and-scatter backward", slow_pool(fn)),
                           ("max pool: reshape + elementwise first-winner backward", fn)):
            jf = jax.jit(f)
            t = time_calls(lambda jf=jf: jf(params, x, target), **kw)
            recs.append({"kind": "step", "name": label, "hparams": {"variant": variant},
                         "images_per_s": n / t["median_s"], "compile_s": t["compile_s"],
                         "cpu_images_per_s": n / cpu_equivalent_s(t["cpu_s"])})
    for evals in (128, 512, 2048, 4096):
        def call(evals=evals):
            return attrax.explain("integrated_gradients", model, params, x, target, steps=50, evals_per_chunk=evals)

        t = time_calls(call, **kw)
        recs.append({"kind": "step", "name": "integrated_gradients(steps=50)",
                     "hparams": {"variant": f"evals_per_chunk={evals}"}, "images_per_s": n / t["median_s"],
                     "compile_s": t["compile_s"], "cpu_images_per_s": n / cpu_equivalent_s(t["cpu_s"])})
    return recs


def probe(batch: int = 100) -> dict[str, float]:
    """Images/s of the batched forward, gradient and IG(50) of a random-init cnn_a (for flag runs)."""
    import attrax

    model = attrax.models.create("cnn_a")
    x = jax.random.uniform(jax.random.key(0), (batch, 28, 28, 1))
    t = jnp.zeros((batch,), jnp.int32)
    params = attrax.models.init(model, jax.random.key(1), x[:1])
    ref = reference_times(model, params, x, t, repeats=7, max_seconds=10)
    ig = time_calls(lambda: attrax.explain("integrated_gradients", model, params, x, t, steps=50),
                    repeats=3, warmup=1, max_seconds=10)
    step = _train_step_fn(model)
    xb, tb = x[:64], t[:64]
    ts = time_calls(lambda: step(params, xb, tb), repeats=7, warmup=1, max_seconds=10)
    return {"forward": [batch / ref["forward"], batch / ref["forward_cpu"]],
            "gradient": [batch / ref["gradient"], batch / ref["gradient_cpu"]],
            "integrated_gradients(steps=50)": [batch / ig["median_s"], batch / cpu_equivalent_s(ig["cpu_s"])],
            "train_step(batch=64)": [64 / ts["median_s"], 64 / cpu_equivalent_s(ts["cpu_s"])]}


def _probe_in_subprocess(**popen_kw: Any) -> tuple[dict | None, str]:
    """`probe()` in a fresh process (start-up settings: XLA_FLAGS, CPU affinity): (figures, "") or
    (None, the last line of its stderr)."""
    out = subprocess.run([sys.executable, "-m", "attrax.perf", "--probe"], capture_output=True, text=True,
                         timeout=600, **popen_kw)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1]), ""
    except (IndexError, json.JSONDecodeError):
        return None, (out.stderr.strip().splitlines() or ["failed"])[-1][:200]


def _train_step_fn(model):
    """The jitted loss gradient w.r.t. the parameters (the cost of one training step)."""
    import optax

    def loss(p, xb, tb):
        return optax.softmax_cross_entropy_with_integer_labels(model(p, xb), tb).mean()

    return jax.jit(jax.grad(loss))


def bench_cores() -> list[dict]:
    """The probe confined to one core vs all cores, each in a fresh process: how much of a second
    core one model's computation uses (why parallel retraining pays on CPU)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    recs = []
    for label, mask in (("1 core", cores[:1]), (f"{len(cores)} cores", cores)):
        if not mask or (label != "1 core" and len(cores) < 2):
            continue
        figs, err = _probe_in_subprocess(preexec_fn=lambda m=mask: os.sched_setaffinity(0, m))
        if figs is None:
            recs.append({"kind": "train", "name": "cores", "hparams": {"variant": label}, "note": err})
            continue
        for what in ("gradient", "train_step(batch=64)"):
            recs.append({"kind": "train", "name": what, "hparams": {"variant": f"process on {label}"},
                         "images_per_s": figs[what][0], "seconds": 64 / figs[what][0] if "train" in what else None})
    return recs


def bench_vmapped_conv(models: int = 18) -> list[dict]:
    """cnn_a's convolutions: forward, input gradient and kernel gradient per model, alone vs vmapped
    over `models` stacked kernels (XLA lowers a batched kernel to a grouped convolution)."""
    from jax import lax

    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn)

    def parts(f):
        return {"forward": jax.jit(f),
                "input gradient": jax.jit(lambda x, k, g: jax.vjp(f, x, k)[1](g)[0]),
                "kernel gradient": jax.jit(lambda x, k, g: jax.vjp(f, x, k)[1](g)[1])}

    rng = np.random.default_rng(0)
    recs = []
    for h, ci, co in ((28, 1, 32), (14, 32, 64)):
        x = to_device(rng.random((models, 64, h, h, ci), np.float32))
        k = to_device(rng.random((models, 3, 3, ci, co), np.float32))
        g = jnp.ones((models, 64, h, h, co), jnp.float32)
        alone, stacked = parts(conv), {n: jax.vmap(f) for n, f in parts(conv).items()}
        for what in alone:
            a = (x[0], k[0]) if what == "forward" else (x[0], k[0], g[0])
            b = (x, k) if what == "forward" else (x, k, g)
            t1 = time_calls(lambda f=alone[what], a=a: f(*a), repeats=5, warmup=1, max_seconds=5)["median_s"]
            tm = time_calls(lambda f=jax.jit(stacked[what]), b=b: f(*b), repeats=3, warmup=1,
                            max_seconds=10)["median_s"] / models
            for variant, t in (("alone", t1), (f"vmap of {models}, per model", tm)):
                recs.append({"kind": "train", "name": f"conv {h}x{h}x{ci}->{co} {what}",
                             "hparams": {"variant": variant}, "seconds": t, "images_per_s": 64 / t})
    return recs


def bench_flags(flag_sets: list[str]) -> list[dict]:
    """The probe under each XLA_FLAGS value, each in a fresh process (flags are read at start-up)."""
    recs = []
    for flags in flag_sets:
        figs, err = _probe_in_subprocess(env=dict(os.environ, XLA_FLAGS=flags))
        if figs is None:
            recs.append({"kind": "step", "name": "xla_flags", "hparams": {"variant": flags or "(none)"}, "note": err})
            continue
        for what, (wall, cpu) in figs.items():
            recs.append({"kind": "step", "name": what, "hparams": {"variant": f"XLA_FLAGS={flags or '(none)'}"},
                         "images_per_s": wall, "cpu_images_per_s": cpu})
    return recs


# ---------------------------------------------------------------------------------------------
# Training strategies


def _fixed_batch_steps(tr, model, ds, split: bool):
    """(batch, run): `run(steps)` trains a fresh copy of one init for `steps` calls of fit's
    donated training step (`split`: fit's sub-batch split, else one un-split step) on one fixed
    batch, no data handling; returns the final state."""
    batch = min(tr.TrainConfig().batch_size, len(ds.x))
    variables = tr.init(model, jax.random.key(0), to_device(ds.x[:1]))
    tx = tr._optimizer(tr.TrainConfig())
    parts = tr.split_parts(variables, batch) if split else 1
    # fit's own step: its sub-batch halves from two threads where fit uses them (`_ThreadedStep`)
    threaded = tr._threaded(model, tr.TrainConfig(), parts) if split and not tr.uses_lapack(
        model, variables, ds.x[:1]) else None
    step = jax.jit(tr._make_step(model, tx, parts), donate_argnums=0)
    xb, yb = to_device(ds.x[:batch]), to_device(ds.y[:batch])
    idx = jnp.arange(batch, dtype=jnp.int32)[None]

    def run(steps: int):
        fresh = jax.tree.map(jax.numpy.copy, variables)  # the step donates its state
        other = {k: v for k, v in fresh.items() if k != "params"}
        state = (fresh["params"], other, tx.init(fresh["params"]))
        if threaded is not None:
            carry = (state, jnp.zeros((), jnp.float32))
            for _ in range(steps):
                carry = threaded.fit_call(carry, (xb, yb), idx, 0)
            return carry[0]
        for _ in range(steps):
            state = step(state, xb, yb)[0]
        return state

    return batch, run


def _fit_step_overhead(tr, model, ds, epochs: int, fit_s: float) -> dict:
    """`fit`'s steps alone: fit's training step (the same split, donated) called on one fixed batch
    as many times as one `fit` takes steps, against `fit`'s time (python loop) measured above."""
    batch, run = _fixed_batch_steps(tr, model, ds, split=True)
    steps = len(ds.x) // batch * epochs
    t = time_calls(lambda: run(steps), repeats=2, warmup=0, max_seconds=60)
    return {"kind": "train", "name": "fit steps alone", "images_per_s": steps * batch / t["median_s"],
            "hparams": {"batch": batch, "steps": steps}, "seconds": t["median_s"],
            "note": f"fit (python loop) / steps alone = {fit_s / t['median_s']:.2f}; per-step overhead "
                    f"{(fit_s - t['median_s']) / steps * 1e3:.2f} ms"}


def _parallel_step_bound(tr, model, ds, epochs: int, workers: int | None = None, min_steps: int = 100) -> dict | None:
    """The bound of parallel retraining (`train_many(mode="parallel")`): one un-split training
    step per thread, a model each, `workers` threads (default: `train.cpu_workers()`, as parallel
    mode) at once, on one fixed batch, no data handling. Measured 2026-12-02 on the 2-core CPU
    with a plain flax / optax step of cnn_a (batch 64): 1,470 images/s from one thread, 2,452 from
    two threads (one model each), against 2,250 for train_many parallel (4 models); attrax's own
    step (this function, 100 steps) 1,805 from one thread and 2,422 from two, the plain one
    1,808 / 2,528 in the same process: the grid's speed is bound by the step itself, not the
    per-step overhead."""
    from attrax.harness import in_threads

    workers = tr.cpu_workers() if workers is None else workers
    if workers < 2:
        return None
    batch, run = _fixed_batch_steps(tr, model, ds, split=False)
    steps = max(len(ds.x) // batch * epochs, min_steps)  # (a short run times the threads' start-up)
    t = time_calls(lambda: in_threads([lambda: run(steps)] * workers, workers), repeats=2, warmup=1,
                   max_seconds=60)
    return {"kind": "train", "name": "parallel steps alone", "images_per_s": workers * steps * batch / t["median_s"],
            "hparams": {"batch": batch, "steps": steps, "threads": workers}, "seconds": t["median_s"],
            "note": "one un-split step per thread, a model each: the bound of train_many(mode='parallel')"}


def training_flops_per_image(model, sample_x: Any, batch: int = 64) -> float:
    """XLA's count of floating-point operations of one training gradient (cross-entropy loss,
    w.r.t. the parameters) per image, from the compiled program's cost analysis. Counted on the
    convolution form XLA knows (`ATTRAX_CONV_VJP=xla` while tracing): attrax.fastconv's kernel
    gradient scans chunks of the batch, and XLA's cost analysis counts a loop's body once."""
    from attrax.models import init

    variables = init(model, jax.random.key(0), to_device(np.asarray(sample_x)[:1]))
    x = jnp.zeros((batch,) + tuple(np.shape(sample_x)[1:]), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    old = os.environ.get("ATTRAX_CONV_VJP")
    os.environ["ATTRAX_CONV_VJP"] = "xla"
    try:
        ca = _train_step_fn(model).lower(variables, x, y).compile().cost_analysis()
    finally:
        if old is None:
            os.environ.pop("ATTRAX_CONV_VJP", None)
        else:
            os.environ["ATTRAX_CONV_VJP"] = old
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    return float(ca["flops"]) / batch


MATMUL_SHAPES = ((4096, 512, 512), (12544, 288, 64), (1024, 1024, 1024))


def matmul_probe(start_at: float, core: int | None = None, seconds: float = 2.0,
                 shapes=MATMUL_SHAPES) -> dict[str, Any]:
    """In this process (pinned to `core` first, before JAX starts its CPU client and threads): the
    fastest float32 (m, k) @ (k, n) product rate (FLOP/s) over `shapes`, each timed for `seconds`
    from the wall-clock time `start_at` on (so that the probes of all cores run at once), after a
    warm-up."""
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    rng = np.random.default_rng(0)
    f = jax.jit(lambda u, v: u @ v)
    args = [(to_device(rng.random((m, k), np.float32)), to_device(rng.random((k, n), np.float32)))
            for m, k, n in shapes]
    for a in args:
        jax.block_until_ready(f(*a))
    time.sleep(max(0.0, start_at - time.time()))
    best, label = 0.0, ""
    for (m, k, n), a in zip(shapes, args, strict=True):
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            jax.block_until_ready(f(*a))
            calls += 1
        rate = calls * 2 * m * k * n / (time.perf_counter() - t0)
        if rate > best:
            best, label = rate, f"({m}, {k}) @ ({k}, {n})"
    return {"flops": best, "shape": label}


def matmul_rate(workers: int | None = None) -> tuple[float, str]:
    """(FLOP/s, shape) of this machine's fastest float32 matrix product on all its cores: one
    fresh process pinned to each core (CPU; one process on GPU/TPU), all timed at once
    (`matmul_probe`), their rates summed: what an ideal step - every FLOP at matrix-product speed
    on every core - would reach. Measured on the 2-core AMD EPYC of 2026-12-04: 33.5-34.8
    GFLOP/s per core alone, ~67 for two pinned processes at once (NumPy's OpenBLAS the same);
    threads of one process reached only 33-63 (XLA:CPU's own thread pool contends)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if jax.default_backend() != "cpu" or not cores:
        cores = [None]
    cores = cores[: workers or len(cores)]
    start = time.time() + 15.0  # after every process's imports and warm-up
    procs = [subprocess.Popen([sys.executable, "-m", "attrax.perf", "--matmul-probe", str(start)]
                              + ([] if c is None else ["--matmul-core", str(c)]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cores]
    total, shapes = 0.0, set()
    for p in procs:
        out, err = p.communicate(timeout=600)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            last = ((err or "").strip().splitlines() or ["no output"])[-1][:160]
            raise AttraxError(f"matmul probe failed: {last}") from None
        total += float(r["flops"])
        shapes.add(r["shape"])
    return total, ", ".join(sorted(shapes)) + f" on {len(cores)} pinned process(es)"


def arithmetic_bound(model, sample_x: Any, batch: int = 64, workers: int | None = None) -> dict:
    """The training bound of this machine: its fastest matrix-product rate on all cores divided
    by the training gradient's FLOPs per image, i.e. images/s if every operation of the step ran
    at matrix-product speed. A training loop's images/s over it is its arithmetic efficiency,
    and a goal ratio against another loop is reachable only where goal x that loop's efficiency
    stays below 1."""
    import importlib

    workers = importlib.import_module("attrax.train").cpu_workers() if workers is None else workers
    if jax.default_backend() != "cpu":
        workers = 1
    fpi = training_flops_per_image(model, sample_x, batch)
    rate, shape = matmul_rate(workers)
    return {"kind": "train", "name": "arithmetic bound", "images_per_s": rate / fpi,
            "hparams": {"batch": batch, "threads": workers}, "flops_per_image": fpi, "matmul_flops": rate,
            "note": f"{fpi / 1e6:.2f} MFLOP per image (XLA's count of the loss gradient) at "
                    f"{rate / 1e9:.1f} GFLOP/s (float32 {shape})"}


def _efficiency_note(rec: dict[str, Any], bound: dict[str, Any]) -> str:
    """A training row's place under the arithmetic bound: the anchor's and attrax's share of it
    and the share the row's goal asks for."""
    b = bound["images_per_s"]
    goal = rec.get("goal") or 1.5
    txt = f"arithmetic bound {b:,.0f} img/s: PyTorch {rec['bar'] / b:.0%}"
    if rec.get("images_per_s"):
        txt += f", attrax {rec['images_per_s'] / b:.0%}"
    return txt + f"; {goal:g}x needs {goal * rec['bar'] / b:.0%}"


def bench_training(cfg: dict[str, Any]) -> list[dict]:
    """lax.scan vs Python-loop epochs, and vmapped vs sequential training of several seeds."""
    import importlib

    import attrax

    tr = importlib.import_module("attrax.train")  # the module (`attrax.train` is the train function)
    tcfg = cfg.get("training") or {}
    ds = attrax.datasets.load(cfg["dataset"], split="train").take(int(tcfg.get("images", 2000)))
    model = attrax.models.create(cfg["model"])
    epochs = int(tcfg.get("epochs", 1))
    recs = []
    for loop in ("python", "scan"):
        c = attrax.TrainConfig(epochs=epochs, loop=loop)
        t = time_calls(lambda c=c: tr.fit(model, ds.x, ds.y, seed=0, cfg=c, progress=False)[0],
                       repeats=2, warmup=0, max_seconds=60)
        recs.append({"kind": "train", "name": "fit", "hparams": {"loop": loop, "epochs": epochs},
                     "images_per_s": tr.images_trained(len(ds.x), c.batch_size, epochs) / t["median_s"],
                     "compile_s": t["compile_s"], "seconds": t["median_s"]})
    recs.append(_fit_step_overhead(tr, model, ds, epochs, recs[0]["seconds"]))
    bound = _parallel_step_bound(tr, model, ds, epochs)
    if bound:
        recs.append(bound)
    recs.append(arithmetic_bound(model, ds.x[:1]))
    configs = [(cfg["model"], {}, int(tcfg.get("seeds", 4)), epochs, 64)]
    small = tcfg.get("dispatch_bound")  # a step so small that fixed per-call costs dominate (GPU-shaped)
    if small:
        configs.append((small.get("model", "mlp"), dict(small.get("model_kwargs") or {}), int(small.get("seeds", 12)),
                        int(small.get("epochs", 4)), int(small.get("batch_size", 16))))
    recs += bench_vmapped_conv()
    recs += bench_cores()
    for mname, mkw, n_seeds, ep, bs in configs:
        m = attrax.models.create(mname, **{k: tuple(v) if isinstance(v, list) else v for k, v in mkw.items()})
        seeds = list(range(n_seeds))
        for mode in ("sequential", "vmap", "parallel"):
            c = attrax.TrainConfig(epochs=ep, batch_size=bs, loop="python")
            def call(c=c, mode=mode, m=m, seeds=seeds):
                return tr.train_many(m, ds.x, ds.y, seeds, cfg=c, mode=mode)[0]

            t = time_calls(call, repeats=2, warmup=0, max_seconds=60)
            label = mname + ("(" + ",".join(f"{k}={v}" for k, v in mkw.items()) + ")" if mkw else "")
            recs.append({"kind": "train", "name": "train_many",
                         "hparams": {"model": label, "mode": mode, "seeds": n_seeds, "epochs": ep, "batch": bs,
                                     "loop": "python"},
                         "images_per_s": n_seeds * tr.images_trained(len(ds.x), bs, ep) / t["median_s"],
                         "compile_s": t["compile_s"], "seconds": t["median_s"]})
    return recs


# ---------------------------------------------------------------------------------------------
# The ROAR + KAR grid: batched vs one-by-one retraining, measured in the same run


def _drop_cached_retrains() -> int:
    """Remove the retrained models (not the base model, maps or rankings) from the cache."""
    from attrax.train import cache_dir

    n = 0
    for meta in cache_dir().glob("*.json"):
        try:
            purpose = json.loads(meta.read_text()).get("purpose")
        except (OSError, json.JSONDecodeError):
            continue
        if purpose == "roar/kar retrain":
            meta.with_suffix(".msgpack").unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            n += 1
    return n


def bench_roar_grid(cfg: dict[str, Any], log=lambda *a: None) -> list[dict]:
    """The full ROAR + KAR grid (methods x fractions x seeds retrains) on the benchmark's data set,
    once with the batched retraining mode and once one model at a time, in a fresh cache.

    Pass 1 (`batched` mode) starts from an empty cache: its wall time is the whole grid (base model,
    maps and rankings of every train and test image, retrains, evaluation). Pass 2 re-runs the same
    retrains with mode "sequential" (maps and rankings now cached, retrained models removed), so
    the two training times compare the same models. `vmap_methods` are also retrained with "vmap".
    """
    import importlib
    import tempfile

    import attrax
    from attrax.protocols import roar

    g = cfg.get("roar_grid") or {}
    methods = dict(g.get("methods") or {"gradient": {}, "random": {}})
    fractions = [float(f) for f in g.get("fractions", roar.FRACTIONS)]
    seeds = [int(s) for s in g.get("seeds", (0, 1, 2))]
    model_name = g.get("model", cfg["model"])
    tcfg = attrax.TrainConfig(epochs=int(g.get("epochs", 2)), batch_size=int(g.get("batch_size", 64)))
    train_set = attrax.datasets.load(cfg["dataset"], split="train")
    if g.get("train_per_class"):
        train_set = train_set.take(per_class=int(g["train_per_class"]))
    test_set = attrax.datasets.load(cfg["dataset"], split="test")
    if g.get("test_images"):
        test_set = test_set.take(int(g["test_images"]))
    batched = importlib.import_module("attrax.train").pick_many_mode(str(g.get("batched", "auto")))
    model = attrax.models.create(model_name, num_classes=train_set.num_classes)

    def grid(mode: str, names) -> dict[str, Any]:
        t0 = time.perf_counter()
        tot = {"maps_s": 0.0, "rank_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "n_trained": 0}
        per_method, accs = {}, {}
        for name in names:
            df = roar.run(name, model, train_set, test_set, fractions=fractions, seeds=seeds,
                          method_hparams=methods[name], train_config=tcfg, mode=mode)
            tm = df.attrs["timings"]
            for k in tot:
                tot[k] += tm[k]
            per_method[name] = tm["train_s"]
            accs[name] = df.set_index(["protocol", "x", "seed"]).value
            log(f"roar grid {mode:10s} {name:24s} retrained {tm['n_trained']:3d} models in {tm['train_s']:.1f}s")
        return dict(tot, wall_s=time.perf_counter() - t0, per_method=per_method, accs=accs)

    old = os.environ.get("ATTRAX_CACHE")
    recs = []
    with tempfile.TemporaryDirectory(prefix="attrax-roar-bench-") as tmp:
        os.environ["ATTRAX_CACHE"] = tmp
        try:
            first = grid(batched, methods)
            _drop_cached_retrains()
            seq = grid("sequential", methods)
            vm_names = [m for m in g.get("vmap_methods") or [] if m in methods]
            vm = None
            if vm_names and batched != "vmap":
                _drop_cached_retrains()
                vm = grid("vmap", vm_names)
        finally:
            if old is None:
                os.environ.pop("ATTRAX_CACHE", None)
            else:
                os.environ["ATTRAX_CACHE"] = old
    n = first["n_trained"]
    same = max(float(np.abs(first["accs"][k] - seq["accs"][k]).max()) for k in methods)
    per_model = importlib.import_module("attrax.train").images_trained(len(train_set), tcfg.batch_size, tcfg.epochs)
    hp = {"methods": len(methods), "fractions": len(fractions), "seeds": len(seeds),
          "protocols": "roar+kar", "train_images": len(train_set), "test_images": len(test_set),
          "epochs": tcfg.epochs, "model": model_name, "retrains": n, "images_per_retrain": per_model}
    imgs = n * per_model

    def record(mode: str, res: dict, ratio: float, **extra) -> dict:
        return {"kind": "roar", "name": "roar_kar_grid", "hparams": dict(hp, mode=mode), "seconds": res["wall_s"],
                "train_s": res["train_s"], "maps_s": res["maps_s"], "rank_s": res["rank_s"], "eval_s": res["eval_s"],
                "images_per_s": imgs / res["train_s"], "train_ratio": ratio, **extra}

    recs.append(record(batched, first, first["train_s"] / seq["train_s"], max_accuracy_diff=same))
    recs.append(record("sequential", seq, 1.0))
    if vm is not None:
        seq_s = sum(seq["per_method"][m] for m in vm_names)
        recs.append({"kind": "roar", "name": "roar_kar_grid", "hparams": dict(
            hp, mode="vmap", methods=len(vm_names), retrains=vm["n_trained"], subset=",".join(vm_names)),
            "seconds": vm["wall_s"], "train_s": vm["train_s"], "eval_s": vm["eval_s"],
            "images_per_s": vm["n_trained"] * per_model / vm["train_s"],
            "train_ratio": vm["train_s"] / seq_s})
    return recs


# ---------------------------------------------------------------------------------------------
# Memory-bounded chunking


def budget_check(model, params, x, cfg: dict[str, Any]) -> dict:
    """images x IG steps within a memory budget: chunk size from the measured per-image memory."""
    import attrax
    from attrax.harness import chunk_size_for, compiled_memory_bytes, evals_per_chunk_for_memory
    from attrax.methods import get, per_example_keys

    b = cfg.get("budget") or {}
    images, steps, mb = int(b.get("images", 10000)), int(b.get("steps", 256)), float(b.get("memory_mb", 1024))
    evals = evals_per_chunk_for_memory("integrated_gradients", model, params, x, memory_mb=mb, steps=steps)
    chunk = chunk_size_for(steps, images, evals)
    entry = get("integrated_gradients")
    fn = jax.jit(lambda p, xx, tt, kk: entry.fn(model, p, xx, tt, key=kk, steps=steps))
    xx = jnp.zeros((chunk, *x.shape[1:]), x.dtype)
    compiled = fn.lower(params, xx, jnp.zeros((chunk,), jnp.int32), per_example_keys(0, chunk)).compile()
    used = compiled_memory_bytes(compiled) / 2**20
    rec = {"kind": "budget", "name": "integrated_gradients",
           "hparams": {"steps": steps, "images": images, "memory_mb": mb, "evals_per_chunk": evals,
                       "chunk": chunk},
           "peak_mb": used, "within_budget": used <= mb}
    run_chunks = int(b.get("run_chunks", 1))
    n_run = images if run_chunks < 0 else min(images, run_chunks * chunk)
    reps = -(-n_run // x.shape[0])
    xr = jnp.concatenate([x] * reps)[:n_run]
    tr = jnp.zeros((n_run,), jnp.int32)
    rss0 = rss_peak_mb()
    t0 = time.perf_counter()
    jax.block_until_ready(attrax.explain("integrated_gradients", model, params, xr, tr, steps=steps,
                                         evals_per_chunk=evals))
    secs = time.perf_counter() - t0
    rec.update(images_run=n_run, seconds=secs, images_per_s=n_run / secs,
               rss_growth_mb=rss_peak_mb() - rss0, projected_s=images * secs / n_run)
    return rec


# ---------------------------------------------------------------------------------------------
# The PyTorch stack side by side (--against PATH/torch_cpu.json)

ANCHOR_SECTIONS = ("attribution", "quantus")


def load_anchor(path: str | Path) -> dict[str, Any]:
    """The JSON of ../shared/anchors/torch_anchor.py, checked (one-line AttraxError otherwise)."""
    p = Path(path)
    if not p.is_file():
        raise AttraxError(f"--against {path}: no such file (give the anchor's <out-dir>/results/torch_cpu.json)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AttraxError(f"--against {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AttraxError(f"--against {path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not any(isinstance(data.get(k), dict)
                                             for k in (*ANCHOR_SECTIONS, "roar_retrain")):
        raise AttraxError(f"--against {path}: not a torch_anchor.py result (no 'attribution', 'quantus' or "
                          "'roar_retrain' section)")
    return data


def _foreign_load(entry: dict) -> float | None:
    loads = [m.get("foreign_cpu_cores_avg") for m in entry.get("cpu_during_passes") or [] if isinstance(m, dict)]
    if isinstance(entry.get("cpu_during"), dict):
        loads.append(entry["cpu_during"].get("foreign_cpu_cores_avg"))
    loads = [float(v) for v in loads if isinstance(v, int | float)]
    return max(loads) if loads else None


def anchor_workloads(anchor: dict[str, Any]) -> list[dict[str, Any]]:
    """Every workload of the anchor JSON: section, name, images/s (None if it failed), settings,
    status and the CPU load of other processes while it ran. The training figure is the
    anchor's second (warm) training run, `roar_retrain`, in training images/s."""
    out = []
    for sec in ANCHOR_SECTIONS:
        for name, e in (anchor.get(sec) or {}).items():
            if not isinstance(e, dict):
                continue
            ips = e.get("images_per_s")
            ok = e.get("status", "ok") == "ok" and isinstance(ips, int | float) and ips > 0
            out.append({"section": sec, "name": name, "images_per_s": float(ips) if ok else None,
                        "settings": str(e.get("settings", "")), "status": e.get("status", "ok" if ok else "?"),
                        "error": e.get("error"), "foreign": _foreign_load(e), "n_images": e.get("n_images"),
                        "batch_size": e.get("batch_size")})
    rr = anchor.get("roar_retrain")
    if isinstance(rr, dict):
        train = ((anchor.get("model") or {}).get("train") or {})
        epochs, bs = int(train.get("epochs", 3)), int(train.get("batch_size", 64))
        n_train, wall = rr.get("n_train"), rr.get("wall_s")
        ok = isinstance(n_train, int) and isinstance(wall, int | float) and wall > 0
        out.append({"section": "training", "name": "roar_retrain",
                    "images_per_s": n_train * epochs / wall if ok else None,
                    "settings": f"one model, {epochs} epochs x {n_train} images, batch {bs}, Adam 1e-3",
                    "status": "ok" if ok else "failed", "error": None if ok else "no n_train / wall_s",
                    "foreign": _foreign_load(rr), "n_train": n_train, "epochs": epochs, "batch_size": bs})
    return out


def counterparts(cfg: dict[str, Any], section: str, name: str) -> list[dict[str, Any]]:
    """The attrax workloads the config's `against:` table names for one anchor workload."""
    spec = ((cfg.get("against") or {}).get(section) or {}).get(name)
    if spec is None:
        return []
    return [dict(s) for s in (spec if isinstance(spec, list) else [spec])]


def _hp_key(hp: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in (hp or {}).items() if k != "masks"}, sort_keys=True, default=str)


def _counterpart_label(c: dict[str, Any]) -> str:
    if "method" in c or "protocol" in c:
        name = c.get("method") or c.get("protocol")
        hp = c.get("hparams") or c.get("choices") or {}
        return name + (f" ({', '.join(f'{k}={v}' for k, v in hp.items())})" if hp else "")
    if c.get("train") == "parallel":
        return f"train_many, mode=parallel, {int(c.get('seeds', 4))} models (images/s of all)"
    if c.get("train") == "roar_grid":
        return "ROAR + KAR grid (roar_grid section), batched retraining"
    return f"train.fit ({c.get('train')})"


def bench_against_training(spec: dict[str, Any], work: dict[str, Any], cfg: dict[str, Any]) -> dict:
    """One model (`fit`) or several (`train_many`, parallel) trained with the anchor's settings."""
    import importlib

    import attrax

    tr = importlib.import_module("attrax.train")
    ds = attrax.datasets.load(cfg["dataset"], split="train")
    n_train = int(work.get("n_train") or len(ds.x))
    ds = ds.take(min(n_train, len(ds.x)))
    model = attrax.models.create(cfg.get("model", "cnn_a"))
    tcfg = attrax.TrainConfig(epochs=int(work["epochs"]), batch_size=int(work["batch_size"]), lr=1e-3)
    images = tr.images_trained(len(ds.x), tcfg.batch_size, tcfg.epochs)
    if spec["train"] == "parallel":
        seeds = list(range(int(spec.get("seeds", 4))))

        def call():
            return tr.train_many(model, ds.x, ds.y, seeds, cfg=tcfg, mode="parallel")[0]

        images *= len(seeds)
    else:
        def call():
            return tr.fit(model, ds.x, ds.y, seed=0, cfg=tcfg, progress=False)[0]

    t = time_calls(call, repeats=2, warmup=0, max_seconds=60)
    return {"kind": "train", "name": "against " + spec["train"],
            "hparams": {"images": len(ds.x), "epochs": tcfg.epochs, "batch": tcfg.batch_size,
                        **({"models": int(spec.get("seeds", 4))} if spec["train"] == "parallel" else {})},
            "images_per_s": images / t["median_s"], "seconds": t["median_s"], "compile_s": t["compile_s"],
            "cpu_images_per_s": images / cpu_equivalent_s(t["cpu_s"]) if t["cpu_s"] > 0 else None}


def against_records(anchor: dict[str, Any], source: str, cfg: dict[str, Any], records: list[dict],
                    run_entry: Callable[[str, str, dict], dict | None]) -> list[dict]:
    """One `against` record per (anchor workload, counterpart): the anchor's images/s, attrax's,
    and the ratio. Counterparts already measured with the same settings are reused; the others
    are run through `run_entry(kind, name, settings)` (None: not run in this benchmark)."""
    out = []
    for w in anchor_workloads(anchor):
        key = f"{w['section']}.{w['name']}"
        meta = anchor.get("meta") or {}
        base = {"kind": "against", "name": key, "anchor_settings": w["settings"], "anchor_foreign": w["foreign"],
                "bar": w["images_per_s"], "source": source, "anchor_quick": bool(meta.get("quick")),
                "anchor_date": meta.get("date_utc"), "anchor_versions": {
                    k: (meta.get("versions") or {}).get(k) for k in ("torch", "captum", "quantus", "zennit")}}
        specs = counterparts(cfg, w["section"], w["name"])
        if w["images_per_s"] is None:
            why = (w.get("error") or "")[:120]
            out.append({**base, "hparams": {}, "note": f"anchor entry {w['status']}" + (f": {why}" if why else "")})
            continue
        if not specs:
            out.append({**base, "hparams": {}, "note": "no attrax counterpart named in the config's `against:` table"})
            continue
        for spec in specs:
            label = _counterpart_label(spec)
            rec = {**base, "hparams": {"counterpart": label}, "counterpart": label}
            if spec.get("goal") is not None:
                rec["goal"] = float(spec["goal"])  # this counterpart's own goal ratio (else the run's target)
            if "none" in spec:
                out.append({**rec, "counterpart": "-", "note": f"no attrax counterpart: {spec['none']}"})
                continue
            if "method" in spec or "protocol" in spec:
                kind = "method" if "method" in spec else "protocol"
                name = spec.get(kind)
                settings = dict(spec.get("hparams") or spec.get("choices") or {})
                found = None
                for r in records:
                    if r.get("kind") == kind and r.get("name") == name and not r.get("error") and \
                            r.get("images_per_s") and _hp_key(r.get("hparams")) == _hp_key(
                                _effective(kind, name, settings, cfg)):
                        found = r
                        break
                if found is None:
                    found = run_entry(kind, name, settings)
                    if found is not None and found.get("kind"):  # a measured record (not an error or note)
                        records.append(found)
            else:
                found = run_entry("train", spec["train"], {"spec": spec, "work": w})
            if found is None or found.get("error") or not found.get("images_per_s"):
                why = (found or {}).get("error") or (found or {}).get("note") or "not run in this benchmark"
                out.append({**rec, "note": str(why)[:160]})
                continue
            if found.get("bar") is None and found.get("kind") in ("method", "protocol"):
                found["bar"] = w["images_per_s"]
            rec.update(images_per_s=found["images_per_s"], cpu_images_per_s=found.get("cpu_images_per_s"),
                       speedup=found["images_per_s"] / w["images_per_s"])
            if found.get("cpu_images_per_s"):
                rec["cpu_speedup"] = found["cpu_images_per_s"] / w["images_per_s"]
            if found.get("kind") == "roar" and found.get("seconds"):
                h = found["hparams"]
                per = h.get("images_per_retrain") or h["train_images"] * h["epochs"]
                rec.update(retrains=h["retrains"], train_images_total=h["retrains"] * per,
                           train_s=found["train_s"], grid_s=found["seconds"])
                rec["note"] = _grid_note(rec, w["images_per_s"])
            out.append(rec)
    return out


def _with_bound_notes(recs: list[dict], bound: dict[str, Any] | None) -> list[dict]:
    """The training rows of `recs` with the arithmetic bound (`arithmetic_bound`) beside them."""
    if not bound:
        return recs
    for r in recs:
        if r.get("name", "").startswith("training.") and r.get("bar"):
            r["arith_bound"] = bound["images_per_s"]
            r["note"] = "; ".join(t for t in (r.get("note"), _efficiency_note(r, bound)) if t)
    return recs


def _grid_note(rec: dict[str, Any], bar: float) -> str:
    """The ROAR + KAR grid's row: its retrains at the PyTorch loop's speed `bar` against attrax."""
    torch_s = rec["train_images_total"] / bar
    return (f"{rec['retrains']} retrains: PyTorch-equivalent {torch_s:.1f} s of training vs attrax "
            f"{rec['train_s']:.1f} s training / {rec['grid_s']:.1f} s whole grid "
            f"({torch_s / rec['grid_s']:.2f}x with maps, rankings and evaluation)")


def sandwich_records(records: list[dict], after: dict[str, Any], after_source: str) -> list[dict]:
    """The `against` records of a finished run, re-scored against the anchor run twice: once
    before attrax (the run's own `--against`) and once after it (`after`). The PyTorch figure of
    each workload becomes the geometric mean of the two runs (the machine's state halfway, if it
    drifts steadily), the ratio is taken against it, and the two single-run ratios and the anchor's
    drift (after / before) are kept beside it. A workload the second run lacks keeps its
    one-run figure, marked as such."""
    figures = {f"{w['section']}.{w['name']}": w for w in anchor_workloads(after)}
    meta = after.get("meta") or {}
    out = []
    for r in records:
        if r.get("kind") != "against":
            continue
        r = dict(r, after_source=after_source, after_quick=bool(meta.get("quick")), after_date=meta.get("date_utc"))
        w = figures.get(r["name"])
        before = r.get("bar")
        if not before or w is None or not w["images_per_s"]:
            if r.get("speedup") is not None:
                only = " (before-run figure only: the second anchor run has none)"
                r["note"] = ((r.get("note") or "") + only).strip()
            out.append(r)
            continue
        after_ips = w["images_per_s"]
        loads = [v for v in (r.get("anchor_foreign"), w["foreign"]) if v is not None]
        r.update(bar_before=before, bar_after=after_ips, anchor_drift=after_ips / before,
                 bar=float(np.sqrt(before * after_ips)), anchor_foreign=max(loads) if loads else None)
        if r.get("images_per_s"):
            r.update(speedup_before=r["images_per_s"] / before, speedup_after=r["images_per_s"] / after_ips,
                     speedup=r["images_per_s"] / r["bar"])
            if r.get("cpu_images_per_s"):
                r["cpu_speedup"] = r["cpu_images_per_s"] / r["bar"]
            if r.get("train_images_total"):
                r["note"] = _grid_note(r, r["bar"])
            elif r.get("arith_bound"):
                r["note"] = None  # the bound's note alone, rewritten below against the new bar
            if r.get("arith_bound"):
                _with_bound_notes([r], {"images_per_s": r["arith_bound"]})
        out.append(r)
    return out


def load_run_records(run_dir: str | Path) -> list[dict]:
    """The benchmark records of a finished `attrax-bench` run (its run.json), checked."""
    p = Path(run_dir) / "run.json"
    if not p.is_file():
        raise AttraxError(f"--from-run {run_dir}: no run.json there (give an attrax-bench --out folder)")
    try:
        recs = (json.loads(p.read_text()).get("bench") or {}).get("records")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise AttraxError(f"--from-run {run_dir}: run.json is damaged ({type(e).__name__})") from None
    if not isinstance(recs, list) or not any(isinstance(r, dict) and r.get("kind") == "against" for r in recs):
        raise AttraxError(f"--from-run {run_dir}: no side-by-side records (run attrax-bench with --against first)")
    return recs


def _effective(kind: str, name: str, settings: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The hparams a benchmark record of `name` carries when run with `settings`."""
    if kind == "protocol":
        from attrax.protocols import PROTOCOLS

        if PROTOCOLS.get(name).meta.get("needs_method"):
            return {"method": cfg["relevance_method"], **settings}
    return dict(settings)


def _rate(v: Any) -> str:
    """images/s with 3 significant digits below 100 (the anchor's slow entries: 0.0261)."""
    if isinstance(v, int | float) and np.isfinite(v) and 0 < abs(v) < 100:
        return f"{v:.3g}"
    return _fmt(v)


def against_markdown(records: list[dict], target: float) -> list[str]:
    rows = [r for r in records if r["kind"] == "against"]
    if not rows:
        return []
    out = ["## Against the PyTorch stack (measured side by side)", "",
           f"PyTorch figures: `{rows[0]['source']}` (../shared/anchors/torch_anchor.py: Captum, Quantus, Zennit, "
           "torch's training loop); attrax: this run, same model, batch and settings (conf/bench/default.yaml "
           "`against:`). ratio = attrax images/s / PyTorch images/s (CPU est.: attrax's process CPU time spread "
           f"over all cores, for a loaded machine); goal >= {target:g}x unless a row names its own. "
           "PyTorch foreign load: CPU cores other "
           "processes used while the anchor timed it (trust a figure only where it is ~0).", "",
           f"Anchor run {rows[0].get('anchor_date') or '?'}, "
           + ", ".join(f"{k} {v}" for k, v in (rows[0].get("anchor_versions") or {}).items() if v) + ".", ""]
    sandwich = any("after_source" in r for r in rows)
    if sandwich:
        out += [f"Sandwich: the anchor ran again after attrax (`{rows[0]['after_source']}`, "
                f"{rows[0].get('after_date') or '?'}). PyTorch images/s is the geometric mean of the two runs; "
                "`before / after` are the single runs, `drift` = after / before (the machine's own change while "
                "attrax ran: a ratio is only as sure as its drift is near 1), and the ratio is given against the "
                "mean and against each run.", ""]
    if rows[0].get("anchor_quick") or (sandwich and rows[0].get("after_quick")):
        out += ["**The anchor JSON is a --quick smoke run: its figures are not valid for claims.**", ""]
    extra_h, extra_a = ("PyTorch before / after | drift | ratio vs before / after | ", "---:|---:|---:|") if sandwich \
        else ("", "")
    out += ["| PyTorch workload | PyTorch settings | PyTorch images/s | foreign load | " + extra_h
            + "attrax counterpart | attrax images/s | ratio | CPU est. ratio | goal |",
            "|---|---|---:|---:|" + extra_a + "---|---:|---:|---:|---|"]

    def extra(r: dict, with_ratio: bool) -> str:
        if not sandwich:
            return ""
        if r.get("bar_after") is None:
            return "- | - | - | "
        ratios = (f"{r['speedup_before']:.2f} / {r['speedup_after']:.2f}" if with_ratio and r.get("speedup_before")
                  else "-")
        return f"{_rate(r['bar_before'])} / {_rate(r['bar_after'])} | {r['anchor_drift']:.2f} | {ratios} | "

    for r in rows:
        settings = r.get("anchor_settings", "").replace("|", "/")[:90]
        if r.get("speedup") is None:
            out.append(f"| {r['name']} | {settings} | {_rate(r.get('bar'))} | {_fmt(r.get('anchor_foreign'), 2)} | "
                       f"{extra(r, False)}{r.get('counterpart', '-')} | - | - | - | {r.get('note', '')} |")
            continue
        # the goal is the wall-clock ratio on an idle machine; the CPU estimate only says what a loaded run hides
        goal = r.get("goal") or target
        verdict = "ok" if r["speedup"] >= goal else ("BELOW (CPU est. >= goal)"
                                                     if (r.get("cpu_speedup") or 0) >= goal else "BELOW")
        if goal != target:
            verdict += f" (goal {goal:g}x)"
        note = f" {r['note']}" if r.get("note") else ""
        out.append(f"| {r['name']} | {settings} | {_rate(r['bar'])} | {_fmt(r.get('anchor_foreign'), 2)} | "
                   f"{extra(r, True)}{r['counterpart']} | {_rate(r['images_per_s'])} | {r['speedup']:.2f} | "
                   f"{_fmt(r.get('cpu_speedup'), 2)} | {verdict}{note} |")
    out.append("")
    return out


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def to_rows(records: list[dict], *, run_id: str, cfg: dict[str, Any]) -> pd.DataFrame:
    from attrax.results import conform, hparams_json

    rows = []
    for r in records:
        hp = {**(r.get("hparams") or {}), **({"bound": r["bound_kind"]} if r.get("bound_kind") else {})}
        for metric in ("images_per_s", "compile_s", "peak_mb", "bound_ratio", "bar_images_per_s", "speedup_vs_bar",
                       "cpu_images_per_s", "cpu_bound_ratio", "seconds", "train_s", "maps_s", "train_ratio",
                       "gradient_ratio", "cpu_gradient_ratio", "explain_gradient_ratio"):
            v = r.get("bar") if metric == "bar_images_per_s" else r.get(metric)
            if metric == "speedup_vs_bar" and r.get("bar") and r.get("images_per_s"):
                v = r["images_per_s"] / r["bar"]
            if v is None or not np.isfinite(float(v)):
                continue
            rows.append({"run_id": run_id, "experiment": f"bench/{r['kind']}", "dataset": cfg["dataset"],
                         "model": r.get("model", cfg["model"].split(",")[0]), "model_seed": 0, "method": r["name"],
                         "method_hparams": hparams_json(hp), "protocol": "bench", "metric": metric,
                         "x": np.nan, "value": float(v), "example": -1, "seed": 0})
    return conform(pd.DataFrame(rows))


def markdown(records: list[dict], cfg: dict[str, Any], env: dict[str, Any]) -> str:
    target = float(cfg.get("target", 1.5))
    ref = env["ref"]
    n = cfg["batch"]
    out = ["# attrax performance", "",
           f"`attrax-bench` on {env['cpus']} CPU cores ({env['backend']}), {cfg['dataset']}, model `{cfg['model']}`, "
           f"batch {cfg['batch']}; median of up to {cfg['repeats']} timed calls after warm-up. "
           f"Load average {env['load_before']:.1f} before / {env['load_after']:.1f} after. XLA_FLAGS: "
           f"`{env['xla_flags'] or '(none)'}`.", "",
           "- images/s: wall clock, steady state through `attrax.explain` / `attrax.evaluate` (median).",
           "- CPU est.: the same calls' process CPU time spread over all cores (`cpu_equivalent_s`): what an idle "
           "machine would give with perfect use of its cores. On a shared machine the wall figures mostly measure "
           "the other processes; the CPU figures barely depend on them. Both are kept.",
           "- compile s: first call minus a steady call. peak MB: XLA's compiled memory analysis of one chunk "
           "(arguments + outputs + temporaries).",
           "- bound ratio: time / time of `cost` raw batched gradients (gradient, backprop, relevance, CAM families) "
           "or forwards (perturbation, surrogate; protocols: K+1 forwards or K re-explanations) at the FASTEST rate "
           "this machine reached at any batch size of the sweep below, measured in this run: "
           f"forward {cfg['batch'] / ref['forward']:,.0f} images/s (batch {ref.get('forward_best_batch', n)}) "
           f"/ {cfg['batch'] / ref['forward_cpu']:,.0f} CPU est., gradient {cfg['batch'] / ref['gradient']:,.0f} "
           f"images/s (batch {ref.get('gradient_best_batch', n)}) / {cfg['batch'] / ref['gradient_cpu']:,.0f} "
           "CPU est.",
           f"- PyTorch: the anchor's figure (`--against`, ../shared/anchors/torch_anchor.py) for the entries with a "
           f"counterpart; target {target}x.", ""]
    if ref.get("sweep"):
        out += ["| batch | forward images/s | gradient images/s | forward CPU est. | gradient CPU est. |",
                "|---:|---:|---:|---:|---:|"]
        out += [f"| {r['batch']} | {r['batch'] / r['forward']:,.0f} | {r['batch'] / r['gradient']:,.0f} | "
                f"{r['batch'] / r['forward_cpu']:,.0f} | {r['batch'] / r['gradient_cpu']:,.0f} |" for r in ref["sweep"]]
        out.append("")
    out += against_markdown(records, target)

    def table(kind: str, title: str):
        rs = [r for r in records if r["kind"] == kind]
        if not rs:
            return
        out.extend([f"## {title}", "",
                    "| name | hyperparameters | images/s | CPU est. | PyTorch | speed-up wall / CPU est. | "
                    "compile s | peak MB | bound | bound ratio | CPU est. ratio |",
                    "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"])
        for r in rs:
            if r.get("error") or r.get("note"):
                out.append(f"| {r['name']} | | - | | | | | | | | {r.get('error') or r.get('note')} |")
                continue
            hp = ", ".join(f"{k}={v}" for k, v in (r.get("hparams") or {}).items())
            sp = sp_cpu = None
            speed = "-"
            if r.get("bar"):
                sp = r["images_per_s"] / r["bar"]
                sp_cpu = (r.get("cpu_images_per_s") or 0) / r["bar"]
                speed = f"{sp:.2f} / {sp_cpu:.2f}" + (" ok" if sp >= target else (" ok (CPU est.)" if sp_cpu >= target
                                                                                    else " BELOW"))
            bound = f"{_fmt(r.get('bound_evals'), 0)} x {r['bound_kind']}" if r.get("bound_kind") else "-"
            out.append(f"| {r['name']} | {hp} | {_fmt(r.get('images_per_s'))} | {_fmt(r.get('cpu_images_per_s'))} | "
                       f"{_fmt(r.get('bar'))} | {speed} | {_fmt(r.get('compile_s'), 2)} | {_fmt(r.get('peak_mb'))} | "
                       f"{bound} | {_fmt(r.get('bound_ratio'), 2)} | {_fmt(r.get('cpu_bound_ratio'), 2)} |")
        out.append("")

    table("method", "Methods")
    table("protocol", "Protocols")
    fams = [r for r in records if r["kind"] == "family"]
    if fams:
        goal = fams[0].get("target_ratio", 2.0)
        out += ["## Model families: one map relative to one gradient of the same batch", "",
                "Models from `attrax.examples` (user-style, not zoo; random weights) and zoo models, on the same "
                f"batch; ratio = seconds of the map through `attrax.explain` / seconds of one raw batched input "
                f"gradient (`reference_times`), measured in this run; goal <= {goal:g}x. CPU est. ratio: the same "
                "with process CPU time (robust to other load). vs explained gradient: ratio to `attrax.explain("
                "\"gradient\")` of the same batch (both sides pay the same per-call cost; on a tiny model the raw "
                "ratio mostly measures that cost).", "",
                "| model | method | images/s | compile s | ratio to one gradient | CPU est. ratio | "
                "vs explained gradient | goal |",
                "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in fams:
            if r.get("error"):
                out.append(f"| {r.get('model', '')} | {r['name']} | - | - | - | - | - | {r['error']} |")
                continue
            ratio = r.get("gradient_ratio")
            verdict = "-" if r["name"] == "gradient" else ("ok" if ratio is not None and ratio <= goal else "ABOVE")
            out.append(f"| {r['model']} | {r['name']} | {_fmt(r.get('images_per_s'))} | {_fmt(r.get('compile_s'), 2)} "
                       f"| {_fmt(ratio, 2)} | {_fmt(r.get('cpu_gradient_ratio'), 2)} "
                       f"| {_fmt(r.get('explain_gradient_ratio'), 2)} | {verdict} |")
        out.append("")
    steps = [r for r in records if r["kind"] == "step"]
    if steps:
        out += ["## The performance work, step by step (measured in this run)", "",
                "| computation | variant | images/s | CPU est. | compile s |", "|---|---|---:|---:|---:|"]
        out += [f"| {r['name']} | {r['hparams'].get('variant')} | {_fmt(r.get('images_per_s'))} | "
                f"{_fmt(r.get('cpu_images_per_s'))} | {_fmt(r.get('compile_s'), 2)} |" for r in steps]
        out.append("")
    trains = [r for r in records if r["kind"] == "train"]
    if trains:
        out += ["## Training strategies (all kept; `auto` chooses by backend)", "",
                "| what | settings | images/s (all models) | time | compile s | note |", "|---|---|---:|---:|---:|---|"]
        def dur(v):
            if v is None:
                return "-"
            return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.2f} s"

        out += [f"| {r['name']} | {', '.join(f'{k}={v}' for k, v in (r.get('hparams') or {}).items())} | "
                f"{_fmt(r.get('images_per_s'))} | {dur(r.get('seconds'))} | {_fmt(r.get('compile_s'), 2)} | "
                f"{r.get('note') or r.get('error') or ''} |" for r in trains]
        out.append("")
    grids = [r for r in records if r["kind"] == "roar" and not r.get("error")]
    if grids:
        hp = grids[0]["hparams"]
        out += ["## ROAR + KAR grid (batched vs one-by-one retraining, same run)", "",
                f"{hp['methods']} methods x {hp['fractions']} fractions (ROAR and KAR) x {hp['seeds']} retrains of "
                f"`{hp['model']}` on {hp['train_images']:,} training digits for {hp['epochs']} epochs "
                f"({hp['retrains']} retrained models: the unmodified point, the random control's ROAR = KAR and "
                "modified training sets that two methods share - e.g. the same pixels removed at a high fraction - "
                f"are trained once), test accuracy on {hp['test_images']:,} digits. The first row ran from an empty "
                "cache (base model, maps and rankings included); the others retrain the same models again with "
                "maps and rankings cached. ratio = training time / the sequential training time of the same models.",
                "", "| retraining | models | grid wall s | maps s | training s | images/s (training) | ratio |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in grids:
            h = r["hparams"]
            mode = h["mode"] + (f" ({h['subset']})" if h.get("subset") else "")
            out.append(f"| {mode} | {h['retrains']} | {_fmt(r.get('seconds'))} | {_fmt(r.get('maps_s'))} | "
                       f"{_fmt(r.get('train_s'))} | {_fmt(r.get('images_per_s'))} | {_fmt(r.get('train_ratio'), 2)} |")
        if grids[0].get("max_accuracy_diff") is not None:
            out.append(f"\nLargest test-accuracy difference between the {grids[0]['hparams']['mode']} and the "
                       f"sequential retrains: {grids[0]['max_accuracy_diff']:.4f}.")
        out.append("")
    for r in (r for r in records if r["kind"] == "roar" and r.get("error")):
        out += [f"ROAR grid failed: {r['error']}", ""]
    for r in (r for r in records if r["kind"] == "budget"):
        hp = r["hparams"]
        out += ["## Memory-bounded chunking", "",
                f"{hp['images']:,} images x integrated gradients {hp['steps']} steps with a {hp['memory_mb']:.0f} MB "
                f"budget: `evals_per_chunk_for_memory` chose {hp['evals_per_chunk']:,} evaluations per chunk "
                f"({hp['chunk']} images); the compiled chunk needs {r['peak_mb']:.1f} MB "
                f"({'within' if r['within_budget'] else 'OVER'} budget). Ran {r['images_run']} images at "
                f"{r['images_per_s']:.2f} images/s (RSS grew {r['rss_growth_mb']:.0f} MB); all {hp['images']:,} "
                f"would take ~{r['projected_s'] / 60:.0f} min.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The command


def _names(arg: str | None, all_names: list[str]) -> list[str]:
    if arg is None or arg == "all":
        return all_names
    if arg in ("", "none"):
        return []
    names = [a.strip() for a in arg.split(",") if a.strip()]
    return names


def model_names(cfg: dict[str, Any]) -> list[str]:
    """The models of a run: `model` is one name or a comma-separated list (zoo or `attrax.examples`)."""
    import attrax
    from attrax import examples

    names = [m.strip() for m in str(cfg["model"]).split(",") if m.strip()]
    known = set(attrax.models.names()) | set(examples.names())
    for m in names:
        if m not in known:
            from attrax.errors import unknown_name

            raise unknown_name("model", m, sorted(known))
    return names


def run(cfg: dict[str, Any], out_dir: str | Path, *, methods: list[str], protocols: list[str],
        steps: bool = True, training: bool = True, budget: bool = True, flags: list[str] | None = None,
        roar_grid: bool = True, progress: bool = True, families: bool | None = None,
        against: dict[str, Any] | None = None, against_source: str = "",
        against_only: str | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Run the benchmark and write rows.parquet, run.json and performance.md into `out_dir`.

    With several models (`model: a,b,c`), the method/protocol/step/budget entries run on the first;
    the `families` section (default: on when several models or a non-zoo example is named) times
    LRP, DeepLIFT and guided backprop against one gradient on every model. `against`: a loaded
    anchor JSON (`load_anchor`); every workload of it gets a row with its attrax counterpart
    (conf `against:`), run with the matching settings where the lists above did not already;
    `against_only` (the `--roar-only` / `--families-only` option's name): no counterpart is run
    beyond the sections asked for, the others' rows say so."""
    import attrax
    from attrax import examples
    from attrax.results import write_run

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    cfg = dict(cfg)
    models = model_names(cfg)
    if families is None:
        families = len(models) > 1 or models[0] in examples.names()
    cfg["model"] = models[0]
    zoo_main = models[0] not in examples.names()
    t_start = time.perf_counter()
    env = {"cpus": os.cpu_count(), "backend": jax.default_backend(), "load_before": os.getloadavg()[0],
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    model, params, x, target, info = setup(cfg)
    ref = reference_times(model, params, x, target, repeats=cfg["repeats"], max_seconds=cfg["max_seconds"],
                          batches=cfg.get("bound_batches") if (methods or protocols or against) else None)
    env["ref"] = ref
    n = x.shape[0]
    for r in ref["sweep"]:
        log(f"reference batch {r['batch']:4d}: forward {r['batch'] / r['forward']:8.0f} img/s, "
            f"gradient {r['batch'] / r['gradient']:8.0f} img/s")
    log(f"bound: forward {n / ref['forward']:.0f} img/s (batch {ref['forward_best_batch']}), "
        f"gradient {n / ref['gradient']:.0f} img/s (batch {ref['gradient_best_batch']})")
    records: list[dict] = []

    def guarded(fn, kind, name):
        try:
            rec = fn()
        except Exception as e:  # noqa: BLE001 - one failing entry must not stop the benchmark
            rec = {"kind": kind, "name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        log(f"{kind:9s} {name:32s} " + (f"{rec['images_per_s']:10.1f} img/s" if rec.get("images_per_s")
                                        else str(rec.get("error") or rec.get("note") or "")))
        records.append(rec)
        return rec

    for name in methods:
        guarded(lambda name=name: bench_method(name, model, params, x, target, ref, cfg), "method", name)
    relevance = masks = None
    if protocols or against:
        relevance = attrax.explain(cfg["relevance_method"], model, params, x, target, key=0)
        h, w = x.shape[1:3]
        masks = jnp.zeros((x.shape[0], h, w), bool).at[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4].set(True)
        for name in protocols:
            guarded(lambda name=name: bench_protocol(name, model, params, x, target, relevance, ref, cfg, masks),
                    "protocol", name)
    def section(kind, fn):
        try:
            for r in fn():
                records.append(r)
                log(f"{kind:9s} {r['name']:32s} {r.get('images_per_s') or 0:10.1f} img/s  {r['hparams']}")
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            records.append({"kind": kind, "name": kind, "hparams": {},
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            log(f"{kind}: {records[-1]['error']}")

    if steps:
        section("step", lambda: bench_steps(model, params, x, target, cfg))
    if flags:
        section("step", lambda: bench_flags(flags))
    if (training or roar_grid) and not zoo_main:
        log(f"training and ROAR sections train zoo models; skipped for {models[0]!r}")
    if training and zoo_main:
        section("train", lambda: bench_training(cfg))
    if budget:
        guarded(lambda: budget_check(model, params, x, cfg), "budget", "integrated_gradients")
    if roar_grid and cfg.get("roar_grid") and zoo_main:
        section("roar", lambda: bench_roar_grid(cfg, log))
    if against:
        def run_entry(kind: str, name: str, settings: dict) -> dict | None:
            if against_only and name != "roar_grid":
                return {"note": f"not run ({against_only}: only its section is compared)"}
            try:
                if kind == "method":
                    entry = {**(cfg["methods"].get(name) or {}), "hparams": settings}
                    c2 = {**cfg, "methods": {**cfg["methods"], name: entry}}
                    return bench_method(name, model, params, x, target, ref, c2)
                if kind == "protocol":
                    entry = {**(cfg["protocols"].get(name) or {}), "choices": settings}
                    c2 = {**cfg, "protocols": {**cfg["protocols"], name: entry}}
                    return bench_protocol(name, model, params, x, target, relevance, ref, c2, masks)
                if name == "roar_grid":
                    done = [r for r in records if r["kind"] == "roar" and not r.get("error")]
                    return done[0] if done else {"note": "the ROAR + KAR grid did not run (--no-roar)"}
                if not training or not zoo_main:
                    return {"note": "training figures not run (--no-training)"}
                rec = bench_against_training(settings["spec"], settings["work"], cfg)
                records.append(rec)
                return rec
            except Exception as e:  # noqa: BLE001 - one failing entry must not stop the benchmark
                return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}

        bound = next((r for r in records if r.get("name") == "arithmetic bound" and r.get("images_per_s")), None)
        for r in _with_bound_notes(against_records(against, against_source, cfg, records, run_entry), bound):
            records.append(r)
            log(f"against   {r['name']:32s} " + (f"{r['speedup']:6.2f}x  ({r['counterpart']})" if r.get("speedup")
                                                 else str(r.get("note", ""))))
    if families:
        try:
            records.extend(bench_families(cfg, models, log))
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            records.append({"kind": "family", "name": "families", "hparams": {},
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
    cfg["model"] = ",".join(models)
    env["load_after"] = os.getloadavg()[0]
    run_id = time.strftime("bench-%Y%m%d-%H%M%S")
    rows = to_rows(records, run_id=run_id, cfg=cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "performance.md").write_text(markdown(records, cfg, env))
    write_run(out_dir, rows, config=cfg, timings={"total_s": time.perf_counter() - t_start},
              extra={"bench": {"records": records, "environment": env, "setup": info,
                               "rss_peak_mb": rss_peak_mb()}})
    return rows, records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="attrax-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="default", help="conf/bench/<name>.yaml or a YAML path (default: default)")
    ap.add_argument("--methods", default=None, help="comma-separated names, 'all' (default) or 'none'")
    ap.add_argument("--protocols", default=None, help="comma-separated names, 'all' (default) or 'none'")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--model", default=None,
                    help="a zoo model or an `attrax.examples` family, or a comma-separated list "
                         "(nonzoo_cnn,nonzoo_resnet,vit_tiny,jnp_mlp,nnx_cnn): the families section times "
                         "LRP / DeepLIFT / guided backprop against one gradient on each")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--train-epochs", type=int, default=None, help="0 = random init")
    ap.add_argument("--out", default=None, help="output folder (default: results/bench/<time>)")
    ap.add_argument("--no-steps", action="store_true", help="skip the optimization-step figures")
    ap.add_argument("--no-training", action="store_true", help="skip the training-strategy figures")
    ap.add_argument("--no-budget", action="store_true", help="skip the memory-bounded chunking check")
    ap.add_argument("--no-roar", action="store_true", help="skip the ROAR + KAR retraining grid (minutes)")
    ap.add_argument("--roar-only", action="store_true",
                    help="only the ROAR + KAR grid (same as --methods none --protocols none --no-steps "
                         "--no-training --no-budget)")
    ap.add_argument("--families-only", action="store_true",
                    help="only the model-families section (same as --methods none --protocols none --no-steps "
                         "--no-training --no-budget --no-roar)")
    ap.add_argument("--no-families", action="store_true", help="skip the model-families section")
    ap.add_argument("--flags", action="append", default=None,
                    help="XLA_FLAGS value to probe in a subprocess (repeatable; '' = none)")
    ap.add_argument("--bound-batches", default=None, metavar="B1,B2,...",
                    help="batch sizes of the bound's sweep (default: the config's bound_batches)")
    ap.add_argument("--against", default=None, metavar="PATH",
                    help="the PyTorch stack's torch_cpu.json (../shared/anchors/torch_anchor.py, run just "
                         "before): adds the ratio column for every workload it timed (with --roar-only: "
                         "the grid's row only; the others are listed as not run)")
    ap.add_argument("--against-after", default=None, metavar="PATH",
                    help="with --from-run: the anchor's torch_cpu.json of a second run made AFTER attrax-bench; "
                         "re-scores that run's side-by-side table against both anchor runs (geometric mean, each "
                         "run's ratio, the anchor's drift) and writes it to the run folder's sandwich.md")
    ap.add_argument("--from-run", default=None, metavar="DIR",
                    help="an attrax-bench --out folder whose run used --against; runs no workload")
    ap.add_argument("--dataset-root", default=None, metavar="DIR",
                    help="the image folder of --dataset image_folder (none given: a small synthetic folder is "
                         "generated); with a large zoo --model (resnet18, resnet50, vgg16, vit) the paper-scale "
                         "section runs (attrax.perf_scale, conf/bench/scale.yaml)")
    ap.add_argument("--weights", default=None, metavar="PATH",
                    help="weights of the large zoo --model (attrax.models.import_weights; default: random init)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--matmul-probe", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--matmul-core", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.probe:
        print(json.dumps(probe()))
        return 0
    if a.matmul_probe is not None:
        print(json.dumps(matmul_probe(a.matmul_probe, a.matmul_core)))
        return 0
    if a.from_run or a.against_after:
        return _sandwich_main(a)
    from attrax import perf_scale

    if perf_scale.wanted(a):  # large zoo models / image folders: the paper-scale section
        return perf_scale.main(a)
    import attrax

    try:
        cfg = load_config(a.config, {"dataset": a.dataset, "model": a.model, "batch": a.batch, "repeats": a.repeats,
                                     "train_epochs": a.train_epochs})
        if a.roar_only:
            a.methods, a.protocols, a.no_steps, a.no_training, a.no_budget = "none", "none", True, True, True
        if a.families_only:
            a.methods, a.protocols, a.no_steps, a.no_training, a.no_budget, a.no_roar = ("none", "none", True, True,
                                                                                         True, True)
        if a.bound_batches is not None:
            try:
                cfg["bound_batches"] = [int(b) for b in a.bound_batches.split(",") if b.strip()]
            except ValueError:
                raise AttraxError(f"--bound-batches {a.bound_batches!r}: give comma-separated batch sizes") from None
            if any(b < 1 for b in cfg["bound_batches"]):
                raise AttraxError(f"--bound-batches {a.bound_batches!r}: batch sizes must be >= 1")
        anchor = load_anchor(a.against) if a.against else None  # a bad file fails before anything runs
        model_names(cfg)  # "did you mean" before anything runs
        methods = _names(a.methods, attrax.methods.names())
        protocols = _names(a.protocols, attrax.protocols.names())
        for n in methods:
            attrax.methods.get(n)  # "did you mean" before anything runs
        for n in protocols:
            attrax.protocols.get(n)
        out = a.out or os.path.join("results", "bench", time.strftime("%Y%m%d-%H%M%S"))
        run(cfg, out, methods=methods, protocols=protocols, steps=not a.no_steps, training=not a.no_training,
            budget=not a.no_budget, flags=a.flags, roar_grid=not a.no_roar, progress=not a.quiet,
            families=False if a.no_families else (True if a.families_only else None),
            against=anchor, against_source=str(a.against or ""),
            against_only="--roar-only" if a.roar_only else "--families-only" if a.families_only else None)
    except AttraxError as e:
        print(f"attrax-bench: error: {e}", file=sys.stderr)
        return 2
    if anchor is not None:  # the side-by-side table on stdout too
        md = (Path(out) / "performance.md").read_text()
        start = md.find("## Against the PyTorch stack")
        if start >= 0:
            end = md.find("\n## ", start + 1)
            print(md[start: end if end > 0 else None].rstrip() + "\n")
    print(Path(out) / "performance.md")
    return 0


def _sandwich_main(a: argparse.Namespace) -> int:
    """`--from-run DIR --against-after PATH`: the side-by-side table of a finished run against
    the anchor run before it and the one after it."""
    from attrax.train import atomic_write_bytes

    try:
        if not (a.from_run and a.against_after):
            raise AttraxError("--from-run and --against-after go together: the finished attrax-bench run folder and "
                              "the anchor's torch_cpu.json made after it")
        records = load_run_records(a.from_run)
        after = load_anchor(a.against_after)
        target = float(load_config(a.config).get("target", 1.5))
    except AttraxError as e:
        print(f"attrax-bench: error: {e}", file=sys.stderr)
        return 2
    rows = sandwich_records(records, after, str(a.against_after))
    md = "\n".join(against_markdown(rows, target)).rstrip() + "\n"
    atomic_write_bytes(Path(a.from_run) / "sandwich.md", md.encode())
    atomic_write_bytes(Path(a.from_run) / "sandwich.json", json.dumps(rows, indent=1, default=str).encode())
    print(md)
    print(Path(a.from_run) / "sandwich.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
