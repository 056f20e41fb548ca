"""Leaderboards and figures built from results folders alone (`attrax report PATH...`)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attrax import results as results_store
from attrax.errors import AttraxError

CONTROLS = ("random", "sobel")


# The metadata of rows written before the results carried it (empty `direction`): the registry's
# as it is now. ROAR: a lower accuracy after removing the most relevant inputs = a better ranking;
# KAR: higher; the mask-only leak control (roar_mask / kar_mask): lower = less leak.
LEGACY_DIRECTIONS = {("roar", "test_accuracy"): False, ("kar", "test_accuracy"): True,
                     ("roar_mask", "test_accuracy"): False, ("kar_mask", "test_accuracy"): False}
AREA = "_area"
#: What identifies one experiment in the leaderboard (besides protocol and metric).
IDENTITY = ("protocol", "protocol_choices", "metric", "method", "method_hparams", "model", "dataset",
            "model_seed", "seed")


def _direction(protocol: str, metric: str) -> bool | None:
    """Fallback direction from the code's registry (for rows without a `direction`)."""
    from attrax.protocols import PROTOCOLS

    base = metric[: -len(AREA)] if metric.endswith(AREA) else metric
    if (protocol, base) in LEGACY_DIRECTIONS:
        return LEGACY_DIRECTIONS[(protocol, base)]
    if protocol in PROTOCOLS:
        hib = PROTOCOLS.get(protocol).meta.get("higher_is_better", {})
        if base in hib:
            return hib[base]
    if protocol.startswith("sanity_") and (base.rsplit("_", 1)[0] in ("cascading", "independent")
                                           or base.split("_", 1)[-1] in ("spearman", "spearman_abs", "ssim", "hog")):
        return False  # similarity to the trained model's maps (older rows)
    return None


def row_directions(df: pd.DataFrame) -> pd.Series:
    """True / False / None per row: the row's own `direction`, else the registry's (fallback)."""
    d = df["direction"] if "direction" in df else pd.Series("", index=df.index)
    out = d.map({"higher": True, "lower": False}).astype(object)
    missing = ~d.isin(["higher", "lower", "none"])
    if missing.any():
        pm = df.loc[missing, ["protocol", "metric"]]
        cache = {k: _direction(*k) for k in set(map(tuple, pm.to_numpy()))}
        out[missing] = [cache[tuple(k)] for k in pm.to_numpy()]
    return out.where(out.notna(), None)


def _seedless(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose seed is a replicate (aggregation mean_over_seeds, e.g. ROAR retrains) get seed -1,
    so the replicates pool into one experiment."""
    if "seed" not in df:
        return df
    agg = df["aggregation"] if "aggregation" in df else pd.Series("", index=df.index)
    legacy = {p for p, _ in LEGACY_DIRECTIONS}  # rows written before `aggregation`: retrain seeds are replicates
    rep = (agg == "mean_over_seeds") | ((agg.fillna("") == "") & df["protocol"].isin(legacy))
    if rep.any():
        df = df.copy()
        df.loc[rep, "seed"] = -1
    return df


CARRIED = ("direction", "x_label", "aggregation", "version", "flag")


def curve_areas(df: pd.DataFrame) -> pd.DataFrame:
    """Scalar rows from curves: the trapezoid area under each curve divided by its x range (the
    curve's mean height), metric `<metric>_area`, one row per curve (run, method, seed, example)."""
    cur = df[df["x"].notna()]
    if cur.empty:
        return cur
    keys = [c for c in ("run_id", *IDENTITY, "example", *CARRIED) if c in cur.columns]
    rows = []
    for k, g in cur.groupby(keys, sort=False, dropna=False):
        g = g.groupby("x", as_index=False)["value"].mean().sort_values("x")
        x, v = g["x"].to_numpy(float), g["value"].to_numpy(float)
        span = x[-1] - x[0]
        area = float(np.sum((v[1:] + v[:-1]) * np.diff(x)) / 2 / span) if span > 0 else float(v.mean())
        rows.append(dict(zip(keys, k, strict=True), value=area))
    out = pd.DataFrame(rows)
    out["metric"] = out["metric"] + AREA
    out["x"] = np.nan
    return out


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        m = float(v.mean()) if len(v) else float("nan")
        return m, m
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def leaderboard(df: pd.DataFrame, *, n_boot: int = 1000) -> pd.DataFrame:
    """One row per experiment identity (IDENTITY: protocol, its choices, metric, method, its
    hyperparameters, model, dataset, seeds): mean, bootstrap CI, n, direction and rank.

    Only scalar metrics (x is NaN) of individual examples are ranked; rank 1 is best in the
    direction the rows carry (`direction`; rows written before it existed fall back to the
    registry), among the methods of one (protocol, choices, metric, model, dataset, seeds); no
    rank where the direction is unknown. Results with curves only (ROAR/KAR accuracy vs fraction)
    are ranked by the area under each curve (`curve_areas`). `flagged`: rows of the experiment
    carry a warning (`flag`, e.g. a permuted-label model that did not fit).
    """
    scal = df[df["x"].isna() & (df["example"] >= 0)]
    if scal.empty:  # aggregate-only results (e.g. the benchmark table): rank the aggregates
        scal = df[df["x"].isna()]
    if scal.empty:
        scal = curve_areas(df)
    if scal.empty:
        raise AttraxError("no metrics in these results")
    scal = _seedless(scal)
    scal = scal.assign(_hib=row_directions(scal), _flag=scal["flag"] if "flag" in scal else "")
    keys = [c for c in IDENTITY if c in scal.columns]
    out = []
    for k, g in scal.groupby(keys, sort=True, dropna=False):
        lo, hi = bootstrap_ci(g["value"].to_numpy(), n_boot=n_boot)
        hib = [h for h in g["_hib"] if h is not None]
        flags = sorted({f for f in g["_flag"].fillna("") if f})
        out.append({**dict(zip(keys, k, strict=True)), "mean": g["value"].mean(), "ci_low": lo, "ci_high": hi,
                    "n": len(g), "higher_is_better": hib[0] if hib else None,
                    "x_label": g["x_label"].iloc[0] if "x_label" in g else "",
                    "version": int(g["version"].iloc[0]) if "version" in g else -1,
                    "flagged": "; ".join(flags)})
    lb = pd.DataFrame(out)
    lb["higher_is_better"] = lb["higher_is_better"].astype(object).where(lb["higher_is_better"].notna(), None)
    ranks = []
    for _, g in lb.groupby([c for c in keys if c not in ("method", "method_hparams")], dropna=False):
        hib = g["higher_is_better"].iloc[0]
        ranks.append(g["mean"].rank(ascending=not hib, method="min") if hib is not None else g["mean"] * np.nan)
    lb["rank"] = pd.concat(ranks).reindex(lb.index)
    lb["label"] = _labels(lb)
    lb["column"] = _columns(lb)
    return lb


def _varying(lb: pd.DataFrame, cols: tuple[str, ...], within: str | None = None) -> list[str]:
    """Columns of `cols` that take more than one value (within each `within` group)."""
    out = []
    for c in cols:
        if c not in lb:
            continue
        n = lb.groupby(within)[c].nunique(dropna=False).max() if within else lb[c].nunique(dropna=False)
        if n > 1:
            out.append(c)
    return out


def _labels(lb: pd.DataFrame) -> list[str]:
    """Row labels: the method, plus the hyperparameters in which its rows differ, and the model,
    dataset and seeds where these vary."""
    extra = _varying(lb, ("model", "dataset", "model_seed", "seed"))
    labels = []
    for _, r in lb.iterrows():
        label = str(r["method"])
        if "method_hparams" in lb:
            d = _diff(r["method_hparams"], lb.loc[lb["method"] == r["method"], "method_hparams"])
            label += f" ({d})" if d else ""
        labels.append(" ".join([label, *(f"{c}={r[c]}" for c in extra)]))
    return labels


def _diff(mine_json: str, all_json) -> str:
    """`k=v, ...` of the keys of one JSON dict that differ in any of `all_json` ("" if none)."""
    import json

    others = [json.loads(c or "{}") for c in pd.unique(pd.Series(all_json))]
    mine = json.loads(mine_json or "{}")
    keys = sorted(set(mine).union(*others))
    return ", ".join(f"{k}={mine.get(k)}" for k in keys if any(o.get(k) != mine.get(k) for o in others))


def _columns(lb: pd.DataFrame) -> list[str]:
    """Column labels: protocol/metric, plus the protocol's choices where one protocol ran with several."""
    cols = []
    for _, r in lb.iterrows():
        d = _diff(r["protocol_choices"], lb.loc[lb["protocol"] == r["protocol"], "protocol_choices"]) \
            if "protocol_choices" in lb else ""
        p = r["protocol"] + (f" ({d})" if d else "")
        cols.append(f"{p}/{r['metric']} {arrow(r['higher_is_better'])}".rstrip())
    return cols


def arrow(hib: Any) -> str:
    return "↑" if hib is True else "↓" if hib is False else ""


def format_table(lb: pd.DataFrame) -> str:
    """Methods x metrics text table: mean [CI] (rank), sorted by the first ranked metric."""
    lb = lb.copy()
    if "label" not in lb:
        lb["label"] = lb["method"]
    if "column" not in lb:
        lb["column"] = lb["protocol"] + "/" + lb["metric"] + " " + lb["higher_is_better"].map(arrow)
    lb["cell"] = [
        f"{m:.4g} [{lo:.3g}, {hi:.3g}]" + (f" ({int(r)})" if np.isfinite(r) else "")
        + (" (!)" if isinstance(f, str) and f else "")
        for m, lo, hi, r, f in zip(lb["mean"], lb["ci_low"], lb["ci_high"], lb["rank"],
                                   lb.get("flagged", pd.Series("", index=lb.index)), strict=True)
    ]
    wide = lb.pivot_table(index="label", columns="column", values="cell", aggfunc="first")
    ranked = lb.dropna(subset=["rank"])
    if not ranked.empty:
        first = ranked["column"].iloc[0]
        order = list(dict.fromkeys(ranked[ranked["column"] == first].sort_values("rank")["label"]))
        wide = wide.reindex(order + [m for m in wide.index if m not in order])
    method_of = dict(zip(lb["label"], lb["method"], strict=False))
    wide.index = [f"{m} (control)" if method_of.get(m) in CONTROLS else m for m in wide.index]
    text = wide.to_markdown()
    flagged = sorted({f for f in lb.get("flagged", []) if isinstance(f, str) and f})
    if flagged:
        text += "\n\n(!) flagged: " + "; ".join(flagged)
    return text


X_LABELS = {"pixel_flipping": "fraction of pixels removed", "deletion": "fraction removed",
            "insertion": "fraction inserted", "roar": "fraction replaced", "kar": "fraction replaced",
            "roar_mask": "fraction replaced", "kar_mask": "fraction replaced",
            "sanity_model_randomization": "randomized layer", "selectivity": "step",
            "continuity": "shift (px)"}


def curve_figure(df: pd.DataFrame, path: Path, metric: str | None = None) -> Path | None:
    """Mean curves with 95% CI bands, one line per method, one panel per (protocol, metric).

    Covers deletion / insertion / pixel-flipping curves, ROAR/KAR accuracy vs fraction and
    sanity similarity vs randomized layer alike: anything recorded with an x position.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    cur = df[df["x"].notna()]
    if metric is not None:
        cur = cur[cur["metric"] == metric]
    if cur.empty:
        return None
    panels = sorted(cur.groupby(["protocol", "metric"]).groups)
    cols = min(3, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, (proto, met) in zip(axes.flat, panels, strict=False):
        sub = cur[(cur["protocol"] == proto) & (cur["metric"] == met)]
        sns.lineplot(data=sub, x="x", y="value", hue="method", errorbar=("ci", 95), ax=ax, n_boot=200, seed=0,
                     legend=ax is axes.flat[0])
        xl = sub["x_label"].iloc[0] if "x_label" in sub and sub["x_label"].iloc[0] else X_LABELS.get(proto, "x")
        ax.set(title=f"{proto}: {met}", xlabel=xl, ylabel=met)
    if axes.flat[0].get_legend() is not None:
        axes.flat[0].legend(fontsize=7, ncol=2 if cur["method"].nunique() > 8 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SANITY = "sanity_model_randomization"
SANITY_MODES = ("cascading", "independent")
SANITY_SIMS = ("spearman", "spearman_abs", "ssim", "hog")


def _sanity_means(df: pd.DataFrame) -> pd.DataFrame:
    """Mean similarity per (method, mode, similarity, step) of the model randomization rows."""
    s = df[(df["protocol"] == SANITY) & df["x"].notna()]
    if s.empty:
        return s
    parts = s["metric"].str.split("_", n=1, expand=True)
    s = s.assign(mode=parts[0], similarity=parts[1])
    return s.groupby(["method", "mode", "similarity", "x"], as_index=False)["value"].mean()


def sanity_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: mean similarity to the trained model's maps with the top (logits)
    layer re-initialized, with all layers re-initialized (cascading), and with one layer at a
    time (independent, mean over layers) - for each similarity; beside them the method's noise
    ceiling (`noise_ceiling_<sim>`) and the re-explanation with nothing randomized
    (`unrandomized_<sim>`, 1 when the re-explanation matches the map) where the rows have them.
    Lower = the maps depend on the learned weights (Adebayo et al. 2018: such a method passes);
    a similarity at or above the ceiling says nothing randomized mattered."""
    m = _sanity_means(df)
    if m.empty:
        return pd.DataFrame()
    scal = df[(df["protocol"] == SANITY) & df["x"].isna()
              & df["metric"].str.startswith(("noise_ceiling_", "unrandomized_"))]
    scal = scal.groupby(["method", "metric"])["value"].mean()
    rows = []
    for meth, g in m.groupby("method"):
        row = {"method": meth}
        for sim in SANITY_SIMS:
            for what in ("noise_ceiling", "unrandomized"):
                if (meth, f"{what}_{sim}") in scal.index:
                    row[f"{what}_{sim}"] = scal[(meth, f"{what}_{sim}")]
        for sim in SANITY_SIMS:
            c = g[(g["mode"] == "cascading") & (g["similarity"] == sim)].sort_values("x")
            i = g[(g["mode"] == "independent") & (g["similarity"] == sim)]
            if len(c):
                row[f"top_{sim}"], row[f"all_{sim}"] = c["value"].iloc[0], c["value"].iloc[-1]
            if len(i):
                row[f"independent_{sim}"] = i["value"].mean()
        rows.append(row)
    return pd.DataFrame(rows).sort_values("all_spearman_abs" if "all_spearman_abs" in rows[0] else "method")


def format_sanity_table(t: pd.DataFrame) -> str:
    """Markdown: per method and column, Spearman / Spearman-abs / SSIM / HOG; the last column is
    the method's noise ceiling (same method, two keys, nothing randomized; 1 = deterministic)."""
    cols = [("top", "logits layer re-initialized"), ("all", "all layers (cascading)"),
            ("independent", "one layer at a time (mean)"), ("noise_ceiling", "noise ceiling")]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for _, r in t.iterrows():
        cells = [" / ".join(f"{r[f'{c}_{s}']:.2f}" if pd.notna(r.get(f"{c}_{s}")) else "-" for s in SANITY_SIMS)
                 for c, _ in cols]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sanity_figure(df: pd.DataFrame, path: Path) -> Path | None:
    """Small multiples, one panel per method: mean similarity vs number of layers randomized,
    cascading (solid) and independent (dashed), one colour per similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = _sanity_means(df)
    if m.empty:
        return None
    methods = list(sanity_table(df)["method"])
    cols = min(6, len(methods))
    rows = int(np.ceil(len(methods) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows + 0.6), squeeze=False, sharey=True)
    colors = dict(zip(SANITY_SIMS, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    for ax, meth in zip(axes.flat, methods, strict=False):
        g = m[m["method"] == meth]
        for (mode, sim), c in g.groupby(["mode", "similarity"]):
            c = c.sort_values("x")
            ax.plot(c["x"], c["value"], color=colors.get(sim, "k"), ls="-" if mode == "cascading" else "--",
                    marker=".", lw=1.2, label=f"{mode} {sim}")
        ax.axhline(0, color="0.7", lw=0.6)
        ax.set_xticks(sorted(g["x"].unique()))
        ax.set_title(meth, fontsize=8)
        ax.set_ylim(-0.4, 1.05)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.supxlabel("layers randomized from the logits (cascading) / layer index from the top (independent)",
                  fontsize=8, y=0.045)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


BENCH_METRICS = ("images_per_s", "bound_ratio", "speedup_vs_bar")


def bench_figure(df: pd.DataFrame, path: Path) -> Path | None:
    """The benchmark table (`attrax-bench` results): images/s (log scale), bound ratio and the
    speed-up over the PyTorch bar, one bar per method / protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    b = df[(df["protocol"] == "bench") & df["metric"].isin(BENCH_METRICS) & df["x"].isna()]
    if b.empty:
        return None
    metrics = [m for m in BENCH_METRICS if m in set(b["metric"])]
    order = (b[b["metric"] == metrics[0]].groupby("method")["value"].mean().sort_values(ascending=False).index)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.25 * len(order) + 1.5), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        sub = b[b["metric"] == m].groupby("method", as_index=False)["value"].mean()
        sns.barplot(data=sub, y="method", x="value", order=[o for o in order if o in set(sub["method"])], ax=ax,
                    color="tab:blue")
        if m == "images_per_s":
            ax.set_xscale("log")
        if m in ("bound_ratio", "speedup_vs_bar"):
            ax.axvline(1.5, color="tab:red", ls="--", lw=1)
        ax.set(title=m, xlabel=m, ylabel="")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rank_heatmap(lb: pd.DataFrame, path: Path) -> Path | None:
    """Methods x metrics heatmap of ranks (1 = best in the metric's direction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    r = lb.dropna(subset=["rank"])
    if r.empty:
        return None
    r = r.assign(col=r["column"] if "column" in r else r["protocol"] + "/" + r["metric"],
                 lab=r["label"] if "label" in r else r["method"])
    wide = r.pivot_table(index="lab", columns="col", values="rank", aggfunc="first")
    wide = wide.loc[wide.mean(axis=1).sort_values().index]
    fig, ax = plt.subplots(figsize=(max(3.0, 1.2 + 0.9 * wide.shape[1]), max(2.5, 1 + 0.4 * wide.shape[0])))
    sns.heatmap(wide, annot=True, fmt=".0f", cmap="viridis_r", cbar_kws={"label": "rank"}, ax=ax)
    ax.set(xlabel="", ylabel="")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merged_heatmaps(runs: list[Path], path: Path) -> Path | None:
    """One images x methods grid from the `maps.npz` of several runs (e.g. a sweep's jobs)."""
    x = y = None
    maps: dict[str, np.ndarray] = {}
    for run in runs:
        f = Path(run) / "maps.npz"
        if not f.exists():
            continue
        d = np.load(f)
        if x is None:
            x, y = d["x"], d["y"]
        elif d["x"].shape != x.shape or not np.array_equal(d["x"], x):
            continue
        maps.update({k: d[k] for k in d.files if k not in ("x", "y")})
    if x is None or not maps:
        return None
    return heatmap_grid(x, maps, path, labels=y)


def heatmap_grid(images: np.ndarray, maps: dict[str, np.ndarray], path: Path, labels=None) -> Path:
    """Images (rows) x methods (columns): the input, then each method's channel-summed map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = ["input", *maps]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.6 * n), squeeze=False)
    for i in range(n):
        for j, c in enumerate(cols):
            ax = axes[i, j]
            if c == "input":
                img = images[i]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
                if labels is not None:
                    ax.set_ylabel(str(labels[i]), rotation=0, labelpad=10)
            else:
                r = maps[c][i].sum(-1)
                v = float(np.abs(r).max()) or 1.0
                ax.imshow(r, cmap="seismic", vmin=-v, vmax=v)
            if i == 0:
                ax.set_title(c, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _embed(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    stem = Path(path).stem
    return f'<figure><img alt="{stem}" src="data:image/png;base64,{data}"/><figcaption>{stem}</figcaption></figure>'


def build(paths: list[str], out: str | Path | None = None) -> Path:
    """Aggregate results folders into leaderboard.md/.csv and a self-contained report.html."""
    from attrax import findings

    df = results_store.load(*paths)
    runs = results_store.find_runs(paths)
    out = Path(out or (Path(paths[0]) / "report"))
    out.mkdir(parents=True, exist_ok=True)
    lb = leaderboard(df)
    lb.to_csv(out / "leaderboard.csv", index=False)
    table = format_table(lb)
    specs = {}  # the finding each run was made with (its recorded config), not today's preset file
    for run in runs:
        try:
            rc = results_store.run_info(run).get("config") or {}
        except (OSError, ValueError):
            continue
        if rc.get("finding") and rc.get("experiment_name"):
            specs.setdefault(rc["experiment_name"], rc["finding"])
    checks = findings.check(df, specs)
    check_md = findings.format(checks)
    flags = sorted({f for f in df["flag"] if f})  # e.g. a permuted-label model that did not fit
    st = sanity_table(df)
    sanity_md = format_sanity_table(st) if len(st) else ""
    (out / "leaderboard.md").write_text(
        f"# attrax leaderboard\n\n{len(df)} rows from {df['run_id'].nunique()} runs; "
        f"mean [95% bootstrap CI] (rank), arrows give each metric's better direction.\n\n{table}\n"
        + (f"\n## Model randomization (Spearman / Spearman-abs / SSIM / HOG vs the trained model's maps; "
           f"lower = depends on the weights; noise ceiling = the same method with two keys, nothing "
           f"randomized)\n\n{sanity_md}\n" if sanity_md else "")
        + (f"\n## Expected findings\n\n{check_md}\n" if checks else "")
        + ("\n## Warnings\n\n" + "\n".join(f"- {f}" for f in flags) + "\n" if flags else ""))
    figs = [p for p in (curve_figure(df, out / "curves.png"), sanity_figure(df, out / "sanity.png"),
                        rank_heatmap(lb, out / "ranks.png"),
                        merged_heatmaps(runs, out / "heatmaps.png"), bench_figure(df, out / "bench.png")) if p]
    seen = {p.name for p in figs}
    for run in runs:
        for png in sorted(Path(run).glob("*.png")):
            if png.name not in ("deletion_curves.png", "heatmaps.png") and png.name not in seen:
                figs.append(png)
    html = ["<!doctype html><html><head><meta charset='utf-8'><title>attrax report</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}</style>",
            "</head><body><h1>attrax report</h1>",
            f"<p>{len(df)} rows from {df['run_id'].nunique()} runs.</p>",
            lb.assign(direction=lb["higher_is_better"].map(arrow)).to_html(
                index=False, float_format=lambda v: f"{v:.4g}"),
            *(["<h2>Model randomization</h2>", st.to_html(index=False, float_format=lambda v: f"{v:.3f}")]
              if sanity_md else []),
            *(["<h2>Expected findings</h2><pre>", check_md, "</pre>"] if checks else []),
            *(["<h2>Warnings</h2><ul>", *(f"<li>{f}</li>" for f in flags), "</ul>"] if flags else []),
            *[_embed(p) for p in figs], "</body></html>"]
    (out / "report.html").write_text("\n".join(html))
    print(table)
    for f in flags:
        print(f"warning: {f}")
    if checks:
        print()
        print(check_md)
    print(f"\nwrote {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}, {out / 'report.html'}")
    return out
