"""Detectors by name, imported lazily so that `adqueue jobs` never pays for importing torch.

Every detector lives in its own folder, adqueue/detectors/<name>/: `config.py` holds its Config
dataclass and `validate(config)` and imports no torch; `model.py` holds the Detector subclass.
The one table below lists the names; the rest is found by that convention.

Two ways in: `config_spec` gives a detector's settings (its Config dataclass), their checks and a
one-line summary without importing torch, for listing settings and validating them at submission;
`detector_class` / `create` import the detector itself, for the code that trains and scores.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adqueue.detectors.base import Detector

DETECTORS = ("mvg", "ebm", "differnet", "encoder_flow", "patchcore")


@dataclass(frozen=True)
class ConfigSpec:
    """A detector's settings without the detector: what `--set` accepts, and how it is checked."""

    name: str
    config_class: type
    validate: Callable[[Any], None]  # raises ValueError for settings that cannot work
    summary: str  # what the detector is, in one line

    @property
    def setting_names(self) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(self.config_class))

    def build(self, settings: Mapping[str, Any]) -> Any:
        """A checked Config from `--set` strings or JSON values; ValueError/TypeError name the bad one."""
        from adqueue.detectors.settings import build_config

        config = build_config(self.config_class, settings)
        self.validate(config)
        return config


def names() -> list[str]:
    return sorted(DETECTORS)


def _module(name: str, part: str) -> ModuleType:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(names())}")
    return importlib.import_module(f"adqueue.detectors.{name}.{part}")


def _defined_in(module: ModuleType, wanted: Callable[[type], bool], what: str) -> type:
    """The one class defined in `module` (not imported into it) that is `wanted`."""
    found = [value for value in vars(module).values()
             if inspect.isclass(value) and value.__module__ == module.__name__ and wanted(value)]
    if len(found) != 1:
        raise TypeError(f"{module.__name__} must define exactly one {what}, not {len(found)}")
    return found[0]


def config_spec(name: str) -> ConfigSpec:
    """The detector's settings and their checks, importing no torch."""
    module = _module(name, "config")
    summary = ((module.__doc__ or "").strip().splitlines() or [""])[0]
    config_class = _defined_in(module, dataclasses.is_dataclass, "Config dataclass")
    return ConfigSpec(name, config_class, module.validate, summary)


def detector_class(name: str) -> type[Detector]:
    from adqueue.detectors.base import Detector

    module = _module(name, "model")
    return _defined_in(module, lambda cls: issubclass(cls, Detector), "Detector subclass")


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
