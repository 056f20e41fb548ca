"""The HTML page of `attrax report`: one self-contained file (styles, script and figures inline;
nothing is fetched when it is opened), laid out as a leaderboard page to publish.

Sections: what was run (header), findings, the leaderboard (methods x metrics, sortable and
filterable in the browser by the inline script below), glossary, figures.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attrax import report

CSS = """
:root{--fg:#1b1f24;--mute:#57606a;--line:#d0d7de;--bg2:#f6f8fa;--accent:#0b5cad}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);
 margin:0;background:#fff}
main{max-width:1400px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;
 border-bottom:1px solid var(--line)}h3{font-size:16px;margin:22px 0 6px}
.sub{color:var(--mute);margin:0 0 14px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid var(--line);padding:8px 28px;z-index:5;
 font-size:13px}nav a{margin-right:16px;color:var(--accent);text-decoration:none}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:8px 0 14px;
 background:var(--bg2);border:1px solid var(--line);border-radius:6px;padding:12px 16px}
dl.meta dt{color:var(--mute)}dl.meta dd{margin:0}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
code.cmd{background:var(--bg2);border:1px solid var(--line);border-radius:4px;padding:1px 5px;
 white-space:pre-wrap;word-break:break-all}
table{border-collapse:collapse}
table.plain td,table.plain th{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
table.plain th{background:var(--bg2)}
.finding{border:1px solid var(--line);border-left:6px solid #999;border-radius:6px;padding:10px 14px;
 margin:10px 0;background:#fff}
.finding.agrees{border-left-color:#1a7f37}.finding.differs{border-left-color:#cf6a00}
.badge{display:inline-block;font-size:12px;font-weight:600;border-radius:10px;padding:1px 9px;margin-right:6px;
 color:#fff;background:#777;vertical-align:1px}
.agrees .badge{background:#1a7f37}.differs .badge{background:#cf6a00}
.finding .claim{font-weight:600}.finding .numbers{margin:6px 0 0;color:#24292f}
.finding .why{margin:6px 0 0;padding:6px 10px;background:#fff8c5;border-radius:4px}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 14px}
.controls{display:flex;flex-wrap:wrap;gap:10px 28px;margin:8px 0 10px;padding:10px 14px;background:var(--bg2);
 border:1px solid var(--line);border-radius:6px}
.controls fieldset{border:0;margin:0;padding:0}.controls legend{font-weight:600;font-size:12px;
 color:var(--mute);padding:0;margin-bottom:2px}
.controls label{margin-right:10px;white-space:nowrap;font-size:13px}
.controls details{font-size:13px}.controls details label{display:inline-block;min-width:260px}
.tablewrap{overflow:auto;max-height:80vh;border:1px solid var(--line);border-radius:6px}
table#lb{font-size:12.5px}
#lb th,#lb td{border-bottom:1px solid var(--line);border-right:1px solid #eaeef2;padding:4px 8px;white-space:nowrap}
#lb thead th{position:sticky;top:0;background:#eef1f4;z-index:2;cursor:pointer;user-select:none;
 vertical-align:bottom;text-align:left}
#lb thead th:hover{background:#e1e6eb}
#lb thead th{white-space:normal;min-width:110px;max-width:210px;overflow-wrap:anywhere}
#lb thead th .cat{display:block;font-weight:400;font-size:11px;color:var(--mute)}
#lb thead th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px}
#lb thead th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
#lb td.name,#lb th.name{position:sticky;left:0;background:#fff;z-index:1;font-weight:600}
#lb thead th.name{z-index:3;background:#eef1f4}
#lb td.num{text-align:right;font-variant-numeric:tabular-nums}
#lb td .ci{color:#444;font-size:11px;margin-left:4px}
#lb td .rk{display:inline-block;min-width:22px;margin-left:5px;font-size:11px;font-weight:600;color:#333}
#lb tr.control td{font-style:italic}
#lb tr.control td.name{background:repeating-linear-gradient(135deg,#fff,#fff 6px,#eceff3 6px,#eceff3 12px)}
.tag{display:inline-block;font-size:10.5px;font-style:normal;font-weight:600;border-radius:8px;padding:0 6px;
 margin-left:6px;background:#57606a;color:#fff}
.fam{color:var(--mute);font-size:12px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.legend{font-size:12.5px;color:var(--mute);margin:8px 0}
.legend .scale{display:inline-block;width:160px;height:10px;vertical-align:-1px;border:1px solid var(--line);
 background:linear-gradient(90deg,hsl(125,55%,78%),hsl(62,60%,82%),hsl(0,65%,84%))}
figure{margin:10px 0 26px}figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px}
figcaption{color:var(--mute);font-size:13px;max-width:1000px;margin-top:4px}
section,header{scroll-margin-top:44px}
footer{margin-top:40px;color:var(--mute);font-size:12px}
"""

# The page's script: sorting (click a header; again to reverse), filtering rows by method
# family and columns by metric category / metric, and the mean rank over the shown metrics.
JS = r"""
(function () {
  'use strict';
  var table = document.getElementById('lb');
  if (!table) { return; }
  var body = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var aggIndex = heads.findIndex(function (h) { return h.dataset.kind === 'agg'; });
  var state = { col: -1, dir: 1 };

  function keyOf(tr, i) {
    var td = tr.cells[i];
    var kind = heads[i].dataset.kind;
    if (kind === 'text') { return td.dataset.v || td.textContent; }
    var v = kind === 'metric' && heads[i].dataset.ranked === '1' ? td.dataset.rank : td.dataset.v;
    return (v === undefined || v === '') ? null : parseFloat(v);
  }

  function sortBy(i, dir) {
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = heads[i].dataset.kind !== 'text';
    rows.sort(function (a, b) {
      var ka = keyOf(a, i), kb = keyOf(b, i);
      if (ka === null && kb === null) { return 0; }
      if (ka === null) { return 1; }
      if (kb === null) { return -1; }
      var c = numeric ? ka - kb : String(ka).localeCompare(String(kb));
      return c * dir;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    heads.forEach(function (h) { h.removeAttribute('aria-sort'); });
    heads[i].setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
    state = { col: i, dir: dir };
  }

  heads.forEach(function (h, i) {
    h.title = 'sort by this column (click again to reverse)';
    h.addEventListener('click', function () { sortBy(i, state.col === i ? -state.dir : 1); });
  });

  function checked(sel) {
    var out = {};
    document.querySelectorAll(sel).forEach(function (b) { out[b.value] = b.checked; });
    return out;
  }

  function apply() {
    var fam = checked('input.f-family');
    var met = checked('input.f-metric');
    var shown = [];
    heads.forEach(function (h, i) {
      if (h.dataset.kind !== 'metric') { return; }
      var on = met[h.dataset.col] !== false;
      h.style.display = on ? '' : 'none';
      Array.prototype.forEach.call(body.rows, function (r) { r.cells[i].style.display = on ? '' : 'none'; });
      if (on && h.dataset.ranked === '1') { shown.push(i); }
    });
    Array.prototype.forEach.call(body.rows, function (r) {
      r.style.display = fam[r.dataset.family] === false ? 'none' : '';
      var s = 0, n = 0;
      shown.forEach(function (i) {
        var v = r.cells[i].dataset.rank;
        if (v !== undefined && v !== '') { s += parseFloat(v); n += 1; }
      });
      if (aggIndex >= 0) {
        var td = r.cells[aggIndex];
        td.dataset.v = n ? String(s / n) : '';
        td.textContent = n ? (s / n).toFixed(2) : '-';
      }
    });
    var note = document.getElementById('agg-count');
    if (note) { note.textContent = String(shown.length); }
    if (state.col >= 0) { sortBy(state.col, state.dir); }
  }

  document.querySelectorAll('input.f-category').forEach(function (c) {
    c.addEventListener('change', function () {
      document.querySelectorAll('input.f-metric[data-category="' + c.value + '"]').forEach(function (m) {
        m.checked = c.checked;
      });
      apply();
    });
  });
  document.querySelectorAll('input.f-family, input.f-metric').forEach(function (b) {
    b.addEventListener('change', apply);
  });
  var reset = document.getElementById('reset');
  if (reset) {
    reset.addEventListener('click', function () {
      document.querySelectorAll('.controls input[type=checkbox]').forEach(function (b) { b.checked = true; });
      apply();
      if (aggIndex >= 0) { sortBy(aggIndex, 1); }
    });
  }
  apply();
  if (aggIndex >= 0) { sortBy(aggIndex, 1); }
})();
"""

e = html.escape


def rank_color(rank: float, n: int) -> str:
    """Cell colour of a rank among n: green (best) through yellow to red (worst)."""
    t = 0.0 if n <= 1 else (rank - 1) / (n - 1)
    t = min(max(t, 0.0), 1.0)
    hue = 125 * (1 - t)
    return f"hsl({hue:.0f},{55 + 10 * t:.0f}%,{78 + 6 * t:.0f}%)"


def _f(v: float, digits: int) -> str:
    return f"{v:.{digits}g}" if np.isfinite(v) else "-"


def _header(recs: list[dict[str, Any]], n_rows: int) -> str:
    fields = report.header_fields(recs)
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in fields)
    cmds = [r for r in recs if r.get("command")]
    rows = "".join(
        f"<tr><td>{e(r['run_id'])}</td><td>{e(str(r['experiment']))}</td><td>{e(r['dataset'])}</td>"
        f"<td>{e(r['model'])} ({report._fmt_acc(r['test_accuracy'])})</td><td>{e(str(r['n_images'] or '-'))}</td>"
        f"<td>{e(r['seed'])} / {e(r['model_seed'])}</td><td><code>{e(r['commit'] or '-')}</code></td>"
        f"<td><code>{e(r['config_hash'] or '-')}</code></td><td>{e(r['date'] or '-')}</td>"
        f"<td>{'<code class=cmd>' + e(r['command']) + '</code>' if r['command'] else 'not recorded'}</td></tr>"
        for r in recs)
    runs = ("<details" + (" open" if len(recs) <= 4 else "") + "><summary>Runs and the commands that reproduce them"
            f" ({len(recs)})</summary><table class=plain><thead><tr><th>run</th><th>experiment</th><th>data set</th>"
            "<th>model (test acc.)</th><th>images</th><th>seeds (expl. / model)</th><th>commit</th>"
            "<th>config hash</th><th>date</th><th>command</th></tr></thead><tbody>"
            f"{rows}</tbody></table></details>")
    repro = ""
    if len(cmds) == 1:
        repro = f"<p>Reproduce: <code class=cmd>{e(cmds[0]['command'])}</code></p>"
    note = ("<p class=sub>config hash: the first 12 hex digits of the SHA-256 of the run's resolved config "
            "(run.json <code>config</code>, keys sorted); the command is the run's Hydra overrides "
            "(<code>.hydra/overrides.yaml</code>) after <code>attrax</code>.</p>")
    return (f"<header id=header><h1>attrax leaderboard</h1><p class=sub>{n_rows} result rows from {len(recs)} "
            f"run{'s' if len(recs) != 1 else ''}</p><dl class=meta>{dl}</dl>{repro}{runs}{note}</header>")


def _findings(checks: list[dict[str, str]], flags: list[str]) -> str:
    parts = ["<section id=findings><h2>Findings</h2>"]
    if not checks:
        parts.append("<p>No paper preset with an expected finding in these results: nothing to check. "
                     "(Run a preset, e.g. <code>attrax experiment=samek2016_aopc</code>, to get one.)</p>")
    for c in checks:
        numbers, why = report.split_why(c["numbers"])
        v = c["verdict"]
        parts.append(
            f"<div class='finding {e(v).replace('/', '')}'><span class=badge>{e(v)}</span>"
            f"<span class=claim>{e(c['claim'])}</span> <span class=fam>({e(c['experiment'])})</span>"
            f"<p class=numbers>{e(numbers)}</p>"
            + (f"<p class=why><b>Why it differs:</b> {e(why)}</p>" if why else "") + "</div>")
    if flags:
        parts.append("<div class=warn><b>Warnings</b><ul>" + "".join(f"<li>{e(f)}</li>" for f in flags)
                     + "</ul></div>")
    parts.append("</section>")
    return "".join(parts)


def _leaderboard(lb: pd.DataFrame) -> str:
    b = report._board(lb)
    if b.empty:
        return "<section id=leaderboard><h2>Leaderboard</h2><p>No metrics.</p></section>"
    cols = report.column_order(b)
    cmeta = {c: b[b["column"] == c].iloc[0] for c in cols}
    ncount = b.dropna(subset=["rank"]).groupby("column")["label"].nunique()
    agg = report.aggregate_ranks(b)
    labels = list(agg["agg_rank"].sort_values(kind="stable").index)
    lab_meta = b.groupby("label")[["method", "family"]].first()
    cells = {(r["label"], r["column"]): r for _, r in b.iterrows()}
    ranked_any = b["rank"].notna().any()

    cats = list(dict.fromkeys(report.metric_category(cmeta[c]["protocol"]) for c in cols))
    fams = [f for f in report.FAMILY_ORDER if f in set(lab_meta["family"])]
    fams += sorted(set(lab_meta["family"]) - set(fams))
    controls = ["<div class=controls>",
                "<fieldset><legend>method family (rows)</legend>"
                + "".join(f"<label><input type=checkbox class=f-family value='{e(f)}' checked> {e(f)}</label>"
                          for f in fams) + "</fieldset>",
                "<fieldset><legend>metric category (columns)</legend>"
                + "".join(f"<label><input type=checkbox class=f-category value='{e(c)}' checked> {e(c)}</label>"
                          for c in cats) + "</fieldset>",
                "<details><summary>choose single metrics</summary>"
                + "".join(f"<label><input type=checkbox class=f-metric value='{i}' data-category='"
                          f"{e(report.metric_category(cmeta[c]['protocol']))}' checked> {e(c)}</label>"
                          for i, c in enumerate(cols)) + "</details>",
                "<div><button id=reset type=button>show all, sort by mean rank</button></div></div>"]

    th = ["<th class=name data-kind=text>method</th>", "<th data-kind=text>family</th>"]
    if ranked_any:
        th.append("<th data-kind=agg>mean rank<span class=cat>over <span id=agg-count>"
                  f"{int((ncount > 0).sum())}</span> shown metrics</span></th>")
    for i, c in enumerate(cols):
        r = cmeta[c]
        ranked = int(ncount.get(c, 0) > 0)
        th.append(f"<th data-kind=metric data-col='{i}' data-ranked='{ranked}' data-protocol='{e(r['protocol'])}' "
                  f"data-metric='{e(str(r['metric']))}' data-category='{e(report.metric_category(r['protocol']))}'>"
                  f"{e(c)}<span class=cat>{e(report.metric_category(r['protocol']))}"
                  f"{'' if ranked else ', not ranked'}</span></th>")
    body = []
    for lab in labels:
        meth, fam = lab_meta.loc[lab, "method"], lab_meta.loc[lab, "family"]
        ctrl = meth in report.CONTROLS
        a = agg.loc[lab, "agg_rank"]
        tds = [f"<td class=name data-v='{e(lab)}'>{e(lab)}{'<span class=tag>control</span>' if ctrl else ''}</td>",
               f"<td class=fam data-v='{e(fam)}'>{e(fam)}</td>"]
        if ranked_any:
            tds.append(f"<td class=num data-v='{'' if not np.isfinite(a) else repr(float(a))}'>"
                       f"{'-' if not np.isfinite(a) else f'{a:.2f}'}</td>")
        for c in cols:
            r = cells.get((lab, c))
            if r is None:
                tds.append("<td class=num data-v=''>-</td>")
                continue
            m, lo, hi, rk = float(r["mean"]), float(r["ci_low"]), float(r["ci_high"]), float(r["rank"])
            style = f" style='background:{rank_color(rk, int(ncount.get(c, 1)))}'" if np.isfinite(rk) else ""
            flag = f" title='{e(str(r.get('flagged', '')))}'" if r.get("flagged") else ""
            tds.append(
                f"<td class=num data-v='{m!r}' data-lo='{lo!r}' data-hi='{hi!r}' data-n='{int(r['n'])}'"
                + (f" data-rank='{int(rk)}'" if np.isfinite(rk) else "") + f"{style}{flag}>"
                f"<span class=m>{_f(m, 4)}</span><span class=ci>[{_f(lo, 3)}, {_f(hi, 3)}]</span>"
                + (f"<span class=rk>#{int(rk)}</span>" if np.isfinite(rk) else "")
                + (" (!)" if r.get("flagged") else "") + "</td>")
        body.append(f"<tr data-family='{e(fam)}' data-method='{e(meth)}'"
                    f"{' class=control' if ctrl else ''}>{''.join(tds)}</tr>")
    legend = (
        "<p class=legend>Each cell: mean over the examples (or retraining seeds) "
        "<span class=ci>[95% bootstrap confidence interval]</span> #rank. Ranks are in each metric's direction "
        "(↑ higher is better, ↓ lower is better; 1 = best) among the methods of the same experiment; cells are "
        "coloured by rank: <span class=scale></span> best to worst. Metrics without a direction are shown "
        "but not ranked. <b>Controls</b> (hatched rows, <span class=tag>control</span>): random relevance and "
        "the Sobel edge map, which know nothing of the model - a method that does not beat them on a metric "
        f"shows nothing there. <b>Mean rank</b>: {e(report.AGG_DEFINITION)}; it follows the metric filters "
        "above. Click a column header to sort by it (metric columns sort by rank), again to reverse.</p>")
    return ("<section id=leaderboard><h2>Leaderboard</h2>" + "".join(controls) + legend
            + "<div class=tablewrap><table id=lb><thead><tr>" + "".join(th) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table></div></section>")


def _glossary(gl: pd.DataFrame) -> str:
    """One block of rows per protocol setting (protocol and its recorded choices): a row per metric
    (direction, aggregation) and, once for the block, category, source, x label, version, choices."""
    if gl is None or gl.empty:
        return ""
    rows = []
    for _, g in gl.groupby(["protocol", "choices"], sort=False):
        n = len(g)
        for k, (_, r) in enumerate(g.iterrows()):
            shared = (f"<td rowspan={n}>{e(r['category'])}</td><td rowspan={n}>{e(r['source'] or '-')}</td>"
                      f"<td rowspan={n}>{e(r['x_label'] or '-')}</td><td rowspan={n}>{e(str(r['version']) or '-')}</td>"
                      f"<td rowspan={n}><code>{e(r['choices'])}</code></td>") if k == 0 else ""
            rows.append(f"<tr><td><b>{e(r['column'])}</b></td><td>{e(r['direction'])}</td>"
                        f"<td>{e(r['aggregation'] or '-')}</td>{shared}</tr>")
    return ("<section id=glossary><h2>Glossary</h2><p class=sub>Per metric, as the result rows record it "
            "(direction, x label, aggregation, protocol version and the protocol's choices such as score "
            "space, replacement, steps and order), not as today's code would set it; one block per protocol "
            "setting.</p><table class=plain><thead><tr><th>metric</th><th>direction</th><th>aggregation</th>"
            "<th>category</th><th>source</th><th>x (curves)</th><th>version</th><th>recorded choices</th></tr>"
            "</thead><tbody>" + "".join(rows) + "</tbody></table></section>")


def _figure(title: str, path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f"<h3>{e(title)}</h3><figure><img alt=\"{e(Path(path).stem)}\" src=\"data:image/png;base64,{data}\"/>"
            f"<figcaption>{e(caption)}</figcaption></figure>")


def _sanity(st: pd.DataFrame) -> str:
    if st is None or st.empty:
        return ""
    return ("<h3>Model randomization summary</h3><p class=sub>Similarity to the trained model's maps (lower = "
            "the maps depend on the weights): with the logits layer re-initialized (top_), all layers (all_), "
            "one layer at a time (independent_, mean over layers); noise ceiling = the same method with two "
            "keys, nothing randomized.</p><div class=tablewrap style='max-height:420px'>"
            + st.to_html(index=False, float_format=lambda v: f"{v:.3f}", classes="plain", border=0)
            + "</div>")


def render(*, recs, checks, lb, glossary, sanity, flags, figs, n_rows: int) -> str:
    """The whole page as one string."""
    figures = "".join(_figure(t, p, c) for t, p, c in figs) or "<p>No figures for these results.</p>"
    version = next((r["attrax"] for r in recs if r.get("attrax")), "")
    meta = json.dumps({"runs": [r["run_id"] for r in recs]})
    return "\n".join([
        "<!doctype html><html lang=en><head><meta charset='utf-8'>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        "<title>attrax leaderboard</title>", f"<style>{CSS}</style></head><body>",
        "<nav><a href='#header'>What was run</a><a href='#findings'>Findings</a><a href='#leaderboard'>"
        "Leaderboard</a><a href='#glossary'>Glossary</a><a href='#figures'>Figures</a></nav><main>",
        _header(recs, n_rows), _findings(checks, flags), _leaderboard(lb), _glossary(glossary),
        "<section id=figures><h2>Figures</h2>", figures, _sanity(sanity), "</section>",
        f"<footer>Written by <code>attrax report</code> {e(version)}; the same content is in leaderboard.md, "
        "leaderboard.csv (one row per experiment and method) and leaderboard_wide.csv (methods x metrics) "
        "beside this file. This page is self-contained: it needs no network.</footer>",
        f"<script type=application/json id=report-meta>{e(meta)}</script>",
        f"<script>{JS}</script></main></body></html>",
    ])
