"""The paper-scale section of `attrax-bench`: large zoo models on image folders at 224 x 224.

    attrax-bench --model resnet50 --dataset image_folder [--dataset-root DIR] [--weights PATH]
    attrax-bench --model vit --dataset image_folder                    (the tiny ViT of scale.yaml)
    attrax-bench --model resnet50,vit --config scale --out DIR

Reached from `attrax-bench` (`attrax.perf.main`) when every `--model` is a large zoo model
(resnet18, resnet50, vgg16, vit) or `--dataset image_folder` / `--dataset-root` / `--weights` is
given. Settings: conf/bench/scale.yaml (`--config NAME|PATH` replaces it; every setting is
recorded in `run.json` and in `scale.md`).

Per model it times, on images decoded from the folder by its Grain pipeline, each configured
method (gradient, integrated gradients, SmoothGrad, an LRP composite, Grad-CAM, RISE) through
`attrax.explain` and the pixel-flipping protocol through `attrax.evaluate`:

- chunking: `attrax.harness.evals_per_chunk_for_memory(method, ..., memory_mb=...)` chooses the
  evaluations per chunk from XLA's compiled memory analysis (`chunk_s`: the seconds that choice
  took: it compiles 2-3 probe chunks);
- `compile_s`: tracing + lowering + XLA compilation inside the first pass, summed from JAX's
  compile-duration events (`/jax/core/compile/*_duration`), so a method too slow to run twice
  still gets a steady-state figure (first pass - compile_s); cheap methods are re-run (up to
  `repeats`, within `max_seconds`) and the median of those passes is the steady time;
- images/s wall clock and the CPU estimate of `attrax.perf.cpu_equivalent_s` (process CPU time
  spread over all cores: on a shared machine the wall figures mostly measure the other load);
- RISE with `timed_masks` < `n_masks`: RISE's time is linear in its masks (one scan over blocks
  of batched forwards of a fixed size), so it runs `timed_masks` and reports images/s at the
  configured `n_masks` scaled by timed/n_masks (`extrapolated` in the row; `timed_masks: null`
  runs all of them).

Decoding is measured separately (the folder's pipeline rate, `decode` row): the method timings
are compute only, on the decoded batches.

"Where the time goes" (`profile:`; `--no-steps` skips it), per model on one batch: forward,
input gradient, its backward alone (`jax.vjp`'s residuals computed first), the gradient with
the kernel (parameter) gradients too (training's cost, which attribution does not pay), every
convolution of the model timed alone (forward, backward data, backward filter, from the model's
jaxpr; their sum against the whole passes gives the convolution share), the same convolutions
in NCHW/OIHW (torch's layout) against NHWC/HWIO, the dim_labels of the convolutions in the
compiled HLO (the layout XLA:CPU chose), and images/s of the gradient against the chunk size.

Measured with it (results/bench/resnet50_224_20261201/, shared 2-core CPU, load 7-10, jaxlib 0.10.2):
ResNet-50's input gradient is ~2 forwards and convolutions are most of both passes; XLA:CPU keeps every
convolution NHWC/HWIO and NCHW/OIHW is 1.2-1.4x slower; chunks of >= 8 gradient images are ~20% faster
than chunks of 1 (the harness default already gives 8); the kernel gradients attribution does not
need are 5.7x the forward convolutions (JAX prunes them). What helped here: random init from numpy
(`fast_random_init`, 2-5 s) instead of Flax's `init` (32 s jitted, 53 s eager for ResNet-50 on this
CPU). What did not: fastconv's col2im input gradient on the ResNet stem (176 vs 100 ms).

Without `--dataset-root` a small synthetic folder (smooth random JPEGs, `synthetic:`) is written
to a temporary folder; the output says "synthetic" wherever the data is named.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attrax._arrays import to_device
from attrax.errors import AttraxError

#: zoo models of the paper-scale section (`attrax.zoo_large`)
SCALE_MODELS = ("resnet18", "resnet50", "vgg16", "vit")


def _model_list(spec: str | None) -> list[str]:
    return [m.strip() for m in str(spec or "").split(",") if m.strip()]


def wanted(a: argparse.Namespace) -> bool:
    """True when the parsed `attrax-bench` arguments ask for the paper-scale section."""
    if getattr(a, "families_only", False) or getattr(a, "against", None) or getattr(a, "roar_only", False):
        return False
    models = _model_list(a.model)
    if not models and a.dataset is None and a.config != "default":  # a scale config (it lists `models:`)
        from attrax.perf import load_config

        try:
            return "models" in load_config(a.config)
        except AttraxError:
            return False
    return (a.dataset == "image_folder" or a.dataset_root is not None or a.weights is not None
            or (bool(models) and all(m in SCALE_MODELS for m in models)))


# ---------------------------------------------------------------------------------------------
# Settings and data


def load_settings(a: argparse.Namespace) -> dict[str, Any]:
    """conf/bench/scale.yaml (or `--config`) with the command line's overrides."""
    from attrax.perf import load_config

    cfg = load_config("scale" if a.config == "default" else a.config)
    if a.dataset not in (None, "image_folder"):
        raise AttraxError(f"--dataset {a.dataset!r}: the paper-scale section (large zoo models) reads image folders; "
                          "use --dataset image_folder [--dataset-root DIR]")
    if a.model:
        cfg["models"] = _model_list(a.model)
    cfg["models"] = _model_list(cfg.get("models")) if isinstance(cfg.get("models"), str) else list(cfg["models"])
    for m in cfg["models"]:
        if m not in SCALE_MODELS:
            from attrax.errors import unknown_name

            raise unknown_name("paper-scale model", m, SCALE_MODELS)
    if a.dataset_root is not None:
        cfg["dataset_root"] = a.dataset_root
    if a.weights is not None:
        if len(cfg["models"]) != 1:
            raise AttraxError("--weights needs exactly one --model")
        if not Path(a.weights).expanduser().is_file():
            raise AttraxError(f"--weights {a.weights}: no such file")
        cfg["weights"] = a.weights
    if a.batch is not None:
        cfg["batch"] = int(a.batch)
    if a.repeats is not None:
        cfg["repeats"] = int(a.repeats)
    root = cfg.get("dataset_root")
    if root is not None and not Path(root).expanduser().is_dir():
        raise AttraxError(f"--dataset-root {root}: no such folder (give an image folder, or leave it out for a "
                          "generated synthetic one)")
    import attrax

    for kind, arg in (("methods", a.methods), ("protocols", a.protocols)):
        table = dict(cfg.get(kind) or {})
        if arg in ("none", ""):
            table = {}
        elif arg not in (None, "all"):
            keep = _model_list(arg)
            for n in keep:
                (attrax.methods.get if kind == "methods" else attrax.protocols.get)(n)  # did you mean
            table = {n: table.get(n) or {} for n in keep}
        cfg[kind] = table
    if not a.no_steps:
        cfg.setdefault("profile", {})
    else:
        cfg["profile"] = None
    return cfg


def make_synthetic_folder(root: str | Path, *, image_size: int, classes: int = 2, per_class: int = 4,
                          train_per_class: int = 1, seed: int = 0) -> Path:
    """A `train/<class>/`, `test/<class>/` tree of smooth random JPEGs (`image_size` square) under root."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", per_class)):
        for c in range(classes):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                low = rng.random((8, 8, 3)) * 0.6 + 0.4 * (np.arange(3) == c % 3)
                img = Image.fromarray((np.clip(low, 0, 1) * 255).astype(np.uint8)).resize(
                    (image_size, image_size), Image.BILINEAR)
                img.save(d / f"img_{i:03d}.jpg", quality=90)
    return root


def load_images(cfg: dict[str, Any], tmp: str, log) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Decoded batches of the first `images` test images of the folder (or of a generated synthetic
    one) and the data's description (with the decode rate of the folder's pipeline)."""
    import attrax

    size = int(cfg["image_size"])
    root = cfg.get("dataset_root")
    info: dict[str, Any] = {"image_size": size}
    if root is None:
        s = dict(cfg.get("synthetic") or {})
        n_img = int(cfg["images"])
        classes = int(s.get("classes", 2))
        per_class = max(int(s.get("per_class", 0) or 0), -(-n_img // classes))
        root = make_synthetic_folder(Path(tmp) / "synthetic_folder", image_size=size, classes=classes,
                                     per_class=per_class, train_per_class=int(s.get("train_per_class", 1)),
                                     seed=int(s.get("seed", 0)))
        info.update(synthetic=True, data=f"synthetic: {classes * per_class} generated JPEGs ({classes} classes) "
                                         f"in a temporary folder")
        log(f"data: SYNTHETIC image folder generated at {root}")
    else:
        info.update(synthetic=False, data=f"image folder {root}")
    ds = attrax.datasets.load("image_folder", split=cfg.get("split", "test"), root=str(root), image_size=size,
                              **dict(cfg.get("dataset_kwargs") or {}))
    n = min(int(cfg["images"]), len(ds))
    part = ds.subset(np.arange(n))
    t0 = time.perf_counter()
    batches = list(part.batches(int(cfg["batch"])))
    dt = time.perf_counter() - t0
    info.update(root=str(root), split=cfg.get("split", "test"), images=n, classes=int(ds.meta.get("num_classes") or
                                                                                      len(set(ds.y.tolist()))),
                decode_s=dt, decode_images_per_s=n / dt if dt > 0 else None,
                layout=ds.meta.get("layout"))
    return batches, info


def build_model(name: str, cfg: dict[str, Any], x1: np.ndarray):
    """(model, params, description): the zoo model with `model_kwargs[name]`, random init (jitted), or the
    weights of `weights` via `attrax.models.import_weights`."""
    import attrax

    kw = dict((cfg.get("model_kwargs") or {}).get(name) or {})
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    if cfg.get("weights"):
        model, variables = attrax.models.import_weights(name, cfg["weights"])
        return model, variables, {"weights": str(cfg["weights"]), "kwargs": kw}
    model = attrax.models.create(name, **kw)
    params = fast_random_init(model.module, to_device(x1), int(cfg.get("seed", 0)))
    return model, params, {"weights": "random init (He-normal kernels, numpy)", "kwargs": kw}


def fast_random_init(module, x1, seed: int = 0) -> Any:
    """Seeded random variables of the module's shapes, drawn with numpy: He-normal kernels (fan-in =
    all but the last axis), zero biases and BatchNorm means, unit scales and BatchNorm variances,
    N(0, 0.02) token / position embeddings. Flax's own `init` of ResNet-50 takes 30-50 s on this
    CPU (its truncated-normal initializers compile for every shape); timings do not depend on the
    values, only finiteness does."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x1)
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("var", "scale"):
            v = np.ones(s.shape)
        elif name in ("mean", "bias"):
            v = np.zeros(s.shape)
        elif name == "kernel":
            v = rng.normal(0.0, np.sqrt(2.0 / max(1, int(np.prod(s.shape[:-1])))), s.shape)
        else:
            v = rng.normal(0.0, 0.02, s.shape)
        return to_device(v, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


# ---------------------------------------------------------------------------------------------
# Timing


def timed_passes(fn, *, repeats: int, max_seconds: float) -> dict[str, float]:
    """One first pass (compile seconds from JAX's events) and up to `repeats` steady passes while they
    fit in `max_seconds` (none when the first pass's steady part alone exceeds it)."""
    from attrax.perf import count_compilations, steady_calls

    with count_compilations() as cs:
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    steady_first = max(first - cs.seconds, 1e-9)
    n = int(min(repeats, max_seconds // steady_first)) if repeats > 0 else 0
    times, cpu = steady_calls(fn, n)
    if times:
        steady, steady_cpu = statistics.median(times), statistics.median(cpu)
    else:  # the first pass minus its compilation (the compile's CPU time taken as its wall time)
        steady, steady_cpu = steady_first, max(first_cpu - cs.seconds, 1e-9)
    return {"first_s": first, "compile_s": cs.seconds, "compiles": cs.count, "seconds": steady,
            "cpu_s": steady_cpu, "repeats": len(times)}


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def bench_entry(kind: str, name: str, entry: dict[str, Any], model, params, batches, relevance, cfg) -> dict:
    """One method (through `attrax.explain`) or protocol (`attrax.evaluate`) over the decoded batches."""
    import attrax
    from attrax.harness import chunk_size_for, evals_per_chunk_for_memory
    from attrax.perf import cpu_equivalent_s

    entry = dict(entry or {})
    hp = dict(entry.get("hparams" if kind == "method" else "choices") or {})
    n_img = int(entry.get("images") or sum(len(y) for _, y in batches))
    xs = np.concatenate([x for x, _ in batches])[:n_img]
    ts = np.concatenate([y for _, y in batches])[:n_img]
    bsz = int(cfg["batch"])
    parts = [(to_device(xs[s:s + bsz]), to_device(ts[s:s + bsz])) for s in range(0, n_img, bsz)]
    rec: dict[str, Any] = {"kind": kind, "name": name, "hparams": dict(hp), "images": n_img}
    scale = 1.0
    if kind == "method" and name == "rise" and entry.get("timed_masks"):
        full = int(hp.get("n_masks", attrax.methods.get("rise").hparams()["n_masks"]))
        timed = min(full, int(entry["timed_masks"]))
        if timed < full:
            scale = timed / full
            hp["n_masks"] = timed
            rec["extrapolated"] = f"timed {timed} of {full} masks, images/s x {timed}/{full}"
    model = attrax.models.Model(model.name, model.apply_fn, model.module)  # a fresh jit cache per entry
    mem = float(cfg["memory_mb"])
    if kind == "method":
        t0 = time.perf_counter()
        evals = evals_per_chunk_for_memory(name, model, params, parts[0][0], memory_mb=mem, probe_images=(1, 2),
                                           max_images=max(2, len(parts[0][1])), **hp)
        rec["chunk_s"] = time.perf_counter() - t0
        cost = int(attrax.methods.get(name).meta.get("cost", lambda h: 1)({**attrax.methods.get(name).hparams(),
                                                                           **hp}))
        rec.update(evals_per_chunk=evals, chunk=chunk_size_for(cost, len(parts[0][1]), evals), memory_mb=mem)

        def call():
            return [attrax.explain(name, model, params, xb, tb, key=0, evals_per_chunk=evals, **hp)
                    for xb, tb in parts]
    else:
        rels = [relevance[:n_img][s:s + bsz] for s in range(0, n_img, bsz)]

        def call():
            return [jax.tree.map(to_device, attrax.evaluate(name, model, params, xb, tb, r, key=0, **hp).values)
                    for (xb, tb), r in zip(parts, rels, strict=True)]

    t = timed_passes(call, repeats=int(cfg["repeats"]), max_seconds=float(cfg["max_seconds"]))
    c = cpu_equivalent_s(t["cpu_s"])
    rec.update(images_per_s=n_img / t["seconds"] * scale, cpu_images_per_s=n_img / c * scale if c > 0 else None,
               seconds=t["seconds"], compile_s=t["compile_s"], first_s=t["first_s"], repeats=t["repeats"],
               compiles=t["compiles"])
    return rec


# ---------------------------------------------------------------------------------------------
# Where the time goes


def _conv_eqns(jaxpr) -> list[Any]:
    """Every conv_general_dilated equation of a (closed) jaxpr, sub-jaxprs included."""
    out = []
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out.append(eqn)
        for v in eqn.params.values():
            for sub in (v if isinstance(v, list | tuple) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _conv_eqns(inner)
    return out


def _conv_timings(model, params, x, repeats: int, layouts: list[str], with_fastconv: bool = True,
                  max_shapes: int | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Every distinct convolution of the model's forward at x's batch, timed alone: forward, backward data
    (input vjp) and backward filter (kernel vjp), in NHWC/HWIO (the model's) and optionally NCHW/OIHW, and
    `attrax.fastconv`'s backward pass where it applies. Returns (per shape, sums weighted by count).
    `max_shapes`: only the that many most frequent distinct shapes (the sums then cover those only:
    `timed_distinct` says how many; each one compiles its own programs)."""
    from jax import lax

    from attrax.perf import time_calls

    try:
        from attrax import fastconv
    except ImportError:  # pragma: no cover - an older tree
        fastconv = None
    eqns = _conv_eqns(jax.make_jaxpr(lambda z: model(params, z))(x))
    groups: dict[Any, list] = collections.OrderedDict()
    for e in eqns:
        lhs, rhs = (v.aval for v in e.invars)
        key = (lhs.shape, rhs.shape, tuple(sorted((k, str(v)) for k, v in e.params.items())))
        groups.setdefault(key, [e, 0])[1] += 1
    distinct = len(groups)
    if max_shapes is not None and max_shapes < distinct:  # the most frequent first, ties in model order
        order = sorted(groups, key=lambda k: -groups[k][1])[:max_shapes]
        groups = collections.OrderedDict((k, groups[k]) for k in order)
    totals: dict[str, float] = collections.defaultdict(float)
    per_shape: list[dict] = []
    rng = np.random.default_rng(0)
    kw = {"repeats": repeats, "warmup": 1, "max_seconds": 3.0}
    for (lshape, rshape, _), (e, count) in groups.items():
        p = dict(e.params)
        dn = p["dimension_numbers"]
        lhs = to_device(rng.random(lshape, np.float32))
        rhs = to_device(rng.random(rshape, np.float32))
        row: dict[str, Any] = {"lhs": list(lshape), "rhs": list(rshape), "strides": list(p["window_strides"]),
                               "count": count}
        variants = [(lay, None) for lay in layouts]
        if with_fastconv and fastconv is not None and "NHWC" in layouts:
            variants.append(("fastconv", fastconv))
        for layout, fc in variants:
            if layout == "NCHW":
                q = {**p, "dimension_numbers": lax.ConvDimensionNumbers((0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3))}
                a, b = lhs.transpose(dn.lhs_spec), rhs.transpose(dn.rhs_spec)
            else:
                q, a, b = p, lhs, rhs

            def f(u, w, q=q, fc=fc):
                if fc is not None:
                    y = fc.bind_conv(q, u, w)
                    if y is not None:
                        return y
                    raise NotImplementedError
                return lax.conv_general_dilated_p.bind(u, w, **q)

            try:
                out = jax.eval_shape(f, a, b)
            except NotImplementedError:
                continue  # fastconv does not apply to this convolution
            g = jnp.ones(out.shape, out.dtype)
            fwd = jax.jit(f)
            bwd_data = jax.jit(lambda u, w, g, f=f: jax.vjp(lambda uu: f(uu, w), u)[1](g)[0])
            bwd_filter = jax.jit(lambda u, w, g, f=f: jax.vjp(lambda ww: f(u, ww), w)[1](g)[0])
            parts = [("backward data", bwd_data), ("backward filter", bwd_filter)]
            if layout != "fastconv":
                parts.insert(0, ("forward", fwd))
            if layout == "NCHW":
                parts = parts[:2]
            for what, fn in parts:
                sec = time_calls(lambda fn=fn, what=what, a=a, b=b, g=g: fn(a, b) if what == "forward"
                                 else fn(a, b, g), **kw)["median_s"]
                row[f"{layout} {what}"] = sec
                totals[f"{layout} {what}"] += count * sec
        per_shape.append(row)
    if "fastconv backward data" in totals:  # the same convolutions in XLA's form, for the comparison
        totals["XLA form of the fastconv-supported: backward data"] = sum(
            r["count"] * r["NHWC backward data"] for r in per_shape if "fastconv backward data" in r)
        totals["XLA form of the fastconv-supported: backward filter"] = sum(
            r["count"] * r["NHWC backward filter"] for r in per_shape if "fastconv backward filter" in r)
    return per_shape, {"convolutions": len(eqns), "distinct": distinct, "timed_distinct": len(groups), **dict(totals)}


def _hlo_conv_layouts(compiled) -> dict[str, int]:
    """dim_labels of the convolutions in a compiled module's HLO (XLA:CPU's chosen layouts) and custom calls."""
    text = compiled.as_text()
    labels = collections.Counter(re.findall(r"convolution\([^\n]*?dim_labels=([\w>-]+)", text))
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    return {**{f"dim_labels {k}": v for k, v in labels.items()}, **{f"custom_call {k}": v for k, v in calls.items()}}


def where_time_goes(mname: str, model, params, x, target, cfg: dict[str, Any], log) -> list[dict]:
    """Forward / backward / kernel gradient / convolutions / layout / chunk size figures of one model."""
    import attrax
    from attrax.harness import activation_bytes, chunk_size_for, default_evals_per_chunk
    from attrax.methods import input_gradient
    from attrax.perf import cpu_equivalent_s, time_calls

    pc = dict(cfg.get("profile") or {})
    rep = int(pc.get("repeats", 3))
    kw = {"repeats": rep, "warmup": 1, "max_seconds": float(pc.get("max_seconds", 20))}
    b = int(pc.get("batch", x.shape[0]))
    reps = -(-b // x.shape[0])
    xb, tb = jnp.concatenate([x] * reps)[:b], jnp.concatenate([target] * reps)[:b]
    recs: list[dict] = []

    def add(what: str, t: dict, variant: str = "", **extra):
        c = cpu_equivalent_s(t["cpu_s"])
        recs.append({"kind": "profile", "model": mname, "name": what, "hparams": {"variant": variant, "batch": b},
                     "seconds": t["median_s"], "images_per_s": b / t["median_s"], "compile_s": t["compile_s"],
                     "cpu_images_per_s": b / c if c > 0 else None, **extra})
        log(f"profile   {mname}: {what:34s} {variant:28s} {t['median_s']:8.3f} s  ({b / t['median_s']:.2f} img/s)")

    def logit(p, z, tt):
        return jnp.take_along_axis(model(p, z), tt[:, None], axis=1).sum()

    fwd = jax.jit(lambda p, z: model(p, z))
    grad_in = jax.jit(lambda p, z, tt: input_gradient(lambda u: model(p, u), z, tt)[1])
    grad_all = jax.jit(jax.grad(logit, argnums=(0, 1)))
    vjp_fwd = jax.jit(lambda p, z, tt: jax.vjp(lambda u: logit(p, u, tt), z)[1])
    vjp_bwd = jax.jit(lambda vf: vf(jnp.ones((), xb.dtype))[0])
    add("forward", time_calls(lambda: fwd(params, xb), **kw))
    add("input gradient (forward + backward)", time_calls(lambda: grad_in(params, xb, tb), **kw))
    res = vjp_fwd(params, xb, tb)
    add("forward keeping residuals (jax.vjp)", time_calls(lambda: vjp_fwd(params, xb, tb), **kw))
    add("backward alone (vjp of the residuals)", time_calls(lambda: vjp_bwd(res), **kw))
    res = None  # the residuals (~1 GB for ResNet-50 at batch 8) go before the next figure
    add("input + kernel gradients (training's)", time_calls(lambda: grad_all(params, xb, tb), **kw))
    compiled = grad_in.lower(params, xb, tb).compile()
    layouts = _hlo_conv_layouts(compiled)
    flops = (compiled.cost_analysis() or {}) if hasattr(compiled, "cost_analysis") else {}
    if isinstance(flops, list):
        flops = flops[0] if flops else {}
    recs.append({"kind": "profile", "model": mname, "name": "compiled HLO of the input gradient",
                 "hparams": {"variant": "layouts", "batch": b}, "layouts": layouts,
                 "gflops": float(flops.get("flops", 0.0)) / 1e9 if flops else None})
    log(f"profile   {mname}: HLO {layouts} GFLOP {recs[-1]['gflops']}")
    if pc.get("convolutions", True) and _conv_eqns(jax.make_jaxpr(lambda z: model(params, z))(xb[:1])):
        want = [s for s in pc.get("layouts", ["NHWC", "NCHW"])]
        per_shape, conv = _conv_timings(model, params, xb, max(2, rep), want, bool(pc.get("fastconv", True)),
                                        pc.get("max_conv_shapes"))
        recs.append({"kind": "profile", "model": mname, "name": "convolutions timed alone",
                     "hparams": {"variant": "sum over the model's convolutions", "batch": b}, "conv": conv,
                     "per_shape": per_shape})
        log(f"profile   {mname}: convolutions {conv}")
    base = default_evals_per_chunk(activation_bytes(model, params, xb[:1]))
    recs.append({"kind": "profile", "model": mname, "name": "harness default chunk",
                 "hparams": {"variant": "default_evals_per_chunk", "batch": b}, "evals_per_chunk": base,
                 "chunk": chunk_size_for(1, b, base)})
    for c in pc.get("chunks", [1, 4, 16, 32]):
        c = int(c)
        nb = max(b, c)
        rx = -(-nb // x.shape[0])
        xc, tc = jnp.concatenate([x] * rx)[:nb], jnp.concatenate([target] * rx)[:nb]
        m2 = attrax.models.Model(model.name, model.apply_fn, model.module)
        t = time_calls(lambda m2=m2, xc=xc, tc=tc, c=c: attrax.explain("gradient", m2, params, xc, tc, chunk_size=c),
                       repeats=max(1, rep - 1), warmup=0, max_seconds=kw["max_seconds"])
        cc = cpu_equivalent_s(t["cpu_s"])
        recs.append({"kind": "profile", "model": mname, "name": "gradient vs chunk size",
                     "hparams": {"variant": f"chunk {c}", "batch": nb}, "seconds": t["median_s"],
                     "images_per_s": nb / t["median_s"], "compile_s": t["compile_s"],
                     "cpu_images_per_s": nb / cc if cc > 0 else None})
        log(f"profile   {mname}: gradient chunk {c:3d} on {nb} images {nb / t['median_s']:8.2f} img/s")
    return recs


# ---------------------------------------------------------------------------------------------
# The section


def run(cfg: dict[str, Any], out_dir: str | Path, log=lambda *a: None) -> list[dict]:
    """Every configured model: method/protocol timings and (with `profile`) where the time goes."""
    import attrax
    from attrax.perf import rss_peak_mb
    from attrax.results import write_run

    t_start = time.perf_counter()
    env = {"cpus": os.cpu_count(), "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "load_before": os.getloadavg()[0], "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "jax": jax.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="attrax-scale-") as tmp:
        batches, data = load_images(cfg, tmp, log)
    log(f"data: {data['images']} images at {data['image_size']}x{data['image_size']}, decode "
        f"{data['decode_images_per_s'] or 0:.1f} img/s ({data['data']})")
    for mname in cfg["models"]:
        t0 = time.perf_counter()
        model, params, minfo = build_model(mname, cfg, batches[0][0][:1])
        minfo["init_s"] = time.perf_counter() - t0
        x_all = to_device(np.concatenate([x for x, _ in batches]))
        nclass = int(jax.eval_shape(lambda z, m=model, p=params: m(p, z), x_all[:1]).shape[-1])
        y_all = np.concatenate([y for _, y in batches])
        if y_all.max() >= nclass:  # folder labels beyond the model's head: explain its predicted class
            y_all = np.asarray(jnp.argmax(model(params, x_all), -1), np.int32)
            minfo["target"] = "predicted (folder labels exceed the head)"
        else:
            minfo["target"] = "folder label"
        mb = [(x, y_all[i: i + len(y)]) for (x, y), i in zip(batches, np.cumsum([0] + [len(y) for _, y in batches]),
                                                              strict=False)]
        minfo["num_classes"] = nclass
        records.append({"kind": "model", "model": mname, "name": mname, "hparams": minfo["kwargs"], **minfo})
        log(f"model     {mname} {minfo['kwargs'] or '(published size)'} {minfo['weights']}, init "
            f"{minfo['init_s']:.1f} s")
        relevance = None
        for kind in ("methods", "protocols"):
            for name, entry in (cfg.get(kind) or {}).items():
                k = kind[:-1]
                try:
                    if k == "protocol" and relevance is None:
                        relevance = attrax.explain(cfg.get("relevance_method", "gradient"), model, params, x_all,
                                                   to_device(y_all), key=0)
                    rec = bench_entry(k, name, entry, model, params, mb, relevance, cfg)
                except Exception as e:  # noqa: BLE001 - one failing entry must not stop the section
                    rec = {"kind": k, "name": name, "hparams": dict((entry or {}).get("hparams") or
                                                                    (entry or {}).get("choices") or {}),
                           "error": _short(e)}
                rec["model"] = mname
                records.append(rec)
                log(f"{k:9s} {mname}:{name:28s} " + (f"{rec['images_per_s']:10.4g} img/s, compile "
                                                     f"{rec['compile_s']:.1f} s" if rec.get("images_per_s")
                                                     else rec.get("error", "")))
        if cfg.get("profile") is not None:
            try:
                records += where_time_goes(mname, model, params, x_all, to_device(y_all), cfg, log)
            except Exception as e:  # noqa: BLE001
                records.append({"kind": "profile", "model": mname, "name": "where the time goes", "hparams": {},
                                "error": _short(e)})
                log(f"profile   {mname}: {records[-1]['error']}")
    env["load_after"] = os.getloadavg()[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.md").write_text(markdown(records, cfg, env, data))
    rows = to_rows(records, cfg, data)
    write_run(out_dir, rows, config=cfg, timings={"total_s": time.perf_counter() - t_start},
              extra={"bench": {"section": "scale", "records": records, "environment": env, "data": data,
                               "rss_peak_mb": rss_peak_mb()}})
    return records


def to_rows(records: list[dict], cfg: dict[str, Any], data: dict[str, Any]):
    import pandas as pd

    from attrax.results import conform, hparams_json

    run_id = time.strftime("bench-scale-%Y%m%d-%H%M%S")
    rows = []
    for r in records:
        if r["kind"] not in ("method", "protocol", "profile"):
            continue
        for metric in ("images_per_s", "cpu_images_per_s", "compile_s", "seconds", "chunk_s"):
            v = r.get(metric)
            if v is None or not np.isfinite(float(v)):
                continue
            rows.append({"run_id": run_id, "experiment": f"bench/scale/{r['kind']}",
                         "dataset": "image_folder(synthetic)" if data.get("synthetic") else "image_folder",
                         "model": r.get("model", ""), "model_seed": 0, "method": r["name"],
                         "method_hparams": hparams_json(r.get("hparams") or {}), "protocol": "bench", "metric": metric,
                         "x": np.nan, "value": float(v), "example": -1, "seed": 0})
    return conform(pd.DataFrame(rows))


def _rate(v: Any) -> str:
    """Three significant digits (RISE's images/s at ResNet-50 scale is ~1e-3)."""
    if v is None or not np.isfinite(float(v)) or v <= 0:
        return "-"
    return f"{v:,.{max(0, 2 - int(np.floor(np.log10(v))))}f}"


def markdown(records: list[dict], cfg: dict[str, Any], env: dict[str, Any], data: dict[str, Any]) -> str:
    from attrax.perf import _fmt as _f

    size = data["image_size"]
    out = [f"# attrax paper-scale benchmark ({size}x{size})", "",
           f"`attrax-bench` scale section on {env['cpus']} CPU cores ({env['backend']}, jax {env['jax']}), "
           f"{env['time']}. Load average {env['load_before']:.1f} before / {env['load_after']:.1f} after"
           + (" (the machine was shared with other sessions: wall figures include their load; the CPU est. column is "
              "the process CPU time spread over all cores)" if env["load_before"] > 1.0 else "") + ".",
           f"Data: **{data['data']}**, {data['images']} test images decoded at {size}x{size} (center crop), "
           f"decode rate of the folder's Grain + Pillow pipeline {_f(data.get('decode_images_per_s'), 1)} images/s "
           "(measured separately; the timings below are compute on the decoded batches).",
           f"Settings: batch {cfg['batch']}, memory budget {cfg['memory_mb']} MB (chunks from XLA's memory analysis, "
           f"`evals_per_chunk_for_memory`), up to {cfg['repeats']} steady passes within {cfg['max_seconds']} s "
           "(0 = one pass: steady = first pass - its compile seconds). XLA_FLAGS: "
           f"`{env['xla_flags'] or '(none)'}`.", ""]
    for r in (r for r in records if r["kind"] == "model"):
        out.append(f"- model `{r['model']}` {r['hparams'] or '(published size)'}: {r['weights']}, "
                   f"{r['num_classes']} classes, target {r['target']}, init {r['init_s']:.1f} s")
    out += ["", "## Images/s per method", "",
            "| model | method | hyperparameters | images | images/s | CPU est. images/s | compile s | steady s | "
            "passes | chunk (images) | evals/chunk | chunk choice s | note |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in records if r["kind"] in ("method", "protocol")):
        hp = ", ".join(f"{k}={v}" for k, v in (r.get("hparams") or {}).items())
        if r.get("error"):
            out.append(f"| {r['model']} | {r['name']} | {hp} | | - | - | | | | | | | {r['error']} |")
            continue
        out.append(f"| {r['model']} | {r['name']} | {hp} | {r['images']} | {_rate(r['images_per_s'])} | "
                   f"{_rate(r.get('cpu_images_per_s'))} | {_f(r['compile_s'], 1)} | {_f(r['seconds'], 2)} | "
                   f"{r['repeats'] or '1 (first - compile)'} | {_f(r.get('chunk'), 2)} | "
                   f"{_f(r.get('evals_per_chunk'), 2)} | "
                   f"{_f(r.get('chunk_s'), 1)} | {r.get('extrapolated', '')} |")
    prof = [r for r in records if r["kind"] == "profile"]
    if prof:
        out += ["", "## Where the time goes", "",
                "| model | what | variant | batch | seconds | images/s | CPU est. images/s | compile s |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        extra = []
        for r in prof:
            if r.get("error"):
                extra.append(f"- {r['model']}: {r['name']} failed: {r['error']}")
            elif "seconds" in r:
                out.append(f"| {r['model']} | {r['name']} | {r['hparams'].get('variant', '')} "
                           f"| {r['hparams']['batch']} | {_f(r['seconds'], 3)} | {_rate(r['images_per_s'])} "
                           f"| {_rate(r.get('cpu_images_per_s'))} "
                           f"| {_f(r.get('compile_s'), 1)} |")
            elif "layouts" in r:
                extra.append(f"- {r['model']}: compiled HLO of the input gradient (batch {r['hparams']['batch']}): "
                             f"{r['layouts'] or 'no convolutions'}; XLA cost analysis {_f(r.get('gflops'), 1)} GFLOP")
            elif "conv" in r:
                c = r["conv"]
                parts = ", ".join(f"{k} {v:.3f} s" for k, v in c.items() if isinstance(v, float))
                extra.append(f"- {r['model']}: its {c['convolutions']} convolutions ({c['distinct']} distinct shapes) "
                             f"timed alone at batch {r['hparams']['batch']}, summed (x count): {parts}")
                top = sorted(r.get("per_shape") or [], key=lambda q: -q["count"] * q.get("NHWC backward data", 0))
                for q in top[:5]:
                    t = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in q.items() if isinstance(v, float))
                    extra.append(f"  - input {q['lhs']} kernel {q['rhs']} stride {q['strides']} x{q['count']}: {t}")
            elif "chunk" in r:
                extra.append(f"- {r['model']}: the harness's default CPU budget gives {r['evals_per_chunk']} "
                             f"evaluations per chunk = {r['chunk']} images of the gradient at batch "
                             f"{r['hparams']['batch']}")
        out += ["", *extra]
    out += ["", "Settings (as run):", "", "```", _yaml(cfg), "```", ""]
    return "\n".join(out)


def _yaml(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False).rstrip()


def main(a: argparse.Namespace) -> int:
    """`attrax-bench` with large zoo models / image folders (called by `attrax.perf.main`)."""
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr, flush=True))
    try:
        cfg = load_settings(a)
        out = Path(a.out or os.path.join("results", "bench", time.strftime("scale-%Y%m%d-%H%M%S")))
        run(cfg, out, log)
    except AttraxError as e:
        print(f"attrax-bench: error: {e}", file=sys.stderr)
        return 2
    print(out / "scale.md")
    return 0
