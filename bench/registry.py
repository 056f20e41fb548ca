"""Name -> function registries with metadata (methods, protocols, models, datasets).

A registry refuses duplicate names and answers unknown names with "did you mean".
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from attrax.errors import AttraxError, unknown_name


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    meta: dict[str, Any]

    def hparams(self) -> dict[str, Any]:
        """Keyword-only parameters of the function with their defaults (the tunable knobs).

        `key` (the PRNG key of a batch call) is not a knob, except for retraining protocols
        (`kind="retrain"`), whose integer `key` seeds their maps and is configured.
        """
        sig = inspect.signature(self.fn)
        keep_key = self.meta.get("kind") == "retrain"
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is p.KEYWORD_ONLY and (p.name != "key" or keep_key)
        }


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, fn: Callable | None = None, **meta: Any):
        """Register `fn` under `name`; usable as a decorator: `@REG.register("gradient", family=...)`."""

        def deco(f: Callable) -> Callable:
            if name in self._entries:
                raise AttraxError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, f, dict(meta))
            return f

        return deco(fn) if fn is not None else deco

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise unknown_name(self.kind, name, self._entries)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self, **filters: Any) -> list[str]:
        """Sorted names, optionally only those whose metadata matches every filter."""
        return sorted(
            n for n, e in self._entries.items() if all(e.meta.get(k) == v for k, v in filters.items())
        )
