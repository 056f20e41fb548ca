"""The paper-scale section of `attrax-bench` (attrax.perf_scale): large zoo models on an image folder.

Tiny configurations (32x32 images, a 4-wide one-block-per-stage ResNet-50 and a 1-block ViT, 4
generated images, 2 IG steps, 8 RISE masks) run the whole section in-process through the CLI entry.
"""

import json

import pytest
import yaml

from attrax import perf

METHODS = ["gradient", "integrated_gradients", "smoothgrad", "lrp_epsilon_plus", "grad_cam", "rise"]


def tiny_config(tmp_path, models, profile=True):
    cfg = {
        "models": models,
        "model_kwargs": {"resnet50": {"width": 4, "layers": [1], "num_classes": 10},
                         "vit": {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 10}},
        "image_size": 32, "images": 4, "batch": 2, "memory_mb": 256, "repeats": 1, "max_seconds": 5,
        "synthetic": {"classes": 2, "per_class": 0, "train_per_class": 1, "seed": 0},
        "methods": {"gradient": {}, "integrated_gradients": {"hparams": {"steps": 2}},
                    "smoothgrad": {"hparams": {"n_samples": 2}, "images": 2}, "lrp_epsilon_plus": {}, "grad_cam": {},
                    "rise": {"hparams": {"n_masks": 16, "cells": 2}, "images": 2, "timed_masks": 8}},
        "protocols": {"pixel_flipping": {"choices": {"steps": 2, "random_runs": 0}, "images": 3}},
    }
    if profile:
        cfg["profile"] = {"batch": 2, "repeats": 1, "max_seconds": 2, "layouts": ["NHWC", "NCHW"], "chunks": [2],
                          "max_conv_shapes": 2}
    p = tmp_path / "scale.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_scale_section_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = perf.main(["--model", "resnet50", "--dataset", "image_folder", "--config",
                      str(tiny_config(tmp_path, ["resnet50"])), "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    bench = run["bench"]
    recs = bench["records"]
    rows = {r["name"]: r for r in recs if r["kind"] in ("method", "protocol")}
    assert sorted(rows) == sorted(METHODS + ["pixel_flipping"])
    for name, r in rows.items():
        assert not r.get("error"), (name, r.get("error"))
        assert r["images_per_s"] > 0 and r["compile_s"] >= 0, name
    assert rows["integrated_gradients"]["hparams"] == {"steps": 2}
    assert rows["rise"]["hparams"]["n_masks"] == 16 and "8 of 16" in rows["rise"]["extrapolated"]
    assert rows["gradient"]["chunk"] >= 1 and rows["gradient"]["memory_mb"] == 256
    assert bench["data"]["synthetic"] is True
    md = (out / "scale.md").read_text()
    assert "synthetic" in md and "| resnet50 | pixel_flipping |" in md
    assert "memory_mb: 256" in md  # every setting recorded
    prof = [r for r in recs if r["kind"] == "profile"]
    names = {r["name"] for r in prof}
    assert {"forward", "backward alone (vjp of the residuals)", "input + kernel gradients (training's)",
            "convolutions timed alone", "gradient vs chunk size"} <= names, names
    conv = next(r for r in prof if r["name"] == "convolutions timed alone")["conv"]
    assert conv["NHWC forward"] > 0 and conv["NCHW backward data"] > 0 and conv["convolutions"] >= 5
    assert conv["timed_distinct"] == 2 < conv["distinct"]  # the two most frequent shapes (max_conv_shapes)
    per_shape = next(r for r in prof if r["name"] == "convolutions timed alone")["per_shape"]
    assert [r["count"] for r in per_shape] == sorted((r["count"] for r in per_shape), reverse=True)
    layouts = next(r for r in prof if r["name"] == "compiled HLO of the input gradient")["layouts"]
    assert any(k.startswith("dim_labels") for k in layouts)
    assert (out / "rows.parquet").exists()


def test_scale_section_vit(tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path, ["vit"], profile=False)
    assert perf.main(["--config", str(cfg), "--model", "vit", "--methods", "gradient", "--protocols", "none",
                      "--no-steps", "--out", str(out), "--quiet"]) == 0
    recs = json.loads((out / "run.json").read_text())["bench"]["records"]
    rows = [r for r in recs if r["kind"] == "method"]
    assert [r["name"] for r in rows] == ["gradient"] and rows[0]["images_per_s"] > 0 and rows[0]["model"] == "vit"
    assert not any(r["kind"] == "profile" for r in recs)  # --no-steps


def test_missing_dataset_root_is_one_line_error(tmp_path, capsys):
    code = perf.main(["--model", "resnet50", "--dataset", "image_folder", "--dataset-root",
                      str(tmp_path / "nowhere"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("attrax-bench: error: --dataset-root") and "\n" not in err


@pytest.mark.parametrize("args, msg", [(["--model", "resnet5", "--dataset", "image_folder"], "Did you mean"),
                                       (["--model", "resnet50", "--dataset", "mnist"], "image folders")])
def test_bad_arguments_are_one_line_errors(args, msg, capsys):
    assert perf.main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err


def test_scale_section_with_imported_weights(tmp_path):
    import jax.numpy as jnp

    import attrax
    from attrax import perf_scale

    model = attrax.models.create("resnet18", width=4, layers=(1,), num_classes=3)
    variables = perf_scale.fast_random_init(model.module, jnp.zeros((1, 32, 32, 3)))  # Flax's init is slow
    path = attrax.models.save_weights(tmp_path / "r18.safetensors", model, variables)
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path, ["resnet18"], profile=False)
    assert perf.main(["--config", str(cfg), "--model", "resnet18", "--weights", str(path), "--methods", "gradient",
                      "--protocols", "none", "--no-steps", "--out", str(out), "--quiet"]) == 0
    recs = json.loads((out / "run.json").read_text())["bench"]["records"]
    info = next(r for r in recs if r["kind"] == "model")
    assert info["weights"] == str(path) and info["num_classes"] == 3
    assert info["target"].startswith("folder label")  # 2 synthetic classes fit the 3-way head
    assert next(r for r in recs if r["kind"] == "method")["images_per_s"] > 0


def test_missing_weights_file_is_one_line_error(tmp_path, capsys):
    assert perf.main(["--model", "resnet50", "--weights", str(tmp_path / "none.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attrax-bench: error: --weights") and "\n" not in err
