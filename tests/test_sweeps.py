"""Harness: multirun sweeps, resume, the report and its self-contained HTML, paper presets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from incli import run_cli as _cli  # `attrax ...` in this process

from attrax import findings, results

TINY = ["model=cnn_a", "train=fast", "train_per_class=100", "n_images=10", "progress=false", "figures=true"]


@pytest.mark.xdist_group("cli_cnn_a")  # one worker trains the TINY model once (tests/conftest.py)
def test_multirun_report_and_resume(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "method=gradient,integrated_gradients", f"hydra.sweep.dir={sweep}"]
    p = _cli(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit())
    assert len(jobs) == 2 and all(results.is_complete(j) for j in jobs)
    # the callback aggregated the sweep into one report
    lb = pd.read_csv(sweep / "report" / "leaderboard.csv")
    assert {"gradient", "integrated_gradients", "random"} <= set(lb["method"])
    assert set(lb["protocol"]) == {"pixel_flipping"}
    html = (sweep / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 3  # curves, ranks, heatmaps
    assert "src=\"http" not in html and "href=\"http" not in html and "<script src" not in html
    # resume, one relaunch into the same sweep folder: the finished job is skipped (its rows are not
    # rewritten) and a job interrupted before run.json was written is recomputed, not read as complete
    mtime = (jobs[0] / "rows.parquet").stat().st_mtime_ns
    (jobs[1] / "run.json").unlink()
    p2 = _cli(args, tmp_path)
    assert p2.returncode == 0 and p2.stdout.count("already complete") == 1
    assert (jobs[0] / "rows.parquet").stat().st_mtime_ns == mtime
    assert results.is_complete(jobs[1])


def test_report_refuses_partial_results(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "rows.parquet").write_bytes(b"PAR1 truncated")
    p = _cli(["report", str(tmp_path)], tmp_path)
    assert p.returncode == 2 and "unfinished" in p.stderr and "Traceback" not in p.stderr


def test_findings_verdicts():
    def rows(exp, proto, metric, vals):
        return pd.DataFrame([{"experiment": exp, "protocol": proto, "metric": metric, "method": m, "value": v,
                              "x": float("nan"), "example": i} for m, vs in vals.items() for i, v in enumerate(vs)])

    good = rows("samek2016_aopc", "region_perturbation", "aopc",
                {"lrp_epsilon": [3, 3], "deconvnet": [2, 2], "gradient": [1, 1], "random": [0, 0]})
    bad = rows("samek2016_aopc", "region_perturbation", "aopc",
               {"lrp_epsilon": [0, 0], "deconvnet": [2, 2], "gradient": [1, 1], "random": [0.5, 0.5]})
    assert findings.check(good)[0]["verdict"] == "agrees"
    assert findings.check(bad)[0]["verdict"] == "differs"
    inv = rows("kindermans2017_invariance", "input_invariance", "passed",
               {"gradient": [1, 1], "input_x_gradient": [0, 0]})
    assert findings.check(inv)[0]["verdict"] == "agrees"
    missing = rows("petsiuk2018_deletion_insertion", "deletion", "auc", {"rise": [1.0]})
    assert findings.check(missing)[0]["verdict"] == "n/a"


@pytest.mark.xdist_group("cli_cnn_a")
@pytest.mark.parametrize("preset", ["kindermans2017_invariance", "petsiuk2018_deletion_insertion"])
def test_preset_runs_small(tmp_path, preset):
    # figures=false: the main job's figures are checked in test_multirun_report_and_resume and
    # tests/test_foundation.py's test_cli_end_to_end (~1.5 s of drawing per run here)
    if preset == "kindermans2017_invariance":
        # the preset's own model (the MLP, whose twin is exact) with two of its methods: gradient
        # passes input invariance and input x gradient fails, so the finding must agree
        drop = ["smoothgrad", "deconvnet", "guided_backprop", "pattern_net", "pattern_attribution", "lrp_epsilon",
                "integrated_gradients", "deep_taylor"]
        args = ["train=fast", "train_per_class=100", "n_images=10", "progress=false", *(f"~methods.{m}" for m in drop)]
        expect = "expected finding agrees"
    else:
        args = [*TINY, "methods.rise.n_masks=100"]
        expect = "expected finding"
    p = _cli([f"experiment={preset}", *args, "figures=false", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert expect in p.stdout, p.stdout[-3000:]
    df = results.load(tmp_path / "run")
    assert set(df["experiment"]) == {preset}
    if preset == "kindermans2017_invariance":
        assert set(df["method"]) - {""} == {"gradient", "input_x_gradient"} and set(df["model"]) == {"mlp"}


def test_paper_scale_is_one_override():
    from hydra import compose, initialize_config_module

    import attrax  # noqa: F401 - registers the by_scale resolver

    with initialize_config_module(config_module="attrax.conf", version_base="1.3"):
        small = compose(config_name="config", overrides=["experiment=samek2016_aopc"])
        paper = compose(config_name="config", overrides=["experiment=samek2016_aopc", "scale=paper"])
    assert small.n_images < paper.n_images == 1000


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="attrax.conf", version_base="1.3"):
        for launcher, target in (("local_parallel", "joblib"), ("slurm", "submitit")):
            cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert target in cfg.hydra.launcher._target_.lower()


def test_methods_all_names_every_registered_method():
    # (every method set's names and hyperparameters: test_foundation's config test)
    from hydra import compose, initialize_config_module

    import attrax

    with initialize_config_module(config_module="attrax.conf", version_base="1.3"):
        allm = set(compose(config_name="config", overrides=["methods=all"]).methods)
    assert set(attrax.methods.names()) <= allm, set(attrax.methods.names()) - allm


def test_reference_report_is_committed():
    root = Path(__file__).resolve().parents[1]
    ref = root / "results" / "reference"
    assert (ref / "leaderboard.md").exists() and (ref / "report.html").exists()
    assert "results/reference" in (root / "README.md").read_text()


def test_main_job_activation_maximization(tmp_path):
    from attrax import main  # the job in this process (the CLI around it: tests/test_foundation.py)

    args = ["model=mlp", "train=fast", "n_images=10", "method=gradient", "progress=false", "figures=false",
            "activation_maximization.enabled=true", "activation_maximization.steps=20",
            "activation_maximization.decoder_steps=20", "activation_maximization.code_steps=20"]
    main.run(main.compose(args), tmp_path / "run", log=lambda *a: None)
    assert (tmp_path / "run" / "am_image.png").exists() and (tmp_path / "run" / "am_code.png").exists()
    df = results.load(tmp_path / "run")
    am = df[df["method"].isin(["activation_maximization", "activation_maximization_code"])]
    assert {"logit", "probability", "distance_to_mean"} <= set(am["metric"])
    assert set(am["example"]) == set(range(10))


def test_report_plots_benchmark_table(tmp_path):
    from attrax import report

    rows = pd.DataFrame([{"run_id": "b", "experiment": "bench/method", "method": m, "protocol": "bench",
                          "metric": met, "x": float("nan"), "value": v, "example": -1}
                         for m, base in (("gradient", 4000.0), ("integrated_gradients", 90.0))
                         for met, v in (("images_per_s", base), ("bound_ratio", 0.8), ("speedup_vs_bar", 2.0))])
    results.write_run(tmp_path / "bench", rows, {}, {})
    out = report.build([str(tmp_path / "bench")], tmp_path / "rep")
    assert (out / "bench.png").exists()
    assert 'alt="bench" src="data:image/png;base64,' in (out / "report.html").read_text()
    lb = pd.read_csv(out / "leaderboard.csv")
    assert set(lb["metric"]) == {"images_per_s", "bound_ratio", "speedup_vs_bar"}
