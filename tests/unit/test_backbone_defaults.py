"""Every listed backbone works with every detector's default settings: no `--set levels=...` needed.

The torchvision backbones' ImageNet files cannot be downloaded here, so the fit test writes a
seeded, randomly initialised state dict where `ADQUEUE_WEIGHTS_DIR` points: what is tested is that
the default levels exist and line up on that architecture, not the weights' quality.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from adqueue.detectors import registry
from adqueue.detectors.components.backbone_specs import LEVEL_COUNTS, backbone_names, default_levels

BACKBONE_DETECTORS = [
    name for name in registry.names()
    if "backbone" in {field.name for field in dataclasses.fields(registry.config_spec(name).config_class)}
]


@pytest.mark.parametrize("detector", BACKBONE_DETECTORS)
@pytest.mark.parametrize("backbone", backbone_names())
def test_default_levels_exist_on_every_backbone(detector: str, backbone: str) -> None:
    config = registry.config_spec(detector).build({"backbone": backbone})  # raises if a level is missing
    for field in dataclasses.fields(config):
        if field.name.endswith("levels") and getattr(config, field.name):
            assert all(0 <= level < LEVEL_COUNTS[backbone] for level in getattr(config, field.name))


def test_explicit_levels_win_over_the_backbone_default() -> None:
    config = registry.config_spec("mvg").build({"backbone": "resnet18", "levels": "2,3"})
    assert config.levels == (2, 3)
    assert config.map_levels == default_levels("resnet18", "local")
    with pytest.raises(ValueError, match="levels 0-4"):
        registry.config_spec("mvg").build({"backbone": "resnet18", "levels": "5,6"})


def _random_torchvision_weights(name: str, folder: Path) -> None:
    import torchvision.models as tvm

    builders = {"resnet18": (tvm.resnet18, tvm.ResNet18_Weights), "alexnet": (tvm.alexnet, tvm.AlexNet_Weights)}
    build, weights_enum = builders[name]
    torch.manual_seed(0)
    filename = weights_enum.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save(build(weights=None).state_dict(), folder / filename)


@pytest.mark.parametrize("backbone", ["resnet18", "alexnet"])
@pytest.mark.parametrize("detector", [name for name in BACKBONE_DETECTORS if name in ("mvg", "patchcore")])
def test_fits_and_scores_on_a_torchvision_backbone_with_defaults(
    detector: str, backbone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADQUEUE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    _random_torchvision_weights(backbone, tmp_path)
    model = registry.create(detector, {"backbone": backbone, "image_size": "96"})
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((model.min_fit_images + 2, 3, 96, 96), generator=generator)
    model.fit(list(images))
    scores = model.score(images[:3])
    assert scores.image.shape == (3,) and torch.isfinite(scores.image).all()
    assert scores.maps is not None and scores.maps.shape == (3, 96, 96)
