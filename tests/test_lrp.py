"""LRP rules, composites, canonizer and deep Taylor: known answers (METHODS.md) and references."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax.errors import AttraxError
from attrax.methods import _rules, input_gradient
from attrax.models import AvgPool, GlobalAvgPool, MaxPool


def _tiny_cnn(use_bias=True):
    return attrax.models.create("cnn_a", channels=(4, 6), dense=(12,), use_bias=use_bias)


def _init(model, x, seed=0):
    """Random variables from NumPy with the module's shapes (compiling Flax init is slow on CPU)."""
    shapes = jax.eval_shape(model.module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(shapes)
    leaves = []
    for path, s in flat[0]:
        name = str(path[-1].key)
        if name == "kernel":
            v = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif name in ("scale", "var"):
            v = 1.0 + rng.uniform(0, 0.5, size=s.shape)
        else:  # bias, BatchNorm bias and mean
            v = 0.1 * rng.normal(size=s.shape)
        leaves.append(jnp.asarray(v, s.dtype))
    return jax.tree.unflatten(flat[1], leaves)


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


class PoolNet(nn.Module):
    """Conv - ReLU - AvgPool - Conv - ReLU - MaxPool - Dense - ReLU - Dense, with biases."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = AvgPool(2, name="avg")(nn.relu(nn.Conv(4, (3, 3), name="c1")(x)))
        x = MaxPool(2, name="max")(nn.relu(nn.Conv(5, (3, 3), name="c2")(x)))
        x = nn.relu(nn.Dense(7, name="d1")(x.reshape((x.shape[0], -1))))
        return nn.Dense(3, name="d2")(x)


class OneDense(nn.Module):
    features: int = 4
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.features, use_bias=self.use_bias, name="dense")(x)


class OneConv(nn.Module):
    """A single SAME 3x3 conv followed by global average pooling (logit c = mean of map c)."""

    features: int = 3
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        return GlobalAvgPool(name="gap")(nn.Conv(self.features, (3, 3), use_bias=self.use_bias, name="conv")(x))


def _perturbed(params, scale=0.5, seed=7):
    """Random-sign weights and biases (so that rules differ from each other)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + jnp.asarray(scale * rng.normal(size=v.shape), v.dtype), params)


# --------------------------------------------------------------------------- LRP-0 and epsilon
@pytest.mark.parametrize("net", ["poolnet", "resnet"])
def test_lrp0_equals_input_times_gradient(net):
    if net == "poolnet":
        model, x = attrax.as_model(PoolNet()), _x((3, 14, 14, 2))  # max pool 7 -> 4: SAME padding
    else:
        model, x = attrax.models.create("resnet", stages=(4, 6)), _x((3, 8, 8, 3))
    params = _perturbed(_init(model, x), 0.1)
    t = jnp.array([0, 1, 2])
    r = attrax.explain("lrp_0", model, params, x, t)
    _, g = jax.jit(lambda p, xx: input_gradient(lambda v: model(p, v), xx, t))(params, x)
    np.testing.assert_allclose(r, x * g, atol=1e-6 * float(jnp.abs(x * g).max()) + 1e-9)


def test_epsilon_bias_free_sums_to_logit():
    model, x = _tiny_cnn(use_bias=False), _x((4, 12, 12, 1))
    params = _init(model, x)
    t = jnp.array([0, 3, 5, 9])
    f = attrax.methods.class_score(attrax.forward(model, params, x), t)
    r = attrax.explain("lrp_epsilon", model, params, x, t, eps=1e-9)
    np.testing.assert_allclose(r.sum((1, 2, 3)), f, rtol=1e-4, atol=1e-6)


def test_softmax_start_relevance():
    """The tutorial's start (softmax probability of the target); the one-hot start ("one") is
    checked against Zennit below."""
    model, x = _tiny_cnn(use_bias=False), _x((2, 12, 12, 1))
    params = _init(model, x)
    t = jnp.array([1, 2])
    logits = attrax.forward(model, params, x)
    r = attrax.explain("lrp_0", model, params, x, t, start="probability")
    np.testing.assert_allclose(r.sum((1, 2, 3)), jax.nn.softmax(logits)[jnp.arange(2), t], rtol=1e-4)


# --------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("first", ["zplus", "zbox", "wsquare", "flat"])
def test_exact_conservation_bias_free(first):
    """z+ on every hidden layer and one of z+, z^B, w^2, flat on the input: sum R = f_c."""
    model, x = _tiny_cnn(use_bias=False), _x((3, 12, 12, 1))
    params = _init(model, x)
    logits = attrax.forward(model, params, x)
    t = jnp.argmax(logits, -1)  # z+ conserves where the explained output has a positive part
    f = attrax.methods.class_score(logits, t)
    assert bool((f > 0).all())
    r = attrax.explain("lrp", model, params, x, t, rules={"first": first, "default": "zplus"})
    np.testing.assert_allclose(r.sum((1, 2, 3)), f, rtol=1e-5, atol=1e-7)
    if first == "zplus":  # the same with proportional max-pool redistribution
        r2 = attrax.explain("lrp", model, params, x, t, rules={"default": "zplus"}, pooling="proportional")
        np.testing.assert_allclose(r2.sum((1, 2, 3)), f, rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(r2 - r).max()) > 1e-6


def test_zbox_nonnegative_inside_the_box():
    model, x = _tiny_cnn(), _x((4, 12, 12, 1))
    params = _perturbed(_init(model, x), 0.1)
    t = jnp.array([0, 1, 2, 3])
    r = attrax.explain("deep_taylor", model, params, x, t, input_rule="zbox", low=0.0, high=1.0)
    assert float(r.min()) >= -1e-7 and float(jnp.abs(r).max()) > 0


def test_alpha_beta_conservation_and_failure_case():
    mod = OneDense(5, use_bias=False)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 30)), jnp.float32)  # mixed-sign inputs
    params = {"params": {"dense": {"kernel": jnp.asarray(np.random.default_rng(4).normal(size=(30, 5)), jnp.float32)}}}
    model = attrax.as_model(mod)
    t = jnp.array([0, 1, 2, 3])
    f = attrax.methods.class_score(attrax.forward(model, params, x), t)
    for a, b in [(1.0, 0.0), (2.0, 1.0), (3.0, 2.0)]:
        r = attrax.explain("lrp_alpha_beta", model, params, x, t, alpha=a, beta=b)
        np.testing.assert_allclose(r.sum(1), f, rtol=1e-5)
    # one-signed contributions (positive inputs, positive weights): alpha = 2 doubles relevance
    pos = {"params": {"dense": {"kernel": jnp.abs(params["params"]["dense"]["kernel"])}}}
    xp = jnp.abs(x)
    fp = attrax.methods.class_score(attrax.forward(model, pos, xp), t)
    r = attrax.explain("lrp_alpha_beta", model, pos, xp, t, alpha=2.0, beta=1.0)
    np.testing.assert_allclose(r.sum(1), 2 * fp, rtol=1e-5)
    with pytest.raises(AttraxError, match="alpha - beta = 1"):
        attrax.explain("lrp_alpha_beta", model, params, x, t, alpha=2.0, beta=0.0)


# --------------------------------------------------------------------------- closed forms
def _np_lrp(a, w, b, r_out, rule, valid=None, eps=1e-6, gamma=0.25, alpha=2.0, beta=1.0, low=0.0, high=1.0):
    """Closed-form input relevance of one bias-included linear map, per sample.

    a (n, J), w (J, K), b (K,), r_out (n, K); `valid` (n, J) marks real (non-padding) inputs.
    """
    a, w, b, r_out = (np.asarray(v, np.float64) for v in (a, w, b, r_out))
    valid = np.ones_like(a) if valid is None else np.asarray(valid, np.float64)

    def sdiv(num, den, e):
        den = np.where(den >= 0, den + e, den - e)
        return num / den

    if rule in ("zero", "epsilon", "gamma"):
        wm = w + gamma * np.maximum(w, 0) if rule == "gamma" else w
        bm = b + gamma * np.maximum(b, 0) if rule == "gamma" else b
        c = a[:, :, None] * wm[None]
        z = c.sum(1) + bm
        e = {"zero": 0.0, "epsilon": eps, "gamma": 1e-6}[rule]  # gamma keeps the method's eps (1e-6)
        return (sdiv(c, z[:, None], e) * r_out[:, None]).sum(2)
    if rule in ("alpha_beta", "zplus"):
        al, be = (1.0, 0.0) if rule == "zplus" else (alpha, beta)
        c = a[:, :, None] * w[None]
        cp, cn = np.maximum(c, 0), np.minimum(c, 0)
        zp, zn = cp.sum(1) + np.maximum(b, 0), cn.sum(1) + np.minimum(b, 0)
        out = al * np.where(zp[:, None] != 0, cp / np.where(zp == 0, 1, zp)[:, None], 0)
        out = out - be * np.where(zn[:, None] != 0, cn / np.where(zn == 0, 1, zn)[:, None], 0)
        return (out * r_out[:, None]).sum(2)
    if rule == "zbox":
        c = (
            a[:, :, None] * w[None]
            - (low * valid)[:, :, None] * np.maximum(w, 0)
            - (high * valid)[:, :, None] * np.minimum(w, 0)
        )
        return (c / c.sum(1)[:, None] * r_out[:, None]).sum(2)
    if rule in ("wsquare", "flat"):
        c = valid[:, :, None] * (w**2 if rule == "wsquare" else np.ones_like(w))[None]
        return (c / c.sum(1)[:, None] * r_out[:, None]).sum(2)
    raise ValueError(rule)


def _patches(x, k=3):
    """SAME-padded k x k patches of NHWC x: (n, H, W, k*k*C) plus the validity mask."""
    n, h, w, c = x.shape
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    vp = np.pad(np.ones_like(x), ((0, 0), (p, p), (p, p), (0, 0)))
    pats = np.stack([xp[:, i : i + h, j : j + w] for i in range(k) for j in range(k)], axis=3)
    vals = np.stack([vp[:, i : i + h, j : j + w] for i in range(k) for j in range(k)], axis=3)
    return pats.reshape(n, h, w, -1), vals.reshape(n, h, w, -1)


def _fold(rp, shape, k=3):
    """Scatter-add patch relevance (n, H, W, k*k*C) back onto the input (n, H, W, C)."""
    n, h, w, c = shape
    p = k // 2
    out = np.zeros((n, h + 2 * p, w + 2 * p, c))
    rp = rp.reshape(n, h, w, k * k, c)
    for idx, (i, j) in enumerate([(i, j) for i in range(k) for j in range(k)]):
        out[:, i : i + h, j : j + w] += rp[:, :, :, idx]
    return out[:, p : p + h, p : p + w]


RULE_SPECS = {
    "zero": "zero",
    "epsilon": {"name": "epsilon", "eps": 0.01},
    "gamma": {"name": "gamma", "gamma": 0.25},
    "alpha_beta": {"name": "alpha_beta", "alpha": 2.0, "beta": 1.0},
    "zplus": "zplus",
    "zbox": {"name": "zbox", "low": -1.0, "high": 2.0},
    "wsquare": "wsquare",
    "flat": "flat",
}


@pytest.mark.parametrize("rule", list(RULE_SPECS))
def test_rule_matches_numpy_on_dense_layer(rule):
    mod = OneDense(4)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 9)), jnp.float32)
    params = _init(attrax.as_model(mod), x)
    w, b = params["params"]["dense"]["kernel"], params["params"]["dense"]["bias"]
    t = jnp.array([0, 2, 3])
    r = attrax.explain("lrp", OneDense(4), params, x, t, rules={"default": RULE_SPECS[rule]})
    z = np.asarray(x @ w + b, np.float64)
    r_out = np.eye(4)[np.asarray(t)] * z
    kw = dict(eps=0.01, gamma=0.25, alpha=2.0, beta=1.0, low=-1.0, high=2.0)
    want = _np_lrp(x, w, b, r_out, rule, **kw)
    np.testing.assert_allclose(r, want, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("rule", list(RULE_SPECS))
def test_rule_matches_numpy_on_conv_layer(rule):
    mod = OneConv(3)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 5, 5, 2)), jnp.float32)
    params = _init(attrax.as_model(mod), x)
    w, b = params["params"]["conv"]["kernel"], params["params"]["conv"]["bias"]
    t = jnp.array([0, 2])
    r = attrax.explain("lrp", OneConv(3), params, x, t, rules={"default": RULE_SPECS[rule]})
    pats, vals = _patches(np.asarray(x, np.float64))
    n, h, wd, kk = pats.shape
    wk = np.asarray(w, np.float64).reshape(kk, 3)
    z = pats @ wk + np.asarray(b)
    r_out = np.eye(3)[np.asarray(t)][:, None, None, :] * z / (h * wd)
    kw = dict(eps=0.01, gamma=0.25, alpha=2.0, beta=1.0, low=-1.0, high=2.0)
    rp = _np_lrp(pats.reshape(-1, kk), wk, np.asarray(b), r_out.reshape(-1, 3), rule, valid=vals.reshape(-1, kk), **kw)
    want = _fold(rp.reshape(n, h, wd, kk), x.shape)
    np.testing.assert_allclose(r, want, rtol=2e-4, atol=2e-6)


def test_proportional_max_pool_closed_form():
    a = jnp.array([[[[1.0], [3.0]], [[0.0], [2.0]]]])  # one 2x2 window

    def f(t):  # the engine's window form (n, oh, k, ow, k, c)
        return _rules.max_pool_rule(t.reshape(1, 1, 2, 1, 2, 1), "proportional")

    out, vjp = jax.vjp(f, a)
    r_out = jnp.full_like(out, 5.0)
    (g,) = vjp(r_out / out)
    np.testing.assert_allclose((a * g).ravel(), np.array([1, 3, 0, 2]) / 6 * 5, rtol=1e-6)


# --------------------------------------------------------------------------- composites, canonizer
def test_composites_and_user_rule_maps():
    model, x = _tiny_cnn(), _x((2, 12, 12, 1))
    params = _perturbed(_init(model, x), 0.1)
    t = jnp.array([1, 2])
    a = attrax.explain("lrp_epsilon_plus_flat", model, params, x, t)
    b = attrax.explain("lrp", model, params, x, t, rules={"first": "flat", "conv": "zplus", "dense": "epsilon"})
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # a layer path beats the type selector: epsilon everywhere but z+ on conv2 == epsilon_plus on this net?
    c = attrax.explain("lrp", model, params, x, t, rules={"default": "epsilon", "conv2": "zplus", "conv1": "zplus"})
    np.testing.assert_allclose(c, attrax.explain("lrp_epsilon_plus", model, params, x, t), rtol=1e-6, atol=1e-9)
    g = attrax.explain(
        "lrp",
        model,
        params,
        x,
        t,
        rules={"first": "zbox", "conv": {"name": "gamma", "gamma": 0.25}, "dense": "epsilon"},
    )
    np.testing.assert_allclose(g, attrax.explain("lrp_epsilon_gamma_box", model, params, x, t), rtol=1e-6, atol=1e-9)
    with pytest.raises(AttraxError, match="match no layer"):
        attrax.explain("lrp", model, params, x, t, rules={"conv7": "zplus"})
    with pytest.raises(AttraxError, match="only to the first layer"):
        attrax.explain("lrp", model, params, x, t, rules={"default": "zbox"})
    with pytest.raises(AttraxError, match="unknown LRP rule"):
        attrax.explain("lrp", model, params, x, t, rules={"default": "epsilonn"})


def test_batchnorm_canonizer_keeps_logits():
    model = attrax.models.create("resnet", stages=(4, 6))
    x = _x((3, 8, 8, 3))
    params = _init(model, x)
    params = {"params": _perturbed(params["params"], 0.2), "batch_stats": params["batch_stats"]}
    st = _rules.layer_structure(model, params, x)
    # stem + block1 (conv1, conv2) + block2 (conv1, conv2, proj): every conv has its BatchNorm
    assert sum(info.bn is not None for info in st.layers) == 6 and len(st.bn) == 6
    merged = jax.jit(lambda p, xx: _rules.canonized_forward(model, p, xx))(params, x)
    np.testing.assert_allclose(merged, jax.jit(model)(params, x), atol=1e-5, rtol=1e-5)
    r = attrax.explain("lrp_epsilon_gamma_box", model, params, x, jnp.array([0, 1, 2]))
    assert bool(jnp.isfinite(r).all())


# --------------------------------------------------------------------------- deep Taylor toy
class MaxToy(nn.Module):
    """f = max(x1, x2) for x >= 0: hidden ReLU units (1,-1), (-1,1), (1,1), output weights 1/2."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(1, use_bias=False, name="out")(nn.relu(nn.Dense(3, use_bias=False, name="hidden")(x)))


def test_deep_taylor_toy_max_network():
    params = {
        "params": {
            "hidden": {"kernel": jnp.array([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]])},
            "out": {"kernel": jnp.full((3, 1), 0.5)},
        }
    }
    x = jnp.array([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0], [2.0 + 1e-3, 2.0], [2.0, 2.0 + 1e-3]])
    t = jnp.zeros(5, jnp.int32)
    model = attrax.as_model(MaxToy())
    np.testing.assert_allclose(attrax.forward(model, params, x)[:, 0], x.max(1), rtol=1e-6)
    r = np.asarray(attrax.explain("deep_taylor", model, params, x, t, input_rule="zplus"))
    x1, x2 = np.asarray(x).T
    want = np.where(
        (x1 >= x2)[:, None], np.stack([(2 * x1 - x2) / 2, x2 / 2], 1), np.stack([x1 / 2, (2 * x2 - x1) / 2], 1)
    )
    np.testing.assert_allclose(r, want, rtol=1e-5)
    # continuous across x1 = x2, while the gradient jumps there
    assert np.abs(r[3] - r[4]).max() < 1e-2
    _, g = jax.jit(lambda p, xx: input_gradient(lambda v: model(p, v), xx, t))(params, x)
    assert float(jnp.abs(g[3] - g[4]).max()) > 0.9


# --------------------------------------------------------------------------- reference maps (Zennit)
def test_epsilon_plus_flat_matches_zennit_reference(reference):
    model, params, maps, _ = reference
    x, t = jnp.asarray(maps["x"]), jnp.asarray(maps["target"])
    ref = maps["lrp_epsilon_plus_flat"]
    r_one = attrax.explain("lrp_epsilon_plus_flat", model, params, x, t, start="one")
    np.testing.assert_allclose(r_one, ref, atol=1e-6 * np.abs(ref).max())


def test_methods_run_on_dense_only_model():
    """The MLP zoo model (Dense layers only, no pooling): shape and finiteness."""
    model, x = attrax.models.create("mlp", hidden=(8,)), _x((2, 6, 6, 1))
    params = _init(model, x)
    t = jnp.array([3, 7])
    for name in ["lrp_alpha2beta1", "deep_taylor"]:
        r = attrax.explain(name, model, params, x, t)
        assert r.shape == x.shape and bool(jnp.isfinite(r).all()) and float(jnp.abs(r).max()) > 0


# --------------------------------------------------------------------------- overlapping max pooling
class OverlapPoolNet(nn.Module):
    """Bias-free conv -> relu -> 3x3 stride-2 max pool padded 1 (a ResNet stem's) -> conv -> relu
    -> 3x3 stride-2 max pool (VALID) -> mean -> dense: every pool has overlapping windows."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = nn.relu(nn.Conv(6, (3, 3), use_bias=False, name="conv2")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        return nn.Dense(3, use_bias=False, name="dense")(x.mean(axis=(1, 2)))


def _overlap_net():
    x = _x((2, 11, 11, 1), seed=3)
    module = OverlapPoolNet()
    rng = np.random.default_rng(4)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])),
                                                s.dtype), shapes)
    return module, params, x, jnp.array([0, 2], jnp.int32)


def test_overlapping_max_pool_winner_is_gradient_routing():
    """winner-take-all on 3x3 stride-2 windows IS the max's gradient: LRP-0 == input x gradient."""
    module, params, x, t = _overlap_net()
    r = attrax.explain("lrp_0", module, params, x, t, pooling="winner")
    _, g = input_gradient(lambda z: module.apply(params, z), x, t)
    np.testing.assert_allclose(r, x * g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pooling", ["winner", "proportional"])
def test_overlapping_max_pool_conserves_on_bias_free_net(pooling):
    module, params, x, t = _overlap_net()
    logits = module.apply(params, x)[jnp.arange(2), t]
    r = attrax.explain("lrp", module, params, x, t, rules={"default": "epsilon"}, eps=1e-9, pooling=pooling)
    np.testing.assert_allclose(r.reshape(2, -1).sum(1), logits, rtol=1e-4)


def test_overlapping_proportional_max_pool_known_answer():
    """One channel, 5x5, 3x3 windows stride 2 padded 1 (3x3 outputs, neighbours share a row or
    column): R_j = sum over the windows w holding j of a_j / sum_w(a) * R_w, against NumPy loops."""
    x = _x((1, 5, 5, 1), seed=5)
    v = np.random.default_rng(6).uniform(0.5, 1.5, size=(9, 2))

    def apply_fn(p, xx):
        a = jax.nn.relu(xx @ p["w1"])  # a 1x1 "layer" at the input (w1 = 1): R at x == R at a
        y = jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        return y.reshape(1, 9) @ p["v"]

    params = {"w1": jnp.ones((1, 1)), "v": jnp.asarray(v, jnp.float32)}
    r = attrax.explain("lrp_0", apply_fn, params, x, jnp.array([1]), pooling="proportional")
    a = np.pad(np.asarray(x, np.float64)[0, :, :, 0], 1)  # zero padding: no share
    want = np.zeros_like(a)
    for i in range(3):
        for j in range(3):
            win = a[2 * i:2 * i + 3, 2 * j:2 * j + 3]
            r_w = win.max() * v[3 * i + j, 1]
            want[2 * i:2 * i + 3, 2 * j:2 * j + 3] += win / win.sum() * r_w
    np.testing.assert_allclose(np.asarray(r)[0, :, :, 0], want[1:-1, 1:-1], rtol=1e-5, atol=1e-7)
    winner = attrax.explain("lrp_0", apply_fn, params, x, jnp.array([1]), pooling="winner")
    assert not np.allclose(winner, r, atol=1e-3)  # the two rules differ here


def test_user_rule_map_from_config():
    """A rule map written in the config (`method.rules={...}` on the command line, keys by
    position, kind and module path) reaches the method as the same map as from Python."""
    from hydra import compose, initialize_config_module

    from attrax import main

    overrides = ["method=lrp", "method.rules={first:flat,conv2:{name:gamma,gamma:0.5},dense:epsilon}"]
    with initialize_config_module(config_module="attrax.conf", version_base="1.3"):
        cfg = main._plain(compose(config_name="config", overrides=overrides))
    (name, hp), = main.method_specs(cfg).items()
    assert name == "lrp" and hp["rules"] == {"first": "flat", "conv2": {"name": "gamma", "gamma": 0.5},
                                             "dense": "epsilon"}
    model = _tiny_cnn()
    x = _x((2, 28, 28, 1))
    params = _init(model, x)
    t = jnp.array([1, 3])
    r = attrax.explain(name, model, params, x, t, **hp)
    want = attrax.explain("lrp", model, params, x, t, rules={"first": "flat", "conv2": {"name": "gamma", "gamma": 0.5},
                                                           "dense": "epsilon"})
    np.testing.assert_allclose(r, want, rtol=1e-6)
    plain = attrax.explain("lrp", model, params, x, t, rules={"first": "flat", "dense": "epsilon"})
    assert not np.allclose(r, plain, atol=1e-4)  # the module-path key took effect
