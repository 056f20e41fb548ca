"""Known answers of the structure methods on models that are NOT in the zoo (issue 13).

- LRP-0 == input x gradient on ReLU nets (biases, max/avg pooling, residual adds, BatchNorm);
- conservation (sum R = f_c) of z+, flat, w^2 and the residual z-split on bias-free nets;
- canonized BatchNorm: the merged network's logits equal the original ones to 1e-5;
- CP-LRP (LayerNorm scaling and softmax constant in the backward pass) conserves on a bias-free ViT;
- guided backprop (and deconvnet) == gradient on a net whose ReLUs are all active with positive
  upstream gradients;
- DeepLIFT summation-to-delta to 1e-5 on the BatchNorm ResNet, any reference, no NaN where Delta x = 0;
- an unsupported primitive (`jnp.sort`) gets a one-line AttraxError naming it;
- tracing + rewriting is cached: a second batch of the same shape neither re-traces nor recompiles.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nonzoo import make

import attrax
from attrax import examples
from attrax.errors import AttraxError
from attrax.perf import count_compilations

RELU_FAMILIES = ["nonzoo_cnn", "nonzoo_resnet", "jnp_mlp", "nnx_cnn"]


def _f(fam, x=None, t=None):
    x = fam.x if x is None else x
    t = fam.target if t is None else t
    return attrax.methods.class_score(attrax.forward(fam.model, fam.params, x), t)


def _uniform(seed, shape):
    """NumPy draws: JAX's random-bit generator compiles for seconds per shape on a loaded CPU."""
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# --------------------------------------------------------------------------- LRP-0 == input x gradient
@pytest.mark.parametrize("family", RELU_FAMILIES)
def test_lrp0_equals_input_times_gradient(family):
    fam = make(family)
    r = attrax.explain("lrp_0", fam.model, fam.params, fam.x, fam.target)
    ixg = attrax.explain("input_x_gradient", fam.model, fam.params, fam.x, fam.target)
    assert _rel(r, ixg) <= 1e-4, f"{family}: LRP-0 differs from input x gradient by {_rel(r, ixg):.3g}"


# --------------------------------------------------------------------------- conservation, bias-free
BIAS_FREE = {
    "nonzoo_cnn": {"use_bias": False},
    "nonzoo_resnet": {"batchnorm": False, "use_bias": False},  # the residual z-split is in this one
    "jnp_mlp": {"use_bias": False},
}


def _bias_free(family, positive: bool = True):
    """A bias-free member of the family, explained for its top class; with `positive`, a seed
    whose top logits are all > 0 (z+ conserves where the explained output has a positive part)."""
    for seed in range(1, 20):
        fam = make(family, seed=seed, **BIAS_FREE[family])
        logits = attrax.forward(fam.model, fam.params, fam.x)
        t = jnp.argmax(logits, -1).astype(jnp.int32)
        f = attrax.methods.class_score(logits, t)
        if not positive or bool((f > 0).all()):
            return fam, t, f
    raise AssertionError(f"no seed gives positive top logits for {family}")


@pytest.mark.parametrize("first", ["zplus", "flat", "wsquare"])
@pytest.mark.parametrize("family", sorted(BIAS_FREE))
def test_conservation_bias_free(family, first):
    """z+ on every layer above the first, one of z+, flat, w^2 on the first: sum R = f_c. The
    stabilizer (`eps`, also in the z-rule of the pooling sums) -> 0: it absorbs eps / z otherwise."""
    fam, t, f = _bias_free(family)
    r = attrax.explain("lrp", fam.model, fam.params, fam.x, t, rules={"first": first, "default": "zplus"}, eps=1e-9)
    np.testing.assert_allclose(r.sum((1, 2, 3)), f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["flat", "wsquare"])
def test_input_independent_rules_conserve_on_every_layer(rule):
    """flat / w^2 on every layer of a bias-free MLP whose ReLUs are all active (positive weights
    and inputs: no relevance can be lost at a dead unit, which the gradient form of LRP drops)."""
    fam, _, _ = _bias_free("jnp_mlp")
    params = jax.tree.map(jnp.abs, fam.params)
    logits = attrax.forward(fam.model, params, fam.x)
    f = attrax.methods.class_score(logits, fam.target)
    r = attrax.explain("lrp", fam.model, params, fam.x, fam.target, rules={"default": rule}, eps=1e-9)
    np.testing.assert_allclose(r.sum((1, 2, 3)), f, rtol=1e-5, atol=1e-6)


def test_residual_split_conserves_with_epsilon():
    """epsilon -> 0 on every layer of the bias-free ResNet: the adds split in proportion, sum R = f_c."""
    fam, t, f = _bias_free("nonzoo_resnet", positive=False)
    r = attrax.explain("lrp_epsilon", fam.model, fam.params, fam.x, t, eps=1e-9)
    np.testing.assert_allclose(r.sum((1, 2, 3)), f, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- canonized BatchNorm
def test_canonized_batchnorm_keeps_logits():
    fam = make("nonzoo_resnet")
    from attrax.methods import _engine

    merged = jax.jit(lambda p, xx: _engine.canonized_forward(fam.model, p, xx))(fam.params, fam.x)
    np.testing.assert_allclose(merged, attrax.forward(fam.model, fam.params, fam.x), atol=1e-5, rtol=1e-5)
    # and canonizing changes nothing that LRP-0 sees (both equal input x gradient)
    a = attrax.explain("lrp_0", fam.model, fam.params, fam.x, fam.target, canonize=True)
    b = attrax.explain("lrp_0", fam.model, fam.params, fam.x, fam.target, canonize=False)
    assert _rel(a, b) <= 1e-4


# --------------------------------------------------------------------------- CP-LRP on a ViT
def test_cp_lrp_conserves_on_bias_free_vit():
    """CP-LRP (Ali et al. 2022): LayerNorm's scaling and softmax are constants in the backward pass,
    so on a ViT with no additive constant (no biases, no position embedding, mean-pooled head) the
    epsilon rule conserves relevance: sum R = f_c."""
    fam = make("vit_tiny", use_bias=False, pool="mean", pos_embed=False)
    f = _f(fam)
    r = attrax.explain("lrp", fam.model, fam.params, fam.x, fam.target, rules={"default": "epsilon"}, eps=1e-9,
                       **CP_LRP)
    np.testing.assert_allclose(r.sum((1, 2, 3)), f, rtol=1e-4, atol=1e-6)
    # the plain gradient x input does NOT conserve there (softmax and LayerNorm are not linear)
    g = attrax.explain("input_x_gradient", fam.model, fam.params, fam.x, fam.target)
    assert float(jnp.abs(g.sum((1, 2, 3)) - f).max()) > 1e-3 * float(jnp.abs(f).max())


#: how the transformer rules are selected (from helper C's notes, /tmp/attrax_notes/engine.md)
CP_LRP: dict = {"transformer": "cp_lrp"}


# --------------------------------------------------------------------------- guided backprop == gradient
def _all_active(family):
    """Positive weights and biases on positive inputs: every ReLU is active and every upstream
    gradient is positive, so guided backprop's and deconvnet's masks are all ones."""
    fam = make(family)
    params = jax.tree.map(jnp.abs, fam.params)
    return fam, params


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
@pytest.mark.parametrize("family", ["nonzoo_cnn", "jnp_mlp"])
def test_guided_backprop_equals_gradient_when_all_relus_are_active(family, method):
    fam, params = _all_active(family)
    g = attrax.explain("gradient", fam.model, params, fam.x, fam.target)
    r = attrax.explain(method, fam.model, params, fam.x, fam.target)
    assert _rel(r, g) <= 1e-5
    # and they differ from the gradient on the original (mixed-sign) weights
    g0 = attrax.explain("gradient", fam.model, fam.params, fam.x, fam.target)
    r0 = attrax.explain(method, fam.model, fam.params, fam.x, fam.target)
    assert _rel(r0, g0) > 1e-3


# --------------------------------------------------------------------------- DeepLIFT on the ResNet
def test_deeplift_summation_to_delta_on_bn_resnet():
    fam = make("nonzoo_resnet")
    x, t = fam.x, fam.target
    for ref in (jnp.zeros_like(x), _uniform(7, x.shape), 0.5):
        c = attrax.explain("deeplift", fam.model, fam.params, x, t, reference=ref)
        delta = _f(fam, x, t) - _f(fam, jnp.broadcast_to(jnp.asarray(ref, x.dtype), x.shape), t)
        np.testing.assert_allclose(c.sum((1, 2, 3)), delta, atol=1e-5 * max(1.0, float(jnp.abs(delta).max())))
    # an example equal to its reference gets a zero map, never NaN
    ref = x.at[1].set(0.0)
    c = attrax.explain("deeplift", fam.model, fam.params, x.at[1].set(0.0), t, reference=ref)
    assert bool(jnp.isfinite(c).all()) and float(jnp.abs(c[1]).max()) == 0.0


# --------------------------------------------------------------------------- unsupported primitive
class SortCNN(nn.Module):
    """A user model with an operation no rule covers: channels sorted after the first conv."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = jnp.sort(x, axis=-1)
        return nn.Dense(3, name="dense")(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("method", ["lrp_epsilon", "deeplift", "guided_backprop"])
def test_unsupported_primitive_gets_one_line_error(method):
    x = _uniform(0, (2, 8, 8, 3))
    model = attrax.as_model(SortCNN())
    params = examples.init_variables(model.module, 1, x)
    t = jnp.array([0, 1], jnp.int32)
    with pytest.raises(AttraxError) as err:
        jax.block_until_ready(attrax.explain(method, model, params, x, t))
    msg = str(err.value)
    assert "sort" in msg and "\n" not in msg, f"{method}: {msg!r}"
    # the recorded fallback on request: the primitive's gradient
    r = attrax.explain(method, model, params, x, t, unknown="gradient")
    assert r.shape == x.shape and bool(jnp.isfinite(r).all())
    # and the gradient needs no rule at all
    assert bool(jnp.isfinite(attrax.explain("gradient", model, params, x, t)).all())


# --------------------------------------------------------------------------- trace caching
class CountingCNN(examples.PlainCNN):
    """The plain CNN with a trace counter: the body of `__call__` runs only when traced."""

    on_trace: Callable[[], None] = None  # from the test (Flax would freeze a list field into a tuple)

    def __call__(self, x):
        self.on_trace()
        return super().__call__(x)


def _counting_models():
    box_mlp, box_cnn = [], []

    def apply_fn(params, x):
        box_mlp.append(1)
        return examples.jnp_mlp_apply(params, x)

    x = _uniform(0, (2, 8, 8, 3))
    mlp_params = examples.jnp_mlp_init(1, 8 * 8 * 3, num_classes=3)
    cnn = CountingCNN(num_classes=3, on_trace=lambda: box_cnn.append(1))
    cnn_params = examples.init_variables(examples.PlainCNN(num_classes=3), 1, x)
    return x, [("jnp_mlp", apply_fn, mlp_params, box_mlp), ("nonzoo_cnn", cnn, cnn_params, box_cnn)]


@pytest.mark.parametrize("wrap", ["as_model", "raw"])
@pytest.mark.parametrize("method", ["lrp_epsilon", "deeplift", "guided_backprop", "gradient"])
def test_second_batch_neither_retraces_nor_recompiles(method, wrap):
    """`as_model`: the user wraps once; `raw`: the user hands the same Flax module / apply_fn to
    every `attrax.explain` call (the README's first example does)."""
    x, models = _counting_models()
    x2 = _uniform(9, x.shape)
    t = jnp.array([0, 1], jnp.int32)
    for family, raw, params, box in models:
        model = attrax.as_model(raw) if wrap == "as_model" else raw
        with count_compilations() as first:
            jax.block_until_ready(attrax.explain(method, model, params, x, t))
        traces = len(box)
        assert traces >= 1 and first.count >= 1  # both counters see the first call
        with count_compilations() as second:
            jax.block_until_ready(attrax.explain(method, model, params, x2, t))
        assert len(box) == traces, f"{method} on {family}: a second batch of the same shape re-traced the model"
        assert second.count == 0, f"{method} on {family}: a second batch of the same shape recompiled"
