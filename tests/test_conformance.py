"""THE shared conformance test: every registered method (and a few compositions) must

- return relevance with the input's shape, finite;
- give the same map jitted on the batch as on one example at a time (`chunk_size=1`: each call
  gets that example's key), i.e. vmap == loop, to float32 tolerance; for one method per family
  (EAGER) the per-example calls run eagerly (`jit=False`), so jit == eager is checked at once;
  `pytest -m slow` runs the eager loop for every method (tests/test_conformance.py's
  `test_jit_equals_eager_every_method`);
- be deterministic for a fixed key (and, when registered `stochastic`, change with the key);
- ship `conf/method/<name>.yaml` starting with `# @package method`, whose `name` is the method and
  whose other keys are a subset of the function's keyword hyperparameters.

Runs on a tiny randomly initialized `camnet` (GAP -> dense head, so the CAM family applies too)
with 3-channel 12x12 inputs; sample/step counts are shrunk via SMALL where a method has them.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import attrax

CONF = Path(attrax.__file__).resolve().parent.parent / "conf" / "method"
NAMES = attrax.methods.names()
COMPOSITES = ["smooth(integrated_gradients)", "squared(times_input(guided_backprop))"]

#: Hyperparameters shrunk for speed whenever a method has them (any method, any engineer).
SMALL = {
    "steps": 3,
    "n_samples": 16,  # kernel_shap with ridge 0 needs more samples than its 9 patches here
    "n_masks": 8,
    "n_references": 2,
    "n_baselines": 2,
    "iterations": 3,
    "n_iter": 3,
    "n_steps": 3,
    "samples": 6,
}


def small_hparams(name: str) -> dict:
    hp = attrax.methods.get(name).hparams()
    return {k: v for k, v in SMALL.items() if k in hp and isinstance(hp[k], int) and hp[k] > v}


@pytest.fixture(scope="module")
def setup():
    model = attrax.models.create("camnet", channels=(4, 8), num_classes=3)
    x = jax.random.uniform(jax.random.key(0), (2, 12, 12, 3))
    params = attrax.models.init(model, jax.random.key(1), x)
    keys = iter(jax.random.split(jax.random.key(2), 100))
    # non-zero biases: zero-initialized biases hide bugs (e.g. positive homogeneity shortcuts)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape) if p.ndim == 1 else p, params)
    return model, params, x, jnp.array([1, 2], jnp.int32)


def _close(a, b, what: str, name: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(b).max()), 1e-12)
    err = float(np.abs(a - b).max())
    assert err <= 1e-4 * scale + 1e-6, f"{name}: {what} differ by {err:.3g} (scale {scale:.3g})"


#: methods whose per-example loop runs eagerly in the default suite: one per family (and one
#: stochastic composition). An eager call compiles every primitive at every shape on its own
#: (~40 s of the file's 68 s when every method ran eagerly; the jitted loop checks the same
#: batch independence and per-example keys); the slow test below runs all of them eagerly.
EAGER = ("gradient", "integrated_gradients", "guided_backprop", "lrp_epsilon", "deeplift", "grad_cam",
         "occlusion", "lime", "random", "smooth(integrated_gradients)")


def _loop_equals_batch(name, model, params, x, target, r, hp, jit):
    loop = attrax.explain(name, model, params, x, target, key=5, chunk_size=1, jit=jit, **hp)
    what = "the jitted batch and " + ("jitted" if jit else "eager") + " per-example calls"
    _close(loop, r, what, name)


@pytest.mark.parametrize("name", NAMES + COMPOSITES)
def test_method_conformance(setup, name):
    model, params, x, target = setup
    hp = small_hparams(name)
    r = attrax.explain(name, model, params, x, target, key=5, **hp)
    assert r.shape == x.shape, f"{name}: shape {r.shape} != input shape {x.shape}"
    assert bool(jnp.all(jnp.isfinite(r))), f"{name}: non-finite relevance"

    again = attrax.explain(name, model, params, x, target, key=5, **hp)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(again), err_msg=f"{name}: not deterministic")
    if attrax.methods.get(name).meta.get("stochastic"):
        other = attrax.explain(name, model, params, x, target, key=6, **hp)
        assert bool(jnp.all(jnp.isfinite(other))), f"{name}: non-finite relevance with another key"
        assert float(jnp.abs(other - r).max()) > 0, f"{name}: registered stochastic but ignores the key"

    # vmap == loop (and, for EAGER, jit == eager in the same run): the method called on one
    # example at a time (each with its own key) must reproduce the compiled batch.
    _loop_equals_batch(name, model, params, x, target, r, hp, jit=name not in EAGER)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES + COMPOSITES if n not in EAGER])
def test_jit_equals_eager_every_method(setup, name):
    model, params, x, target = setup
    hp = small_hparams(name)
    r = attrax.explain(name, model, params, x, target, key=5, **hp)
    _loop_equals_batch(name, model, params, x, target, r, hp, jit=False)


@pytest.mark.parametrize("name", NAMES)
def test_method_config(name):
    path = CONF / f"{name}.yaml"
    assert path.exists(), f"missing config {path}"
    text = path.read_text()
    assert text.startswith("# @package method"), f"{path} must start with '# @package method'"
    cfg = yaml.safe_load(text) or {}
    assert cfg.get("name") == name, f"{path}: name {cfg.get('name')!r} != {name!r}"
    entry = attrax.methods.get(name)
    allowed = set(entry.hparams())
    extra = set(cfg) - {"name"} - allowed
    assert not extra, f"{path}: keys {sorted(extra)} are not hyperparameters of {name} ({sorted(allowed)})"
    # and every listed default matches the function's (a config must not silently change them)
    sig = inspect.signature(entry.fn).parameters
    for k, v in cfg.items():
        if k != "name" and isinstance(v, int | float | str | None) and not isinstance(sig[k].default, tuple | list):
            assert v == sig[k].default or v is None or sig[k].default is None, (
                f"{path}: {k}={v!r} but the function's default is {sig[k].default!r}"
            )


def test_every_family_has_an_eager_representative():
    fams = {attrax.methods.get(n).meta.get("family") for n in NAMES}
    covered = {attrax.methods.get(n).meta.get("family") for n in EAGER if n in NAMES}
    assert fams == covered, f"families without a method in EAGER: {sorted(fams - covered)}"


def test_registry_metadata_is_complete():
    for name in NAMES:
        meta = attrax.methods.get(name).meta
        assert meta.get("needs") in ("apply", "activation", "stages", "layers"), name
        assert isinstance(meta.get("stochastic"), bool), name
        assert callable(meta.get("cost")), name
        entry = attrax.methods.get(name)
        assert int(meta["cost"](entry.hparams())) >= 0, name
