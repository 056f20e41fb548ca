"""OmegaConf resolvers used by the config tree.

`${by_scale:SMALL,PAPER}` picks the small-scale value by default and the paper-scale value with
the one override `scale=paper`, so every paper preset runs quickly by default and at the
published scale on request.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def _by_scale(small, paper, *, _root_):
    return paper if _root_.get("scale", "small") == "paper" else small


def register() -> None:
    if not OmegaConf.has_resolver("by_scale"):
        OmegaConf.register_new_resolver("by_scale", _by_scale)


register()
