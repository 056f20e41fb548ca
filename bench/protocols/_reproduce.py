"""Small reproduction of Samek 2016 (pixel flipping), Montavon 2018 (selectivity) and
Kindermans 2017 (input invariance) on the embedded MNIST sample.

    python -m attrax.protocols._reproduce --images 500 --selectivity-images 200 --out results/repro

Trains (or loads from the cache) the zoo `cnn` (and the `mlp` for the exact input-invariance
twin), explains class-balanced test digits with every available method of the list below, and
prints mean +- 95% CI tables (normal approximation over images). Rows go to `<out>/rows.parquet`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import attrax
from attrax import results

METHODS = {
    "random": {},
    "sobel": {},
    "gradient": {},
    "sensitivity": ("gradient", {"postprocess": "square"}),
    "deconvnet": {},
    "guided_backprop": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 16},
    "smoothgrad": {"samples": 16},
    "lrp_epsilon": {},
    "lrp_zplus": {},
    "lrp_alpha2beta1": {},
    "deep_taylor": {},
    "pattern_attribution": {},
    "grad_cam": {},
}


def specs(available: list[str]) -> dict[str, tuple[str, dict]]:
    out = {}
    for label, spec in METHODS.items():
        name, hp = spec if isinstance(spec, tuple) else (label, spec)
        if name in available:
            allowed = attrax.methods.get(name).hparams()
            out[label] = (name, {k: v for k, v in hp.items() if k in allowed})
    return out


def ci_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    g = df[(df.metric == metric) & df.x.isna()].groupby("method")["value"]
    t = pd.DataFrame({"mean": g.mean(), "ci95": 1.96 * g.std(ddof=1) / np.sqrt(g.count()), "n": g.count()})
    return t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--selectivity-images", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="results/repro")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: pf,sel,inv")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    train, test = (attrax.datasets.load("mnist_sample", s) for s in ("train", "test"))
    sub = test.take(per_class=-(-a.images // 10)).take(a.images)
    x, y = jnp.asarray(sub.x), jnp.asarray(sub.y)
    todo = specs(attrax.methods.names())
    frames, timings = [], {}
    key = jax.random.key(0)

    def rows(scores, label, hp, proto, model_name, n):
        return results.scores_to_rows(
            scores,
            example_index=np.arange(n),
            run_id="repro",
            experiment="reproduction",
            dataset="mnist_sample",
            model=model_name,
            method=label,
            method_hparams=hp,
            protocol=proto,
            seed=0,
        )

    model, params, _ = attrax.train("cnn", train, seed=0, progress=False)
    print(f"cnn test accuracy {attrax.train_module_accuracy(model, params, test):.4f}", flush=True)
    target = y
    ns = min(a.selectivity_images, a.images)
    for mi, (label, (name, hp)) in enumerate(todo.items()):
        t = time.perf_counter()
        r = jax.block_until_ready(attrax.explain(name, model, params, x, target, key=jax.random.fold_in(key, mi), **hp))
        timings[f"explain_{label}"] = time.perf_counter() - t
        if "pf" not in skip:
            for order in ("morf", "lerf"):
                t = time.perf_counter()
                s = attrax.evaluate("pixel_flipping", model, params, x, target, r, key=1, order=order)
                frames.append(rows(s, label, hp, f"pixel_flipping_{order}", "cnn", a.images))
                timings[f"pf_{order}_{label}"] = time.perf_counter() - t
        if "sel" not in skip and name != "random":
            t = time.perf_counter()
            s = attrax.evaluate(
                "selectivity",
                model,
                params,
                x[:ns],
                target[:ns],
                r[:ns],
                key=2,
                method=name,
                method_hparams=hp,
                steps=a.steps,
            )
            frames.append(rows(s, label, hp, "selectivity", "cnn", ns))
            timings[f"sel_{label}"] = time.perf_counter() - t
        print(
            f"{label}: "
            + ", ".join(f"{k.split('_' + label)[0]} {v:.1f}s" for k, v in timings.items() if k.endswith(label)),
            flush=True,
        )
    if "inv" not in skip:
        mlp, mparams, _ = attrax.train("mlp", train, seed=0, progress=False)
        print(f"mlp test accuracy {attrax.train_module_accuracy(mlp, mparams, test):.4f}", flush=True)
        inv = {**todo, "integrated_gradients_shifted_ref": ("integrated_gradients", {"steps": 16})}
        for label, (name, hp) in inv.items():
            if name in ("random", "sobel", "grad_cam"):
                continue  # controls / CAM: not part of Kindermans' table (grad_cam needs stages)
            for mname, (m, p) in {"mlp": (mlp, mparams), "cnn": (model, params)}.items():
                hp2 = dict(hp)
                extra = {}
                if label == "integrated_gradients_shifted_ref":  # the reference moves with the data
                    extra = {"twin_method_hparams": {**hp2, "baseline": -1.0}}
                try:
                    s = attrax.evaluate(
                        "input_invariance",
                        m,
                        p,
                        x[:ns],
                        target[:ns],
                        x[:ns],
                        key=3,
                        method=name,
                        method_hparams=hp2,
                        **extra,
                    )
                except attrax.AttraxError as e:
                    print(f"input_invariance {label} on {mname}: {e}")
                    continue
                frames.append(rows(s, label, hp2, "input_invariance", mname, ns))
    df = pd.concat(frames, ignore_index=True)
    out = Path(a.out)
    results.write_run(out, df, config=vars(a), timings=timings)
    pd.set_option("display.width", 200)
    for proto, metric in [
        ("pixel_flipping_morf", "aopc_vs_random"),
        ("pixel_flipping_morf", "auc"),
        ("pixel_flipping_lerf", "auc"),
        ("selectivity", "auc"),
    ]:
        d = df[df.protocol == proto]
        if len(d):
            print(f"\n{proto} {metric} (mean +- 95% CI)")
            print(ci_table(d, metric).sort_values("mean").round(3).to_string())
    d = df[df.protocol == "input_invariance"]
    if len(d):
        t = d[d.x.isna()].pivot_table(index="method", columns=["model", "metric"], values="value", aggfunc="mean")
        print("\ninput invariance (share passed, mean distance, mean twin error)")
        print(t.round(4).to_string())


if __name__ == "__main__":
    main()
