"""One exception type for every user-facing error: the CLI prints it as one line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttraxError(ValueError):
    """A user-facing error: bad name, bad input, missing data. Printed as one line by the CLI."""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> AttraxError:
    """Build an 'unknown X' error with a did-you-mean suggestion and the available names."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return AttraxError(f"unknown {kind} {name!r}.{hint} Available: {', '.join(choices)}")
