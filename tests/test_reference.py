"""Agreement with established PyTorch libraries (Captum 0.9) on the reference CNN.

The `reference` fixture loads the weights of the reference MNIST CNN into the zoo's `cnn_a`
and the maps Captum produced for ten test digits (tests/data/reference/README.md).

Tolerance: float32. Different libraries sum convolutions in different orders, so maps agree to
rounding, not bitwise: we require max |ours - ref| <= 1e-5 * max |ref| + 1e-6 (measured: ~2e-7
relative for the gradient maps and ~7e-7 for occlusion, whose logit differences cancel digits).
"""

from __future__ import annotations

import numpy as np
import pytest

import attrax

RTOL = 1e-5
ATOL = 1e-6

# method -> hyperparameters that reproduce the reference settings (README table).
SETTINGS = {
    "gradient": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 50, "rule": "right", "baseline": "zero"},
    "guided_backprop": {},
    "deconvnet": {},
    "occlusion": {"window": 4, "stride": 4, "fill": 0.0},
}


def test_reference_logits(reference):
    model, params, maps, _ = reference
    logits = np.asarray(attrax.forward(model, params, maps["x"]))
    np.testing.assert_allclose(logits, maps["logits"], atol=1e-4)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_matches_reference(reference, method):
    model, params, maps, meta = reference
    assert method in meta["methods"]
    ref = maps[method]
    r = np.asarray(attrax.explain(method, model, params, maps["x"], maps["target"], **SETTINGS[method]))
    assert r.shape == ref.shape
    err = np.abs(r - ref).max()
    assert err <= RTOL * np.abs(ref).max() + ATOL, f"{method}: max abs error {err:.3g}"


def test_deconvnet_and_guided_differ_from_gradient(reference):
    """Guards the comparison above: the three maps are really different on this ReLU net."""
    _, _, maps, _ = reference
    g = maps["gradient"]
    for m in ("guided_backprop", "deconvnet"):
        assert np.abs(maps[m] - g).max() > 1e-3 * np.abs(g).max()
