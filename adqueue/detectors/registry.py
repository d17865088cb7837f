"""Detectors by name, imported lazily so that `adqueue jobs` never pays for importing torch."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adqueue.detectors.base import Detector

_DETECTORS: dict[str, str] = {
    "mvg": "adqueue.detectors.mvg:MVGDetector",
    "ebm": "adqueue.detectors.ebm:EBMDetector",
    "differnet": "adqueue.detectors.differnet:DifferNetDetector",
    "encoder_flow": "adqueue.detectors.encoder_flow:EncoderFlowDetector",
}


def names() -> list[str]:
    return sorted(_DETECTORS)


def detector_class(name: str) -> type[Detector]:
    try:
        target = _DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(names())}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]


def create(name: str, settings: Mapping[str, Any]) -> Detector:
    """A fresh, unfitted detector from its name and `--set` values."""
    from adqueue.detectors.base import build_config

    cls = detector_class(name)
    return cls(build_config(cls.Config, settings))
