"""The conformance test of tests/test_conformance.py over EVERY registered method on five model
families that are NOT in the zoo (issue 13), written the way users write them (tests/nonzoo.py,
`attrax.examples`): a plain linen CNN, a BatchNorm ResNet, a small ViT, a plain `jax.numpy` MLP and
a flax.nnx module. Same properties: shape, finite, jit == eager and vmap == loop, deterministic per
key, stochastic methods change with the key.

A (method, family) pair where the method is not defined gets a one-line `AttraxError`; those
pairs are listed in UNDEFINED with the reason, never skipped.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from nonzoo import FAMILIES, make
from test_conformance import COMPOSITES, NAMES, _close, small_hparams

import attrax
from attrax.errors import AttraxError

CAM_FAMILY = ("cam", "grad_cam", "grad_cam_pp", "guided_grad_cam", "score_cam")

#: (method, family) -> why the method is not defined there (the expected answer: one-line AttraxError)
UNDEFINED = {
    **{(m, "jnp_mlp"): "an MLP has no spatial feature maps" for m in CAM_FAMILY},
    ("cam", "vit_tiny"): "CAM needs a global-average-pool -> linear head; the ViT's head reads the class token",
}

#: (method, family) -> reason, for known gaps marked xfail(strict=True) at the deadline (issue 13)
XFAIL: dict[tuple[str, str], str] = {}


def _cases():
    for fam in FAMILIES:
        for name in NAMES + COMPOSITES:
            marks = []
            if (name, fam) in XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=f"issue 13: {XFAIL[name, fam]}"))
            yield pytest.param(fam, name, marks=marks, id=f"{fam}-{name}")


@pytest.fixture(scope="module")
def families():
    return {f: make(f) for f in FAMILIES}


@pytest.mark.parametrize(("family", "name"), list(_cases()))
def test_method_conformance_nonzoo(families, family, name):
    fam = families[family]
    model, params, x, target = fam.model, fam.params, fam.x, fam.target
    hp = small_hparams(name)
    if (name, family) in UNDEFINED:
        with pytest.raises(AttraxError) as err:
            attrax.explain(name, model, params, x, target, key=5, **hp)
        msg = str(err.value)
        assert msg and "\n" not in msg, f"{name} on {family}: the error must be one line, got {msg!r}"
        return
    r = attrax.explain(name, model, params, x, target, key=5, **hp)
    assert r.shape == x.shape, f"{name} on {family}: shape {r.shape} != input shape {x.shape}"
    assert bool(jnp.all(jnp.isfinite(r))), f"{name} on {family}: non-finite relevance"

    again = attrax.explain(name, model, params, x, target, key=5, **hp)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(again), err_msg=f"{name} on {family}: not deterministic")
    if attrax.methods.get(name).meta.get("stochastic"):
        other = attrax.explain(name, model, params, x, target, key=6, **hp)
        assert bool(jnp.all(jnp.isfinite(other))), f"{name} on {family}: non-finite relevance with another key"
        assert float(jnp.abs(other - r).max()) > 0, f"{name} on {family}: registered stochastic but ignores the key"

    loop = attrax.explain(name, model, params, x, target, key=5, chunk_size=1, jit=False, **hp)
    _close(loop, r, "the jitted batch and eager per-example calls", f"{name} on {family}")


def test_undefined_pairs_are_real_pairs():
    """Guards UNDEFINED/XFAIL against typos that would silently test nothing."""
    for name, fam in [*UNDEFINED, *XFAIL]:
        assert fam in FAMILIES and (name in NAMES or name in COMPOSITES), (name, fam)
