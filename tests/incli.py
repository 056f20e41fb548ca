"""The `attrax` command run in the test process (used instead of a subprocess by the CLI tests)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys


def run_cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    """`attrax ARGS` run from `cwd` in THIS process (`attrax.cli.main`, Hydra included): the exit
    code and what it printed, like `subprocess.run(..., capture_output=True)`. A subprocess would
    pay ~7 s of imports and compile every program again; the programs compiled here are shared
    with the other tests of the worker. The console entry point itself runs in a subprocess in
    tests/test_datasets.py and tests/test_input_validation.py.

    Hydra configures logging (`logging.config.dictConfig`), which closes every handler there is,
    pytest's capturing ones too: they are kept open here, and the root logger's handlers and level
    are put back afterwards."""
    from attrax.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, here = list(sys.argv), os.getcwd()
    root = logging.getLogger()
    handlers, level, shutdown = list(root.handlers), root.level, logging.shutdown
    code = 0
    try:
        os.chdir(cwd)
        logging.shutdown = lambda *a, **k: None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args)) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
        sys.argv = argv
        logging.shutdown = shutdown
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
    return subprocess.CompletedProcess(["attrax", *args], code, out.getvalue(), err.getvalue())
