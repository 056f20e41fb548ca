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
    curve's mean height; its mean where the range is 0), metric `<metric>_area`, one row per curve
    (run, method, seed, example); values at a repeated x are averaged first."""
    cur = df[df["x"].notna()]
    if cur.empty:
        return cur
    keys = [c for c in ("run_id", *IDENTITY, "example", *CARRIED) if c in cur.columns]
    g = cur.groupby([*keys, "x"], sort=True, dropna=False)["value"].mean().reset_index()  # x sorted per curve
    kid = g.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()
    x, v = g["x"].to_numpy(float), g["value"].to_numpy(float)
    n = int(kid.max()) + 1
    same = kid[1:] == kid[:-1]
    seg = np.where(same, (v[1:] + v[:-1]) * np.diff(x) / 2, 0.0)
    area = np.bincount(kid[1:], weights=seg, minlength=n)
    span = np.bincount(kid[1:], weights=np.where(same, np.diff(x), 0.0), minlength=n)
    mean = np.bincount(kid, weights=v, minlength=n) / np.bincount(kid, minlength=n)
    out = g.drop(columns=["x", "value"]).groupby(kid).first().reset_index(drop=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["value"] = np.where(span > 0, area / np.where(span > 0, span, 1.0), mean)
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

    Scalar metrics (x is NaN) are ranked: per (protocol, metric) the rows of individual examples,
    or the aggregates where it has none (e.g. the benchmark table); rank 1 is best in the
    direction the rows carry (`direction`; rows written before it existed fall back to the
    registry), among the methods of one (protocol, choices, metric, model, dataset, seeds); no
    rank where the direction is unknown. A protocol with curves only (ROAR/KAR accuracy vs
    fraction) is ranked by the area under each curve (`curve_areas`); so is any metric with a
    direction that is recorded as curves only (sanity similarity vs randomized layers). The model's
    own test accuracy (protocol `model`) is not a method's score and is left out. `flagged`: rows
    of the experiment carry a warning (`flag`, e.g. a permuted-label model that did not fit).
    """
    df = df[df["protocol"] != "model"]
    s = df[df["x"].isna()]
    per_example = s.assign(_ex=s["example"] >= 0).groupby(["protocol", "metric"])["_ex"].transform("any")
    scal = s[(s["example"] >= 0) | ~per_example]
    cur = df[df["x"].notna()]
    if len(cur):  # a ranked metric recorded as curves only (ROAR/KAR accuracy, sanity similarity vs layer)
        cur = cur[~cur.set_index(["protocol", "metric"]).index.isin(s.set_index(["protocol", "metric"]).index)]
        ranked = cur.assign(_hib=row_directions(cur)).groupby(["protocol", "metric"])["_hib"].transform(
            lambda h: h.notna().any())
        cur = cur[ranked.astype(bool)]
        if len(cur):
            scal = pd.concat([scal, curve_areas(cur)], ignore_index=True)
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
    dataset and seeds where these vary for one method and metric (so a preset's per-image run and a
    retraining run, with other seeds, share one row per method)."""
    key = lb["method"].astype(str) + "\0" + lb["protocol"].astype(str) + "\0" + lb["metric"].astype(str)
    for c in ("protocol_choices", "method_hparams"):
        if c in lb:
            key = key + "\0" + lb[c].astype(str)
    extra = _varying(lb.assign(_key=key), ("model", "dataset", "model_seed", "seed"), within="_key")
    hp = lb["method_hparams"] if "method_hparams" in lb else pd.Series("", index=lb.index)
    diffs = {}  # one _diff per distinct (method, hyperparameters)
    for m, h in set(zip(lb["method"], hp, strict=True)):
        d = _diff(h, hp[lb["method"] == m]) if "method_hparams" in lb else ""
        diffs[(m, h)] = str(m) + (f" ({d})" if d else "")
    ex = [lb[c].astype(str).to_numpy() for c in extra]
    return [" ".join([diffs[(m, h)], *(f"{c}={v[i]}" for c, v in zip(extra, ex, strict=True))])
            for i, (m, h) in enumerate(zip(lb["method"], hp, strict=True))]


def _diff(mine_json: str, all_json) -> str:
    """`k=v, ...` of the keys of one JSON dict that differ in any of `all_json` ("" if none)."""
    import json

    others = [json.loads(c or "{}") for c in pd.unique(pd.Series(all_json))]
    mine = json.loads(mine_json or "{}")
    keys = sorted(set(mine).union(*others))
    return ", ".join(f"{k}={mine.get(k)}" for k in keys if any(o.get(k) != mine.get(k) for o in others))


def _columns(lb: pd.DataFrame) -> list[str]:
    """Column labels: protocol/metric, plus the protocol's choices where one protocol ran with several."""
    ch = lb["protocol_choices"] if "protocol_choices" in lb else pd.Series("", index=lb.index)
    names = {}  # one _diff per distinct (protocol, choices)
    for p, c in set(zip(lb["protocol"], ch, strict=True)):
        d = _diff(c, ch[lb["protocol"] == p]) if "protocol_choices" in lb else ""
        names[(p, c)] = p + (f" ({d})" if d else "")
    return [f"{names[(p, c)]}/{m} {arrow(h)}".rstrip()
            for p, c, m, h in zip(lb["protocol"], ch, lb["metric"], lb["higher_is_better"], strict=True)]


def arrow(hib: Any) -> str:
    return "↑" if hib is True else "↓" if hib is False else ""


def aggregate_ranks(lb: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Per leaderboard row label: the mean of its ranks over the ranked metric columns (all, or
    `columns`), and how many ranks that mean is over (`agg_n`). A label without a rank in any of
    them gets NaN."""
    r = lb.dropna(subset=["rank"])
    if columns is not None:
        r = r[r["column"].isin(columns)]
    g = r.groupby("label")["rank"]
    out = pd.DataFrame({"agg_rank": g.mean(), "agg_n": g.count()})
    return out.reindex(pd.unique(lb["label"]))


AGG_DEFINITION = ("the mean, over the ranked metrics shown, of the method's rank in each "
                  "(1 = best in that metric's direction; ties share the better rank); metrics without a "
                  "direction are not ranked and do not count")


def _board(lb: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard rows a table shows: labels and column names filled in, the model's own
    accuracy (protocol `model`, shown in the header) left out."""
    lb = lb[lb["protocol"] != "model"].copy()
    if "label" not in lb:
        lb["label"] = lb["method"]
    if "column" not in lb:
        lb["column"] = lb["protocol"] + "/" + lb["metric"] + " " + lb["higher_is_better"].map(arrow)
    return lb


def column_order(lb: pd.DataFrame) -> list[str]:
    """The leaderboard's metric columns: grouped by metric category, ranked ones first, then in the
    rows' order."""
    cols = list(dict.fromkeys(lb["column"]))
    proto = dict(zip(lb["column"], lb["protocol"], strict=False))
    ranked = set(lb.loc[lb["rank"].notna(), "column"])
    first = {c: i for i, c in enumerate(cols)}
    return sorted(cols, key=lambda c: (metric_category(proto[c]), c not in ranked, first[c]))


def cell_text(m: float, lo: float, hi: float, r: float, flagged: Any = "") -> str:
    return (f"{m:.4g} [{lo:.3g}, {hi:.3g}]" + (f" ({int(r)})" if np.isfinite(r) else "")
            + (" (!)" if isinstance(flagged, str) and flagged else ""))


def format_table(lb: pd.DataFrame) -> str:
    """Methods x metrics markdown table: mean [CI] (rank), the mean rank over the ranked metrics
    (a last column, when any metric is ranked), rows sorted by it; controls marked."""
    lb = _board(lb)
    if lb.empty:
        return "(no metrics)"
    lb["cell"] = [cell_text(m, lo, hi, r, f) for m, lo, hi, r, f in zip(
        lb["mean"], lb["ci_low"], lb["ci_high"], lb["rank"], lb.get("flagged", pd.Series("", index=lb.index)),
        strict=True)]
    wide = lb.pivot_table(index="label", columns="column", values="cell", aggfunc="first")
    wide = wide[[c for c in column_order(lb) if c in wide.columns]]
    agg = aggregate_ranks(lb)
    if agg["agg_rank"].notna().any():
        order = list(agg["agg_rank"].sort_values(kind="stable").index)
        wide = wide.reindex(order)
        wide["mean rank"] = [f"{v:.2f}" if np.isfinite(v) else "" for v in agg["agg_rank"].reindex(order)]
    method_of = dict(zip(lb["label"], lb["method"], strict=False))
    wide.index = [f"{m} (control)" if method_of.get(m) in CONTROLS else m for m in wide.index]
    text = wide.fillna("").to_markdown()
    flagged = sorted({f for f in lb.get("flagged", []) if isinstance(f, str) and f})
    if flagged:
        text += "\n\n(!) flagged: " + "; ".join(flagged)
    return text


X_LABELS = {"pixel_flipping": "fraction of pixels removed", "deletion": "fraction removed",
            "insertion": "fraction inserted", "roar": "fraction replaced", "kar": "fraction replaced",
            "roar_mask": "fraction replaced", "kar_mask": "fraction replaced",
            "sanity_model_randomization": "randomized layer", "selectivity": "step",
            "continuity": "shift (px)"}


FAMILY_ORDER = ("gradient", "backprop", "relevance", "cam", "perturbation", "surrogate", "other", "control")
#: Line colours of the methods (fixed per method within a report: see `method_colors`); the
#: controls keep their own (random black, dashed; sobel grey, dotted) in every figure.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
CONTROL_STYLE = {"random": ("#000000", "--"), "sobel": ("#7f7f7f", ":")}
RETRAIN = ("roar", "kar", "roar_mask", "kar_mask")


def method_family(method: str) -> str:
    """The family a method is registered with (controls: "control"; unknown names: "other")."""
    if method in CONTROLS:
        return "control"
    from attrax import methods

    try:
        return str(methods.get(method).meta.get("family") or "other")
    except Exception:  # noqa: BLE001 - a name this code does not know (older results, plug-ins)
        return "other"


def metric_category(protocol: str) -> str:
    """The category of the protocol a metric belongs to (faithfulness, localization, ...)."""
    from attrax.protocols import PROTOCOLS

    if protocol == "bench":
        return "speed"
    if protocol == "model":
        return "model"
    base = protocol[: -len("_mask")] if protocol.endswith("_mask") else protocol
    if base in PROTOCOLS:
        return str(PROTOCOLS.get(base).meta.get("category") or "other")
    if base in ("roar", "kar"):
        return "retraining"
    return "other"


def _family_key(method: str) -> tuple[int, str]:
    f = method_family(method)
    return (FAMILY_ORDER.index(f) if f in FAMILY_ORDER else FAMILY_ORDER.index("other"), method)


def method_colors(methods) -> dict[str, str]:
    """One colour per method, the same in every figure of a report: methods sorted by family and
    name take the palette in turn, so the methods of one family panel have distinct colours."""
    names = sorted({str(m) for m in methods if str(m)} - set(CONTROLS), key=_family_key)
    out = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}
    out.update({c: s[0] for c, s in CONTROL_STYLE.items()})
    return out


def family_panels(methods, per_panel: int = 6) -> list[tuple[str, list[str]]]:
    """(title, methods) per panel: one panel per method family, split into panels of at most
    `per_panel` methods (the controls are drawn in every panel besides them)."""
    names = sorted({str(m) for m in methods if str(m)} - set(CONTROLS), key=_family_key)
    if not names:
        return [("controls", [])]
    panels = []
    for fam in dict.fromkeys(method_family(m) for m in names):
        ms = [m for m in names if method_family(m) == fam]
        chunks = [ms[i:i + per_panel] for i in range(0, len(ms), per_panel)]
        for i, c in enumerate(chunks):
            panels.append((fam + (f" ({i + 1}/{len(chunks)})" if len(chunks) > 1 else ""), c))
    return panels


def _curve_label(proto: str, choices: str, metric: str, all_choices) -> str:
    d = _diff(choices, all_choices)
    return f"{proto}" + (f" ({d})" if d else "") + f": {metric}"


def curve_figure(df: pd.DataFrame, path: Path, metric: str | None = None, *, colors: dict | None = None,
                 title: str | None = None, xlabel: str | None = None, dpi: int = 90) -> Path | None:
    """Curves as small multiples: one row of panels per curve (protocol, its choices, metric), one
    panel per method family (at most 6 methods and the controls, so at most 8 lines); mean over
    examples (or retraining seeds) with a 95% band (mean +- 1.96 standard errors).

    Covers deletion / insertion / pixel-flipping curves, ROAR/KAR accuracy vs fraction and sanity
    similarity vs randomized layer alike: anything recorded with an x position.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cur = df[df["x"].notna() & (df["method"] != "")]
    if metric is not None:
        cur = cur[cur["metric"] == metric]
    if cur.empty:
        return None
    cur = cur.assign(protocol_choices=cur["protocol_choices"] if "protocol_choices" in cur else "")
    colors = colors or method_colors(cur["method"].unique())
    keys = ["protocol", "protocol_choices", "metric"]
    stats = cur.groupby([*keys, "method", "x"])["value"].agg(["mean", "std", "count"]).reset_index()
    stats["half"] = (1.96 * stats["std"] / np.sqrt(stats["count"])).fillna(0.0)
    groups = sorted(stats.groupby(keys).groups)
    panels = family_panels(stats["method"].unique())
    present = set(stats["method"])
    controls = [c for c in CONTROLS if c in present]
    nr, nc = len(groups), len(panels)
    fig, axes = plt.subplots(nr, nc, figsize=(3.1 * nc + 0.6, 2.5 * nr + 0.7), squeeze=False, sharey="row")
    for i, g in enumerate(groups):
        sg = stats[(stats["protocol"] == g[0]) & (stats["protocol_choices"] == g[1]) & (stats["metric"] == g[2])]
        xl = xlabel or (cur.loc[cur["protocol"] == g[0], "x_label"].iloc[0] if "x_label" in cur else "") \
            or X_LABELS.get(g[0], "x")
        label = _curve_label(*g, stats.loc[stats["protocol"] == g[0], "protocol_choices"])
        for j, (ptitle, ms) in enumerate(panels):
            ax = axes[i, j]
            for m in [*ms, *controls]:
                s = sg[sg["method"] == m].sort_values("x")
                if s.empty:
                    continue
                c, ls = CONTROL_STYLE.get(m, (colors.get(m, "#333333"), "-"))
                ax.plot(s["x"], s["mean"], color=c, ls=ls, lw=1.3, label=m)
                ax.fill_between(s["x"], s["mean"] - s["half"], s["mean"] + s["half"], color=c, alpha=0.12, lw=0)
            if i == 0:
                ax.set_title(ptitle, fontsize=9, fontweight="bold")
                ax.legend(fontsize=6.5, frameon=False, loc="best")  # cheap: few short lines
            if j == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(label, 30)), fontsize=8)
            if i == nr - 1 or nr == 1:
                ax.set_xlabel(xl, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.25, lw=0.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.06, hspace=0.22)  # (no tight_layout: a second full draw per figure)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
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


def _bars(ax, names, values, colors, title, log=False):
    ax.barh(range(len(names)), values, color=[colors.get(n, "#1f77b4") for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3, lw=0.5)
    if log:
        ax.set_xscale("log")


def bench_figure(df: pd.DataFrame, path: Path, colors: dict | None = None) -> Path | None:
    """The benchmark table (`attrax-bench` results): images/s (log scale), bound ratio and the
    speed-up over the PyTorch bar, one bar per method / protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = df[(df["protocol"] == "bench") & df["metric"].isin(BENCH_METRICS) & df["x"].isna()]
    if b.empty:
        return None
    colors = colors or method_colors(b["method"].unique())
    metrics = [m for m in BENCH_METRICS if m in set(b["metric"])]
    means = b.groupby(["metric", "method"])["value"].mean()
    order = list(means[metrics[0]].sort_values(ascending=False).index)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.28 * len(order) + 1.4), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        names = [o for o in order if o in means[m].index]
        _bars(ax, names, [means[m][n] for n in names], colors, m, log=m == "images_per_s")
        if m in ("bound_ratio", "speedup_vs_bar"):
            ax.axvline(1.5, color="tab:red", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_timings(runs: list[Path]) -> pd.DataFrame:
    """Seconds per image of each method's maps (`explain_<method>_s`) and of its scoring (sum of
    `protocol_<protocol>_<method>_s`) from the runs' run.json timings, mean over runs."""
    rows = []
    for run in runs:
        try:
            info = results_store.run_info(run)
        except (OSError, ValueError):
            continue
        t, n = info.get("timings") or {}, (info.get("config") or {}).get("n_images")
        if not t or not n:
            continue
        for k, v in t.items():
            if k.startswith("explain_") and k.endswith("_s"):
                meth = k[len("explain_"):-2]
                score = sum(s for kk, s in t.items() if kk.startswith("protocol_") and kk.endswith(f"_{meth}_s"))
                rows.append({"run": run.name, "method": meth, "explain_s_per_image": v / n,
                             "score_s_per_image": score / n})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).groupby("method", as_index=False)[["explain_s_per_image", "score_s_per_image"]].mean()


def timing_figure(runs: list[Path], path: Path, colors: dict | None = None) -> Path | None:
    """Bars: wall-clock seconds per image to compute each method's maps (including compilation)
    and to score them, from the runs' recorded timings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = run_timings(runs)
    if t.empty:
        return None
    colors = colors or method_colors(t["method"])
    t = t.sort_values("explain_s_per_image")
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.26 * len(t) + 1.4), squeeze=False)
    _bars(axes[0, 0], list(t["method"]), list(t["explain_s_per_image"]), colors,
          "maps: s per image (incl. compilation)", log=True)
    if (t["score_s_per_image"] > 0).any():
        _bars(axes[0, 1], list(t["method"]), list(t["score_s_per_image"]), colors,
              "scoring: s per image (all protocols)", log=bool((t["score_s_per_image"] > 0).all()))
    else:
        axes[0, 1].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rank_agreement(lb: pd.DataFrame, min_methods: int = 3) -> pd.DataFrame:
    """Spearman correlation between the method rankings of every two ranked metrics (over the
    methods both rank, at least `min_methods`): 1 = the two metrics order the methods alike,
    -1 = in reverse. Ranks are already in each metric's direction."""
    r = _board(lb).dropna(subset=["rank"])
    if r.empty:
        return pd.DataFrame()
    wide = r.pivot_table(index="label", columns="column", values="rank", aggfunc="first")
    wide = wide[list(dict.fromkeys(c for c in r["column"] if c in wide.columns))]
    if wide.shape[1] < 2 or wide.shape[0] < min_methods:
        return pd.DataFrame()
    corr = wide.corr(method="spearman", min_periods=min_methods)
    keep = corr.notna().sum() > 1
    return corr.loc[keep, keep]


def rank_agreement_figure(lb: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corr = rank_agreement(lb)
    if corr.shape[0] < 2:
        return None
    n = corr.shape[0]
    fig, ax = plt.subplots(figsize=(2.2 + 0.5 * n, 1.2 + 0.45 * n))
    im = ax.imshow(corr.to_numpy(float), cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(n), [str(i + 1) for i in range(n)], fontsize=7)  # the metrics' numbers on the rows
    ax.set_yticks(range(n), [f"{c}  ({i + 1})" for i, c in enumerate(corr.index)], fontsize=7)
    ax.xaxis.tick_top()
    for i in range(n):
        for j in range(n):
            v = corr.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if abs(v) > 0.6 else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.04)
    cb.set_label("Spearman of the method ranks", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
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


MAP_KEYS = ("x", "y", "pred")


def merged_heatmaps(runs: list[Path], path: Path, colors: dict | None = None) -> Path | None:
    """One images x methods grid from the `maps.npz` of several runs (e.g. a sweep's jobs)."""
    x = y = pred = None
    maps: dict[str, np.ndarray] = {}
    for run in runs:
        f = Path(run) / "maps.npz"
        if not f.exists():
            continue
        d = np.load(f)
        if x is None:
            x, y = d["x"], d["y"]
            pred = d["pred"] if "pred" in d.files else None
        elif d["x"].shape != x.shape or not np.array_equal(d["x"], x):
            continue
        maps.update({k: d[k] for k in d.files if k not in MAP_KEYS})
    if x is None or not maps:
        return None
    maps = {k: maps[k] for k in sorted(maps, key=_family_key)}
    return heatmap_grid(x, maps, path, labels=y, predicted=pred, colors=colors)


def _rgb(img: np.ndarray) -> np.ndarray:
    """An image as RGB floats in [0, 1] (grey images repeated over the channels)."""
    img = np.clip(np.asarray(img, np.float32), 0, 1)
    if img.ndim == 2:
        img = img[..., None]
    return np.repeat(img[..., :1], 3, -1) if img.shape[-1] != 3 else img


def heatmap_grid(images: np.ndarray, maps: dict[str, np.ndarray], path: Path, labels=None, predicted=None,
                 colors: dict | None = None, per_block: int = 10, dpi: int = 100) -> Path:
    """Images (rows) x methods (columns): the input, then each method's channel-summed map. One
    colour scale per method (symmetric, +- its largest |value| over the images shown), drawn as a
    colour bar with its range under the method's column; rows labelled by the true and (when
    given) predicted class; at most `per_block` methods side by side, more in further blocks.
    Drawn as one mosaic image per block (fast for many methods), images larger than 64 pixels
    subsampled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = matplotlib.colormaps["bwr"]
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    step = max(1, int(np.ceil(max(h, w) / 64)))
    names = list(maps)
    colors = colors or method_colors(names)
    summed = {m: (np.asarray(maps[m]).sum(-1) if np.asarray(maps[m]).ndim == 4 else np.asarray(maps[m]))
              for m in names}
    scale = {m: float(np.nanmax(np.abs(summed[m]))) or 1.0 for m in names}
    h, w = -(-h // step), -(-w // step)
    pad, bar = max(1, h // 14), max(2, h // 7)
    blocks = [names[i:i + per_block] for i in range(0, len(names), per_block)] or [[]]
    cols = 1 + max(len(b) for b in blocks)
    cell_in = 0.95  # inches per image cell
    fig, axes = plt.subplots(len(blocks), 1, squeeze=False,
                             figsize=(cell_in * cols + 0.9, len(blocks) * (cell_in * (n + 0.35) + 0.45)))
    for ax, block in zip(axes[:, 0], blocks, strict=True):
        H = n * (h + pad) + 2 * pad + bar
        W = cols * (w + pad)  # every block as wide as the widest: the same cell size throughout
        mos = np.ones((H, W, 3), np.float32)
        for i in range(n):
            y0 = i * (h + pad)
            mos[y0:y0 + h, :w] = _rgb(images[i][::step, ::step])
            for j, m in enumerate(block):
                x0 = (j + 1) * (w + pad)
                v = summed[m][i][::step, ::step] / scale[m]
                mos[y0:y0 + h, x0:x0 + w] = cmap((np.nan_to_num(v) + 1) / 2)[..., :3]
            if labels is not None:
                lab = f"true {labels[i]}" + (f"\npred {predicted[i]}" if predicted is not None else "")
                ax.text(-pad, y0 + h / 2, lab, ha="right", va="center", fontsize=7.5)
        yb = n * (h + pad) + pad
        for j, m in enumerate(block):
            x0 = (j + 1) * (w + pad)
            mos[yb:yb + bar, x0:x0 + w] = cmap(np.linspace(0, 1, w))[None, :, :3]
            ax.text(x0 + w / 2, yb + bar + pad, f"±{scale[m]:.3g}", ha="center", va="top", fontsize=6.5)
            ax.text(x0 + w / 2, -pad, m if len(m) <= 16 else m[:15] + "…", ha="center", va="bottom", fontsize=7,
                    color=CONTROL_STYLE.get(m, (colors.get(m, "black"),))[0])
        ax.text(w / 2, -pad, "input", ha="center", va="bottom", fontsize=7)
        ax.imshow(mos, interpolation="nearest")
        ax.set_axis_off()
    fig.subplots_adjust(left=0.08, right=0.99, top=0.96, bottom=0.02, hspace=0.12)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


#: Where each protocol's metrics come from (for the glossary).
SOURCES = {
    "pixel_flipping": "Bach et al. 2015 (PLoS ONE); Samek et al. 2016 (IEEE TNNLS)",
    "region_perturbation": "Samek et al. 2016 (IEEE TNNLS), AOPC",
    "deletion": "Petsiuk, Das, Saenko 2018 (RISE, BMVC)",
    "insertion": "Petsiuk, Das, Saenko 2018 (RISE, BMVC)",
    "road": "Rong et al. 2022 (ROAD, ICML)",
    "selectivity": "Montavon, Samek, Mueller 2018 (Digital Signal Processing)",
    "selectivity_oneshot": "Montavon, Samek, Mueller 2018 (Digital Signal Processing)",
    "continuity": "Montavon, Samek, Mueller 2018 (Digital Signal Processing)",
    "roar": "Hooker, Erhan, Kindermans, Kim 2019 (NeurIPS)",
    "kar": "Hooker, Erhan, Kindermans, Kim 2019 (NeurIPS)",
    "roar_mask": "leak control of ROAR (Hooker et al. 2019): the mask alone",
    "kar_mask": "leak control of KAR (Hooker et al. 2019): the mask alone",
    "sanity_model_randomization": "Adebayo et al. 2018 (Sanity checks, NeurIPS)",
    "sanity_data_randomization": "Adebayo et al. 2018 (Sanity checks, NeurIPS)",
    "input_invariance": "Kindermans et al. 2017/2019 (The (un)reliability of saliency methods)",
    "faithfulness_correlation": "Bhatt, Weller, Moura 2020 (IJCAI)",
    "infidelity": "Yeh et al. 2019 (NeurIPS)",
    "avg_sensitivity": "Yeh et al. 2019 (NeurIPS)",
    "max_sensitivity": "Yeh et al. 2019 (NeurIPS)",
    "monotonicity": "Arya et al. 2019 (monotonic); Nguyen, Martinez 2020 (correlation)",
    "random_logit": "Sixt, Granz, Landgraf 2020 (ICML)",
    "complexity": "Bhatt, Weller, Moura 2020 (IJCAI), entropy",
    "sparseness": "Chalasani et al. 2020 (ICML), Gini index",
    "pointing_game": "Zhang et al. 2018 (IJCV)",
    "relevance_mass": "Arras, Osman, Samek 2022 (Information Fusion)",
    "relevance_rank": "Arras, Osman, Samek 2022 (Information Fusion)",
    "aupr": "ground-truth localization: AUPR / AUROC of relevance against the object mask",
    "bench": "attrax benchmark (`attrax bench`)",
}
#: The recorded protocol choices the glossary lists first (the ones papers disagree on).
KEY_CHOICES = ("score", "replacement", "baseline", "steps", "order", "patch", "fractions", "seeds", "modes",
               "metrics", "n_runs", "radius", "n_samples", "tie")


def _choices_text(choices_json: str) -> str:
    import json

    if not choices_json:
        return ""
    try:
        d = json.loads(choices_json)
    except ValueError:
        return choices_json
    keys = [k for k in KEY_CHOICES if k in d] + sorted(k for k in d if k not in KEY_CHOICES)
    short = lambda v: json.dumps(v) if not isinstance(v, str) else v  # noqa: E731
    return "; ".join(f"{k}={short(d[k])}" for k in keys)


def glossary(df: pd.DataFrame, lb: pd.DataFrame) -> pd.DataFrame:
    """One row per leaderboard column (protocol, its recorded choices, metric): direction, the
    metric's source paper, category, and what the rows record - x label, aggregation, protocol
    version, the protocol's choices - read from the rows (`leaderboard` ranks by the same)."""
    b = _board(lb)
    if b.empty:
        return pd.DataFrame()
    d = df.assign(protocol_choices=df["protocol_choices"] if "protocol_choices" in df else "")
    meta = d.groupby(["protocol", "protocol_choices"], dropna=False).agg(
        x_label=("x_label", lambda s: "; ".join(sorted({v for v in s if v}))) if "x_label" in d else ("value", "size"),
        aggregation=("aggregation", lambda s: "; ".join(sorted({v for v in s if v}))) if "aggregation" in d
        else ("value", "size"))
    rows = []
    for col in column_order(b):
        r = b[b["column"] == col].iloc[0]
        ch = r.get("protocol_choices", "") or ""
        m = meta.loc[(r["protocol"], ch)] if (r["protocol"], ch) in meta.index else {}
        hib = r["higher_is_better"]
        direction = "higher is better" if hib is True else "lower is better" if hib is False else "not ranked"
        legacy = not (d.loc[d["protocol"] == r["protocol"], "direction"] != "").any() if "direction" in d else True
        metric = str(r["metric"])
        rows.append({
            "column": col, "protocol": r["protocol"], "metric": metric, "category": metric_category(r["protocol"]),
            "direction": direction + (" (registry: rows predate recorded directions)" if legacy and hib is not None
                                      else ""),
            "source": SOURCES.get(r["protocol"], ""),
            "x_label": (m.get("x_label", "") if len(m) else "") or "",
            "aggregation": "; ".join(a for a in (
                (m.get("aggregation", "") if len(m) else "") or "",
                "ranked by the area under each curve (mean height)" if metric.endswith(AREA) else "") if a),
            "version": int(r["version"]) if int(r.get("version", -1)) >= 0 else "",
            "choices": _choices_text(ch) or ("not recorded (rows written before choices were recorded)"
                                             if legacy else "none"),
        })
    return pd.DataFrame(rows)


def _config_hash(cfg: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_command(run: Path, info: dict) -> str:
    """The command that reproduces a run: `attrax` + the overrides Hydra recorded for the job
    (`.hydra/overrides.yaml`), else a `command` recorded in run.json; "" if neither exists."""
    import shlex

    import yaml

    f = Path(run) / ".hydra" / "overrides.yaml"
    if f.is_file():
        try:
            ov = yaml.safe_load(f.read_text()) or []
            return " ".join(["attrax", *(shlex.quote(str(o)) for o in ov)])
        except (OSError, yaml.YAMLError):
            pass
    cmd = info.get("command")
    if isinstance(cmd, list):
        return " ".join(shlex.quote(str(c)) for c in cmd)
    return str(cmd or "")


def run_records(runs: list[Path], df: pd.DataFrame) -> list[dict[str, Any]]:
    """What each run was (for the page header): experiment, data set, model and its test accuracy,
    images, seeds, attrax version and commit, config hash, hardware, date, command - from its
    run.json and rows."""
    out = []
    for run in runs:
        try:
            info = results_store.run_info(run)
        except (OSError, ValueError):
            info = {}
        cfg = info.get("config") or {}
        rows = df[df["run_id"] == Path(run).name] if "run_id" in df else df.iloc[:0]
        first = lambda c, rows=rows: ", ".join(sorted({str(v) for v in rows[c] if str(v)})) if c in rows else ""  # noqa: E731
        name = lambda v: v.get("name") if isinstance(v, dict) else v  # noqa: E731
        acc = info.get("test_accuracy")
        if acc is None and len(rows):
            a = rows[(rows["protocol"] == "model") & (rows["metric"] == "test_accuracy")]["value"]
            acc = float(a.mean()) if len(a) else None
        n_img = cfg.get("n_images")
        if n_img is None and len(rows) and (rows["example"] >= 0).any():
            n_img = int(rows.loc[rows["example"] >= 0, "example"].nunique())
        seeds = sorted({int(s) for s in rows["seed"] if s >= 0}) if "seed" in rows else []
        mseeds = sorted({int(s) for s in rows["model_seed"] if s >= 0}) if "model_seed" in rows else []
        devices = ", ".join(info.get("devices") or [])
        hw = " ".join(p for p in (info.get("backend") or "", f"({devices})" if devices else "",
                                  info.get("platform") or "") if p)
        out.append({
            "run": str(run), "run_id": Path(run).name,
            "experiment": cfg.get("experiment_name") or first("experiment"),
            "dataset": str(name(cfg.get("dataset")) or first("dataset")),
            "model": str(name(cfg.get("model")) or first("model")),
            "test_accuracy": acc, "n_images": n_img,
            "seed": ", ".join(map(str, seeds)) or str(cfg.get("seed", "")),
            "model_seed": ", ".join(map(str, mseeds)) or str(cfg.get("model_seed", "")),
            "attrax": (info.get("versions") or {}).get("attrax") or "",
            "commit": (info.get("git_commit") or "")[:12],
            "config_hash": _config_hash(cfg) if cfg else "",
            "hardware": hw, "date": info.get("written", ""), "command": run_command(run, info),
        })
    return out


def _fmt_acc(a: Any) -> str:
    return f"{a:.4f}" if isinstance(a, int | float) and np.isfinite(a) else "-"


def header_fields(recs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(field, value) pairs of the page header: each field's distinct values over the runs."""
    def vals(f, fmt=str):
        v = list(dict.fromkeys(fmt(r[f]) for r in recs if r.get(f) not in (None, "")))
        return ", ".join(v) if v else "not recorded"

    def union(f):
        v = sorted({s.strip() for r in recs for s in str(r.get(f) or "").split(",") if s.strip()},
                   key=lambda s: (len(s), s))
        return ", ".join(v) if v else "not recorded"

    models = list(dict.fromkeys(f"{r['model']} (test accuracy {_fmt_acc(r['test_accuracy'])})" for r in recs
                                if r.get("model")))
    dates = sorted(r["date"] for r in recs if r.get("date"))
    return [
        ("experiment", vals("experiment")), ("data set", vals("dataset")),
        ("model", ", ".join(models) or "not recorded"), ("images", vals("n_images")),
        ("seeds (explanation / model)", f"{union('seed')} / {union('model_seed')}"),
        ("attrax", f"{vals('attrax')}, commit {vals('commit')}"), ("config hash", vals("config_hash")),
        ("hardware", vals("hardware")),
        ("date", (dates[0] if dates and dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates
         else "not recorded"),
        ("runs", str(len(recs))),
    ]


def split_why(numbers: str) -> tuple[str, str]:
    """(numbers, why) of a finding's text (findings.evaluate_finding appends the preset's reason)."""
    key = ". Why it differs: "
    if key in numbers:
        n, w = numbers.split(key, 1)
        return n, w
    return numbers, ""


def _embed(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    stem = Path(path).stem
    return f'<figure><img alt="{stem}" src="data:image/png;base64,{data}"/><figcaption>{stem}</figcaption></figure>'


def _md_table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False) if len(df) else ""


def markdown(recs, checks, lb, gl, st, flags, figs, df) -> str:
    """leaderboard.md: the page's content in GitHub-flavoured markdown."""
    from attrax import findings

    heads = pd.DataFrame(header_fields(recs), columns=["", "value"])
    runs = pd.DataFrame([{"run": r["run_id"], "experiment": r["experiment"], "data set": r["dataset"],
                          "model (test acc.)": f"{r['model']} ({_fmt_acc(r['test_accuracy'])})",
                          "images": r["n_images"], "seeds": r["seed"], "commit": r["commit"],
                          "config": r["config_hash"], "date": r["date"],
                          "command": f"`{r['command']}`" if r["command"] else "not recorded"} for r in recs])
    parts = ["# attrax leaderboard", "", f"{len(df)} rows from {df['run_id'].nunique()} runs.", "",
             "## What was run", "", _md_table(heads), "", _md_table(runs), "", "## Findings", "",
             findings.format(checks) if checks else "No paper preset with an expected finding in these results.", ""]
    if flags:
        parts += ["Warnings:", "", *(f"- {f}" for f in flags), ""]
    parts += ["## Leaderboard", "",
              "mean [95% bootstrap CI] (rank) per cell; arrows give each metric's better direction; "
              "(control) marks the controls (random relevance, Sobel edges): a method that does not beat "
              f"them on a metric tells nothing there. Mean rank: {AGG_DEFINITION}.", "", format_table(lb), ""]
    if len(gl):
        g = gl.copy()
        again = g.duplicated(["protocol", "choices"])  # a protocol setting's shared cells once
        for c in ("category", "source", "x_label", "version", "choices"):
            g[c] = g[c].astype(object).where(~again, "〃")
        parts += ["## Glossary", "", _md_table(g.drop(columns=["protocol", "metric"]).rename(columns={
            "column": "metric", "x_label": "x (curves)", "choices": "recorded choices"})), ""]
    if len(st):
        parts += ["## Model randomization", "",
                  "Spearman / Spearman-abs / SSIM / HOG vs the trained model's maps; lower = depends on the "
                  "weights; noise ceiling = the same method with two keys, nothing randomized.", "",
                  format_sanity_table(st), ""]
    if figs:
        parts += ["## Figures", "", *(f"![{p.stem}]({p.name})" for p in figs), ""]
    return "\n".join(parts)


def wide_csv(lb: pd.DataFrame) -> pd.DataFrame:
    """Methods x metrics for papers: per metric column its mean, CI and rank; the mean rank."""
    b = _board(lb)
    if b.empty:
        return pd.DataFrame()
    agg = aggregate_ranks(b)
    out = pd.DataFrame(index=agg.index)
    out["method"] = b.groupby("label")["method"].first().reindex(out.index)
    out["family"] = out["method"].map(method_family)
    out["mean_rank"] = agg["agg_rank"]
    for col in column_order(b):
        g = b[b["column"] == col].set_index("label")
        for k in ("mean", "ci_low", "ci_high", "rank"):
            out[f"{col} {k}"] = g[k].reindex(out.index)
    out = out.sort_values("mean_rank", kind="stable")
    out.index.name = "label"
    return out.reset_index()


#: Titles of the figures a run draws itself (embedded as they are by `build(figures="run")`).
RUN_FIGURES = {"deletion_curves.png": "Curves", "heatmaps.png": "Heatmaps", "retrain_curves.png": "ROAR / KAR"}


def build(paths: list[str], out: str | Path | None = None, *, quiet: bool = False,
          figures: bool | str = True) -> Path:
    """Aggregate results folders into leaderboard.md/.csv (and leaderboard_wide.csv) and a
    self-contained report.html: header, findings, sortable leaderboard, glossary, figures.

    `figures`: True draws every figure from the rows; "run" (the main job's own report, kept
    quick) embeds the figures the runs drew themselves; False: none."""
    from attrax import findings, report_page

    say = (lambda *a: None) if quiet else print
    df = results_store.load(*paths)
    runs = results_store.find_runs(paths)
    out = Path(out or (Path(paths[0]) / "report"))
    out.mkdir(parents=True, exist_ok=True)
    lb = leaderboard(df)
    lb["family"] = lb["method"].map(method_family)
    lb["category"] = lb["protocol"].map(metric_category)
    lb.to_csv(out / "leaderboard.csv", index=False)
    wide_csv(lb).to_csv(out / "leaderboard_wide.csv", index=False)
    specs = {}  # the finding each run was made with (its recorded config), not today's preset file
    for run in runs:
        try:
            rc = results_store.run_info(run).get("config") or {}
        except (OSError, ValueError):
            continue
        if rc.get("finding") and rc.get("experiment_name"):
            specs.setdefault(rc["experiment_name"], rc["finding"])
    checks = findings.check(df, specs)
    flags = sorted({f for f in df["flag"] if f})  # e.g. a permuted-label model that did not fit
    st = sanity_table(df)
    recs = run_records(runs, df)
    gl = glossary(df, lb)
    figs: list[tuple[str, Path, str]] = []  # (title, file, caption)
    if figures == "run":
        for run in runs:
            for png in sorted(Path(run).glob("*.png")):
                if png.name != "report.png":
                    figs.append((RUN_FIGURES.get(png.name, png.stem), png,
                                 f"drawn by run {Path(run).name}; `attrax report` draws the full set"))
    elif figures:
        colors = method_colors(set(df["method"]))
        cur = df[df["x"].notna()]
        retrain = cur["protocol"].isin(RETRAIN) | (cur["aggregation"] == "mean_over_seeds")
        sanity = cur["protocol"] == SANITY
        casc = sanity & cur["metric"].str.startswith("cascading_")
        shown = [m for m in ("cascading_spearman_abs", "cascading_ssim") if m in set(cur.loc[casc, "metric"])]
        casc = casc & cur["metric"].isin(shown or sorted(set(cur.loc[casc, "metric"]))[:2])  # all: the table
        specs_fig = [
            ("Curves", lambda p: curve_figure(cur[~retrain & ~sanity], p, colors=colors), "curves.png",
             "Mean curve over the images per method, shaded: 95% band (mean +- 1.96 standard errors). One row "
             "per curve, one panel per method family; the random control (black, dashed) and the Sobel edge "
             "control (grey, dotted) are drawn in every panel."),
            ("Sanity checks: cascading model randomization", lambda p: curve_figure(
                cur[casc], p, colors=colors, xlabel="layers re-initialized, from the logits down"), "sanity.png",
             "Similarity of each method's maps to the trained model's maps as more layers are re-initialized "
             "(Adebayo et al. 2018): Spearman of the absolute maps and SSIM (every similarity: the summary table "
             "below). Falling to 0 = the maps depend on the learned weights (passes)."),
            ("ROAR / KAR", lambda p: curve_figure(cur[retrain], p, colors=colors), "roar_kar.png",
             "Test accuracy of models retrained on images with a fraction of the inputs replaced (ROAR: the "
             "most relevant removed, lower = better; KAR: the most relevant kept, higher = better); shaded: "
             "95% band over the retraining seeds."),
            ("Heatmaps", lambda p: merged_heatmaps(runs, p, colors=colors), "heatmaps.png",
             "Channel-summed maps of the same test images (rows: true / predicted class) for every method "
             "(columns). Each method has its own symmetric colour scale, +- its largest |value| over these "
             "images, shown by the colour bar under its column (red positive, blue negative)."),
            ("Rank agreement between metrics", lambda p: rank_agreement_figure(lb, p), "rank_agreement.png",
             "Spearman correlation of the method rankings of every two ranked metrics (over the methods both "
             "rank, at least 3). 1: the metrics order the methods alike; 0: unrelated; -1: reversed."),
            ("Benchmark speed", lambda p: bench_figure(df, p, colors=colors), "bench.png",
             "attrax bench: images per second (log scale), bound ratio and speed-up over the PyTorch bar "
             "(red line: 1.5)."),
            ("Run time per method", lambda p: timing_figure(runs, p, colors=colors), "timings.png",
             "Wall-clock seconds per image recorded by the runs: computing the maps (including compilation) "
             "and scoring them with every protocol."),
        ]
        for title, make, name, caption in specs_fig:
            p = make(out / name)
            if p:
                figs.append((title, Path(p), caption))
        seen = {p.name for _, p, _ in figs}
        for run in runs:
            for png in sorted(Path(run).glob("*.png")):
                if png.name not in ("deletion_curves.png", "heatmaps.png", "retrain_curves.png") \
                        and png.name not in seen and png.name != "report.png":
                    figs.append((png.stem, png, f"from run {Path(run).name}"))
                    seen.add(png.name)
    (out / "leaderboard.md").write_text(markdown(recs, checks, lb, gl, st, flags, [p for _, p, _ in figs], df))
    html = report_page.render(recs=recs, checks=checks, lb=lb, glossary=gl, sanity=st, flags=flags, figs=figs,
                              n_rows=len(df))
    (out / "report.html").write_text(html)
    if not quiet:
        print(format_table(lb))
        for f in flags:
            print(f"warning: {f}")
        if checks:
            print()
            print(findings.format(checks))
    say(f"\nwrote {out / 'leaderboard.md'}, {out / 'leaderboard.csv'}, {out / 'report.html'}")
    return out
