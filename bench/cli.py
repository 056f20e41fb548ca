"""Console entry point `attrax`.

    attrax [hydra overrides]          the main job (Hydra; `-m` for sweeps)
    attrax report PATH... [--out D]   leaderboard + figures from results folders
    attrax bench [options]            the benchmark command (same as `attrax-bench`)

User errors (unknown names, bad input, missing data) print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from importlib import resources

from attrax.errors import AttraxError, unknown_name

CONF_MODULE = "attrax.conf"
GROUPS = ("dataset", "model", "train", "methods", "method", "protocols", "protocol", "experiment")


def group_options(group: str) -> list[str]:
    d = resources.files(CONF_MODULE) / group
    if not d.is_dir():
        return []
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


#: Top-level counts that must be positive integers (checked before Hydra starts).
POSITIVE_INTS = ("n_images", "heatmap_images", "chunk_evals", "train_per_class", "retrain_train_per_class")


def check_overrides(argv: list[str]) -> None:
    """Unknown config-group choices get a one-line "did you mean" before Hydra starts, and
    counts such as `n_images` must be positive integers."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "hydra")):
            continue
        k, v = arg.split("=", 1)
        k = k.lstrip("+~")
        if k in POSITIVE_INTS and v not in ("null", ""):
            for value in v.split(","):
                if not value.strip().isdigit() or int(value) < (0 if k == "heatmap_images" else 1):
                    least = "a non-negative" if k == "heatmap_images" else "a positive"
                    raise AttraxError(f"{k} must be {least} integer, got {value!r}")
        if k in GROUPS and v not in ("null", ""):
            opts = group_options(k)
            for choice in v.split(","):
                if choice not in opts:
                    raise unknown_name(f"{k} config", choice, opts)


def _hydra_main(argv: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    status = {"code": 0}

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONF_MODULE}", config_name="config")
    def _job(cfg: DictConfig) -> None:
        from hydra.types import RunMode

        from attrax.main import run

        hc = HydraConfig.get()
        try:
            run(cfg, hc.runtime.output_dir)
        except AttraxError as e:
            print(f"attrax: error: {e}", file=sys.stderr)
            status["code"] = 2
            return
        if hc.mode == RunMode.RUN:  # a sweep's report is built once, over all its jobs, when it ends
            run_report(hc.runtime.output_dir, figures="run" if cfg.get("figures", True) else False)

    sys.argv = [sys.argv[0], *argv]
    _job()
    return status["code"]


def open_hint(page) -> str:
    """How to open a report page: any browser opens the file itself (it needs no network)."""
    from pathlib import Path

    uri = Path(page).resolve().as_uri()
    opener = "open" if sys.platform == "darwin" else "start" if sys.platform.startswith("win") else "xdg-open"
    return f"open it in a browser: {opener} {page}  (or paste {uri} into the address bar; self-contained, no network)"


def run_report(run_dir, *, figures: bool | str = "run") -> None:
    """The report of one finished run, in `<run_dir>/report/`, with the figures the run drew (quick);
    its path and how to open it are printed. A report that cannot be built is one line: the results
    are written already. `attrax report <run_dir>` draws the full set of figures."""
    from pathlib import Path

    from attrax import report

    try:
        out = report.build([str(run_dir)], Path(run_dir) / "report", quiet=True, figures=figures)
    except Exception as e:  # noqa: BLE001 - never fail a finished run for its report
        print(f"[attrax] report not built ({type(e).__name__}: {e}); try: attrax report {run_dir}")
        return
    page = out / "report.html"
    print(f"[attrax] report: {page}")
    print(f"[attrax] {open_hint(page)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "report":
            import argparse

            from attrax import report

            ap = argparse.ArgumentParser(
                prog="attrax report", description="leaderboard and figures from results folders"
            )
            ap.add_argument("paths", nargs="+")
            ap.add_argument("--out", default=None, help="output folder (default: <first path>/report)")
            a = ap.parse_args(argv[1:])
            out = report.build(a.paths, a.out)
            print(f"report: {out / 'report.html'}\n{open_hint(out / 'report.html')}")
            return 0
        if argv and argv[0] == "bench":
            from attrax import perf

            return perf.main(argv[1:])
        check_overrides(argv)
        code = _hydra_main(argv)
    except AttraxError as e:
        print(f"attrax: error: {e}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)
    return 0


if __name__ == "__main__":
    main()
