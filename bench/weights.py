"""Weight import: `model, variables = attrax.models.import_weights(arch, path, **kwargs)`.

Files researchers have, read without PyTorch:
- torchvision-layout state dicts (ResNet, VGG) and timm-layout state dicts (`vit_*`) saved as
  safetensors (`safetensors.safe_open(path, "numpy")`); a `module.` prefix (DataParallel) is removed;
- Flax checkpoints: an orbax directory (orbax-checkpoint is a dependency of flax, so reading it costs
  nothing extra), a Flax msgpack file (`flax.serialization`), or an `.npz` / safetensors file whose
  keys are "/"-joined Flax paths (`conv1/kernel`, `params/conv1/kernel`; `mean`/`var` go to
  `batch_stats`). `save_weights` writes the msgpack, safetensors or orbax forms with the module's
  configuration embedded, so they load back without keywords.

`arch` is a zoo name (`resnet18`, `resnet50`, `vgg16`, `vit`). The layout is detected from the keys;
sizes the shapes determine are inferred (ResNet: width, blocks per stage, basic vs bottleneck,
bottleneck width, groups, classes; VGG: conv widths, max-pool positions from the layer indices,
BatchNorm, hidden size, pool size, classes; ViT: patch size, width, depth, MLP width, qkv bias,
number of patches, classes). The rest are keywords: `heads=` for a ViT (or the safetensors string
metadata `num_heads`, which the timm exporter of ../shared/reference writes), `normalize=` (None,
"imagenet", "inception": the input normalisation the weights expect; the default None feeds x as
given). Unknown, missing and mismatched keys give one-line `AttraxError`s naming the key.

Conversion (torch -> Flax): conv weight OIHW -> HWIO (`transpose(2, 3, 1, 0)`), linear weight ->
its transpose, norm `weight` -> `scale`, BatchNorm `running_mean` / `running_var` -> `batch_stats`
`mean` / `var`, `num_batches_tracked` dropped; VGG's first classifier layer has its rows permuted
from torch's C,H,W flatten order to NHWC's H,W,C.

A user's own checkpoint and function: `external(apply="my_pkg.my_mod:my_fn", weights=path)` returns
`(Model, variables)` with the file's tree as stored (`load_tree`); config: `model=external
model.apply=my_pkg.my_fn model.weights=path` (`from_config`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from attrax import zoo_large  # noqa: F401  (registers the architectures)
from attrax._arrays import to_device
from attrax.errors import AttraxError
from attrax.models import ZOO, Model, as_model, module_model

ARCHS = {"resnet18": "resnet", "resnet50": "resnet", "vgg16": "vgg", "vit": "vit"}
LAYOUTS = ("torchvision_resnet", "torchvision_vgg", "timm_vit", "flax")
_CONFIG_KEY = "attrax_config"
_ARCH_KEY = "attrax_arch"
Flat = dict[tuple[str, ...], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Reading files


def read_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(flat tensors by key, string metadata, format) of a safetensors / npz / msgpack file or orbax dir."""
    p = Path(path)
    if not p.exists():
        raise AttraxError(f"weights file not found: {p}")
    if p.is_dir():
        return _read_orbax(p)
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}, {}, "npz"
        except Exception as e:  # noqa: BLE001
            raise AttraxError(f"cannot read weights file {p}: broken npz ({type(e).__name__}: {e})") from None
    if len(head) == 9 and head[8:9] == b"{":
        return _read_safetensors(p)
    try:
        state = flax.serialization.msgpack_restore(p.read_bytes())
    except Exception:  # noqa: BLE001
        raise AttraxError(
            f"cannot read weights file {p}: not safetensors, npz, Flax msgpack or an orbax directory"
        ) from None
    if not isinstance(state, dict):
        raise AttraxError(f"cannot read weights file {p}: the msgpack holds a {type(state).__name__}, not a tree")
    meta = {}
    if isinstance(state.get("attrax"), dict) and "variables" in state:
        meta = {k: _decode(v) for k, v in state["attrax"].items()}
        state = state["variables"]
    return flatten_tree(state), meta, "msgpack"


def _decode(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else v if isinstance(v, str) else str(np.asarray(v).tobytes(), "utf8")


def _read_safetensors(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover
        raise AttraxError("reading safetensors needs the `safetensors` package: pip install safetensors") from None
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001
        if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
            return _read_safetensors_bf16(p)
        raise AttraxError(f"cannot read weights file {p}: broken safetensors ({type(e).__name__}: {e})") from None
    return tensors, meta, "safetensors"


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_bf16(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """NumPy has no bfloat16, so the safetensors NumPy API refuses BF16 tensors: read the documented
    format (u64 header length, JSON header, raw little-endian data) and widen BF16 to float32 exactly."""
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    data = memoryview(raw)[8 + n:]
    tensors = {}
    for k, info in header.items():
        a, b = info["data_offsets"]
        buf = data[a:b]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            arr = np.frombuffer(buf, np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise AttraxError(f"cannot read weights file {p}: tensor {k!r} has dtype {info['dtype']}")
        tensors[k] = arr.reshape(info["shape"]).copy()
    return tensors, dict(meta), "safetensors"


def _read_orbax(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    import orbax.checkpoint as ocp

    sidecar = p / "attrax_model.json"
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    try:
        tree = ocp.PyTreeCheckpointer().restore(str(p.resolve()))
    except Exception as e:  # noqa: BLE001
        raise AttraxError(f"cannot read weights directory {p}: not an orbax checkpoint ({type(e).__name__})") from None
    return flatten_tree(tree), meta, "orbax"


def flatten_tree(tree: Any, prefix: str = "", leaf: Callable = np.asarray) -> dict[str, Any]:
    """Nested dicts -> {"a/b/c": leaf(array)}."""
    out: dict[str, Any] = {}
    for k, v in (tree.items() if hasattr(tree, "items") else ()):
        key = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(flatten_tree(v, key + "/", leaf))
        else:
            out[key] = leaf(v)
    return out


def unflatten(flat: dict[str, Any], sep: str = "/") -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for k, v in flat.items():
        node = tree
        parts = k.split(sep)
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return tree


def load_tree(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's tensors as stored, for a user's own `apply_fn`: nested by "/" where keys have it
    (Flax files), flat `{"layer.weight": array}` otherwise (torch state dicts)."""
    flat, _, _ = read_file(path)
    if any("/" in k for k in flat):
        return unflatten(flat)
    return dict(flat)


# ---------------------------------------------------------------------------------------------
# Layout detection and torch -> Flax translation


def detect_layout(keys: Any) -> str:
    """"torchvision_resnet", "torchvision_vgg", "timm_vit" or "flax" from a state dict's keys."""
    keys = set(keys)
    if any("/" in k for k in keys):
        return "flax"
    if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm_vit"
    if any(k.startswith("layer1.") for k in keys) or "conv1.weight" in keys:
        return "torchvision_resnet"
    if any(k.startswith("features.") for k in keys) and any(k.startswith("classifier.") for k in keys):
        return "torchvision_vgg"
    sample = ", ".join(sorted(keys)[:4])
    raise AttraxError(f"unknown weights layout (keys {sample}, ...): expected torchvision ResNet/VGG, timm ViT or Flax")


_FAMILY_OF_LAYOUT = {"torchvision_resnet": "resnet", "torchvision_vgg": "vgg", "timm_vit": "vit"}


def _torch_param(path: tuple[str, ...], name: str, w: np.ndarray, key: str) -> tuple[tuple[str, ...], np.ndarray]:
    """One torch parameter -> (Flax path incl. collection, array)."""
    if name == "weight":
        if w.ndim == 4:
            return ("params", *path, "kernel"), w.transpose(2, 3, 1, 0)
        if w.ndim == 2:
            return ("params", *path, "kernel"), w.T
        if w.ndim == 1:
            return ("params", *path, "scale"), w
    elif name == "bias":
        return ("params", *path, "bias"), w
    elif name == "running_mean":
        return ("batch_stats", *path, "mean"), w
    elif name == "running_var":
        return ("batch_stats", *path, "var"), w
    raise AttraxError(f"unknown key {key!r} (parameter {name!r}, shape {tuple(w.shape)})")


def _resnet_path(parts: list[str], key: str) -> tuple[str, ...]:
    if len(parts) == 1 and parts[0] in ("conv1", "bn1", "fc"):
        return (parts[0],)
    m = re.fullmatch(r"layer([1-9])", parts[0])
    if m and len(parts) >= 3 and parts[1].isdigit():
        block = f"layer{m.group(1)}_{parts[1]}"
        if len(parts) == 3 and re.fullmatch(r"(conv|bn)[1-3]", parts[2]):
            return (block, parts[2])
        if len(parts) == 4 and parts[2] == "downsample" and parts[3] in ("0", "1"):
            return (block, "downsample_conv" if parts[3] == "0" else "downsample_bn")
    raise AttraxError(f"unknown key {key!r} for a torchvision ResNet")


def _vit_path(parts: list[str], key: str) -> tuple[str, ...]:
    if parts == ["patch_embed", "proj"]:
        return ("patch_embed",)
    if len(parts) == 1 and parts[0] in ("norm", "head"):
        return (parts[0],)
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
        rest = tuple(parts[2:])
        if rest in (("norm1",), ("norm2",), ("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
            return (f"blocks_{parts[1]}", *rest)
    hint = " (timm options fc_norm / reg tokens / layer scale are not supported)" if parts[0] in (
        "fc_norm", "reg_token", "norm_pre") or "ls1" in parts or "ls2" in parts else ""
    raise AttraxError(f"unknown key {key!r} for a timm ViT{hint}")


def translate(tensors: dict[str, np.ndarray], layout: str) -> tuple[Flat, dict[tuple[str, ...], str], dict]:
    """A state dict in `layout` -> (Flax flat dict, Flax path -> source key, hints such as VGG's cfg)."""
    flat: Flat = {}
    origin: dict[tuple[str, ...], str] = {}
    hints: dict[str, Any] = {}
    tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}

    def put(path: tuple[str, ...], arr: np.ndarray, key: str) -> None:
        flat[path] = np.asarray(arr)
        origin[path] = key

    if layout == "flax":
        for k, v in tensors.items():
            parts = tuple(k.split("/"))
            if parts[0] not in ("params", "batch_stats"):
                parts = ("batch_stats" if parts[-1] in ("mean", "var") else "params", *parts)
            put(parts, v, k)
        return flat, origin, hints
    if layout == "torchvision_vgg":
        return _translate_vgg(tensors)
    for key, w in tensors.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if layout == "timm_vit" and parts[0] in ("cls_token", "pos_embed") and len(parts) == 1:
            put(("params", parts[0]), w, key)
            continue
        mpath = _resnet_path(parts[:-1], key) if layout == "torchvision_resnet" else _vit_path(parts[:-1], key)
        path, arr = _torch_param(mpath, parts[-1], w, key)
        put(path, arr, key)
    return flat, origin, hints


def _translate_vgg(tensors: dict[str, np.ndarray]) -> tuple[Flat, dict, dict]:
    flat: Flat = {}
    origin: dict[tuple[str, ...], str] = {}
    layers: dict[int, dict[str, tuple[str, np.ndarray]]] = {}
    fcs: dict[int, dict[str, tuple[str, np.ndarray]]] = {}
    for key, w in tensors.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if len(parts) != 3 or parts[0] not in ("features", "classifier") or not parts[1].isdigit():
            raise AttraxError(f"unknown key {key!r} for a torchvision VGG")
        (layers if parts[0] == "features" else fcs).setdefault(int(parts[1]), {})[parts[2]] = (key, w)
    cfg: list[Any] = []
    conv_index: dict[int, int] = {}
    k = -1
    last_conv, last_width, last_idx = None, None, None
    step = None
    for idx in sorted(layers):
        entry = layers[idx]
        w = entry.get("weight", (None, None))[1]
        is_conv = w is not None and w.ndim == 4
        if is_conv:
            if last_idx is not None:
                gap = idx - last_idx
                if step is None:
                    step = 3 if any(i in layers for i in range(last_idx + 1, idx)) else 2
                if gap == step + 1:
                    cfg.append("M")
                elif gap != step:
                    raise AttraxError(f"features.{idx}: cannot place it in a torchvision VGG (index gap {gap})")
            k += 1
            conv_index[k] = idx
            cfg.append(int(w.shape[0]))
            last_conv, last_width, last_idx = idx, int(w.shape[0]), idx
            mpath = (f"conv{k}",)
        elif last_conv is not None and idx == last_conv + 1:
            mpath = (f"bn{k}",)
        else:
            raise AttraxError(f"unknown key features.{idx}.* for a torchvision VGG (not a conv or its BatchNorm)")
        for name, (key, arr) in entry.items():
            path, a = _torch_param(mpath, name, arr, key)
            flat[path] = a
            origin[path] = key
    cfg.append("M")  # torchvision's configurations end with a max-pool
    for j, idx in enumerate(sorted(fcs)):
        mpath = (f"fc{j + 1}",)
        for name, (key, arr) in fcs[idx].items():
            if name == "weight" and j == 0 and last_width:
                hidden, fan_in = arr.shape
                p = math.isqrt(fan_in // last_width)
                if p * p * last_width != fan_in:
                    raise AttraxError(f"{key}: {fan_in} inputs are not {last_width} channels x a square pool")
                arr = arr.reshape(hidden, last_width, p, p).transpose(0, 2, 3, 1).reshape(hidden, fan_in)
            path, a = _torch_param(mpath, name, arr, key)
            flat[path] = a
            origin[path] = key
    return flat, origin, {"cfg": tuple(cfg), "conv_index": conv_index}


# ---------------------------------------------------------------------------------------------
# Inferring the configuration from shapes


def _need(flat: Flat, path: tuple[str, ...], layout: str, hints: dict | None = None) -> np.ndarray:
    if path not in flat:
        raise AttraxError(f"missing key {source_name(layout, path, hints)!r}")
    return flat[path]


def infer_config(family: str, flat: Flat, origin: dict, hints: dict, layout: str, meta: dict) -> dict[str, Any]:
    """Module fields the shapes determine."""
    tv = layout != "flax"
    if family == "resnet":
        width = int(_need(flat, ("params", "conv1", "kernel"), layout, hints).shape[3])
        layers = []
        for i in range(1, 5):
            j = 0
            while ("params", f"layer{i}_{j}", "conv1", "kernel") in flat:
                j += 1
            layers.append(j)
        if layers[0] == 0:
            raise AttraxError(f"missing key {'layer1.0.conv1.weight' if tv else 'layer1_0/conv1/kernel'!r}")
        while layers and layers[-1] == 0:
            layers.pop()
        bottleneck = ("params", "layer1_0", "conv3", "kernel") in flat
        cfg: dict[str, Any] = {"width": width, "layers": tuple(layers),
                               "block": "bottleneck" if bottleneck else "basic"}
        if bottleneck:
            mid = int(flat[("params", "layer1_0", "conv1", "kernel")].shape[3])
            c2 = _need(flat, ("params", "layer1_0", "conv2", "kernel"), layout, hints)
            cfg["mid_ratio"] = mid / width
            cfg["groups"] = max(1, mid // int(c2.shape[2]))
        cfg["num_classes"] = int(_need(flat, ("params", "fc", "kernel"), layout, hints).shape[1])
        return cfg
    if family == "vgg":
        convs = []
        while ("params", f"conv{len(convs)}", "kernel") in flat:
            convs.append(int(flat[("params", f"conv{len(convs)}", "kernel")].shape[3]))
        if not convs:
            raise AttraxError(f"missing key {'features.0.weight' if tv else 'conv0/kernel'!r}")
        vcfg = hints.get("cfg")
        if vcfg is None:  # a Flax file without a stored config: VGG-16's pool positions
            if len(convs) != 13:
                raise AttraxError(f"a Flax VGG with {len(convs)} convolutions: pass cfg=(64, 64, 'M', ...)")
            it = iter(convs)
            vcfg = tuple("M" if c == "M" else next(it) for c in zoo_large.VGG16_CFG)
        fc1 = _need(flat, ("params", "fc1", "kernel"), layout, hints)
        fc3 = _need(flat, ("params", "fc3", "kernel"), layout, hints)
        p = math.isqrt(fc1.shape[0] // convs[-1])
        return {"cfg": tuple(vcfg), "batch_norm": ("params", "bn0", "scale") in flat, "hidden": int(fc1.shape[1]),
                "pool_size": p, "num_classes": int(fc3.shape[1])}
    if family == "vit":
        pe = _need(flat, ("params", "patch_embed", "kernel"), layout, hints)
        depth = 0
        while ("params", f"blocks_{depth}", "attn", "qkv", "kernel") in flat:
            depth += 1
        if depth == 0:
            raise AttraxError(f"missing key {'blocks.0.attn.qkv.weight' if tv else 'blocks_0/attn/qkv/kernel'!r}")
        fc1 = _need(flat, ("params", "blocks_0", "mlp", "fc1", "kernel"), layout, hints)
        head = _need(flat, ("params", "head", "kernel"), layout, hints)
        cfg = {"patch_size": int(pe.shape[0]), "embed_dim": int(pe.shape[3]), "depth": depth,
               "mlp_dim": int(fc1.shape[1]), "qkv_bias": ("params", "blocks_0", "attn", "qkv", "bias") in flat,
               "num_classes": int(head.shape[1])}
        if "num_heads" in meta:
            cfg["num_heads"] = int(meta["num_heads"])
        return cfg
    raise AttraxError(f"unknown architecture family {family!r}")


def _input_shape(family: str, module: nn.Module, flat: Flat) -> tuple[int, ...]:
    cin = int(flat[("params", "patch_embed" if family == "vit" else ("conv1" if family == "resnet" else "conv0"),
                    "kernel")].shape[2])
    if family == "vit":
        t = flat.get(("params", "pos_embed"))
        g = math.isqrt(t.shape[1] - 1) if t is not None else 2
        s = g * module.patch_size
        return (1, s, s, cin)
    return (1, 64, 64, cin)


def _config_to_json(module: nn.Module) -> str:
    skip = {"parent", "name", "act", "train"}
    cfg = {f: getattr(module, f) for f in module.__dataclass_fields__ if f not in skip}
    return json.dumps(cfg)


def _config_from_json(s: str) -> dict[str, Any]:
    cfg = json.loads(s)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


# ---------------------------------------------------------------------------------------------
# The API


def import_weights(arch: str, path: str | os.PathLike, *, heads: int | None = None,
                   fallback_heads: int | None = None, **kwargs: Any) -> tuple[Model, dict[str, Any]]:
    """Build zoo model `arch` with the sizes of the checkpoint at `path` and load its weights.

    Returns `(model, variables)` with `model(variables, x) -> logits` (x NHWC) and `model.module` the
    Flax module. `heads` = the ViT's number of attention heads (also `num_heads=`; read from the
    file's metadata when present; `fallback_heads` is used only when neither says); other keywords
    are module fields (`normalize="imagenet"`, ...). A keyword that
    contradicts the file (e.g. `num_classes`) is an error.
    """
    if arch not in ARCHS:
        from attrax.errors import unknown_name

        raise unknown_name("architecture for import_weights", arch, ARCHS)
    family = ARCHS[arch]
    tensors, meta, fmt = read_file(path)
    layout = detect_layout(tensors)
    if layout != "flax" and _FAMILY_OF_LAYOUT[layout] != family:
        raise AttraxError(f"{path}: the file holds a {layout.replace('_', ' ')} state dict, not arch {arch!r}")
    stored_arch = meta.get(_ARCH_KEY)
    if stored_arch and ARCHS.get(stored_arch) != family:
        raise AttraxError(f"{path}: the file holds a {stored_arch!r} checkpoint, not arch {arch!r}")
    flat, origin, hints = translate(tensors, layout)
    stored: dict[str, Any] = {}
    if layout == "flax" and _CONFIG_KEY in meta:
        stored = _config_from_json(meta[_CONFIG_KEY])
        if "cfg" in stored:
            hints = {"cfg": stored["cfg"]}
    inferred = infer_config(family, flat, origin, hints, layout, {} if stored else meta)
    if family == "resnet" and inferred["block"] != ("basic" if arch == "resnet18" else "bottleneck"):
        other = "resnet50" if arch == "resnet18" else "resnet18"
        raise AttraxError(f"{path}: the file holds a {inferred['block']} ResNet (layers {inferred['layers']}), "
                          f"not arch {arch!r}: use arch={other!r}")
    if heads is not None:
        kwargs["num_heads"] = heads
    known_heads = inferred.pop("num_heads", stored.get("num_heads"))
    if "num_heads" in kwargs and known_heads is not None and int(kwargs["num_heads"]) != int(known_heads):
        raise AttraxError(f"heads={kwargs['num_heads']} disagrees with the file's num_heads={known_heads}")
    if known_heads is None and "num_heads" not in kwargs and fallback_heads is not None and family == "vit":
        known_heads = fallback_heads
    if known_heads is not None:
        inferred["num_heads"] = int(known_heads)
    for k, v in kwargs.items():
        if k in inferred and k != "num_heads" and _norm(inferred[k]) != _norm(v):
            raise AttraxError(f"{k}={v!r} disagrees with the file ({inferred[k]!r}): the shapes determine it")
    cfg = {**stored, **inferred, **kwargs}
    if family == "vit":
        if "num_heads" not in cfg:
            raise AttraxError(f"{path}: the number of ViT heads cannot be read from the shapes: pass heads=...")
        if cfg["embed_dim"] % int(cfg["num_heads"]):
            raise AttraxError(f"heads={cfg['num_heads']} does not divide the width {cfg['embed_dim']}")
    try:
        module = ZOO.get(arch).fn(**cfg)
    except TypeError as e:
        raise AttraxError(f"import_weights({arch!r}): {e}") from None
    shape = _input_shape(family, module, flat)
    template = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))
    expected = {tuple(k.split("/")): v for k, v in flatten_tree(template, leaf=lambda a: a).items()}
    variables_flat: dict[str, np.ndarray] = {}
    for path_, spec in expected.items():
        if path_ not in flat:
            raise AttraxError(f"missing key {source_name(layout, path_, hints)!r} in {path}")
        arr = flat[path_]
        if tuple(arr.shape) != tuple(spec.shape):
            raise AttraxError(f"key {origin[path_]!r} has shape {tuple(arr.shape)} after conversion, "
                              f"the model expects {tuple(spec.shape)}")
        variables_flat["/".join(path_)] = np.asarray(arr, np.float32)
    for path_ in flat:
        if path_ not in expected:
            raise AttraxError(f"unknown key {origin[path_]!r} in {path} (no such parameter in {arch})")
    variables = jax.tree.map(to_device, unflatten(variables_flat))
    return module_model(module, arch), variables


def _norm(v: Any) -> Any:
    return tuple(_norm(a) for a in v) if isinstance(v, (list, tuple)) else v


def source_name(layout: str, path: tuple[str, ...], hints: dict | None = None) -> str:
    """The key a Flax variable path has in `layout` (for error messages)."""
    if layout == "flax":
        return "/".join(path)
    coll, *mods, leaf = path
    name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
    out = []
    for m in mods:
        if (r := re.fullmatch(r"layer(\d)_(\d+)", m)) or (r := re.fullmatch(r"blocks_(\d+)", m)):
            out += [f"layer{r.group(1)}", r.group(2)] if m.startswith("layer") else ["blocks", r.group(1)]
        elif m in ("downsample_conv", "downsample_bn"):
            out += ["downsample", "0" if m.endswith("conv") else "1"]
        elif m == "patch_embed":
            out += ["patch_embed", "proj"]
        elif layout == "torchvision_vgg" and (r := re.fullmatch(r"(conv|bn|fc)(\d+)", m)):
            k = int(r.group(2))
            if r.group(1) == "fc":
                out += ["classifier", str(3 * (k - 1))]
            else:
                idx = (hints or {}).get("conv_index", {}).get(k)
                out += ["features", "?" if idx is None else str(idx + (r.group(1) == "bn"))]
        else:
            out.append(m)
    if leaf in ("cls_token", "pos_embed"):
        return leaf
    return ".".join([*out, name])


def save_weights(path: str | os.PathLike, model: Model | nn.Module, variables: Any) -> Path:
    """Write `variables` with the module's configuration: `.msgpack` (Flax serialization), `.safetensors`
    ("/"-joined Flax keys + metadata) or any other path = an orbax directory (+ attrax_model.json)."""
    module = model.module if isinstance(model, Model) else model
    arch = next((n for n in ZOO.names() if type(module) is ZOO.get(n).fn), type(module).__name__.lower())
    meta = {_ARCH_KEY: arch, _CONFIG_KEY: _config_to_json(module)}
    p = Path(path)
    host = jax.tree.map(np.asarray, flax.core.unfreeze(variables) if hasattr(variables, "unfreeze") else variables)
    if p.suffix == ".msgpack":
        p.write_bytes(flax.serialization.msgpack_serialize({"attrax": meta, "variables": dict(host)}))
    elif p.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in flatten_tree(dict(host)).items()}, str(p), metadata=meta)
    else:
        import orbax.checkpoint as ocp

        if p.exists():
            raise AttraxError(f"{p} exists: orbax writes a new directory")
        ocp.PyTreeCheckpointer().save(str(p.resolve()), dict(host))
        (p / "attrax_model.json").write_text(json.dumps(meta))
    return p


def resolve_import(spec: str) -> Any:
    """"pkg.mod:attr" or "pkg.mod.attr" -> the object (one-line error when it cannot be imported)."""
    if not isinstance(spec, str) or not spec:
        raise AttraxError("model.apply must be an import path such as my_pkg.my_module:my_fn")
    mod_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not mod_name or not attr:
        raise AttraxError(f"model.apply={spec!r}: give a module and a name, e.g. my_pkg.my_module:my_fn")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise AttraxError(f"model.apply={spec!r}: cannot import {mod_name!r} ({e})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttraxError(f"model.apply={spec!r}: {mod_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


def external(apply: str | Callable | nn.Module, weights: str | os.PathLike | None = None, **module_kwargs: Any
             ) -> tuple[Model, Any]:
    """A user's own model: `apply` = `apply_fn(variables, x) -> logits`, a Flax module (instance or class,
    built with `module_kwargs`), or an import path to one; `weights` = a checkpoint read with `load_tree`
    (None: variables None, for a function that closes over its own weights)."""
    obj = resolve_import(apply) if isinstance(apply, str) else apply
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        obj = obj(**module_kwargs)
    elif module_kwargs:
        raise AttraxError(f"keywords {sorted(module_kwargs)} given for a plain function model.apply")
    if not callable(obj):
        raise AttraxError(f"model.apply={apply!r} is a {type(obj).__name__}, not a function or Flax module")
    variables = load_tree(weights) if weights is not None else None
    if variables is not None:
        variables = jax.tree.map(to_device, variables)
    model = as_model(obj)
    if isinstance(apply, str):
        model = Model(apply, model.apply_fn, model.module)
    return model, variables


class External(nn.Module):
    """`model=external` as a zoo entry: calls the function at import path `fn` with the variables.

    `unwrap=True` passes `variables["params"]` (the checkpoint's tree as stored, which `external` /
    `from_config` put under "params"); False passes the whole Flax variables dict.
    """

    fn: str | None = None
    unwrap: bool = True
    num_classes: int | None = None

    def __call__(self, x, train: bool = False):
        if self.fn is None:
            raise AttraxError("model=external needs model.apply=my_pkg.my_module:my_fn (and model.weights=PATH)")
        f = resolve_import(self.fn)
        v = self.variables
        return f(v.get("params") if self.unwrap else v, x)


@ZOO.register("external", family="external")
def _external_entry(*, apply: str | None = None, weights: str | None = None, kwargs: dict | None = None,
                    num_classes: int | None = None) -> External:
    """The zoo face of `model=external` (config composition, `create`); `from_config` loads the weights."""
    return External(fn=apply, num_classes=num_classes)


def from_config(mcfg: dict[str, Any]) -> tuple[Model, Any] | None:
    """The `model` config group -> (model, variables) when it names weights (else None: train as usual).

    `name: external` with `apply` and `weights`, or a zoo name (`resnet50`, `vit`, ...) with `weights`
    and keywords (`heads`, `normalize`).
    """
    mcfg = dict(mcfg)
    name = mcfg.pop("name")
    weights = mcfg.pop("weights", None)
    mcfg.pop("num_classes", None)  # the data set's; an imported model's own comes from its weights
    if name == "external":
        apply = mcfg.pop("apply", None)
        if apply is None:
            raise AttraxError("model=external needs model.apply=my_pkg.my_module:my_fn (and model.weights=PATH)")
        kwargs = {k: v for k, v in (mcfg.pop("kwargs", None) or {}).items()}
        return external(apply, weights, **kwargs)
    if weights is None:
        return None
    # sizes come from the tensors' shapes; only what they cannot say is taken from the config
    kw = {k: mcfg[k] for k in ("normalize", "heads") if mcfg.get(k) is not None}
    # the config's num_heads (a default of the vit config) counts only where the file does not say
    return import_weights(name, weights, fallback_heads=mcfg.get("num_heads"), **kw)
