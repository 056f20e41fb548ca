"""Bad input gets one clear AttraxError line (issue 14, defect 12): an empty batch, a target
outside the model's outputs, a model that returns NaN, and `n_images=0` on the command line."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import pytest

import attrax
from attrax import cli


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_empty_batch(linear):
    model, params, x, target, _ = linear
    with pytest.raises(attrax.AttraxError, match="empty batch") as err:
        attrax.explain("gradient", model, params, x[:0], target[:0])
    _one_line(err)
    with pytest.raises(attrax.AttraxError, match="empty batch"):
        attrax.evaluate("pixel_flipping", model, params, x[:0], target[:0], x[:0], key=0)


@pytest.mark.parametrize("bad", [3, -1])
def test_target_outside_the_models_outputs(linear, bad):
    model, params, x, target, _ = linear  # 3 classes
    t = target.at[2].set(bad)
    with pytest.raises(attrax.AttraxError, match=f"target {bad} .*outside the model's 3 outputs") as err:
        attrax.explain("gradient", model, params, x, t)
    _one_line(err)
    with pytest.raises(attrax.AttraxError, match="outside the model's 3 outputs"):
        attrax.evaluate("pixel_flipping", model, params, x, t, x, key=0)


def test_target_predicted_is_the_models_argmax_and_other_strings_are_one_line(linear):
    """target="predicted" explains (and scores) each input's argmax class: the same maps as the
    indices themselves; "label" (it needs the labels), a typo, floats and strings are one line."""
    model, params, x, target, _ = linear
    pred = jnp.argmax(model(params, x), axis=-1).astype(jnp.int32)
    r = attrax.explain("gradient", model, params, x, "predicted")
    assert jnp.array_equal(r, attrax.explain("gradient", model, params, x, pred))
    s = attrax.evaluate("pixel_flipping", model, params, x, "predicted", r, key=0)
    same = attrax.evaluate("pixel_flipping", model, params, x, pred, r, key=0)
    assert s.values.keys() == same.values.keys()
    assert all(jnp.allclose(s.values[k], same.values[k]) for k in s.values)
    for bad, msg in (("label", "needs the labels"), ("predicted_class", "did you mean 'predicted'"),
                     (jnp.ones(4) * 1.0, "int class indices"), (["a", "b", "c", "d"], "int class indices")):
        with pytest.raises(attrax.AttraxError, match=msg) as err:
            attrax.explain("gradient", model, params, x, bad)
        _one_line(err)


def test_model_returning_nan_is_named(linear):
    model, params, x, target, _ = linear
    nan_model = attrax.as_model(lambda p, xx: model(p, xx) * jnp.nan)
    with pytest.raises(attrax.AttraxError, match="model returns NaN/inf logits for 4 of 4") as err:
        attrax.explain("gradient", nan_model, params, x, target)
    _one_line(err)
    # a NaN in one image only (picked by its pixels: the batch may run in chunks): that image is counted
    first = x[0, 0, 0, 0]
    one = attrax.as_model(lambda p, xx: model(p, xx) * jnp.where(xx[:, :1, 0, 0] == first, jnp.nan, 1.0))
    with pytest.raises(attrax.AttraxError, match="NaN/inf logits for 1 of 4"):
        attrax.explain("gradient", one, params, x, target)
    r = attrax.explain("gradient", model, params, x, target)  # finite maps pass through unchanged
    assert bool(jnp.all(jnp.isfinite(r)))


def test_cli_n_images_zero_is_one_line(capsys):
    with pytest.raises(SystemExit) as ex:
        cli.main(["n_images=0", "method=gradient"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "attrax: error: n_images must be a positive integer, got '0'"
    for bad in ("n_images=-3", "n_images=ten"):
        with pytest.raises(attrax.AttraxError, match="n_images must be a positive integer"):
            cli.check_overrides([bad])
    cli.check_overrides(["n_images=5", "n_images=null"])  # fine


def test_cli_n_images_zero_in_a_subprocess():
    code = "import sys; from attrax import cli; sys.exit(cli.main(['n_images=0']))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln]
    assert lines == ["attrax: error: n_images must be a positive integer, got '0'"], p.stderr
    assert "Traceback" not in p.stderr
