"""scale=paper presets: the published data set and model, and the one-line fetch hint without them."""

from __future__ import annotations

import pytest

from attrax import main
from attrax.errors import AttraxError

PRESETS = ("petsiuk2018_deletion_insertion", "adebayo2018_sanity", "hooker2019_roar")


def _cfg(overrides):
    from hydra import compose, initialize_config_module

    import attrax  # noqa: F401 - registers the by_scale resolver

    with initialize_config_module(config_module="attrax.conf", version_base="1.3"):
        return main._plain(compose(config_name="config", overrides=overrides))


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
