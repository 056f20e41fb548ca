"""The report page (`attrax report`): header, findings, one sortable leaderboard whose numbers are
the tidy rows', a glossary read from the rows, figures; rendered in a real headless browser.

The results are synthesized tidy rows (two run folders: per-image metrics with curves and maps,
and ROAR/KAR retraining curves over seeds), so no model is trained here.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attrax import report, results

#: method -> quality in [0, 1] (higher: better on the faithfulness metrics)
QUALITY = {"lrp_epsilon": 0.9, "integrated_gradients": 0.75, "gradient": 0.6, "guided_backprop": 0.5,
           "grad_cam": 0.45, "occlusion": 0.4, "smoothgrad": 0.3, "sobel": 0.2, "random": 0.1}
N = 6  # images
WHY = "toy data: the sensitivity map wins on purpose"
FINDING_DIFFERS = {"claim": "AOPC: gradient > lrp_epsilon (toy claim)", "why_differs": WHY,
                   "compare": [{"protocol": "pixel_flipping", "metric": "aopc", "better": "higher",
                                "chain": ["gradient", "lrp_epsilon"]}]}
FINDING_AGREES = {"claim": "ROAR: lrp_epsilon degrades accuracy more than random (toy claim)",
                  "compare": [{"protocol": "roar", "metric": "test_accuracy", "x": "max", "better": "lower",
                               "chain": ["lrp_epsilon", "random"]}]}
PF_CHOICES = {"steps": 5, "order": "morf", "replacement": "zero", "score": "logit"}


def _ids(run_id, exp, method):
    return {"run_id": run_id, "experiment": exp, "dataset": "toy_digits", "model": "tiny_cnn", "model_seed": 0,
            "method": method, "method_hparams": "{}", "seed": 0}


def _per_image_rows(run_id: str, rng) -> pd.DataFrame:
    frames = []
    xs = np.linspace(0, 1, 6)
    for m, q in QUALITY.items():
        ids = _ids(run_id, "toy_preset", m)
        ex = np.arange(N)
        pf = pd.DataFrame({"metric": "auc", "x": np.nan, "value": 1 - q + rng.normal(0, .05, N), "example": ex})
        ao = pd.DataFrame({"metric": "aopc", "x": np.nan, "value": q + rng.normal(0, .05, N), "example": ex})
        cur = pd.DataFrame({"metric": "curve", "x": np.tile(xs, N),
                            "value": np.exp(-np.tile(xs, N) * (1 + 3 * q)) + rng.normal(0, .02, N * len(xs)),
                            "example": np.repeat(ex, len(xs))})
        pf = results.with_metadata(pd.concat([pf, ao, cur]).assign(protocol="pixel_flipping", **ids),
                                   "pixel_flipping", PF_CHOICES)
        # sparseness ranks the methods the other way round (so sorting by it changes the first row);
        # its rows record protocol version 7, which the registry does not have: the glossary must show 7
        sp = pd.DataFrame({"metric": "sparseness", "x": np.nan, "value": 1 - q + rng.normal(0, .01, N),
                           "example": ex}).assign(protocol="sparseness", **ids)
        sp = results.with_metadata(sp, "sparseness", {}).assign(version=7)
        casc = pd.DataFrame({"metric": "cascading_spearman_abs", "x": np.tile(np.arange(4.0), N),
                             "value": np.clip(np.tile(1 - np.arange(4) * q / 3, N) + rng.normal(0, .03, 4 * N), -1, 1),
                             "example": np.repeat(ex, 4)}).assign(protocol="sanity_model_randomization", **ids)
        casc = results.with_metadata(casc, "sanity_model_randomization", {"modes": ["cascading"]})
        frames += [pf, sp, casc]
    acc = pd.DataFrame([{**_ids(run_id, "toy_preset", ""), "protocol": "model", "metric": "test_accuracy",
                         "x": np.nan, "value": 0.9125, "example": -1}])
    return pd.concat([results.conform(f) for f in (*frames, acc)], ignore_index=True)


def _roar_rows(run_id: str, rng) -> pd.DataFrame:
    rows = []
    for m, q in QUALITY.items():
        for seed in (0, 1, 2):
            for fr in (0.0, 0.5, 0.9):
                for proto, sign in (("roar", -1), ("kar", 1)):
                    acc = 0.9 + sign * fr * 0.5 * q - (0.2 * fr if proto == "roar" else 0.3 * (1 - q) * fr)
                    rows.append({**_ids(run_id, "toy_roar", m), "seed": seed, "protocol": proto,
                                 "metric": "test_accuracy", "x": fr, "value": acc + rng.normal(0, .01),
                                 "example": -1})
    df = results.with_metadata(pd.DataFrame(rows), "roar_kar", {"fractions": [0.0, 0.5, 0.9], "seeds": [0, 1, 2]})
    return results.conform(df)


def _config(exp, finding):
    return {"experiment_name": exp, "n_images": N, "seed": 0, "model_seed": 0, "finding": finding,
            "dataset": {"name": "toy_digits"}, "model": {"name": "tiny_cnn"}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two run folders under one results folder, and the report built from it."""
    root = tmp_path_factory.mktemp("report") / "results"
    rng = np.random.default_rng(0)
    run1, run2 = root / "toy_preset", root / "toy_roar"
    results.write_run(run1, _per_image_rows(run1.name, rng), _config("toy_preset", FINDING_DIFFERS),
                      {f"explain_{m}_s": 0.5 + q for m, q in QUALITY.items()}, extra={"test_accuracy": 0.9125})
    results.write_run(run2, _roar_rows(run2.name, rng), _config("toy_roar", FINDING_AGREES), {},
                      extra={"test_accuracy": 0.9125})
    (run1 / ".hydra").mkdir()
    (run1 / ".hydra" / "overrides.yaml").write_text("- experiment=toy_preset\n- n_images=6\n")
    x = rng.uniform(0, 1, (3, 8, 8, 1)).astype(np.float32)
    maps = {m: rng.normal(q, 1, (3, 8, 8, 1)).astype(np.float32) for m, q in QUALITY.items()}
    np.savez_compressed(run1 / "maps.npz", x=x, y=np.array([3, 1, 4]), pred=np.array([3, 7, 4]), **maps)
    out = report.build([str(root)], root / "report", quiet=True)
    return root, out


class _Table(HTMLParser):
    """The leaderboard table's header attributes and, per row, its cells' attributes."""

    def __init__(self):
        super().__init__()
        self.heads, self.rows, self.inside = [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.inside = a.get("id") == "lb"
        elif self.inside and tag == "th":
            self.heads.append(a)
        elif self.inside and tag == "tr" and "data-method" in a:
            self.rows.append((a, []))
        elif self.inside and tag == "td" and self.rows:
            self.rows[-1][1].append(a)

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False


def _expected(root: Path) -> dict[tuple[str, str, str], float]:
    """(method, protocol, metric) -> mean, recomputed from the parquet rows without the report code:
    per-image scalars averaged over images; the curves of protocols without scalars (ROAR/KAR, here
    also the sanity cascade) as the trapezoid area over the x range of each curve (a seed's, an
    image's), averaged over the curves."""
    df = pd.concat([pd.read_parquet(p) for p in sorted(root.rglob("rows.parquet"))])
    df = df[df["protocol"] != "model"]
    out = {}
    scal = df[df["x"].isna()]
    for (m, p, k), g in scal.groupby(["method", "protocol", "metric"]):
        out[(m, p, k)] = g["value"].mean()
    curves_only = set(df["protocol"]) - set(scal["protocol"])
    for (m, p, k), g in df[df["protocol"].isin(curves_only)].groupby(["method", "protocol", "metric"]):
        areas = []
        for _, c in g.groupby(["seed", "example"]):
            c = c.sort_values("x")
            x, v = c["x"].to_numpy(), c["value"].to_numpy()
            areas.append(np.sum((v[1:] + v[:-1]) * np.diff(x)) / 2 / (x[-1] - x[0]))
        out[(m, p, k + "_area")] = float(np.mean(areas))
    return out


def test_leaderboard_numbers_equal_the_tidy_rows(built):
    root, out = built
    page = (out / "report.html").read_text()
    t = _Table()
    t.feed(page)
    expected = _expected(root)
    metric_heads = [(i, h) for i, h in enumerate(t.heads) if h.get("data-kind") == "metric"]
    seen = {}
    for ra, cells in t.rows:
        for i, h in metric_heads:
            c = cells[i]
            if c.get("data-v"):
                seen[(ra["data-method"], h["data-protocol"], h["data-metric"])] = (float(c["data-v"]), c)
    assert set(seen) == set(expected)  # every (method, metric) in ONE table, nothing else
    for k, v in expected.items():
        got, cell = seen[k]
        assert got == pytest.approx(v, rel=1e-12, abs=1e-12), k
        assert float(cell["data-lo"]) <= got <= float(cell["data-hi"]), k
    # ranks in each metric's direction: pixel_flipping auc and ROAR area lower, aopc / KAR higher
    for proto, metric, higher in (("pixel_flipping", "auc", False), ("pixel_flipping", "aopc", True),
                                  ("sparseness", "sparseness", True), ("roar", "test_accuracy_area", False),
                                  ("kar", "test_accuracy_area", True)):
        means = {m: v for (m, p, k), v in expected.items() if (p, k) == (proto, metric)}
        order = sorted(means, key=lambda m: -means[m] if higher else means[m])
        ranks = {m: int(seen[(m, proto, metric)][1]["data-rank"]) for m in means}
        assert [ranks[m] for m in order] == list(range(1, len(order) + 1)), (proto, metric)
    # the markdown and the CSVs carry the same numbers
    md = (out / "leaderboard.md").read_text()
    lb = pd.read_csv(out / "leaderboard.csv")
    wide = pd.read_csv(out / "leaderboard_wide.csv").set_index("method")
    for (m, p, k), v in expected.items():
        assert f"{v:.4g} [" in md, (m, p, k)
        row = lb[(lb["method"] == m) & (lb["protocol"] == p) & (lb["metric"] == k)]
        assert row["mean"].iloc[0] == pytest.approx(v, rel=1e-12)
        col = [c for c in wide.columns if c.startswith(f"{p}/{k} ") and c.endswith(" mean")]
        assert wide.loc[m, col[0]] == pytest.approx(v, rel=1e-12)
    # the mean-rank column: the mean of the row's ranks over the ranked metrics
    agg_i = next(i for i, h in enumerate(t.heads) if h.get("data-kind") == "agg")
    for ra, cells in t.rows:
        rks = [int(cells[i]["data-rank"]) for i, h in metric_heads if "data-rank" in cells[i]]
        assert float(cells[agg_i]["data-v"]) == pytest.approx(np.mean(rks)), ra["data-method"]


def test_page_header_findings_glossary_and_self_contained(built):
    root, out = built
    page = (out / "report.html").read_text()
    # header: what was run and how to reproduce it
    for s in ("toy_digits", "tiny_cnn (test accuracy 0.9125)", "attrax experiment=toy_preset n_images=6",
              "config hash", "hardware", report._config_hash(_config("toy_preset", FINDING_DIFFERS))):
        assert s in page, s
    # findings come before the leaderboard, with the verdicts, numbers and the stated reason
    assert page.index('id=findings') < page.index('id=leaderboard') < page.index('id=glossary')
    assert "agrees" in page and "differs" in page and WHY in page
    assert re.search(r"gradient 0\.\d+ &gt; lrp_epsilon 0\.\d+ \(fails\)", page)
    # glossary: what the rows recorded (steps=5, version 7), not the registry's defaults
    gl = page[page.index("id=glossary"):page.index("id=figures")]
    assert "steps=5" in gl and "replacement=zero" in gl and "Bach et al. 2015" in gl
    assert re.search(r"<td[^>]*>7</td>", gl)
    # controls marked; one figure per kind that has data, all embedded
    assert page.count("<tr data-family='control'") == 2 and page.count(" class=control><td") == 2
    for alt in ("curves", "sanity", "roar_kar", "heatmaps", "rank_agreement", "timings"):
        assert f'alt="{alt}" src="data:image/png;base64,' in page, alt
    assert 'alt="bench"' not in page  # no benchmark rows: that figure is skipped
    assert "http" not in page.replace("http-equiv", "") and "<script src" not in page and "<link" not in page
    md = (out / "leaderboard.md").read_text()
    for s in ("## What was run", "## Findings", "## Leaderboard", "## Glossary", "random (control)",
              "attrax experiment=toy_preset n_images=6", WHY):
        assert s in md, s
    assert re.search(r"\|\s*mean rank\s*\|", md)


def _browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver), options=opts)
    except Exception as e:  # noqa: BLE001 - a browser that does not start is an environment problem
        pytest.skip(f"headless chromium did not start: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def test_page_in_a_headless_browser(built):
    import base64

    from selenium.webdriver.common.by import By

    root, out = built
    d = _browser()
    try:
        d.get((out / "report.html").resolve().as_uri())
        first = lambda: d.execute_script("return document.querySelector('#lb tbody tr').dataset.method")  # noqa: E731
        assert first() == "lrp_epsilon"  # sorted by mean rank at load
        head = d.find_element(By.CSS_SELECTOR, "#lb th[data-metric=sparseness]")
        head.click()  # sparseness ranks the methods the other way round
        assert first() == "random"
        head.click()  # again: reversed
        assert first() != "random"
        # filter: hide the gradient family's rows; hide the faithfulness columns and the mean rank follows
        d.find_element(By.CSS_SELECTOR, "input.f-family[value=gradient]").click()
        hidden = d.execute_script("return Array.from(document.querySelectorAll('#lb tbody tr'))"
                                  ".filter(r => r.style.display === 'none').map(r => r.dataset.family)")
        assert hidden and set(hidden) == {"gradient"}
        d.find_element(By.CSS_SELECTOR, "input.f-category[value=faithfulness]").click()
        n = d.execute_script("return document.getElementById('agg-count').textContent")
        assert int(n) == 4  # sparseness, the ROAR, KAR and sanity-cascade areas (pixel_flipping hidden)
        imgs = d.execute_script("return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        assert len(imgs) >= 6 and all(c and w > 0 for _, c, w in imgs), imgs
        assert "differs" in d.find_element(By.ID, "findings").text
        severe = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        d.find_element(By.ID, "reset").click()
        h = d.execute_script("return document.documentElement.scrollHeight")
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": 1400, "height": min(int(h), 12000), "deviceScaleFactor": 1, "mobile": False})
        shot = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        (root / "toy_preset" / "report.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        d.quit()
    assert (root / "toy_preset" / "report.png").stat().st_size > 10_000


def test_main_job_prints_and_writes_its_report(tmp_path, monkeypatch):
    """`attrax` (the main job) builds the report of its own run folder and says how to open it."""
    import attrax.main
    from attrax import cli

    def fake_run(cfg, run_dir, **kw):  # the job's results, without training a model
        results.write_run(run_dir, _per_image_rows(Path(run_dir).name, np.random.default_rng(1)),
                          _config("toy_preset", FINDING_DIFFERS), {})

    monkeypatch.setattr(attrax.main, "run", fake_run)
    run_dir = tmp_path / "run"
    buf = io.StringIO()  # not capsys: Hydra's log handlers would keep its stream past the test
    with contextlib.redirect_stdout(buf):
        assert cli.main([f"hydra.run.dir={run_dir}", "figures=false", "n_images=6"]) == 0
    text = buf.getvalue()
    page = run_dir / "report" / "report.html"
    assert f"[attrax] report: {page}" in text and "open it in a browser" in text
    assert page.exists() and "n_images=6" in page.read_text()  # the command from Hydra's overrides
    assert re.search(r"data:image/png", page.read_text()) is None  # figures=false: no figures


def test_report_without_optional_data_skips_figures_cleanly(tmp_path):
    """Aggregate-only results (no curves, maps, timings or findings): the page still has every
    section and no empty figure."""
    rows = pd.DataFrame([{**_ids("b", "bench/method", m), "protocol": "bench", "metric": met, "x": np.nan,
                          "value": v, "example": -1}
                         for m, base in (("gradient", 4000.0), ("integrated_gradients", 90.0), ("lime", 5.0))
                         for met, v in (("images_per_s", base), ("speedup_vs_bar", base / 1000))])
    results.write_run(tmp_path / "bench", rows, {}, {})
    out = report.build([str(tmp_path / "bench")], tmp_path / "rep", quiet=True)
    page = (out / "report.html").read_text()
    assert 'alt="bench" src="data:image/png;base64,' in page
    for alt in ("curves", "heatmaps", "roar_kar", "sanity", "timings"):
        assert f'alt="{alt}"' not in page
    assert "id=findings" in page and "No paper preset" in page and "not recorded" in page
    json.loads(re.search(r"id=report-meta>(.*?)</script>", page).group(1).replace("&quot;", '"'))
