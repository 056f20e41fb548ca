"""The rule engine (methods/_engine.py) on models that are not in the zoo: classification, known
answers, the unknown-primitive error and the trace cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nonzoo import make

import attrax
from attrax.errors import AttraxError
from attrax.harness import forward
from attrax.methods import _engine, class_score, input_gradient


def _ixg(fam):
    # reference values computed jitted (eagerly, each of the model's ops compiled on its own)
    g = jax.jit(lambda p, x, t: input_gradient(lambda v: fam.model(p, v), x, t)[1])(fam.params, fam.x, fam.target)
    return fam.x * g


def _logits(fam, x=None):
    return forward(fam.model, fam.params, fam.x if x is None else x)  # one cached compiled forward per model


def test_graph_classification():
    res = make("nonzoo_resnet")
    g = _engine.graph_of(res.model, res.params, res.x)
    names = [i.name for i in g.layers]
    assert names[0] == "conv1" and names[-1] == "dense" and "block2/short_conv" in names
    assert all(i.bn is not None for i in g.layers[:-1]) and g.layers[-1].bn is None
    assert g.layers[0].at_input and not g.layers[0].nonnegative_input and g.layers[1].nonnegative_input
    mlp = make("jnp_mlp")
    assert [i.name for i in _engine.graph_of(mlp.model, mlp.params, mlp.x).layers] == ["dense_0", "dense_1", "dense_2"]
    vit = make("vit_tiny")
    kinds = {s.kind for s in _engine.graph_of(vit.model, vit.params, vit.x).nodes}
    assert {"linear", "softmax", "bilinear", "norm", "activation"} <= kinds


@pytest.mark.parametrize("family", ["nonzoo_resnet", "jnp_mlp", "nnx_cnn"])
def test_lrp0_is_input_times_gradient(family):
    fam = make(family)
    r = attrax.explain("lrp_0", fam.model, fam.params, fam.x, fam.target)
    want = _ixg(fam)
    np.testing.assert_allclose(r, want, atol=1e-5 * float(jnp.abs(want).max()))


def test_canonized_logits_and_vit_gradient_mode():
    res = make("nonzoo_resnet")
    canon = jax.jit(lambda p, v: _engine.canonized_forward(res.model, p, v))(res.params, res.x)
    np.testing.assert_allclose(canon, _logits(res), atol=1e-5, rtol=1e-5)
    vit = make("vit_tiny")
    r = attrax.explain("lrp_0", vit.model, vit.params, vit.x, vit.target, transformer="gradient")
    want = _ixg(vit)
    np.testing.assert_allclose(r, want, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("family", ["nonzoo_resnet", "vit_tiny"])
def test_deeplift_summation_to_delta(family):
    fam = make(family)
    r = attrax.explain("deeplift", fam.model, fam.params, fam.x, fam.target)
    delta = class_score(_logits(fam), fam.target) - class_score(_logits(fam, jnp.zeros_like(fam.x)), fam.target)
    np.testing.assert_allclose(r.sum((1, 2, 3)), delta, atol=1e-5 * float(jnp.abs(delta).max()) + 1e-6)


def test_cp_lrp_conserves_on_bias_free_vit():
    vit = make("vit_tiny", use_bias=False, pool="mean", pos_embed=False)
    f = class_score(_logits(vit), vit.target)
    r = attrax.explain("lrp", vit.model, vit.params, vit.x, vit.target, rules={"default": "epsilon"}, eps=1e-9,
                       transformer="cp_lrp")
    np.testing.assert_allclose(r.sum((1, 2, 3)), f, rtol=1e-4, atol=1e-6)


def test_guided_backprop_is_gradient_when_relus_pass():
    """A ReLU net whose every ReLU input is positive and whose gradient is positive everywhere."""

    def apply_fn(p, x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + 1.0)
        return jnp.maximum(h @ p["w2"] + 1.0, 0.0) @ p["w3"]

    p = {"w1": jnp.full((12, 5), 0.1), "w2": jnp.full((5, 4), 0.2), "w3": jnp.full((4, 3), 0.3)}
    model = attrax.as_model(apply_fn)
    x = jax.random.uniform(jax.random.key(0), (2, 2, 2, 3))
    t = jnp.array([0, 2])
    _, g = input_gradient(lambda v: apply_fn(p, v), x, t)
    np.testing.assert_allclose(attrax.explain("guided_backprop", model, p, x, t), g, rtol=1e-6)


def test_unknown_primitive_one_line_error():
    def apply_fn(p, x):
        h = jnp.sort(x.reshape(x.shape[0], -1) @ p["w"], axis=-1)
        return h @ p["v"]

    p = {"w": jnp.ones((12, 4)), "v": jnp.ones((4, 3))}
    model = attrax.as_model(apply_fn)
    x = jax.random.uniform(jax.random.key(0), (2, 2, 2, 3))
    t = jnp.array([0, 1])
    for name in ("lrp_epsilon", "deeplift", "guided_backprop"):
        with pytest.raises(AttraxError, match="primitive `sort`") as err:
            attrax.explain(name, model, p, x, t)
        assert "\n" not in str(err.value)
    r = attrax.explain("lrp_epsilon", model, p, x, t, unknown="gradient")
    assert bool(jnp.isfinite(r).all())


@pytest.mark.parametrize("threads", [1, 2])
def test_second_batch_neither_retraces_nor_recompiles(monkeypatch, threads):
    # with 2 chunk threads the batch runs as two half-batch chunks in two threads (map_chunks)
    monkeypatch.setenv("ATTRAX_CHUNK_THREADS", str(threads))
    fam = make("nonzoo_cnn")
    half = -(-fam.x.shape[0] // threads)
    # a fresh Model with its own caches: as_model memoizes per module object, and another test in
    # this worker may have explained with the same family object already
    model = attrax.as_model(fam.raw.clone())
    traces = []
    real = _engine.trace
    monkeypatch.setattr(_engine, "trace", lambda *a: traces.append(1) or real(*a))
    compiles = []
    x2 = jax.block_until_ready(fam.x[::-1] * 0.5)

    def listener(event, duration, **kw):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for name in ("lrp_epsilon", "deeplift", "guided_backprop"):
            attrax.explain(name, model, fam.params, fam.x, fam.target)
        n_traces, n_compiles = len(traces), len(compiles)
        # one shared by the three methods, + deeplift's batch-1 reference (unless the chunk is 1 too)
        assert n_traces == (2 if half > 1 else 1)
        for name in ("lrp_epsilon", "deeplift", "guided_backprop"):
            attrax.explain(name, model, fam.params, x2, fam.target)
        assert len(traces) == n_traces and len(compiles) == n_compiles
    finally:
        jax._src.monitoring.unregister_event_duration_listener(listener)


def test_transformer_rule_sets_and_module_prefix_keys():
    vit = make("vit_tiny")
    args = (vit.model, vit.params, vit.x, vit.target)
    a = attrax.explain("lrp_epsilon", *args, transformer="attn_lrp")
    b = attrax.explain("lrp_epsilon", *args, transformer="cp_lrp")
    assert bool(jnp.isfinite(a).all()) and float(jnp.abs(a - b).max()) > 1e-3 * float(jnp.abs(a).max())
    c = attrax.explain("lrp", *args, rules={"blocks_0/attn": "zplus", "default": "epsilon"})
    d = attrax.explain("lrp", *args, rules={"blocks_0/attn/qkv": "zplus", "blocks_0/attn/proj": "zplus",
                                            "default": "epsilon"})
    np.testing.assert_allclose(c, d, rtol=1e-6, atol=1e-9)
    with pytest.raises(AttraxError, match="match no layer"):
        attrax.explain("lrp", *args, rules={"blocks_9": "zplus"})


def test_layer_names_and_replacement():
    res = make("nonzoo_resnet")
    a, logits = _engine.layer_value(res.model, res.params, res.x, "block2")
    assert a.shape == (2, 4, 4, 16) and float(a.min()) >= 0  # after the block's final ReLU
    np.testing.assert_allclose(logits, res.model(res.params, res.x), rtol=1e-6)
    _, again = _engine.layer_value(res.model, res.params, res.x, "block2", replace=a)
    np.testing.assert_allclose(again, logits, rtol=1e-6)
    assert _engine.last_spatial_layer(res.model, res.params, res.x) == "relu_4"


def test_nested_calls_are_inlined():
    """jit, checkpoint (remat), custom_vjp and custom_jvp (jax.nn.relu) calls inside a plain
    function become one flat list of classified equations: no call primitive is left, the layers
    inside them are found and LRP-0 is still input x gradient."""

    @jax.custom_vjp
    def double(h):  # a user's custom_vjp op (linear)
        return 2.0 * h

    double.defvjp(lambda h: (2.0 * h, None), lambda _, g: (2.0 * g,))

    @jax.jit
    def block(w, h):
        return jax.nn.relu(h @ w)

    def apply_fn(p, x):
        h = x.reshape(x.shape[0], -1)
        h = jax.checkpoint(block)(p["w0"], h)
        h = double(block(p["w1"], h))
        return h @ p["w2"]

    rng = np.random.default_rng(0)
    p = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in (("w0", (12, 8)), ("w1", (8, 8)), ("w2", (8, 3)))}
    x = jnp.asarray(rng.uniform(size=(2, 2, 2, 3)), jnp.float32)
    t = jnp.array([0, 2])
    model = attrax.as_model(apply_fn)
    g = _engine.graph_of(model, p, x)
    ops = [s.pname for s in g.steps if isinstance(s, _engine.Op)]
    assert not set(ops) & (_engine.INLINE - {"custom_jvp_call"}) and not g.unknown
    assert [i.name for i in g.layers] == ["dense_0", "dense_1", "dense_2"]
    assert sum(n.kind == "relu" for n in g.nodes) == 2
    _, grad = input_gradient(lambda v: apply_fn(p, v), x, t)
    np.testing.assert_allclose(attrax.explain("lrp_0", model, p, x, t), x * grad, rtol=1e-5, atol=1e-7)


def test_unknown_primitive_error_names_where():
    def apply_fn(p, x):
        h = x.reshape(x.shape[0], -1) @ p["w"]
        with jax.named_scope("ranker"):
            h = jnp.sort(h, axis=-1)
        return h @ p["v"]

    p = {"w": jnp.ones((12, 4)), "v": jnp.ones((4, 3))}
    x = jnp.ones((2, 2, 2, 3))
    with pytest.raises(AttraxError, match=r"primitive `sort` at 'ranker'.*unknown='gradient'") as err:
        attrax.explain("deeplift", apply_fn, p, x, jnp.array([0, 1]))
    assert "\n" not in str(err.value)


def test_fast_max_pool_substitution():
    """window == stride max pooling runs as the zoo's reshape + window max (measured faster than
    select-and-scatter on CPU): neither the LRP nor the DeepLIFT computation contains
    `select_and_scatter_add`, which the plain gradient of the same model does; the zoo's own
    window max (a custom_jvp) is kept whole."""
    fam = make("nonzoo_cnn")
    g = _engine.graph_of(fam.model, fam.params, fam.x)
    assert [n.extra["form"] for n in g.nodes if n.kind == "maxpool"] == ["window"]

    def jaxpr_of(name):
        fn = attrax.methods.get(name).fn
        return str(jax.make_jaxpr(lambda v: fn(fam.model, fam.params, v, fam.target))(fam.x))

    assert "select_and_scatter_add" in str(jax.make_jaxpr(lambda v: input_gradient(
        lambda z: fam.model(fam.params, z), v, fam.target)[1])(fam.x))
    for name in ("lrp_epsilon", "deeplift", "guided_backprop"):
        assert "select_and_scatter_add" not in jaxpr_of(name), name
    zoo = attrax.models.create("cnn_a", channels=(4, 6), dense=(8,))
    xz = jnp.zeros((1, 28, 28, 1))
    pz = jax.eval_shape(zoo.module.init, jax.random.key(0), xz)  # the trace needs only shapes
    assert {n.extra["form"] for n in _engine.graph_of(zoo, pz, xz).nodes if n.kind == "maxpool"} == {"6d"}
