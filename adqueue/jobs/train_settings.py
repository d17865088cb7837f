"""Training settings (`--set fpr=... calib_fraction=...`): their defaults and their checks.

Apart from training.py, which needs torch, because `adqueue train` checks them when it submits
and `adqueue detectors` lists them, and neither may import torch for that.
"""

from __future__ import annotations

from typing import Any

# Settings of the training procedure itself; every other --set key belongs to the detector.
TRAIN_KEYS = {"fpr": 0.01, "calib_fraction": 0.2, "seed": 0, "max_images": 0, "min_images": 0}
# What a count setting means at 0, for the error message of a negative one.
_COUNT_MEANING = {"max_images": "0 (all)", "min_images": "0 (the detector's own minimum)"}


def split_train_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training-procedure settings with defaults, detector settings); ValueError names a bad one.

    The submitter calls this too, so a bad value is refused before any job is queued.
    """
    train: dict[str, Any] = {}
    for key, default in TRAIN_KEYS.items():
        kind = float if isinstance(default, float) else int
        train[key] = _parse_number(key, settings.get(key, default), kind)
    for key in ("fpr", "calib_fraction"):
        if not 0.0 <= train[key] < 1.0:
            raise ValueError(f"{key} must be in [0, 1), not {train[key]}")
    if train["seed"] < 0:  # numpy's generators refuse negative seeds, halfway through a job
        raise ValueError(f"seed must be 0 or a positive integer, not {train['seed']}")
    for key, meaning in _COUNT_MEANING.items():
        if train[key] < 0:
            raise ValueError(f"{key} must be {meaning} or a positive count, not {train[key]}")
    detector = {key: value for key, value in settings.items() if key not in TRAIN_KEYS}
    return train, detector


def _parse_number(key: str, raw: Any, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(str(raw).strip()) if isinstance(raw, str) else kind(raw)
    except (TypeError, ValueError):
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"training setting {key} must be {noun}, not {raw!r}") from None
