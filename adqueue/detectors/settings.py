"""Detector settings from `--set key=value` strings: parsing into a Config dataclass, and the
checks the Config modules share. Torch-free, so that a job is validated when it is submitted
without importing the detector that will run it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args, get_origin, get_type_hints


def build_config(config_cls: type, values: Mapping[str, Any]) -> Any:
    """A detector Config from `--set key=value` strings or JSON values, with clear errors."""
    hints = get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    parsed = {key: coerce(key, hints[key], raw) for key, raw in values.items()}
    return config_cls(**parsed)


def coerce(key: str, annotation: Any, raw: Any) -> Any:
    """Turn a string (or JSON value) into the annotated type: int, float, bool, str, tuples, optionals."""
    origin, args = get_origin(annotation), get_args(annotation)
    if args and type(None) in args:  # Optional[X]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "all", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, inner[0], raw)
    if origin is tuple:
        parts = raw if isinstance(raw, (list, tuple)) else [p for p in str(raw).split(",") if p.strip()]
        return tuple(coerce(key, args[0], part) for part in parts)
    try:
        if annotation is bool:
            if isinstance(raw, bool):
                return raw
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation in (int, float, str):
            return annotation(str(raw).strip()) if annotation is not str else str(raw)
    except ValueError:
        raise ValueError(f"setting {key}={raw!r} is not a valid {annotation.__name__}") from None
    raise TypeError(f"setting {key} has an unsupported type {annotation}")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take. NaN and infinities are never in a range: `--set
    map_sigma=nan` parses as a float, and must be refused here, before a job exists, rather than
    crash the training that meets it."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    why: str = ""  # what the bound means, shown in the message

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf and self.low == 0:
            text = "positive" if self.low_open else "0 or more"
        elif self.high == math.inf:
            text = f"{'above' if self.low_open else 'at least'} {self.low:g}"
        else:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return f"{text} ({self.why})" if self.why else text


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
SHARE = Range(0, 1)  # a fraction, both ends included


def blur_range(image_size: int, unit: str = "input pixels") -> Range:
    """A Gaussian blur's sigma: 0 (none) up to the image's size; a wider blur only flattens the map
    (and its kernel, 8 sigma wide, outgrows memory long before sigma reaches infinity)."""
    return Range(0, image_size, why=f"{unit}, at most image_size")


def require_in(config: Any, ranges: Mapping[str, Range]) -> None:
    """Each named setting within its range; the first one outside is named, with its range."""
    for name, allowed in ranges.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"{name} must be {allowed}, not {value}")


def require_at_least_one(config: Any, names: tuple[str, ...]) -> None:
    """Counts and sizes in a detector's config: each must be >= 1 (all offenders named at once)."""
    bad = [name for name in names if getattr(config, name) < 1]
    if bad:
        values = ", ".join(str(getattr(config, name)) for name in bad)
        raise ValueError(f"{', '.join(bad)} must be at least 1, not {values}")


def require_choice(config: Any, name: str, allowed: tuple[Any, ...]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def require_grey_or_rgb(config: Any) -> None:
    if config.channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), not {config.channels}")
