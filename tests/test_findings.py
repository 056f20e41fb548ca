"""Expected findings: the chain each preset's check compares is written in the preset
(conf/experiment/*.yaml), names only methods that preset runs, and is applied as written."""

from __future__ import annotations

from importlib import resources

import pandas as pd
import pytest
import yaml

from attrax import findings


def _rows(exp, proto, metric, vals, x=float("nan")):
    return pd.DataFrame([{"experiment": exp, "protocol": proto, "metric": metric, "method": m, "value": v,
                          "x": x, "example": i} for m, vs in vals.items() for i, v in enumerate(vs)])


def test_samek_chain_is_the_presets_not_the_best_lrp_variant():
    # LRP-epsilon (the preset's LRP) below deconvnet: another LRP variant above it must not rescue it
    df = _rows("samek2016_aopc", "region_perturbation", "aopc",
               {"lrp_epsilon": [1.0, 1.0], "deep_taylor": [9.0, 9.0], "lrp_alpha2beta1": [8.0, 8.0],
                "deconvnet": [3.0, 3.0], "gradient": [2.0, 2.0], "random": [0.0, 0.0]})
    c = findings.check(df)[0]
    assert c["verdict"] == "differs"
    assert "lrp_epsilon 1 > deconvnet 3 (fails)" in c["numbers"] and "deep_taylor" not in c["numbers"]
    assert "Why it differs" in c["numbers"]  # the preset's explanation travels with the verdict
    good = df.assign(value=df["method"].map({"lrp_epsilon": 4.0, "deep_taylor": 0.0, "lrp_alpha2beta1": 0.0,
                                             "deconvnet": 3.0, "gradient": 2.0, "random": 0.0}))
    c = findings.check(good)[0]
    assert c["verdict"] == "agrees" and "Why" not in c["numbers"]


def test_groups_margins_and_x_selection():
    spec = {"claim": "c", "compare": [{"protocol": "p", "metric": "m", "better": "lower", "x": "max",
                                       "margin": 0.1, "chain": [["a", "b"], "r"]}]}
    df = pd.concat([_rows("e", "p", "m", {"a": [0.5], "b": [0.6], "r": [0.75]}, x=0.9),
                    _rows("e", "p", "m", {"a": [9.0], "b": [9.0], "r": [0.0]}, x=0.1)])
    assert findings.evaluate_finding(df, spec)[1] == "agrees"  # at x=0.9: 0.6 < 0.75 - 0.1
    spec["compare"][0]["margin"] = 0.2
    assert findings.evaluate_finding(df, spec)[1] == "differs"
    spec["compare"][0]["chain"] = [["a", "zz"], "r"]
    assert findings.evaluate_finding(df, spec)[1] == "n/a"


def _presets():
    root = resources.files("attrax.conf") / "experiment"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("preset", [p for p in _presets() if findings.preset_finding(p)])
def test_every_finding_names_only_methods_its_preset_runs(preset):
    conf = resources.files("attrax.conf")
    exp = yaml.safe_load((conf / "experiment" / f"{preset}.yaml").read_text())
    sets = [d["override /methods"] for d in exp["defaults"] if isinstance(d, dict) and "override /methods" in d]
    methods = set(yaml.safe_load((conf / "methods" / f"{sets[0]}.yaml").read_text()))
    methods |= set(exp.get("controls", yaml.safe_load((conf / "config.yaml").read_text())["controls"]))
    spec = exp["finding"]
    assert spec["claim"] and spec["compare"]
    for c in spec["compare"]:
        names = [n for g in c.get("chain", []) for n in (g if isinstance(g, list) else [g])] + c.get("methods", [])
        assert names and set(names) <= methods, (preset, set(names) - methods)


def test_reproduction_script_is_folded_into_presets():
    assert "samek2016_pixel_flipping" in _presets()
    assert not (resources.files("attrax.protocols") / "_reproduce.py").is_file()


def test_report_checks_the_finding_recorded_with_the_run(tmp_path):
    """A report of old results uses the chain the run was made with (its run.json), not today's preset."""
    from attrax import report, results

    df = _rows("samek2016_aopc", "region_perturbation", "aopc",
               {"lrp_epsilon": [1.0, 1.0], "deconvnet": [3.0, 3.0], "gradient": [2.0, 2.0], "random": [0.0, 0.0]})
    df = df.assign(run_id="r", dataset="d", model="m", model_seed=0, method_hparams="{}", seed=0)
    recorded = {"claim": "recorded claim: deconvnet > lrp_epsilon",
                "compare": [{"protocol": "region_perturbation", "metric": "aopc", "better": "higher",
                             "chain": ["deconvnet", "lrp_epsilon"]}]}
    results.write_run(tmp_path / "run", df, {"experiment_name": "samek2016_aopc", "finding": recorded}, {})
    out = report.build([str(tmp_path / "run")], tmp_path / "report")
    md = (out / "leaderboard.md").read_text()
    assert "recorded claim" in md and "agrees" in md


def test_retraining_findings_read_their_aggregate_rows():
    """ROAR/KAR rows are aggregates (example -1): the check must see them, not report 'no rows'."""
    accs = {"smoothgrad_sq": .75, "vargrad": .76, "random": .50, "gradient": .27,
            "integrated_gradients": .15, "guided_backprop": .62}
    df = pd.DataFrame([{"experiment": "hooker2019_roar", "protocol": "roar", "metric": "test_accuracy",
                        "method": m, "value": v, "x": 0.9, "example": -1} for m, v in accs.items()])
    c = findings.check(df)[0]
    assert c["verdict"] == "differs" and "no rows" not in c["numbers"]
