"""scale=paper presets: the published data set and model, and the one-line fetch hint without them."""

from __future__ import annotations

import pytest

from attrax import main
from attrax.errors import AttraxError

PRESETS = ("petsiuk2018_deletion_insertion", "adebayo2018_sanity", "hooker2019_roar")


def _cfg(overrides):
    return main.compose(overrides)


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_scale_is_imagenet_resnet50(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRAX_DATA", str(tmp_path / "data"))
    small = main.at_scale(_cfg([f"experiment={preset}"]))
    assert small["dataset"]["name"] != "image_folder"  # the small scale is unchanged
    cfg = main.at_scale(_cfg([f"experiment={preset}", "scale=paper"]))
    assert cfg["dataset"] == {"name": "image_folder", "layout": "imagenet", "root": None, "image_size": 224}
    assert cfg["model"]["name"] == "resnet50" and cfg["model"]["normalize"] == "imagenet"
    if preset != "hooker2019_roar":  # deletion/insertion and sanity checks explain a trained ImageNet model
        assert cfg["model"]["weights"] == str(tmp_path / "data" / "weights" / "resnet50.safetensors")
    else:  # ROAR trains ResNet-50 itself; Food-101 and Birdsnap are one override away
        assert "weights" not in cfg["model"]
        food = main.at_scale(_cfg([f"experiment={preset}", "scale=paper", "paper.dataset.layout=food101"]))
        assert food["dataset"]["layout"] == "food101"


@pytest.mark.parametrize("preset,what", [("petsiuk2018_deletion_insertion", "ImageNet"),
                                         ("hooker2019_roar", "Food-101")])
def test_without_the_data_a_one_line_hint(preset, what, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRAX_DATA", str(tmp_path / "data"))
    over = [f"experiment={preset}", "scale=paper"] + (["paper.dataset.layout=food101"] if what == "Food-101" else [])
    with pytest.raises(AttraxError) as e:
        main.run(_cfg(over), tmp_path / "run", log=lambda *a: None)
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "scale=paper" in msg
    layout = "food101" if what == "Food-101" else "imagenet"
    assert str(tmp_path / "data" / layout) in msg and "paper.dataset.root=PATH" in msg
    assert ("resnet50.safetensors" in msg) == (preset != "hooker2019_roar")
    assert not (tmp_path / "run").exists()  # nothing was loaded, trained or written


def test_with_the_data_only_the_weights_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRAX_DATA", str(tmp_path / "data"))
    (tmp_path / "data" / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(AttraxError) as e:
        main.check_paper_inputs(main.at_scale(_cfg(["experiment=adebayo2018_sanity", "scale=paper"])))
    assert "ImageNet (" not in str(e.value) and "resnet50.safetensors" in str(e.value)


# Memory: every family that multiplies the batch gets a chunk from the budget (XLA memory analysis).
# A tiny CNN at 16x16x3 stands in for ResNet-50 at 224x224 (README: Paper scale; a width-4 ResNet-18
# takes over a minute just to initialize on the shared 2-core test machine).
BUDGET_METHODS = {"gradient": {}, "integrated_gradients": {"steps": 8}, "smoothgrad": {"n_samples": 4},
                  "occlusion": {"window": 4, "stride": 4}, "rise": {"n_masks": 16, "cells": 4},
                  "kernel_shap": {"n_samples": 16, "patch": 4}}
SLOW = pytest.mark.slow  # the same code as the fast cases, with longer compiles
BUDGET_CASES = [pytest.param(m, marks=[SLOW] if m in ("smoothgrad", "rise", "kernel_shap") else [])
                for m in BUDGET_METHODS]


@pytest.fixture(scope="module")
def tiny_cnn():
    import jax

    import attrax

    model = attrax.models.create("cnn_a", num_classes=3)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    return model, attrax.models.init(model, jax.random.key(1), x), x


@pytest.mark.parametrize("method", BUDGET_CASES)
def test_memory_budget_picks_each_methods_chunk(method, tiny_cnn):
    import jax
    import jax.numpy as jnp

    from attrax.harness import chunk_size_for, compiled_memory_bytes
    from attrax.methods import per_example_keys
    from attrax.methods.combinators import resolve
    from attrax.streaming import evals_within_budget

    model, params, x = tiny_cnn
    hp = BUDGET_METHODS[method]
    entry = resolve(method)
    fn = jax.jit(lambda p, xx, tt, kk: entry.fn(model, p, xx, tt, key=kk, **hp))

    def mb(c):
        compiled = fn.lower(params, jnp.zeros((c, 16, 16, 3)), jnp.zeros((c,), jnp.int32),
                            per_example_keys(0, c)).compile()
        return compiled_memory_bytes(compiled) / 2**20

    budget = 3 * mb(1)  # room for a few images beyond what one image needs
    evals = evals_within_budget(method, model, params, x, memory_mb=budget, **hp)
    cost = max(1, int(entry.meta.get("cost", lambda h: 1)({**entry.hparams(), **hp})))
    chunk = chunk_size_for(cost, 100_000, evals)
    assert chunk >= 2 and evals == (evals // cost) * cost
    assert mb(chunk) <= budget < mb(4 * chunk + 8)


def test_main_job_takes_chunks_from_memory_mb(tmp_path):
    from attrax import results
    from attrax.streaming import evals_within_budget

    cfg = _cfg(["model=mlp", "train=fast", "progress=false", "figures=false", "controls=[]", "n_images=4",
                "method=integrated_gradients", "method.steps=4", "protocol=sparseness", "memory_mb=16"])
    main.run(cfg, tmp_path / "run", log=lambda *a: None)
    got = results.run_info(tmp_path / "run")["memory_chunk_evals"]["integrated_gradients"]
    import attrax

    tr = attrax.datasets.load("mnist_sample", "train")
    model, params, _ = attrax.train(attrax.models.create("mlp", num_classes=10), tr, seed=0,
                                    cfg=attrax.TrainConfig(**cfg["train"]), progress=False)
    want = evals_within_budget("integrated_gradients", model, params, tr.x[:1], memory_mb=16.0,
                                      **{k: v for k, v in cfg["method"].items() if k != "name"})
    assert got == want
