"""Known answers of the CAM family on global-average-pooling -> linear heads, Score-CAM on a model
that looks at one channel, layer selection, and clear errors."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.methods import cam as cam_mod


def _uniform(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(model, seed, x):
    """Random parameters of the right shapes without compiling an init (keeps the tests fast)."""
    module = getattr(model, "module", model)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape), s.dtype), shapes)


def _gap_net(channels, key=0, n=3, size=12):
    """A CAM net with random nonzero biases; `channels=(k,)` keeps features at input resolution."""
    model = attrax.models.create("camnet", num_classes=4, channels=channels)
    x = _uniform(key, (n, size, size, 1))
    params = _init(model, key + 1, x)
    params = jax.tree.map(lambda a: a, params)
    b = _normal(key + 2, (4,))
    params["params"]["out"]["bias"] = b
    target = jnp.arange(n, dtype=jnp.int32) % 4
    return model, params, x, target


def _closed_form(model, params, x, target):
    a = jax.jit(model.features)(params, x)
    w = params["params"]["out"]["kernel"][:, target].T  # (n, K)
    b = params["params"]["out"]["bias"][target]
    cam = jnp.einsum("nk,nhwk->nhw", w, a)
    return a, w, b, cam


@pytest.fixture(scope="module")
def gap_full():
    return _gap_net((6,))


@pytest.fixture(scope="module")
def gap_pool():
    return _gap_net((4, 8))


@pytest.fixture(scope="module")
def linear_act():
    """The `gap_pool` architecture without activations (one shared Model object: one compile)."""
    return attrax.models.create("camnet", num_classes=4, channels=(4, 8), act=lambda z: z)


def test_cam_mean_equals_logit_minus_bias_at_feature_resolution(gap_pool):
    model, params, x, target = gap_pool
    m = jax.jit(lambda p, xx, t: cam_mod.cam_map(model, p, xx, t))(params, x, target)
    assert m.shape == (3, 6, 6)
    logits = jax.jit(model.apply_fn)(params, x)[jnp.arange(3), target]
    b = params["params"]["out"]["bias"][target]
    np.testing.assert_allclose(m.mean(axis=(1, 2)), logits - b, rtol=1e-4, atol=1e-5)
    _, _, _, cf = _closed_form(model, params, x, target)
    np.testing.assert_allclose(m, cf, rtol=1e-4, atol=1e-5)
    # explain() upsamples to the input and broadcasts over channels
    r = attrax.explain("cam", model, params, x, target)
    assert r.shape == x.shape


def test_cam_and_grad_cam_closed_forms(gap_full):
    model, params, x, target = gap_full
    _, _, b, cf = _closed_form(model, params, x, target)
    hw = x.shape[1] * x.shape[2]
    r_cam = attrax.explain("cam", model, params, x, target)[..., 0]
    np.testing.assert_allclose(r_cam, cf, rtol=1e-4, atol=1e-5)
    logits = jax.jit(model.apply_fn)(params, x)[jnp.arange(3), target]
    np.testing.assert_allclose(r_cam.mean(axis=(1, 2)), logits - b, rtol=1e-4, atol=1e-5)
    r_gc = attrax.explain("grad_cam", model, params, x, target)[..., 0]
    np.testing.assert_allclose(r_gc, jax.nn.relu(cf) / hw, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(r_gc).max()) > 0


def test_grad_cam_pp_closed_forms(gap_full):
    model, params, x, target = gap_full
    a, w, _, _ = _closed_form(model, params, x, target)
    hw = x.shape[1] * x.shape[2]
    mean_a = a.mean(axis=(1, 2))  # (n, K)
    # tutorial: alpha = 1 / (2 + g S_k) with g = w / HW, S_k = HW mean(A_k): weights summed over HW
    w_tut = jax.nn.relu(w) / (2.0 + w * mean_a)
    expect_tut = jax.nn.relu(jnp.einsum("nk,nhwk->nhw", w_tut, a))
    r = attrax.explain("grad_cam_pp", model, params, x, target, variant="tutorial")[..., 0]
    np.testing.assert_allclose(r, expect_tut, rtol=1e-4, atol=1e-6)
    # paper: alphas normalized to sum to one where the gradient is positive -> weights relu(w)/HW
    expect_paper = jax.nn.relu(jnp.einsum("nk,nhwk->nhw", jax.nn.relu(w), a)) / hw
    r = attrax.explain("grad_cam_pp", model, params, x, target, variant="paper")[..., 0]
    np.testing.assert_allclose(r, expect_paper, rtol=1e-4, atol=1e-6)


def test_grad_cam_pp_guards_zero_division(gap_full):
    # all-zero feature maps and gradients: 0/0 everywhere must give a finite (zero) map
    model, params, x, target = gap_full
    params = jax.tree.map(lambda a: a, params)
    params["params"]["out"]["kernel"] = jnp.zeros_like(params["params"]["out"]["kernel"])
    for variant in ("paper", "tutorial"):
        r = attrax.explain("grad_cam_pp", model, params, x, target, variant=variant)
        assert bool(jnp.all(jnp.isfinite(r))) and float(jnp.abs(r).max()) == 0.0


def test_guided_grad_cam_is_guided_backprop_times_grad_cam(gap_pool, linear_act):
    # without ReLUs guided backprop is the gradient, so guided Grad-CAM = gradient x Grad-CAM
    model, (_, params, x, target) = linear_act, gap_pool
    r = attrax.explain("guided_grad_cam", model, params, x, target)
    g = attrax.explain("gradient", model, params, x, target)
    gc = attrax.explain("grad_cam", model, params, x, target)
    np.testing.assert_allclose(r, g * gc, rtol=1e-4, atol=1e-8)


def test_named_layer_matches_features_stage(gap_pool, linear_act):
    # identity activation: the output of conv2 is exactly the `features` stage
    model, (_, params, x, target) = linear_act, gap_pool
    a = attrax.explain("grad_cam", model, params, x, target)
    b = attrax.explain("grad_cam", model, params, x, target, layer="conv2")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    r = attrax.explain("score_cam", model, params, x, target, layer="pool1")
    assert r.shape == x.shape and bool(jnp.all(jnp.isfinite(r)))
    with pytest.raises(attrax.AttraxError, match="no layer 'nope'.*conv1"):
        attrax.explain("grad_cam", model, params, x, target, layer="nope")
    with pytest.raises(attrax.AttraxError, match="spatial maps"):
        attrax.explain("grad_cam", model, params, x, target, layer="out")


class QuadrantNet(nn.Module):
    """features: channel k = the image on quadrant k; logit 0 = mean of channel `j`, logit 1 = 0."""

    j: int = 2

    def features(self, x):
        h, w = x.shape[1:3]
        ii, jj = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
        quad = (ii >= h // 2).astype(jnp.int32) * 2 + (jj >= w // 2).astype(jnp.int32)
        masks = jax.nn.one_hot(quad, 4)  # (H, W, 4)
        return x.sum(-1, keepdims=True) * masks

    def head(self, a):
        s = 10.0 * a[..., self.j].mean(axis=(1, 2))
        return jnp.stack([s, jnp.zeros_like(s)], axis=-1)

    def __call__(self, x, train: bool = False):
        return self.head(self.features(x))


@pytest.mark.parametrize("score,subtract", [("logit", False), ("probability", True)])
def test_score_cam_ranks_the_region_of_the_used_channel_first(score, subtract):
    model = attrax.as_model(QuadrantNet(j=2))
    x = 0.2 + 0.8 * _uniform(0, (2, 8, 8, 1))
    params = _init(model, 0, x)
    r = attrax.explain(
        "score_cam",
        model,
        params,
        x,
        jnp.zeros(2, jnp.int32),
        score=score,
        subtract_baseline=subtract,
    )[..., 0]
    region = np.zeros((8, 8), bool)
    region[4:, :4] = True  # quadrant 2
    for i in range(2):
        top = np.argsort(-np.asarray(r[i]).ravel())[: region.sum()]
        assert region.ravel()[top].all()
        assert float(np.abs(np.asarray(r[i])[~region]).max()) < 1e-6


def test_errors_without_stages(linear):
    model, params, x, target, _ = linear
    for name in ("cam", "grad_cam", "grad_cam_pp", "score_cam"):
        with pytest.raises(attrax.AttraxError, match="stages|NHWC"):
            attrax.explain(name, model, params, x, target)
    plain = attrax.as_model(lambda p, xx: model(p, xx))
    with pytest.raises(attrax.AttraxError):
        attrax.explain("grad_cam", plain, params, x, target)
    mlp = attrax.models.create("mlp", hidden=(8,))
    mp = _init(mlp, 0, jnp.zeros((1, 6, 6, 1)))
    with pytest.raises(attrax.AttraxError, match="spatial maps"):
        attrax.explain("grad_cam", mlp, mp, x, target)


SMALL = {
    "cam": {},
    "grad_cam": {},
    "grad_cam_pp": {},
    "guided_grad_cam": {},
    "score_cam": {},
    "lime": {"n_samples": 12, "patch": 4},
    "kernel_shap": {"n_samples": 12, "patch": 4},
    "meaningful_perturbation": {"steps": 3, "mask_size": 2},
}


# the module's own, older conformance check: tests/test_conformance.py holds every registered method
# (these included) to the same properties in the default run, and checks their configs
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_conformance_of_this_module(gap_pool, name):
    """Shape, finiteness, jit == eager, determinism and batch independence; config keys."""
    import yaml

    from attrax.methods import per_example_keys

    model, params, x, target = gap_pool
    hp = SMALL[name]
    r = attrax.explain(name, model, params, x, target, key=7, **hp)
    assert r.shape == x.shape and bool(jnp.all(jnp.isfinite(r)))
    again = attrax.explain(name, model, params, x, target, key=7, chunk_size=2, **hp)
    np.testing.assert_allclose(r, again, rtol=1e-4, atol=1e-6)
    entry = attrax.methods.get(name)
    if entry.meta["stochastic"]:  # seeded: another key gives other samples
        other = attrax.explain(name, model, params, x, target, key=8, **hp)
        assert not np.allclose(r, other)
    if entry.meta["family"] == "cam":  # eager runs of the sampling methods are slow to dispatch
        keys = per_example_keys(7, x.shape[0])
        eager = entry.fn(model, params, x, target, key=keys, **hp)
        np.testing.assert_allclose(r, eager, rtol=1e-3, atol=1e-5)
    conf = Path(__file__).resolve().parents[1] / "conf" / "method" / f"{name}.yaml"
    cfg = yaml.safe_load(conf.read_text())
    assert cfg.pop("name") == name
    assert set(cfg) <= set(entry.hparams())
    assert all(entry.hparams()[k] == v for k, v in cfg.items())


# ----------------------------------------------------------------------------- conventions (issue 14)


def test_cam_refuses_heads_that_are_not_gap_linear():
    x = _uniform(0, (2, 8, 8, 1))
    target = jnp.zeros(2, jnp.int32)
    cnn = attrax.models.create("cnn", num_classes=3, channels=(4, 4), dense=(8,))
    with pytest.raises(attrax.AttraxError, match="global-average-pooling -> linear") as err:
        attrax.explain("cam", cnn, _init(cnn, 0, x), x, target)
    assert "\n" not in str(err.value) and "grad_cam" in str(err.value)
    gap = attrax.models.create("camnet", num_classes=3, channels=(4, 4))
    with pytest.raises(attrax.AttraxError, match="global-average-pooling"):  # a layer below a conv
        attrax.explain("cam", gap, _init(gap, 0, x), x, target, layer="pool1")
    # a 1x1 convolution before the pooling commutes with it: accepted
    allconv = attrax.models.create("allconv", num_classes=3, channels=(4, 4))
    r = attrax.explain("cam", allconv, _init(allconv, 0, x), x, target)
    assert r.shape == x.shape and bool(jnp.all(jnp.isfinite(r)))


def test_grad_cam_pp_keeps_small_gradients(gap_full):
    # weights of 1e-6: gradients ~1e-8, whose squares and cubes an absolute cut-off drops
    model, params, x, target = gap_full
    params = jax.tree.map(lambda a: a, params)
    params["params"]["out"]["kernel"] = 1e-6 * params["params"]["out"]["kernel"]
    a, w, _, _ = _closed_form(model, params, x, target)
    hw = x.shape[1] * x.shape[2]
    expect_paper = jax.nn.relu(jnp.einsum("nk,nhwk->nhw", jax.nn.relu(w), a)) / hw
    r = attrax.explain("grad_cam_pp", model, params, x, target, variant="paper")[..., 0]
    assert float(expect_paper.max()) > 0
    np.testing.assert_allclose(r, expect_paper, rtol=1e-4, atol=1e-3 * float(expect_paper.max()))
    w_tut = jax.nn.relu(w) / (2.0 + w * a.mean(axis=(1, 2)))
    expect_tut = jax.nn.relu(jnp.einsum("nk,nhwk->nhw", w_tut, a))
    r = attrax.explain("grad_cam_pp", model, params, x, target, variant="tutorial")[..., 0]
    np.testing.assert_allclose(r, expect_tut, rtol=1e-4, atol=1e-3 * float(expect_tut.max()))


def test_score_cam_channel_softmax_weighting():
    model = attrax.as_model(QuadrantNet(j=2))
    x = 0.2 + 0.8 * _uniform(0, (2, 8, 8, 1))
    params = _init(model, 0, x)
    target = jnp.zeros(2, jnp.int32)
    r = attrax.explain("score_cam", model, params, x, target, score="logit", weighting="softmax")[..., 0]
    # by hand: s_k = logit of x masked by the min-max normalized k-th map; weights softmax_k(s)
    a = np.asarray(model.features(params, x))
    lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
    h = (a - lo) / (hi - lo)
    s = np.stack([np.asarray(model(params, x * h[..., k : k + 1]))[:, 0] for k in range(4)], -1)
    wts = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    expect = np.maximum(np.einsum("nk,nhwk->nhw", wts, a), 0)
    np.testing.assert_allclose(r, expect, rtol=1e-5, atol=1e-6)
    raw = attrax.explain("score_cam", model, params, x, target, score="logit")[..., 0]
    assert float(np.abs(np.asarray(raw)[:, :4, :4]).max()) < 1e-6 < float(np.asarray(r)[:, :4, :4].min())
    with pytest.raises(attrax.AttraxError, match="weighting"):
        attrax.explain("score_cam", model, params, x, target, weighting="nope")
