"""The main job: data -> model -> methods -> protocol -> tidy rows -> table and figures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd

import attrax
from attrax import report, results, streaming
from attrax._arrays import to_device
from attrax.errors import AttraxError
from attrax.harness import check_target_mode


def _plain(cfg: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The main job's configuration for command-line `overrides`, composed as `attrax` does
    (resolved, as plain dicts), to run a job from Python: `run(compose(["model=mlp"]), "out/run")`
    (the run folder is `run`'s argument; `hydra.*` settings do not apply)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from attrax.cli import CONF_MODULE, check_overrides

    overrides = list(overrides)
    check_overrides(overrides)  # unknown choices / bad counts: the CLI's one-line errors
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return _plain(hydra_compose(config_name="config", overrides=overrides))


def method_specs(cfg: dict) -> dict[str, dict]:
    """{method name: hparams} from `method` (one) or `methods` (a named set)."""
    if cfg.get("method"):
        m = dict(cfg["method"])
        return {m.pop("name"): m}
    specs = {k: dict(v or {}) for k, v in (cfg.get("methods") or {}).items()}
    if not specs:
        raise AttraxError("no methods selected: set methods=<set> or method=<name>")
    return specs


def method_specs_with_controls(cfg: dict) -> dict[str, dict]:
    """The selected methods plus the configured controls: every comparison carries them."""
    specs = method_specs(cfg)
    for c in cfg.get("controls") or []:
        specs.setdefault(c, {})
    return specs


def protocol_specs(cfg: dict) -> dict[str, dict]:
    """{protocol name: parameters} from `protocol` (one) or `protocols` (a named set)."""
    if cfg.get("protocol"):
        p = dict(cfg["protocol"])
        return {p.pop("name"): p}
    specs = {k: dict(v or {}) for k, v in (cfg.get("protocols") or {}).items()}
    if not specs:
        raise AttraxError("no protocols selected: set protocols=<set> or protocol=<name>")
    return specs


def supply(pname: str, given: dict, context: dict) -> dict:
    """THE one place where a protocol gets what it needs from the run: its config's parameters,
    plus every parameter its registration declares in `needs` (the method, its FILLED
    hyperparameters and the map's key, masks, channel mean, train/test sets, training config,
    model seed) taken from `context` unless the config sets it. The same for per-batch and
    retraining protocols, for the map and for every re-explanation."""
    entry = attrax.protocols.get(pname)
    accepted = entry.hparams()
    wanted = attrax.protocols.needs(pname)
    out = dict(given)
    for k in wanted:
        v = context.get(k)
        if v is not None and (out.get(k) is None or (k == "method_hparams" and not out[k])):
            out[k] = v
    if "masks" in wanted and out.get("masks") is None and accepted.get("masks") is None:
        raise AttraxError(f"protocol {pname!r} needs ground-truth masks: use dataset=cluttered_mnist or synthetic")
    return out


def protocol_context(pname: str, given: dict, context: dict) -> dict:
    """Former name of `supply`."""
    return supply(pname, given, context)


def retrain_protocols() -> dict:
    """Registered retraining protocols (kind="retrain"): name -> function(method, model, train, test, ...)."""
    return {n: attrax.protocols.get(n).fn for n in attrax.protocols.names(kind="retrain")}


def run_protocol(pname: str, kw: dict, model, params, x, target, relevance, key):
    """Call a registered protocol with the parameters `supply` gave it (one call shape per kind)."""
    if attrax.protocols.is_retrain(pname):
        kw = dict(kw)
        return attrax.protocols.get(pname).fn(kw.pop("method"), model, kw.pop("train_set"), kw.pop("test_set"), **kw)
    return attrax.evaluate(pname, model, params, x, target, relevance, key=key, **kw)


def run_retrain(cfg: dict, run_dir: Path, specs: dict, pspecs: dict, model, tcfg, train_set, test_set, dname,
                mname, log=print) -> tuple[pd.DataFrame, dict[str, float], dict]:
    """ROAR / KAR / data randomization: each method's maps, retrained models, tidy rows. The
    method's data-dependent hyperparameters are filled once per method (on the base model the
    retraining protocols explain with: `small_train`, `model_seed`) and supplied to every protocol."""
    n_train = cfg.get("retrain_train_per_class")
    small_train = train_set.take(per_class=n_train) if n_train else train_set
    base_model, base_params, _ = attrax.train(model, small_train, seed=cfg["model_seed"], cfg=tcfg, progress=False)
    frames, timings, filled_info = [], {}, {}
    for meth, hp in specs.items():
        filled, how = fill_method_hparams(meth, hp, small_train, cfg["seed"], base_model, base_params)
        filled_info[meth] = how
        context = {"method": meth, "method_hparams": filled, "train_set": small_train, "test_set": test_set,
                   "train_config": dict(vars(tcfg)), "model_seed": cfg["model_seed"], "progress": cfg["progress"]}
        for pname, pcfg in pspecs.items():
            t = time.perf_counter()
            df = run_protocol(pname, supply(pname, pcfg, context), model, None, None, None, None, None)
            timings[f"{pname}_{meth}_s"] = time.perf_counter() - t
            log(f"[attrax] {meth}: {pname} in {timings[f'{pname}_{meth}_s']:.1f}s "
                f"({df.attrs.get('timings', {})})")
            df = df.copy()
            df["run_id"], df["experiment"], df["dataset"], df["model"] = (
                run_dir.name, cfg["experiment_name"], dname, mname)
            df["method"], df["method_hparams"] = meth, results.hparams_json(hp)
            if "model_seed" not in df or (df["model_seed"] < 0).all():
                df["model_seed"] = cfg["model_seed"]
            frames.append(results.conform(df))
    rows = pd.concat(frames, ignore_index=True)
    return rows, timings, filled_info


def fill_method_hparams(meth: str, hp: dict, train_set, seed: int, model=None, params=None,
                        n_reference: int = 64) -> tuple[dict, dict]:
    """(hparams, how) with the data-dependent hyperparameters left unset (None) filled from the
    TRAINING data: baselines / references sampled (seeded) as expected gradients, GradientSHAP and
    DeepLIFT-SHAP define them, and PatternNet/PatternAttribution signal estimators fitted on the
    training images (cached). The filled dict is what the map AND every re-explanation use; `how`
    records how each filled value was made (for run.json; the rows keep the configured values)."""
    accepted = attrax.methods.get(meth).hparams()
    out, how = dict(hp), {}
    if "patterns" in accepted and out.get("patterns") is None and model is not None:
        from attrax.methods.pattern import fit_patterns

        kw = {k: out[k] for k in ("estimator",) if out.get(k) is not None}
        out["patterns"] = fit_patterns(model, params, train_set.x, canonize=out.get("canonize", True), **kw)
        how["patterns"] = {"fitted_on": f"{len(train_set)} training images", "by": "fit_patterns",
                           "canonize": out.get("canonize", True), **kw,
                           "digest": results.hparams_json({"p": out["patterns"]})}
    need = [k for k in ("baselines", "references") if k in accepted and out.get(k) is None]
    if need:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(train_set), size=min(n_reference, len(train_set)), replace=False))
        for k in need:
            out[k] = np.asarray(train_set.x[idx])
            how[k] = {"from": f"{len(idx)} training images drawn without replacement", "rng_seed": seed,
                      "indices": idx.tolist(), "digest": results.hparams_json({"a": out[k]})}
    return out, how


def method_context(meth: str, hp: dict, train_set, seed: int, model=None, params=None,
                   n_reference: int = 64) -> dict:
    """The filled hyperparameters of `fill_method_hparams` (without the record)."""
    return fill_method_hparams(meth, hp, train_set, seed, model, params, n_reference)[0]


def run_activation_maximization(cfg: dict, run_dir: Path, model, params, train_set, ids: dict, log=print):
    """Interpret the model (not an example): class images by activation maximization in image space
    and in the code space of a decoder trained on the classifier's penultimate code; image grids
    `am_image.png` / `am_code.png` and tidy rows (final logit, probability, distance to the class mean)."""
    from attrax.methods import activation_maximization as am

    acfg = dict(cfg.get("activation_maximization") or {})
    units = np.arange(train_set.num_classes)
    means = am.class_means(train_set.x, train_set.y, train_set.num_classes)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    hp = {k: acfg[k] for k in ("lam", "steps", "lr") if k in acfg}
    imgs = am.activation_maximization(model, params, units, prior="mean", means=means, bounds=(0.0, 1.0), **hp)
    frames = [am.summarize(model, params, imgs, units, means=means, path=run_dir / "am_image.png",
                           ids={**ids, "method": "activation_maximization", "method_hparams": hp})]
    if acfg.get("code_space", True):
        dec = am.train_decoder(model, params, train_set.x, steps=acfg.get("decoder_steps", 500))
        cmeans = am.class_code_means(model, params, train_set.x, train_set.y, train_set.num_classes)
        chp = {"lam": acfg.get("lam", 1.0), "steps": acfg.get("code_steps", 300)}
        cimgs, _ = am.activation_maximization_code(model, params, units, decoder=dec, prior="mean",
                                                   code_means=cmeans, **chp)
        frames.append(am.summarize(model, params, cimgs, units, means=means, path=run_dir / "am_code.png",
                                   ids={**ids, "method": "activation_maximization_code", "method_hparams": chp}))
    log(f"[attrax] activation maximization of {len(units)} classes in {time.perf_counter() - t:.1f}s: "
        f"{run_dir / 'am_image.png'}")
    return pd.concat(frames, ignore_index=True)


def recorded_findings(cfg: dict) -> dict:
    """{experiment: finding} of this run's own config, so a verdict uses the chain the run was made with."""
    return {cfg["experiment_name"]: cfg["finding"]} if cfg.get("finding") else {}


def select_images(ds, n: int):
    """A class-balanced subset of n images (the first n/classes of every class)."""
    per = max(1, int(np.ceil(n / ds.num_classes)))
    return ds.take(per_class=per).take(n)


def at_scale(cfg: dict) -> dict:
    """The config at its scale: with `scale=paper`, a preset's `paper:` block (the published data
    set and model) replaces `dataset` and `model` (other keys in it override theirs). A relative
    `model.weights` that does not exist is looked up under `$ATTRAX_DATA/weights/`."""
    paper = cfg.get("paper")
    if cfg.get("scale") != "paper" or not paper:
        return cfg
    out = {**cfg, **{k: v for k, v in paper.items() if k not in ("dataset", "model")}}
    for k in ("dataset", "model"):
        if paper.get(k):
            out[k] = dict(paper[k])
    w = out["model"].get("weights")
    if w and not Path(w).is_absolute() and not Path(w).exists():
        from attrax.datasets.download import data_dir

        out["model"]["weights"] = str(data_dir() / "weights" / w)
    return out


def check_paper_inputs(cfg: dict) -> None:
    """At `scale=paper`, one line naming what to fetch and where when the data set or the weights
    are missing (before anything is loaded or trained)."""
    if cfg.get("scale") != "paper" or not cfg.get("paper"):
        return
    from attrax.datasets.download import data_dir
    from attrax.datasets.image_folder import FETCH_HINTS

    need = []
    d = cfg["dataset"]
    if d.get("name") == "image_folder":
        layout = d.get("layout") or "auto"
        root = Path(d["root"]).expanduser() if d.get("root") else (
            data_dir() / layout if layout in ("imagenet", "food101", "birdsnap") else None)
        if root is None or not root.is_dir() or not any(root.iterdir()):
            what = FETCH_HINTS.get(layout, FETCH_HINTS["imagenet"])
            need.append(f"{what}, at {root if root is not None else 'paper.dataset.root'} "
                        "(or paper.dataset.root=PATH)")
    w = cfg["model"].get("weights")
    if w and not Path(w).exists():
        need.append(f"{cfg['model'].get('name')} ImageNet weights as a safetensors file (torchvision's "
                    f"IMAGENET1K_V1 state dict) at {w} (or paper.model.weights=PATH)")
    if need:
        raise AttraxError(f"{cfg.get('experiment_name', 'this preset')} at scale=paper needs " + "; and ".join(need)
                          + " (README: Paper scale)")


def run(cfg: Any, run_dir: str | Path, *, log=print) -> pd.DataFrame:
    cfg = at_scale(_plain(cfg))
    check_paper_inputs(cfg)
    check_target_mode(cfg.get("target", "label"))  # before any data, training or method work
    run_dir = Path(run_dir)
    if results.is_complete(run_dir):
        log(f"[attrax] {run_dir} is already complete: skipping (delete it to recompute)")
        return results.load(run_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dcfg = dict(cfg["dataset"])
    dname = dcfg.pop("name")
    train_set = attrax.datasets.load(dname, "train", **dcfg)
    if cfg.get("train_per_class"):  # a quick look: a smaller training set (the model cache keys on the data)
        train_set = train_set.take(per_class=int(cfg["train_per_class"]))
    test_set = attrax.datasets.load(dname, "test", **dcfg)
    timings["data_s"] = time.perf_counter() - t0

    mcfg = dict(cfg["model"])
    mname = mcfg.pop("name")
    t = time.perf_counter()
    tcfg = attrax.TrainConfig(**cfg.get("train", {}))
    imported = attrax.weights.from_config({"name": mname, **mcfg})  # model=external, or +model.weights=PATH
    if imported is not None:
        (model, params), info = imported, {"imported": True}
    else:
        model = attrax.models.create(mname, num_classes=train_set.num_classes, **mcfg)
        model, params, info = attrax.train(model, train_set, seed=cfg["model_seed"], cfg=tcfg,
                                           progress=cfg["progress"])
    settings = streaming.StreamConfig.from_config(cfg.get("stream"))
    # a job given some shards of a sweep leaves the model's test accuracy to the job with shard 0
    acc = (streaming.accuracy(model, params, test_set) if settings.shards is None or 0 in settings.shards
           else float("nan"))
    timings["train_s"] = time.perf_counter() - t
    how = ("imported weights" if info.get("imported") else
           "loaded from cache" if info.get("cached") else f"trained in {timings['train_s']:.1f}s")
    log(f"[attrax] model {mname} on {dname}: {how}; test accuracy "
        + (f"{acc:.4f}" if acc == acc else "left to the job with shard 0"))

    pspecs = protocol_specs(cfg)
    for pname in pspecs:  # unknown names fail before any work
        attrax.protocols.get(pname)
    retrain = [p for p in pspecs if attrax.protocols.is_retrain(p)]
    if retrain:
        if len(retrain) < len(pspecs):
            raise AttraxError(f"retraining protocols ({', '.join(attrax.protocols.names(kind='retrain'))}) run on "
                              "their own: do not mix them with per-batch protocols in one job")
        specs = method_specs_with_controls(cfg)
        rows, rt, filled = run_retrain(cfg, run_dir, specs, pspecs, model, tcfg, train_set, test_set, dname,
                                       mname, log)
        timings.update(rt, total_s=time.perf_counter() - t0)
        if cfg["figures"]:
            run_dir.mkdir(parents=True, exist_ok=True)
            report.curve_figure(rows, run_dir / "retrain_curves.png")
        results.write_run(run_dir, rows, cfg, timings, extra={"test_accuracy": acc, "filled_hparams": filled})
        log("")
        acc_rows = rows[rows["metric"] == "test_accuracy"]
        if not acc_rows.empty:
            log(acc_rows.pivot_table(index="method", columns=["protocol", "x"], values="value", aggfunc="mean")
                .round(4).to_string())
        for f in sorted({f for f in rows["flag"] if f}):
            log(f"[attrax] warning: {f}")
        from attrax import findings

        for c in findings.check(rows, recorded_findings(cfg)):
            log(f"[attrax] expected finding {c['verdict']}: {c['claim']}. {c['numbers']}")
        log(f"[attrax] results: {run_dir / results.ROWS_FILE}")
        return rows
    sub = select_images(test_set, cfg["n_images"])
    masks = sub.meta.get("masks")
    # what protocols may take from the run; per method and batch, `supply` adds the method, its
    # filled hyperparameters, the batch's masks and the per-example keys its map was computed with
    run_context = {"channel_mean": np.asarray(train_set.meta["channel_mean"]).tolist(),
                   "masks": None if masks is None else to_device(masks),
                   "train_set": train_set, "test_set": test_set, "train_config": dict(vars(tcfg)),
                   "model_seed": cfg["model_seed"], "progress": cfg["progress"]}
    key = jax.random.key(cfg["seed"])
    frames, maps, choices, skipped, filled_info, shard_info, chunk_evals = [], {}, {}, {}, {}, {}, {}
    # heatmap rows: one image per class first, then the rest, up to `heatmap_images`
    firsts = [int(np.flatnonzero(sub.y == c)[0]) for c in np.unique(sub.y)]
    hidx = np.asarray((firsts + [i for i in range(len(sub)) if i not in firsts])[: cfg["heatmap_images"]])
    specs = method_specs_with_controls(cfg)
    store = streaming.ShardStore(run_dir)
    row_ids = {"run_id": run_dir.name, "experiment": cfg["experiment_name"], "dataset": dname, "model": mname,
               "model_seed": cfg["model_seed"], "seed": cfg["seed"], "target_mode": cfg["target"]}
    for mi, (meth, hp) in enumerate(specs.items()):
        method_key = jax.random.fold_in(key, mi)  # the map's key: protocols re-explain with it
        try:
            filled, how = fill_method_hparams(meth, hp, train_set, cfg["seed"], model, params)
            evals = cfg["chunk_evals"]
            if cfg.get("memory_mb"):  # chunks of this method within the budget (XLA's memory analysis)
                evals = streaming.evals_within_budget(meth, model, params, np.asarray(sub.x[:1]),
                                                      memory_mb=float(cfg["memory_mb"]), **filled)
                chunk_evals[meth] = evals
            mframes, mmaps, mt, mchoices, sinfo = streaming.run_method(
                method=meth, mi=mi, hparams=hp, filled=filled, sub=sub, model=model, params=params,
                method_key=method_key, protocol_key=lambda pi: jax.random.fold_in(key, 10_000 + pi),
                pspecs=pspecs, run_context=run_context, heat_positions=hidx,
                row_ids={**row_ids, "method": meth, "method_hparams": hp}, cfg=cfg, settings=settings,
                store=store, log=log, explain_kw={"evals_per_chunk": evals})
        except AttraxError as e:
            if cfg.get("method") or len(specs) == 1:  # a single chosen method must not be skipped
                raise
            skipped[meth] = str(e)
            log(f"[attrax] {meth}: skipped: {e}")
            continue
        filled_info[meth], shard_info[meth] = how, sinfo
        timings[f"explain_{meth}_s"] = mt.pop("explain_s")
        resumed = f" ({len(sinfo['resumed'])} shard(s) resumed)" if sinfo["resumed"] else ""
        log(f"[attrax] {meth}: explained {sinfo['images']} images in {timings[f'explain_{meth}_s']:.2f}s{resumed}")
        for pname in pspecs:
            timings[f"protocol_{pname}_{meth}_s"] = dt = mt.get(f"protocol_{pname}_s", 0.0)
            log(f"[attrax] {meth}: {pname} scored in {dt:.2f}s")
        frames += mframes
        choices.update(mchoices)
        if len(mmaps) == len(hidx):
            maps[meth] = np.stack([mmaps[int(i)] for i in hidx])
    if (cfg.get("activation_maximization") or {}).get("enabled"):
        frames.append(run_activation_maximization(
            cfg, run_dir, model, params, train_set,
            {"run_id": run_dir.name, "experiment": cfg["experiment_name"], "dataset": dname, "model": mname,
             "model_seed": cfg["model_seed"], "seed": cfg["seed"]}, log))
    if not frames:  # every method was skipped: say why in one line instead of an empty table
        raise AttraxError("no method produced a map: " + "; ".join(f"{m}: {e}" for m, e in skipped.items()))
    rows = pd.concat(frames, ignore_index=True)
    acc_row = results.conform(pd.DataFrame([{
        "run_id": run_dir.name, "experiment": cfg["experiment_name"], "dataset": dname, "model": mname,
        "model_seed": cfg["model_seed"], "method": "", "method_hparams": "{}", "protocol": "model",
        "metric": "test_accuracy", "x": np.nan, "value": acc, "example": -1, "seed": cfg["seed"]}]))
    if acc == acc:  # NaN: a job of some shards that leaves the accuracy to the job with shard 0
        rows = pd.concat([rows, acc_row], ignore_index=True)
    timings["total_s"] = time.perf_counter() - t0
    figs = []
    if cfg["figures"]:
        run_dir.mkdir(parents=True, exist_ok=True)
        figs.append(report.curve_figure(rows, run_dir / "deletion_curves.png"))
        if maps:  # the heatmap images' maps (all of them lie in shard 0's job when shards are split)
            pred = np.asarray(attrax.resolve_target(model, params, to_device(sub.x[hidx]), None, "predicted"))
            figs.append(report.heatmap_grid(sub.x[hidx], maps, run_dir / "heatmaps.png", labels=sub.y[hidx],
                                            predicted=pred))
            np.savez_compressed(run_dir / "maps.npz", x=sub.x[hidx], y=sub.y[hidx], pred=pred, **maps)
    model_info = {k: v for k, v in info.items() if k != "losses"}
    results.write_run(run_dir, rows, cfg, timings, extra={"model_info": model_info,
                                                          "test_accuracy": acc, "protocol_choices": choices,
                                                          "skipped_methods": skipped,
                                                          "filled_hparams": filled_info, "shards": shard_info,
                                                          "memory_chunk_evals": chunk_evals})
    log("")
    log(report.format_table(report.leaderboard(rows)))
    from attrax import findings

    for c in findings.check(rows, recorded_findings(cfg)):
        log(f"[attrax] expected finding {c['verdict']}: {c['claim']}. {c['numbers']}")
    log("")
    log(f"[attrax] results: {run_dir / results.ROWS_FILE}")
    for f in figs:
        if f:
            log(f"[attrax] figure:  {f}")
    return rows
