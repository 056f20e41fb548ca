"""Weight import: PyTorch reference logits, layout detection, Flax checkpoints, errors, external models."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import attrax
from attrax import weights, zoo_large
from attrax.errors import AttraxError

REF = Path(__file__).parent / "data" / "reference" / "import"


def random_variables(module, shape, seed=0):
    """Variables for `module` without running its initializers (fast: a trace, then NumPy draws)."""
    spec = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), jnp.float32)
        scale = 1.0 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(size=s.shape) * scale + (1.0 if name == "scale" else 0.0), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, spec)


def to_torch_layout(variables, layout, hints=None):
    """Flax variables -> a torch-layout state dict (names from `weights.source_name`)."""
    out = {}
    for key, a in weights.flatten_tree(variables).items():
        path = tuple(key.split("/"))
        a = np.asarray(a)
        if path[-1] == "kernel":
            a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
        out[weights.source_name(layout, path, hints)] = np.ascontiguousarray(a)
    return out


def _forward(model, variables, x):
    return np.asarray(jax.jit(model.apply_fn)(variables, jnp.asarray(x)))


@pytest.mark.parametrize("arch,name", [("resnet18", "resnet18_w16"), ("vit", "vit_tiny")])
def test_reference_logits(arch, name):
    model, variables = attrax.models.import_weights(arch, REF / f"{name}.safetensors")
    io = np.load(REF / f"{name}_io.npz")
    err = np.abs(_forward(model, variables, io["x"]) - io["logits"]).max()
    assert err < 1e-4, err
    m = model.module
    if arch == "vit":  # heads from the file's metadata, the rest from the shapes
        assert (m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_dim) == (4, 48, 2, 3, 192)
    else:
        assert (m.width, m.layers, m.block, m.num_classes) == (16, (2, 2, 2, 2), "basic", 10)


def test_layout_detection():
    assert weights.detect_layout(load_file(REF / "resnet18_w16.safetensors")) == "torchvision_resnet"
    assert weights.detect_layout(load_file(REF / "vit_tiny.safetensors")) == "timm_vit"
    assert weights.detect_layout(["features.0.weight", "classifier.0.weight"]) == "torchvision_vgg"
    assert weights.detect_layout(["params/conv1/kernel"]) == "flax"
    with pytest.raises(AttraxError, match="unknown weights layout"):
        weights.detect_layout(["encoder.weight"])


def test_heads_keyword_and_errors(tmp_path):
    t = load_file(REF / "vit_tiny.safetensors")
    bare = tmp_path / "vit_nometa.safetensors"
    save_file(t, str(bare))  # no metadata: the heads cannot be read from the shapes
    with pytest.raises(AttraxError, match="heads=") as e:
        weights.import_weights("vit", bare)
    assert "\n" not in str(e.value)
    model, variables = weights.import_weights("vit", bare, heads=3)
    io = np.load(REF / "vit_tiny_io.npz")
    assert np.abs(_forward(model, variables, io["x"]) - io["logits"]).max() < 1e-4
    with pytest.raises(AttraxError, match="disagrees"):
        weights.import_weights("vit", REF / "vit_tiny.safetensors", heads=4)
    with pytest.raises(AttraxError, match="not arch 'resnet18'"):
        weights.import_weights("resnet18", REF / "vit_tiny.safetensors")
    with pytest.raises(AttraxError, match="(?i)did you mean"):
        weights.import_weights("resnet_18", REF / "vit_tiny.safetensors")


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("layer3.1.bn2.running_var"), "missing key 'layer3.1.bn2.running_var'"),
    (lambda t: t.__setitem__("layer1.0.extra.weight", np.zeros(3, np.float32)), "unknown key 'layer1.0.extra.weight'"),
    (lambda t: t.__setitem__("layer2.1.conv1.weight", np.zeros((32, 16, 3, 3), np.float32)), "layer2.1.conv1.weight"),
])
def test_key_errors_name_the_key(tmp_path, edit, match):
    t = load_file(REF / "resnet18_w16.safetensors")
    edit(t)
    p = tmp_path / "edited.safetensors"
    save_file(t, str(p))
    with pytest.raises(AttraxError, match=match) as e:
        weights.import_weights("resnet18", p)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 definitely not weights")
    with pytest.raises(AttraxError, match="cannot read weights file"):
        weights.import_weights("resnet18", junk)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((REF / "vit_tiny.safetensors").read_bytes()[:5000])
    with pytest.raises(AttraxError, match="cut.safetensors"):
        weights.import_weights("vit", cut)
    with pytest.raises(AttraxError, match="not found"):
        weights.import_weights("vit", tmp_path / "absent.safetensors")


def _same_variables(a, b):
    fa, fb = weights.flatten_tree(a), weights.flatten_tree(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_flax_checkpoint_round_trip(tmp_path):
    model, variables = weights.import_weights("resnet18", REF / "resnet18_w16.safetensors", normalize="imagenet")
    config = weights._config_to_json(model.module)
    x = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype(np.float32)
    f = jax.jit(model.module.apply)  # one compile: every loaded model below has this module's config
    want = np.asarray(f(variables, x))
    for target in ("ck.msgpack", "ck.safetensors", "ck_orbax"):
        path = weights.save_weights(tmp_path / target, model, variables)
        back, v2 = attrax.models.import_weights("resnet18", path)
        assert weights._config_to_json(back.module) == config  # normalize="imagenet" travels with the file
        _same_variables(v2, variables)
        np.testing.assert_array_equal(np.asarray(f(v2, x)), want)
    # a plain Flax npz (the reference README's "/"-joined keys, mean/var beside scale/bias): sizes inferred
    flat = {k.split("/", 1)[1]: v for k, v in weights.flatten_tree(variables).items()}
    np.savez(tmp_path / "plain.npz", **flat)
    back, v3 = weights.import_weights("resnet18", tmp_path / "plain.npz", normalize="imagenet")
    assert weights._config_to_json(back.module) == config
    _same_variables(v3, variables)
    with pytest.raises(AttraxError, match="'vit'"):
        weights.import_weights("vit", tmp_path / "ck.msgpack")


@pytest.mark.parametrize("arch,layout,bn", [("vgg16", "torchvision_vgg", True), ("vgg16", "torchvision_vgg", False),
                                            ("resnet50", "torchvision_resnet", True)])
def test_torch_layout_round_trip_infers_sizes(tmp_path, arch, layout, bn):
    module = zoo_large.tiny(arch, num_classes=5, **({"batch_norm": bn} if arch == "vgg16" else {}))
    variables = random_variables(module, (1, 32, 32, 3))
    if arch == "vgg16":  # torchvision indices: conv (, bn), relu per conv; a pool after each stage
        hints = {"conv_index": {0: 0, 1: 4, 2: 8} if bn else {0: 0, 1: 3, 2: 6}}
        sd = to_torch_layout(variables, layout, hints)
        w = sd["classifier.0.weight"]  # rows in torch's C,H,W flatten order
        hidden, c, p = w.shape[0], 16, 2
        sd["classifier.0.weight"] = w.reshape(hidden, p, p, c).transpose(0, 3, 1, 2).reshape(hidden, -1)
    else:
        sd = to_torch_layout(variables, layout)
    p_ = tmp_path / f"{arch}.safetensors"
    if bn:
        sd["bn1.num_batches_tracked" if arch != "vgg16" else "features.1.num_batches_tracked"] = np.zeros((), np.int64)
    save_file(sd, str(p_))
    model, v2 = weights.import_weights(arch, p_)
    assert weights._config_to_json(model.module) == weights._config_to_json(module)  # every size inferred
    _same_variables(v2, variables)


USER_MODULE = '''
import jax.numpy as jnp

def my_fn(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]
'''


def test_external_model_python_api_and_config(tmp_path, monkeypatch):
    pkg = tmp_path / "my_attrax_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(12, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    ck = tmp_path / "mine.safetensors"
    save_file({"w": w, "b": b}, str(ck))
    x = rng.uniform(size=(4, 2, 2, 3)).astype(np.float32)
    model, variables = attrax.models.external("my_attrax_user_pkg:my_fn", ck)
    np.testing.assert_allclose(np.asarray(model(variables, x)), x.reshape(4, -1) @ w + b, rtol=1e-5)
    r = attrax.explain("gradient", model, variables, jnp.asarray(x), jnp.asarray([0, 1, 2, 0]))
    np.testing.assert_allclose(np.asarray(r)[1].reshape(-1), w[:, 1], rtol=1e-5)

    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="attrax.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=external", "model.apply=my_attrax_user_pkg.my_fn", f"model.weights={ck}"])
    m2, v2 = weights.from_config(dict(cfg.model))
    np.testing.assert_allclose(np.asarray(m2(v2, x)), x.reshape(4, -1) @ w + b, rtol=1e-5)
    zoo = attrax.models.create("external", apply="my_attrax_user_pkg:my_fn")  # the zoo face
    np.testing.assert_allclose(np.asarray(zoo({"params": v2}, x)), x.reshape(4, -1) @ w + b, rtol=1e-5)
    with pytest.raises(AttraxError, match="cannot import"):
        weights.external("no_such_pkg_xyz.fn", ck)
    with pytest.raises(AttraxError, match="model.apply"):
        weights.from_config({"name": "external", "weights": str(ck)})
    sys.modules.pop("my_attrax_user_pkg", None)


def test_zoo_config_with_weights(tmp_path):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="attrax.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=vit", f"+model.weights={REF / 'vit_tiny.safetensors'}"])
    model, variables = weights.from_config(dict(cfg.model))  # num_heads 12 of vit.yaml yields to the file's 3
    io = np.load(REF / "vit_tiny_io.npz")
    assert np.abs(_forward(model, variables, io["x"]) - io["logits"]).max() < 1e-4
    assert weights.from_config({"name": "cnn"}) is None


def test_bf16_safetensors_are_widened_exactly(tmp_path):
    import json

    t = load_file(REF / "vit_tiny.safetensors")
    header, blobs, off = {"__metadata__": {"num_heads": "3"}}, [], 0
    for k, v in t.items():
        b = (v.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()  # truncate to bfloat16
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    p = tmp_path / "vit_bf16.safetensors"
    p.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
    _, v16 = weights.import_weights("vit", p)
    _, v32 = weights.import_weights("vit", REF / "vit_tiny.safetensors")
    f16, f32 = weights.flatten_tree(v16), weights.flatten_tree(v32)
    for k in f32:
        want = (f32[k].view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        np.testing.assert_array_equal(f16[k], want, err_msg=k)
