"""ImageNet-scale zoo: published parameter counts, tiny configurations, stages, pooling, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrax
from attrax import zoo_large
from attrax.errors import AttraxError


def random_variables(module, shape, seed=0):
    spec = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), jnp.float32)
        scale = 1.0 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(size=s.shape) * scale, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, spec)


def _n_params(spec):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(spec["params"]))


# torchvision's / timm's parameter counts (buffers such as BatchNorm running statistics excluded)
PUBLISHED = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vgg16": 138_357_544, "vit": 86_567_656}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes(name):
    module = attrax.models.create(name, num_classes=1000).module
    spec = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert _n_params(spec) == PUBLISHED[name]
    out = jax.eval_shape(module.apply, spec, jnp.zeros((2, 224, 224, 3)))
    assert out.shape == (2, 1000)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16"])
def test_tiny_convnets_split_into_features_and_head(name):
    small = {"layers": (1, 1, 1, 1)} if name == "resnet18" else {}  # one block per stage keeps the compile short
    module = zoo_large.tiny(name, num_classes=5, normalize="imagenet", **small)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
    v = random_variables(module, x.shape)

    @jax.jit
    def both(v, x):
        a = module.apply(v, x, method="features")
        return module.apply(v, x), module.apply(v, a, method="head"), a

    logits, staged, a = both(v, x)
    assert logits.shape == (2, 5) and a.ndim == 4 and bool(jnp.all(a >= 0))  # after the ReLU
    np.testing.assert_allclose(np.asarray(staged), np.asarray(logits), rtol=1e-5, atol=1e-6)
    assert attrax.as_model(module).has_stages and hasattr(module, "act")
    # training mode (the trainer's `clone(train=True)`) updates the BatchNorm statistics
    if "batch_stats" in v:
        _, upd = jax.eval_shape(lambda v, x: module.clone(train=True).apply(v, x, mutable=["batch_stats"]), v, x)
        assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(v["batch_stats"])


def test_adaptive_avg_pool_matches_torch_bins():
    x = jnp.arange(2 * 5 * 3 * 1, dtype=jnp.float32).reshape(2, 5, 3, 1)
    got = np.asarray(zoo_large.adaptive_avg_pool(x, 3))
    # torch AdaptiveAvgPool2d(3) on 5 rows: bins [0, 2), [1, 4), [3, 5); on 3 columns: one each
    rows = [(0, 2), (1, 4), (3, 5)]
    want = np.stack([np.asarray(x)[:, a:b].mean(axis=1) for a, b in rows], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    one = jnp.ones((1, 1, 1, 4))
    assert zoo_large.adaptive_avg_pool(one, 7).shape == (1, 7, 7, 4)  # VGG at small inputs: replicated


def test_tiny_vit_explains_and_checks_its_input_size():
    module = zoo_large.tiny("vit", num_classes=4, depth=1)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 32, 32, 3)), jnp.float32)
    v = random_variables(module, x.shape)
    assert v["params"]["pos_embed"].shape == (1, 1 + 16, 24) and v["params"]["cls_token"].shape == (1, 1, 24)
    model = attrax.as_model(module)
    r = attrax.explain("gradient", model, v, x, jnp.asarray([0, 3]))
    assert r.shape == x.shape and bool(jnp.isfinite(r).all()) and float(jnp.abs(r).sum()) > 0
    assert not model.has_stages  # no spatial feature maps: the CAM family says so in one line
    with pytest.raises(AttraxError, match="pos_embed"):
        jax.eval_shape(module.apply, v, jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(AttraxError, match="divisible"):
        jax.eval_shape(zoo_large.tiny("vit", num_heads=5).init, jax.random.key(0), x)
    with pytest.raises(AttraxError, match="normalize"):
        jax.eval_shape(zoo_large.tiny("vit", normalize="imagenett").init, jax.random.key(0), x)


def test_resnet_grad_cam_uses_the_stages():
    module = zoo_large.tiny("resnet18", num_classes=3, layers=(1, 1))
    x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 32, 32, 3)), jnp.float32)
    v = random_variables(module, x.shape)
    r = attrax.explain("grad_cam", attrax.as_model(module), v, x, jnp.asarray([0, 2]))
    assert r.shape[:3] == x.shape[:3] and bool(jnp.isfinite(r).all())


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0)])  # the ResNet stem, VGG's pools (odd sizes crop)
def test_max_pool_matches_nn_max_pool_and_its_gradient(k, s, p):
    import flax.linen as nn

    x = jnp.maximum(jax.random.normal(jax.random.key(0), (2, 9, 8, 3)), 0)  # ReLU zeros: many ties

    def ref(x):
        return nn.max_pool(x, (k, k), strides=(s, s), padding=((p, p), (p, p)))

    out = zoo_large.max_pool(x, k, s, p)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref(x)))
    w = jax.random.normal(jax.random.key(1), out.shape)
    ga = jax.grad(lambda x: (zoo_large.max_pool(x, k, s, p) * w).sum())(x)
    gb = jax.grad(lambda x: (ref(x) * w).sum())(x)
    np.testing.assert_array_equal(np.asarray(ga), np.asarray(gb))


def test_max_pool_forward_is_one_reduce_window_max():
    """The forward stays `reduce_window_max`, the form the rule engine maps to its max-pool rules (LRP,
    DeepLIFT, guided backprop on ResNet / VGG); only the derivative is custom."""
    jaxpr = jax.make_jaxpr(zoo_large.max_pool)(jnp.zeros((1, 8, 8, 2)))
    inner = [e for eqn in jaxpr.eqns for e in eqn.params["call_jaxpr"].jaxpr.eqns]
    assert [e.primitive.name for e in inner] == ["reduce_window_max"]
