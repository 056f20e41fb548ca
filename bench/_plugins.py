"""Import every module of a plugin package so that its registrations run.

Methods, protocols and dataset loaders register themselves with a decorator; adding one is
adding a file, with no central list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str, package_path) -> None:
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
