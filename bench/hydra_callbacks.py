"""Hydra callbacks: aggregate a finished multirun into one report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class ReportOnMultirunEnd(Callback):
    """After `attrax -m ...` finishes, build leaderboard.md/.csv and report.html under the sweep folder."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from attrax import report, results
        from attrax.errors import AttraxError

        sweep = Path(config.hydra.sweep.dir)
        try:
            if results.find_runs([sweep]):
                report.build([str(sweep)], sweep / "report")
        except AttraxError as e:
            print(f"attrax: report not built: {e}")
