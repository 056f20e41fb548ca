"""The conformance test of tests/test_conformance.py over EVERY registered method on five model
families that are NOT in the zoo (issue 13), written the way users write them (tests/nonzoo.py,
`attrax.examples`): a plain linen CNN, a BatchNorm ResNet, a small ViT, a plain `jax.numpy` MLP and
a flax.nnx module. Same properties: shape, finite, vmap == loop (and jit == eager on the linen CNN for EAGER_METHODS),
deterministic per key, stochastic methods change with the key.

A (method, family) pair where the method is not defined gets a one-line `AttraxError`; those
pairs are listed in UNDEFINED with the reason, never skipped.

Speed: the default suite runs the CORE methods on every family and each other structure method on
one family (round-robin); model-agnostic methods (gradient-only, perturbation, surrogate, controls)
and the full product run with `pytest -m slow`.
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

#: the family whose per-example loop runs eagerly (jit == eager); the others' run jitted
EAGER_FAMILY = "nonzoo_cnn"
#: ... for these methods in the default suite: the model's own apply (gradient), the rule engine's
#: interception of every layer (LRP), DeepLIFT's reference pass, the captured feature maps (Grad-CAM)
EAGER_METHODS = ("gradient", "lrp_epsilon_plus_flat", "deeplift", "grad_cam")

#: further shrunk sample/step counts (on top of test_conformance's SMALL): five families, tiny inputs
TINY = {"steps": 2, "n_samples": 8, "n_masks": 4, "iterations": 2, "n_iter": 2, "n_steps": 2, "samples": 4}


def tiny_hparams(name: str) -> dict:
    return {k: min(v, TINY.get(k, v)) for k, v in small_hparams(name).items()}


#: (method, family) -> reason, for known gaps marked xfail(strict=True) at the deadline (issue 13)
XFAIL: dict[tuple[str, str], str] = {}


#: run on every family in the default (fast) suite: one method per mechanism of the rule engine
CORE = ["gradient", "guided_backprop", "deeplift", "lrp_epsilon_plus_flat", "grad_cam", "fullgrad"]
#: methods that only evaluate `model(params, x)` and its input gradient: nothing in them depends on
#: how the model is written (tests/test_conformance.py holds them to the same properties), so the
#: default suite leaves them to the slow product; `gradient` stays in CORE as the baseline
MODEL_AGNOSTIC_FAMILIES = ("gradient", "perturbation", "surrogate", "control")
STRUCTURE_GRADIENT = ("fullgrad",)  # registered in the gradient family, but reads the layers


def _agnostic(name: str) -> bool:
    return (attrax.methods.get(name).meta.get("family") in MODEL_AGNOSTIC_FAMILIES
            and name not in STRUCTURE_GRADIENT)


def _fast(fam: str, name: str) -> bool:
    """CORE methods on every family; every other structure method (and composite) on one family
    where it is defined, assigned round-robin so that each family sees a share of them; the
    undefined pairs everywhere; model-agnostic methods only in the slow product."""
    if name in CORE or (name, fam) in UNDEFINED:  # the undefined pairs fail fast: always checked
        return True
    if _agnostic(name):
        return False
    others = [n for n in NAMES + COMPOSITES if n not in CORE and not _agnostic(n)]
    defined = [f for f in FAMILIES if (name, f) not in UNDEFINED]
    return defined[others.index(name) % len(defined)] == fam


def _cases():
    for fam in FAMILIES:
        for name in NAMES + COMPOSITES:
            marks = [] if _fast(fam, name) else [pytest.mark.slow]
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
    hp = tiny_hparams(name)
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

    # vmap == loop: one example at a time, each with its own key. Eagerly (jit == eager too) on
    # the plain linen CNN for EAGER_METHODS (one per way a method reaches into the model) and for
    # the slow product's pairs there; jitted otherwise: an eager run compiles each of the method's
    # hundreds of ops one by one (70% of this file's time when every pair ran eagerly). That jit ==
    # eager holds is a property of the method's code, checked on the zoo (tests/test_conformance.py)
    eager = family == EAGER_FAMILY and (name in EAGER_METHODS or not _fast(family, name))
    loop = attrax.explain(name, model, params, x, target, key=5, chunk_size=1, jit=not eager, **hp)
    _close(loop, r, f"the jitted batch and {'eager' if eager else 'jitted'} per-example calls", f"{name} on {family}")


def test_undefined_pairs_are_real_pairs():
    """Guards UNDEFINED/XFAIL/CORE against typos that would silently test nothing, and checks that
    the fast suite still runs every method somewhere and every CORE method everywhere."""
    for name, fam in [*UNDEFINED, *XFAIL]:
        assert fam in FAMILIES and (name in NAMES or name in COMPOSITES), (name, fam)
    assert set(CORE) <= set(NAMES) and EAGER_FAMILY in FAMILIES and set(EAGER_METHODS) <= set(CORE)
    for name in NAMES + COMPOSITES:
        assert _agnostic(name) or any(_fast(f, name) for f in FAMILIES), name
