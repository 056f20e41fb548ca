"""Expected findings of the paper presets (PROTOCOLS.md), checked on a results table.

Each check looks at the rows of one experiment and returns "agrees", "differs" or "n/a" (when
the methods or metrics it needs are missing) together with the numbers it compared, so a report
states plainly whether a small-scale reproduction shows the published ordering.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

LRP_LIKE = ("lrp_epsilon", "lrp_alpha2beta1", "lrp_alpha1beta0", "lrp_epsilon_plus", "lrp", "deep_taylor",
            "lrp_0", "lrp_epsilon_plus_flat", "lrp_zplus", "lrp_gamma")


def _means(df: pd.DataFrame, protocol: str, metric: str) -> dict[str, float]:
    sub = df[(df["protocol"] == protocol) & (df["metric"] == metric) & df["x"].isna() & (df["example"] >= 0)]
    return sub.groupby("method")["value"].mean().to_dict()


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(d.items(), key=lambda kv: kv[1]))


def _best(m: dict[str, float], names, higher: bool) -> tuple[str, float] | None:
    have = {k: m[k] for k in names if k in m}
    if not have:
        return None
    k = max(have, key=have.get) if higher else min(have, key=have.get)
    return k, have[k]


def _chain(m: dict[str, float], groups: list[tuple[str, tuple[str, ...]]], higher: bool) -> tuple[str, str]:
    """Each group's best member must beat the next group's best member."""
    picks = [(label, _best(m, names, higher)) for label, names in groups]
    picks = [(label, p) for label, p in picks if p is not None]
    if len(picks) < 2:
        return "n/a", "methods missing"
    ok = all((a[1][1] > b[1][1]) if higher else (a[1][1] < b[1][1]) for a, b in zip(picks, picks[1:], strict=False))
    sign = " > " if higher else " < "
    return ("agrees" if ok else "differs"), sign.join(f"{lab} ({p[0]} {p[1]:.4g})" for lab, p in picks)


def samek2016(df):
    m = _means(df, "region_perturbation", "aopc")
    v, nums = _chain(m, [("LRP", LRP_LIKE), ("deconvnet", ("deconvnet",)), ("sensitivity", ("gradient",)),
                         ("random", ("random",))], higher=True)
    return "AOPC: LRP > deconvnet > sensitivity > random (Samek 2016)", v, nums


def montavon_selectivity(df):
    m = _means(df, "selectivity", "auc")
    v, nums = _chain(m, [("deep Taylor/LRP", ("deep_taylor", "lrp_alpha1beta0")), ("sensitivity", ("gradient",))],
                     higher=False)
    return "selectivity AUC: deep Taylor/LRP below sensitivity (Montavon 2018)", v, nums


def montavon_continuity(df):
    m = _means(df, "continuity", "max_ratio")
    v, nums = _chain(m, [("deep Taylor", ("deep_taylor",)),
                         ("gradient / simple Taylor", ("gradient", "input_x_gradient"))],
                     higher=False)
    return "continuity: deep Taylor's max neighbour ratio below gradient/simple Taylor (Montavon 2018)", v, nums


def kindermans2017(df):
    m = _means(df, "input_invariance", "passed")
    should_pass = ("gradient", "smoothgrad", "deconvnet", "guided_backprop", "pattern_net", "pattern_attribution")
    should_fail = ("input_x_gradient", "lrp_epsilon", "lrp_0", "integrated_gradients", "deep_taylor")
    seen = {k: v for k, v in m.items() if k in should_pass + should_fail}
    if not seen:
        return "input invariance (Kindermans 2017)", "n/a", "methods missing"
    wrong = [k for k in seen if (k in should_pass) != (seen[k] >= 0.5)]
    nums = "pass rate: " + _fmt(seen)
    if wrong:
        nums += f"; unexpected: {', '.join(wrong)}"
    return ("input invariance: gradient/SmoothGrad/deconvnet/guided BP/Pattern* pass, IxG/LRP/IG/deep Taylor fail "
            "(Kindermans 2017)"), ("agrees" if not wrong else "differs"), nums


def adebayo2018(df):
    sub = df[(df["protocol"] == "sanity_model_randomization") & (df["metric"] == "cascading_spearman_abs")]
    if sub.empty:
        return "model randomization (Adebayo 2018)", "n/a", "no cascading_spearman_abs rows"
    last = sub[sub["x"] == sub["x"].max()].groupby("method")["value"].mean().to_dict()
    first = sub[sub["x"] == sub["x"].min()].groupby("method")["value"].mean().to_dict()
    passers = [k for k in ("gradient", "grad_cam") if k in first]
    failers = [k for k in ("guided_backprop", "guided_grad_cam") if k in first]
    if not passers or not failers:
        return "model randomization (Adebayo 2018)", "n/a", "methods missing"
    ok = max(first[k] for k in passers) < min(first[k] for k in failers)
    nums = f"similarity after the top layer: {_fmt({k: first[k] for k in passers + failers})}; all layers: {_fmt(last)}"
    return ("model randomization: gradient/Grad-CAM lose similarity faster than guided BP/guided Grad-CAM "
            "(Adebayo 2018)"), ("agrees" if ok else "differs"), nums


def hooker2019(df):
    sub = df[(df["protocol"] == "roar") & (df["metric"] == "test_accuracy")]
    if sub.empty:
        return "ROAR (Hooker 2019)", "n/a", "no roar rows"
    hi = sub[sub["x"] == sub["x"].max()].groupby("method")["value"].mean().to_dict()
    if "random" not in hi:
        return "ROAR (Hooker 2019)", "n/a", "random control missing"
    beat = [k for k in ("smoothgrad_sq", "vargrad") if k in hi]
    plain = [k for k in ("gradient", "integrated_gradients", "guided_backprop") if k in hi]
    margin = 0.01
    ok = all(hi[k] < hi["random"] - margin for k in beat) and all(hi[k] >= hi["random"] - margin for k in plain)
    return ("ROAR: SmoothGrad^2 and VarGrad degrade accuracy more than random; gradient, IG, guided BP do not "
            "(Hooker 2019)"), ("agrees" if ok else "differs") if beat or plain else "n/a", \
        f"accuracy at fraction {sub['x'].max():g}: {_fmt(hi)}"


def petsiuk2018(df):
    d, i = _means(df, "deletion", "auc"), _means(df, "insertion", "auc")
    if not all(k in d and k in i for k in ("rise", "grad_cam")):
        return "deletion/insertion (Petsiuk 2018)", "n/a", "rise or grad_cam missing"
    ok = d["rise"] < d["grad_cam"] and i["rise"] > i["grad_cam"]
    return ("deletion/insertion: RISE has lower deletion and higher insertion AUC than Grad-CAM (Petsiuk 2018)",
            "agrees" if ok else "differs",
            f"deletion AUC rise {d['rise']:.4g} vs grad_cam {d['grad_cam']:.4g}; "
            f"insertion AUC rise {i['rise']:.4g} vs grad_cam {i['grad_cam']:.4g}")


CHECKS: dict[str, Callable[[pd.DataFrame], tuple[str, str, str]]] = {
    "samek2016_aopc": samek2016,
    "montavon2018_selectivity": montavon_selectivity,
    "montavon2018_continuity": montavon_continuity,
    "kindermans2017_invariance": kindermans2017,
    "adebayo2018_sanity": adebayo2018,
    "hooker2019_roar": hooker2019,
    "petsiuk2018_deletion_insertion": petsiuk2018,
}


def check(df: pd.DataFrame) -> list[dict[str, str]]:
    """Run the check of every preset present in the table (by its `experiment` column)."""
    out = []
    for exp in sorted(df["experiment"].dropna().unique()):
        if exp in CHECKS:
            claim, verdict, numbers = CHECKS[exp](df[df["experiment"] == exp])
            out.append({"experiment": exp, "claim": claim, "verdict": verdict, "numbers": numbers})
    return out


def format(checks: list[dict[str, str]]) -> str:  # noqa: A001 - mirrors report.format_table
    return "\n".join(f"- {c['experiment']}: **{c['verdict']}** - {c['claim']}. {c['numbers']}" for c in checks)


__all__ = ["CHECKS", "check", "format", "np"]
