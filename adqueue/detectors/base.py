"""The detector contract: plain PyTorch modules that know nothing of Celery, SQL or files.

A detector takes float tensors in [0, 1] shaped [B, C, H, W] at its own `preprocess` size, fits on
defect-free images only, and scores a batch into one number per image plus an anomaly map per
image. Everything needed to score the same way elsewhere (preprocessing, hyperparameters, fitted
statistics) is in its config and its state dict.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, get_args, get_origin, get_type_hints

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from adqueue.metrics import calibrate_threshold


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the detector's input: square resize and channel count."""

    size: int
    channels: int  # 1 (grey) or 3 (RGB); grey files are replicated to 3 channels when 3

    @property
    def size_wh(self) -> tuple[int, int]:
        return (self.size, self.size)


@dataclass
class Scores:
    image: Tensor  # [B] anomaly score per image, higher is more anomalous
    maps: Tensor | None = None  # [B, H, W] at the input resolution, higher is more anomalous
    extra: dict[str, Tensor] = field(default_factory=dict)  # further per-image scores, [B] each


@dataclass
class FitReport:
    n_images: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Progress(Protocol):
    """Where long work reports how far it got: a terminal bar, a SQL heartbeat, or nothing."""

    def phase(self, name: str, total: int) -> None: ...

    def advance(self, n: int = 1, **info: float) -> None: ...


class NullProgress:
    def phase(self, name: str, total: int) -> None:
        pass

    def advance(self, n: int = 1, **info: float) -> None:
        pass


class Detector(nn.Module, ABC):
    """Base class. Subclasses set `name`, `Config` (a dataclass) and implement fit/score."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # State-dict prefixes of frozen pretrained weights: not saved with the model, since they
    # come from the backbone registry and are checked by hash on load.
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()
    # True when maps need more than the scoring pass (a backward pass to the input, say): the
    # scoring service then asks for maps only for the images that get a heat map.
    costly_maps: ClassVar[bool] = False
    # Fewest readable defect-free images `fit` may get before training refuses (`--set
    # min_images=N` overrides it): below it a model registers but scores little better than
    # chance. Each detector sets its own; 2 is the least any statistics need.
    min_fit_images: ClassVar[int] = 2

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.validate_config(config)
        self.config = config

    @classmethod
    def validate_config(cls, config: Any) -> None:
        """Raise ValueError for settings that cannot work; cheap, loads no weights."""

    @property
    @abstractmethod
    def preprocess(self) -> Preprocess: ...

    @abstractmethod
    def fit(self, images: Dataset[Tensor], *, progress: Progress | None = None) -> FitReport:
        """Fit on defect-free images; `images[i]` is a float [C, H, W] tensor in [0, 1]."""

    @abstractmethod
    def score(self, batch: Tensor, *, with_maps: bool = True) -> Scores:
        """Score a float [B, C, H, W] batch in [0, 1]."""

    def calibrate_threshold(self, normal_scores: np.ndarray, fpr: float) -> float:
        """The anomaly threshold from held-out normal images' scores, for a target false-alarm rate.

        By default the empirical quantile; a detector whose paper prescribes another rule overrides it.
        """
        return calibrate_threshold(normal_scores, fpr)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def backbone_identity(self) -> dict[str, str]:
        """Name and weight hash of the frozen pretrained part, if any (checked on load)."""
        return {}

    def trainable_state(self) -> dict[str, Tensor]:
        return {
            key: value
            for key, value in self.state_dict().items()
            if not key.startswith(self.frozen_prefixes)
        }

    def config_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self.config)))


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


def require_at_least_one(config: Any, names: tuple[str, ...]) -> None:
    """Counts and sizes in a detector's config: each must be >= 1 (all offenders named at once)."""
    bad = [name for name in names if getattr(config, name) < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be at least 1")


def require_choice(config: Any, name: str, allowed: tuple[Any, ...]) -> None:
    value = getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")


def require_grey_or_rgb(config: Any) -> None:
    if config.channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), not {config.channels}")
