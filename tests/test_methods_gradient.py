"""Known answers for the gradient family, combinators, perturbation methods and controls
(METHODS.md "Testable properties")."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.methods import combinators, per_example_keys
from attrax.methods.gradient import make_baseline, riemann
from attrax.methods.perturbation import occlusion_windows, rise_masks


def explain(*args, **kwargs):
    """attrax.explain without jit: on these tiny models eager runs are cheaper than compiles
    (the conformance test checks jit == eager for every method)."""
    return attrax.explain(*args, jit=kwargs.pop("jit", True), **kwargs)


def _lin_expected(linear):
    model, params, x, target, w = linear
    wt = w[:, target].T.reshape(x.shape)  # (n, 6, 6, 1): the target's weights per example
    return model, params, x, target, wt


# ----------------------------------------------------------------------------- linear identities


def test_linear_gradient_is_w(linear):
    model, params, x, target, wt = _lin_expected(linear)
    g = explain("gradient", model, params, x, target)
    np.testing.assert_allclose(g, wt, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(explain("gradient", model, params, x, target, postprocess="square"), wt**2, atol=1e-7)


def test_linear_input_x_gradient_and_times_input(linear):
    model, params, x, target, wt = _lin_expected(linear)
    np.testing.assert_allclose(explain("input_x_gradient", model, params, x, target), wt * x, atol=1e-6)
    np.testing.assert_allclose(explain("times_input(gradient)", model, params, x, target), wt * x, atol=1e-6)


@pytest.mark.parametrize("rule,steps", [("right", 1), ("left", 3), ("midpoint", 2), ("trapezoid", 5)])
def test_linear_ig_is_w_times_x(linear, rule, steps):
    model, params, x, target, wt = _lin_expected(linear)
    r = explain("integrated_gradients", model, params, x, target, steps=steps, rule=rule)
    np.testing.assert_allclose(r, wt * x, rtol=1e-5, atol=1e-6)


def test_linear_smoothgrad_is_w_for_any_sigma(linear):
    model, params, x, target, wt = _lin_expected(linear)
    for sigma in (0.0, 0.5):
        r = explain("smoothgrad", model, params, x, target, key=3, n_samples=5, sigma=sigma)
        np.testing.assert_allclose(r, wt, rtol=1e-5, atol=1e-6)
    sq = explain("smoothgrad_sq", model, params, x, target, key=3, n_samples=5)
    np.testing.assert_allclose(sq, wt**2, rtol=1e-5, atol=1e-7)
    var = explain("vargrad", model, params, x, target, key=3, n_samples=5)
    np.testing.assert_allclose(var, 0.0, atol=1e-10)


def test_linear_occlusion_one_pixel_is_w_times_x(linear):
    model, params, x, target, wt = _lin_expected(linear)
    r = explain("occlusion", model, params, x, target, window=1, stride=1, fill=0.0)
    np.testing.assert_allclose(r, wt * x, rtol=1e-4, atol=1e-5)


def test_linear_occlusion_overlapping_windows_average(linear):
    """2x2 windows, stride 1: each pixel = mean over its covering windows of the window's w.x."""
    model, params, x, target, wt = _lin_expected(linear)
    r = np.asarray(explain("occlusion", model, params, x, target, window=2, stride=1))
    masks = occlusion_windows(6, 6, 2, 1)  # (25, 6, 6)
    contrib = np.asarray(wt * x)[..., 0]
    drops = np.einsum("phw,nhw->np", masks, contrib)
    expected = np.einsum("np,phw->nhw", drops, masks) / masks.sum(0)
    np.testing.assert_allclose(r[..., 0], expected, rtol=1e-4, atol=1e-5)


def test_linear_expected_gradients_one_baseline(linear):
    model, params, x, target, wt = _lin_expected(linear)
    b = jnp.full(x.shape[1:], 0.25)
    r = explain("expected_gradients", model, params, x, target, key=1, n_samples=3, baselines=b)
    np.testing.assert_allclose(r, wt * (x - 0.25), rtol=1e-5, atol=1e-6)
    # two constant baselines 0.2 and 0.4: per example, r / w = x - (mean of the drawn baselines),
    # a constant between 0.2 and 0.4 (exact whatever the draws)
    bs = jnp.stack([jnp.full(x.shape[1:], 0.2), jnp.full(x.shape[1:], 0.4)])
    r = explain("gradient_shap", model, params, x, target, key=1, n_samples=8, stdev=0.0, baselines=bs)
    bbar = np.asarray(x - r / wt).reshape(x.shape[0], -1)
    np.testing.assert_allclose(bbar, bbar[:, :1].repeat(bbar.shape[1], 1), atol=1e-4)
    assert ((bbar >= 0.2 - 1e-4) & (bbar <= 0.4 + 1e-4)).all()
    assert len(np.unique(np.round(bbar[:, 0], 4))) > 1  # the draws differ between examples


def test_linear_rise_matches_closed_form(linear):
    """RISE on f = w.x + b: S = sum_j (w.(x*M_j) + b) M_j / (N p), with the same masks."""
    model, params, x, target, _ = linear
    n_masks, cells, p = 40, 3, 0.5
    r = np.asarray(explain("rise", model, params, x, target, n_masks=n_masks, cells=cells, p_keep=p))
    m = np.asarray(rise_masks(n_masks, cells, p, 6, 6, 0))
    masked = (x[None] * m[:, None, :, :, None]).reshape(-1, 6, 6, 1)
    logits = np.asarray(model(params, masked))
    s = logits.reshape(n_masks, x.shape[0], -1)[:, np.arange(x.shape[0]), np.asarray(target)]
    expected = np.einsum("jn,jhw->nhw", s, m) / (n_masks * p)
    np.testing.assert_allclose(r[..., 0], expected, rtol=1e-4, atol=1e-5)


def test_rise_masks_are_smooth_with_keep_probability():
    m = np.asarray(rise_masks(2000, 4, 0.3, 16, 16, seed=5))
    assert m.shape == (2000, 16, 16) and m.min() >= 0 and m.max() <= 1
    assert abs(m.mean() - 0.3) < 0.02
    assert len(np.unique(np.round(m, 3))) > 10  # bilinear upsampling, not binary


# ----------------------------------------------------------------------------- score option


def test_probability_score_is_explicit(linear):
    model, params, x, target, _ = linear

    def prob(xx):
        return jax.nn.softmax(model(params, xx[None]))[0]

    expected = jnp.stack([jax.grad(lambda xx, t=t: prob(xx)[t])(xi) for xi, t in zip(x, target, strict=True)])
    g = explain("gradient", model, params, x, target, score="probability")
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)
    logit_g = explain("gradient", model, params, x, target)
    assert float(jnp.abs(g - logit_g).max()) > 1e-3


# ----------------------------------------------------------------------------- integrated gradients


@pytest.fixture(scope="module")
def relu_net():
    """A small ReLU MLP with non-zero biases (so the IG path crosses ReLU kinks) on 6x6 inputs."""
    model = attrax.models.create("mlp", hidden=(16, 16), num_classes=3)
    x = 3 * jax.random.uniform(jax.random.key(7), (4, 6, 6, 1))
    params = attrax.models.init(model, jax.random.key(8), x)
    keys = iter(jax.random.split(jax.random.key(9), 100))
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape) if p.ndim == 1 else p, params)
    return model, params, x, jnp.array([0, 1, 2, 0], jnp.int32)


@pytest.mark.parametrize("name", ["input_x_gradient", "integrated_gradients", "guided_backprop", "occlusion", "rise"])
def test_probability_score_option(relu_net, name):
    model, params, x, target = relu_net
    hp = {"steps": 2} if name == "integrated_gradients" else {"n_masks": 8} if name == "rise" else {}
    p = explain(name, model, params, x, target, score="probability", **hp)
    lg = explain(name, model, params, x, target, **hp)
    assert p.shape == x.shape and bool(jnp.all(jnp.isfinite(p)))
    assert float(jnp.abs(p - lg).max()) > 1e-6 * float(jnp.abs(lg).max())


def test_ig_completeness_shrinks_with_steps(relu_net):
    model, params, x, target = relu_net
    logits = model(params, x)
    delta = logits[jnp.arange(4), target] - model(params, jnp.zeros_like(x))[jnp.arange(4), target]
    res = {}
    for steps in (4, 256):
        r = explain("integrated_gradients", model, params, x, target, steps=steps)
        res[steps] = np.asarray(jnp.abs(r.reshape(4, -1).sum(1) - delta) / jnp.abs(delta))
    assert (res[256] < 1e-2).all(), res
    assert res[256].max() < res[4].max()


def test_ig_one_right_step_is_grad_times_delta(relu_net):
    model, params, x, target = relu_net
    g = explain("gradient", model, params, x, target)
    keys = per_example_keys(0, x.shape[0])
    for baseline in ("zero", "black", "mean", "blur", "uniform", 0.3):
        r = explain(
            "integrated_gradients",
            model,
            params,
            x,
            target,
            key=0,
            steps=1,
            rule="right",
            baseline=baseline,
        )
        base = make_baseline(x, baseline, keys)
        np.testing.assert_allclose(r, g * (x - base), rtol=1e-5, atol=1e-6, err_msg=str(baseline))


def test_baselines_known_values():
    x = jnp.stack([jnp.full((5, 5, 2), 0.2).at[0, 0, 0].set(0.8), jnp.full((5, 5, 2), 0.6)])
    keys = per_example_keys(0, 2)
    np.testing.assert_allclose(make_baseline(x, "black", keys)[0], 0.2)
    np.testing.assert_allclose(make_baseline(x, "black", keys)[1], 0.6)
    np.testing.assert_allclose(make_baseline(x, "mean", keys, mean=(0.1, 0.9))[..., 1], 0.9)
    np.testing.assert_allclose(make_baseline(x, "mean", keys)[1], 0.6, rtol=1e-6)
    np.testing.assert_allclose(make_baseline(x, "blur", keys)[1], 0.6, rtol=1e-5)  # constant stays
    blurred = make_baseline(x, "blur", keys, blur_sigma=1.0)[0, ..., 0]
    assert 0.2 < float(blurred[0, 0]) < 0.8 and float(blurred[1, 1]) > 0.2
    u = make_baseline(x, "uniform", keys)
    assert float(u.min()) >= 0 and float(u.max()) < 1 and float(jnp.abs(u[0] - u[1]).max()) > 0


def test_riemann_weights_integrate_exactly():
    for rule in ("left", "right", "midpoint", "trapezoid"):
        a, w = riemann(8, rule)
        assert abs(float(w.sum()) - 1) < 1e-6
    a, w = riemann(8, "midpoint")
    assert abs(float((w * a).sum()) - 0.5) < 1e-6  # midpoint is exact for linear integrands
    with pytest.raises(attrax.AttraxError):
        riemann(4, "simpson")


def _cubic(params, x):
    """f = sum_i c_i x_i^3 + d_i x_i^2: along the path the gradient is a quadratic in alpha."""
    c, d = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 1.0, -1.0])
    return ((c * x**3 + d * x**2).sum(-1))[:, None]


def test_ig_gauss_legendre_is_exact_on_a_polynomial_model():
    # a quadratic integrand needs 2 Gauss-Legendre points (exact to degree 3): IG_i = f_i(x_i)
    x = jnp.array([[0.5, -1.5, 2.0], [1.0, 0.7, -0.3]])
    t = jnp.zeros((2,), jnp.int32)
    c, d = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 1.0, -1.0])
    expected = c * x**3 + d * x**2
    r = explain("integrated_gradients", _cubic, None, x, t, steps=2, rule="gausslegendre")
    np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.sum(1), _cubic(None, x)[:, 0], rtol=1e-5)  # completeness
    right = explain("integrated_gradients", _cubic, None, x, t, steps=2, rule="right")
    assert float(jnp.abs(right - expected).max()) > 0.1  # a Riemann sum is not exact here
    a, w = riemann(5, "gausslegendre")
    assert abs(float(w.sum()) - 1) < 1e-6 and float((w * a**9).sum()) == pytest.approx(0.1, rel=1e-5)


def test_ig_trapezoid_evaluates_exactly_steps_points():
    # the registered cost is `steps` gradient evaluations for every rule, trapezoid included
    entry = attrax.methods.get("integrated_gradients")
    for rule in ("left", "right", "midpoint", "trapezoid", "gausslegendre"):
        a, w = riemann(6, rule)
        assert a.shape == w.shape == (6,), rule
        assert entry.meta["cost"]({"steps": 6, "rule": rule}) == 6
    a, w = riemann(3, "trapezoid")  # points 0, 1/2, 1 with weights 1/4, 1/2, 1/4
    np.testing.assert_allclose(a, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(w, [0.25, 0.5, 0.25])
    # exact for a linear integrand (a quadratic model): IG = f(x) - f(0) per coordinate
    x = jnp.array([[0.5, -1.5, 2.0]])
    quad = lambda p, xx: (xx**2 * jnp.array([1.0, 2.0, -1.0])).sum(-1)[:, None]  # noqa: E731
    r = explain("integrated_gradients", quad, None, x, jnp.zeros((1,), jnp.int32), steps=2, rule="trapezoid")
    np.testing.assert_allclose(r, x**2 * jnp.array([1.0, 2.0, -1.0]), rtol=1e-6)
    with pytest.raises(attrax.AttraxError, match="steps"):
        riemann(1, "trapezoid")


def test_ig_separable_function_per_coordinate():
    """f = 5a + b^2 + sin c on a plain apply_fn: IG_i = f_i(x_i) - f_i(0) for each coordinate."""

    def apply_fn(params, x):
        return (5 * x[:, 0] + x[:, 1] ** 2 + jnp.sin(x[:, 2]))[:, None]

    x = jnp.array([[0.5, -1.5, 2.0], [1.0, 0.7, -0.3]])
    t = jnp.zeros((2,), jnp.int32)
    r = explain("integrated_gradients", apply_fn, None, x, t, steps=256, rule="midpoint")
    expected = jnp.stack([5 * x[:, 0], x[:, 1] ** 2, jnp.sin(x[:, 2])], axis=1)
    np.testing.assert_allclose(r, expected, atol=1e-4)


# ----------------------------------------------------------------------------- SmoothGrad


def test_smoothgrad_sigma_zero_is_gradient(relu_net):
    model, params, x, target = relu_net
    g = explain("gradient", model, params, x, target)
    s = explain("smoothgrad", model, params, x, target, n_samples=3, sigma=0.0)
    np.testing.assert_allclose(s, g, rtol=1e-5, atol=1e-7)


def test_smoothgrad_noise_has_requested_std():
    x = jnp.stack([jnp.linspace(0, 1, 400).reshape(20, 20, 1), 2 * jnp.linspace(0, 1, 400).reshape(20, 20, 1)])
    keys = per_example_keys(0, 2)
    xs, sub = combinators.noisy_copies(x, keys, 50, 0.15)
    assert xs.shape == (50, 2, 20, 20, 1) and sub.shape == (50, 2)
    eps = np.asarray(xs - x[None])
    np.testing.assert_allclose(eps[:, 0].std(), 0.15, rtol=0.03)
    np.testing.assert_allclose(eps[:, 1].std(), 0.30, rtol=0.03)  # relative to the image range
    assert abs(eps.mean()) < 0.01

    def identity(model, params, x, target, *, key=None):
        return x

    # VarGrad of the identity "method" is the noise variance itself
    var = combinators.vargrad(identity).fn(None, None, x, jnp.zeros(2, jnp.int32), key=keys, n_samples=50)
    np.testing.assert_allclose(np.asarray(var[0]).mean(), 0.15**2, rtol=0.06)


def test_smoothgrad_is_batched_in_one_call(relu_net, monkeypatch):
    """All noisy copies go through the wrapped method in ONE call (counted at trace time)."""
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", "1")  # the batch as one chunk (not one per core)
    model, params, x, target = relu_net
    calls = []

    def apply_fn(p, xx):
        calls.append(xx.shape)
        return model(p, xx)

    # besides the one batched call, `explain` traces the model once on a (1, ...) shape probe
    # (abstractly, to check the targets against the number of outputs); the same apply_fn gives
    # the same Model, so the probe is not traced again for the second method
    probe = (1, 6, 6, 1)
    explain("smoothgrad", apply_fn, params, x, target, n_samples=6)
    assert sorted(calls) == [probe, (24, 6, 6, 1)]
    calls.clear()
    explain("integrated_gradients", apply_fn, params, x, target, steps=5)
    assert [c for c in calls if c != probe] == [(20, 6, 6, 1)] and calls.count(probe) <= 1


def test_composite_names_and_errors(relu_net):
    model, params, x, target = relu_net
    entry = attrax.methods.get("smooth(squared(integrated_gradients))")
    assert {"n_samples", "sigma", "steps", "rule", "baseline", "score"} <= set(entry.hparams())
    assert entry.meta["cost"]({**entry.hparams(), "n_samples": 3, "steps": 4}) == 12
    with pytest.raises(attrax.AttraxError, match="did you mean|Did you mean"):
        attrax.methods.get("smoth(gradient)")
    with pytest.raises(attrax.AttraxError, match="unknown method"):
        attrax.methods.get("smooth(gradiant)")
    with pytest.raises(attrax.AttraxError, match="both take"):
        attrax.methods.get("smooth(smoothgrad)")
    with pytest.raises(attrax.AttraxError, match="no hyperparameter"):
        explain("smooth(gradient)", model, params, x, target, steps=3)


# ----------------------------------------------------------------------------- backprop variants


def _one_hidden(act):
    model = attrax.models.create("mlp", hidden=(12,), num_classes=3, act=act, use_bias=False)
    x = jax.random.normal(jax.random.key(3), (5, 4, 4, 1))
    params = attrax.models.init(model, jax.random.key(4), x)
    return model, params, x, jnp.array([0, 1, 2, 0, 1], jnp.int32)


def test_guided_and_deconvnet_closed_form_on_one_hidden_layer():
    """f = v^T relu(W x): grad = W (v [z > 0]); guided = W (relu(v) [z > 0]); deconv = W relu(v)."""
    model, params, x, target = _one_hidden(nn.relu)
    w = params["params"]["dense1"]["kernel"]  # (16, 12)
    v = params["params"]["out"]["kernel"][:, target].T  # (n, 12)
    z = x.reshape(5, -1) @ w
    cases = {
        "gradient": v * (z > 0),
        "guided_backprop": jax.nn.relu(v) * (z > 0),
        "deconvnet": jax.nn.relu(v) * jnp.ones_like(z),
    }
    for name, hidden in cases.items():
        r = explain(name, model, params, x, target)
        np.testing.assert_allclose(r.reshape(5, -1), hidden @ w.T, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("act", [nn.tanh, lambda z: z])
def test_guided_and_deconvnet_equal_gradient_without_relu(act):
    model, params, x, target = _one_hidden(act)
    g = explain("gradient", model, params, x, target)
    for name in ("guided_backprop", "deconvnet"):
        np.testing.assert_allclose(explain(name, model, params, x, target), g, rtol=1e-6, atol=1e-7)


def test_backprop_runs_without_an_activation_field(linear):
    # the rule engine (methods/_engine.py) needs no `act` field: on a linear model guided
    # backprop and deconvnet have no ReLU to modify and equal the gradient
    model, params, x, target, wt = _lin_expected(linear)
    for name in ("guided_backprop", "deconvnet"):
        np.testing.assert_allclose(explain(name, model, params, x, target), wt, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- FullGrad


def test_fullgrad_complete_sums_to_logit():
    model = attrax.models.create("camnet", channels=(4, 6), num_classes=3)
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 2))
    params = attrax.models.init(model, jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases
    target = jnp.array([0, 1, 2], jnp.int32)
    r = explain("fullgrad", model, params, x, target, variant="complete", jit=True)
    f = model(params, x)[jnp.arange(3), target]
    np.testing.assert_allclose(r.reshape(3, -1).sum(1), f, rtol=1e-4, atol=1e-5)
    ixg = explain("input_x_gradient", model, params, x, target)
    assert float(jnp.abs(r - ixg).max()) > 1e-3  # the bias terms are really there


class _ConvBN(nn.Module):
    act: object = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        x = self.act(nn.BatchNorm(use_running_average=True, name="bn")(x))
        return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


def test_fullgrad_includes_batchnorm_bias():
    module = _ConvBN()
    x = jax.random.uniform(jax.random.key(0), (2, 5, 5, 1))
    params = module.init(jax.random.key(1), x)
    keys = iter(jax.random.split(jax.random.key(2), 100))
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.uniform(next(keys), p.shape), params)
    target = jnp.array([1, 2], jnp.int32)
    r = explain("fullgrad", module, params, x, target, variant="complete", jit=True)
    f = module.apply(params, x)[jnp.arange(2), target]
    np.testing.assert_allclose(r.reshape(2, -1).sum(1), f, rtol=1e-4, atol=1e-4)


def test_sobel_known_edges():
    x = jnp.zeros((2, 6, 8, 1)).at[0, :, 4:].set(1.0)  # vertical step between columns 3 and 4
    r = np.asarray(explain("sobel", lambda p, xx: xx, None, x, jnp.zeros(2, jnp.int32)))
    np.testing.assert_allclose(r[1], 0.0)  # constant image: no edges, not even at the border
    np.testing.assert_allclose(r[0, :, 3:5, 0], 4.0)
    np.testing.assert_allclose(r[0, :, :3, 0], 0.0)
    np.testing.assert_allclose(r[0, :, 5:, 0], 0.0)


def test_random_is_seeded_uniform(linear):
    model, params, x, target, _ = linear
    a = explain("random", model, params, x, target, key=1)
    b = explain("random", model, params, x, target, key=1)
    c = explain("random", model, params, x, target, key=2)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 0.1
    assert float(a.min()) >= 0 and float(a.max()) < 1


def test_composites_config_resolves():
    """Every key of conf/methods/composites.yaml is a method name whose hparams it accepts."""
    import yaml

    path = Path(attrax.__file__).resolve().parent.parent / "conf" / "methods" / "composites.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert any("(" in k for k in cfg)
    for name, hp in cfg.items():
        assert set(hp or {}) <= set(attrax.methods.get(name).hparams()), name


def test_fullgrad_default_normalizes_then_upsamples_as_the_authors_code():
    # FullGrad-saliency: |b * grad_b|, min-max per image, then bilinear upsampling with aligned
    # corners (torch interpolate(align_corners=True)): written out here with numpy
    from attrax.methods.fullgrad import full_gradients

    model = attrax.models.create("camnet", channels=(3, 4), num_classes=3)
    x = jax.random.uniform(jax.random.key(0), (2, 6, 6, 1))
    params = attrax.models.init(model, jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)
    target = jnp.array([0, 2], jnp.int32)

    def minmax(t):
        t = np.abs(np.asarray(t, np.float64))
        lo = t.min(axis=(1, 2, 3), keepdims=True)
        return (t - lo) / (t.max(axis=(1, 2, 3), keepdims=True) - lo)

    def up(t, size):  # aligned-corner bilinear, separable
        n, h, w, k = t.shape
        def along(t, axis, m, src):
            pos = np.arange(m) * (src - 1) / (m - 1)
            i0 = np.minimum(np.floor(pos).astype(int), src - 2)
            f = (pos - i0).reshape([-1 if d == axis else 1 for d in range(4)])
            return np.take(t, i0, axis) * (1 - f) + np.take(t, i0 + 1, axis) * f
        return along(along(t, 1, size, h), 2, size, w)

    _, gx, layers = full_gradients(model, params, x, target)
    expect = minmax(x * gx).sum(-1)
    for b, gb in layers:
        if gb.ndim == 4:
            t = minmax(gb * b)
            expect = expect + (t if t.shape[1] == 6 else up(t, 6)).sum(-1)
    r = explain("fullgrad", model, params, x, target)
    np.testing.assert_allclose(r[..., 0], expect, rtol=1e-4, atol=1e-5)
    other = explain("fullgrad", model, params, x, target, order="upsample_then_normalize")
    assert float(jnp.abs(other - r).max()) > 1e-3
