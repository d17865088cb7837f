"""The detector contract: plain PyTorch modules that know nothing of Celery, SQL or files.

A detector takes float tensors in [0, 1] shaped [B, C, H, W] at its own `preprocess` size, fits on
defect-free images only, and scores a batch into one number per image plus an anomaly map per
image. Everything needed to score the same way elsewhere (preprocessing, hyperparameters, fitted
statistics) is in its config and its state dict.

The torch-free parts live apart, for code that must not import torch: each detector's Config and
its checks in detectors/configs/, `--set` parsing in detectors/settings.py, the Progress protocol
in adqueue/progress.py.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from adqueue.core.progress import Progress
from adqueue.data.preprocess import Preprocess
from adqueue.detectors.components.thresholds import calibrate_threshold


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


class Detector(nn.Module, ABC):
    """Base class. Subclasses set `name`, `Config` (a dataclass) and implement fit/score."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # State-dict prefixes of frozen pretrained weights: not saved with the model, since they
    # come from the backbone registry and are checked by hash on load.
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()
    # True when maps need more than the scoring pass (a backward pass to the input, say): the
    # scoring pipeline then asks for maps only for the images that get a heat map.
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

    extrapolating_threshold: ClassVar[bool] = False  # TEMP until the detector template lands

    def load_fitted(self, state: Any) -> tuple[list[str], list[str]]:  # TEMP until the detector template lands
        missing, unexpected = self.load_state_dict(state, strict=False)
        return [k for k in missing if not k.startswith(self.frozen_prefixes)], list(unexpected)

    def config_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self.config)))
