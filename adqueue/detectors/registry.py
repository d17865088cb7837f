"""Detectors by name, imported lazily so that `adqueue jobs` never pays for importing torch.

Two ways in: `config_spec` gives a detector's settings (its Config dataclass), their checks and a
one-line summary without importing torch (adqueue/detectors/configs/), for listing settings and
validating them at submission; `detector_class` / `create` import the detector itself, for
the code that trains and scores.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adqueue.detectors.base import Detector

_DETECTORS: dict[str, str] = {
    "mvg": "adqueue.detectors.mvg.model:MVGDetector",
    "ebm": "adqueue.detectors.ebm.model:EBMDetector",
    "differnet": "adqueue.detectors.differnet.model:DifferNetDetector",
    "encoder_flow": "adqueue.detectors.encoder_flow.model:EncoderFlowDetector",
    "patchcore": "adqueue.detectors.patchcore.model:PatchCoreDetector",
}
# Each detector's torch-free settings module: its Config dataclass and `validate(config)`.
_CONFIGS: dict[str, str] = {
    "mvg": "adqueue.detectors.mvg.config:MVGConfig",
    "ebm": "adqueue.detectors.ebm.config:EBMConfig",
    "differnet": "adqueue.detectors.differnet.config:DifferNetConfig",
    "encoder_flow": "adqueue.detectors.encoder_flow.config:EncoderFlowConfig",
    "patchcore": "adqueue.detectors.patchcore.config:PatchCoreConfig",
}


@dataclass(frozen=True)
class ConfigSpec:
    """A detector's settings without the detector: what `--set` accepts, and how it is checked."""

    name: str
    config_class: type
    validate: Callable[[Any], None]  # raises ValueError for settings that cannot work
    summary: str  # what the detector is, in one line

    def build(self, settings: Mapping[str, Any]) -> Any:
        """A checked Config from `--set` strings or JSON values; ValueError/TypeError name the bad one."""
        from adqueue.detectors.settings import build_config

        config = build_config(self.config_class, settings)
        self.validate(config)
        return config


def names() -> list[str]:
    return sorted(_DETECTORS)


def _target(table: dict[str, str], name: str) -> tuple[str, str]:
    try:
        module_name, _, attr = table[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(names())}") from None
    return module_name, attr


def config_spec(name: str) -> ConfigSpec:
    """The detector's settings and their checks, importing no torch."""
    module_name, attr = _target(_CONFIGS, name)
    module = importlib.import_module(module_name)
    summary = ((module.__doc__ or "").strip().splitlines() or [""])[0]
    return ConfigSpec(name, getattr(module, attr), module.validate, summary)


def detector_class(name: str) -> type[Detector]:
    module_name, attr = _target(_DETECTORS, name)
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]


def create_saved(name: str, saved: Mapping[str, Any]) -> Detector:
    """A detector from a model file's settings. A setting the file lacks was added after it was
    saved: it takes the value its Config lists in `saved_before` (the behaviour the file was
    calibrated with), else the Config's default."""
    config_class = detector_class(name).Config
    return create(name, {**getattr(config_class, "saved_before", {}), **saved})


def create(name: str, settings: Mapping[str, Any]) -> Detector:
    """A fresh, unfitted detector from its name and `--set` values."""
    from adqueue.detectors.settings import build_config

    cls = detector_class(name)
    return cls(build_config(cls.Config, settings))
