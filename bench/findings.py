"""Expected findings of the paper presets (PROTOCOLS.md), checked on a results table.

What each preset's check compares is written in the preset itself (`conf/experiment/<name>.yaml`,
key `finding`), not here, so the comparison a verdict rests on is visible beside the command:

    finding:
      claim: "AOPC: LRP > deconvnet > sensitivity > random (Samek 2016)"
      compare:                      # every comparison must hold
        - protocol: region_perturbation
          metric: aopc
          better: higher            # higher | lower
          chain: [lrp_epsilon, deconvnet, gradient, random]
      why_differs: "..."            # optional: what is known about a differing result

A `chain` is an ordered list of methods (the `method` column of the rows) or groups of methods
(`[a, b]`): every method of a group must beat every method of the next group (optionally by
`margin`). `x: min | max` picks the rows at the smallest / largest x (a layer, a fraction) instead
of the scalar rows. Instead of a chain, `at_least: v` / `below: v` with `methods: [...]` require
each method's mean to lie on that side of v (methods without rows are listed as not run). A check
returns "agrees", "differs" or "n/a" (a method it names has no rows), with the numbers it compared
and, when it differs, the preset's `why_differs`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import pandas as pd
import yaml

CONF_MODULE = "attrax.conf"


def preset_finding(experiment: str) -> dict | None:
    """The `finding` block of the shipped preset `conf/experiment/<experiment>.yaml`, or None."""
    f = resources.files(CONF_MODULE) / "experiment" / f"{experiment}.yaml"
    if not f.is_file():
        return None
    spec = (yaml.safe_load(f.read_text()) or {}).get("finding")
    return spec or None


def _means(df: pd.DataFrame, c: dict) -> dict[str, float]:
    sub = df[(df["protocol"] == c["protocol"]) & (df["metric"] == c["metric"])]
    if (sub["example"] >= 0).any():  # per-example rows where there are; else the aggregates (ROAR/KAR)
        sub = sub[sub["example"] >= 0]
    where = c.get("x")
    if where is None:
        sub = sub[sub["x"].isna()]
    else:
        sub = sub[sub["x"].notna()]
        if not sub.empty:
            sub = sub[sub["x"] == (sub["x"].min() if where == "min" else sub["x"].max())]
    return sub.groupby("method")["value"].mean().to_dict()


def _groups(chain: list) -> list[list[str]]:
    return [list(g) if isinstance(g, list | tuple) else [g] for g in chain]


def _compare(df: pd.DataFrame, c: dict) -> tuple[str, str]:
    """(verdict, numbers) of one comparison of a finding."""
    m = _means(df, c)
    higher = c.get("better", "higher") == "higher"
    label = f"{c['protocol']} {c['metric']}" + (f" at x={c['x']}" if c.get("x") else "")
    if "chain" in c:
        groups = _groups(c["chain"])
        names = [n for g in groups for n in g]
    else:
        names = list(c["methods"])
    missing = [n for n in names if n not in m]
    if "chain" not in c:  # a per-method property: methods without rows are listed, not compared
        names = [n for n in names if n in m]
    if missing and ("chain" in c or not names):
        return "n/a", f"{label}: no rows for {', '.join(missing)}"
    fmt = lambda n: f"{n} {m[n]:.4g}"  # noqa: E731
    if "chain" not in c:
        if "at_least" in c:
            bound, ok = c["at_least"], [m[n] >= c["at_least"] for n in names]
            side = ">="
        else:
            bound, ok = c["below"], [m[n] < c["below"] for n in names]
            side = "<"
        wrong = [n for n, o in zip(names, ok, strict=True) if not o]
        text = f"{label} {side} {bound:g}: " + ", ".join(fmt(n) for n in names)
        if wrong:
            text += f" (not {side} {bound:g}: {', '.join(wrong)})"
        if missing:
            text += f" (not run: {', '.join(missing)})"
        return ("differs" if wrong else "agrees"), text
    margin = float(c.get("margin", 0.0))
    sign = " > " if higher else " < "
    links, ok = [], True
    for a, b in zip(groups, groups[1:], strict=False):
        worst_a = min(m[n] for n in a) if higher else max(m[n] for n in a)
        best_b = max(m[n] for n in b) if higher else min(m[n] for n in b)
        holds = (worst_a - best_b > margin) if higher else (best_b - worst_a > margin)
        ok &= holds
        links.append(f"{'/'.join(fmt(n) for n in a)}{sign}{'/'.join(fmt(n) for n in b)}"
                     f" ({'holds' if holds else 'fails'})")
    better = "higher" if higher else "lower"
    extra = f", margin {margin:g}" if margin else ""
    return ("agrees" if ok else "differs"), f"{label} ({better} is better{extra}): " + "; ".join(links)


def evaluate_finding(df: pd.DataFrame, spec: dict) -> tuple[str, str, str]:
    """(claim, verdict, numbers) of a preset's finding on that preset's rows."""
    parts = [_compare(df, c) for c in spec["compare"]]
    verdicts = {v for v, _ in parts}
    verdict = "n/a" if "n/a" in verdicts else ("differs" if "differs" in verdicts else "agrees")
    numbers = "; ".join(n for _, n in parts)
    if verdict == "differs" and spec.get("why_differs"):
        numbers += f". Why it differs: {spec['why_differs'].strip()}"
    return spec["claim"], verdict, numbers


def check(df: pd.DataFrame, specs: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Run the finding of every preset present in the table (by its `experiment` column).

    `specs` maps experiment names to `finding` blocks (e.g. from the runs' recorded configs); by
    default each is read from the shipped preset of that name.
    """
    out = []
    for exp in sorted(df["experiment"].dropna().unique()):
        spec = (specs or {}).get(exp) or preset_finding(exp)
        if spec:
            claim, verdict, numbers = evaluate_finding(df[df["experiment"] == exp], spec)
            out.append({"experiment": exp, "claim": claim, "verdict": verdict, "numbers": numbers})
    return out


def format(checks: list[dict[str, str]]) -> str:  # noqa: A001 - mirrors report.format_table
    return "\n".join(f"- {c['experiment']}: **{c['verdict']}** - {c['claim']}. {c['numbers']}" for c in checks)


__all__ = ["check", "evaluate_finding", "format", "preset_finding"]
