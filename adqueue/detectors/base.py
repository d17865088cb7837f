"""The detector contract: plain PyTorch modules that know nothing of Celery, SQL or files.

A detector takes float tensors in [0, 1] shaped [B, C, H, W] at its own `preprocess` size, fits on
defect-free images only, and scores a batch into one number per image plus an anomaly map per
image. Everything needed to score the same way elsewhere (preprocessing, hyperparameters, fitted
statistics) is in its config and its state dict.

The base does what every detector would otherwise repeat: it checks the config, derives the
preprocessing and the frozen backbone's identity from it, times `fit`, and keeps the one flag that
says whether the detector is fitted, set by `fit` and by loading a complete trained state.
Subclasses write `_fit` and `_score`.

The torch-free parts live apart, for code that must not import torch: each detector's Config and
its `validate` in detectors/<name>/config.py, `--set` parsing in detectors/settings.py, the
Progress protocol in adqueue/core/progress.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from torch.utils.data import Dataset

from adqueue.core.progress import NullProgress, Progress
from adqueue.data.preprocess import Preprocess
from adqueue.detectors.components.backbones import FeatureExtractor
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


@dataclass
class FitResult:
    """What a detector's `_fit` reports; `fit` adds the image count and the time taken."""

    losses: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Detector(nn.Module, ABC):
    """Base class. Subclasses set `name` and `Config` (the dataclass of their config module) and
    implement `_fit` and `_score`."""

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
    # True when `calibrate_threshold` may return a threshold beyond the calibration scores (a
    # parametric bound rather than a quantile): training then checks it against a wider range.
    extrapolating_threshold: ClassVar[bool] = False
    # differnet and encoder_flow kept "fitted" as a bool buffer of this name before the base had
    # its flag, so their model files hold that entry. The base still writes it from the flag (code
    # of that time loads new files) and reads it back into the flag, with no buffer of its own.
    fitted_state_key: ClassVar[str | None] = None

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.validate_config(config)
        self.config = config
        self._fitted = False

    @classmethod
    def validate_config(cls, config: Any) -> None:
        """Raise ValueError for settings that cannot work; cheap, loads no weights.

        The checks are the `validate` function beside the Config class, which the submission code
        also runs without importing torch.
        """
        importlib.import_module(cls.Config.__module__).validate(config)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.config.image_size, channels=getattr(self.config, "channels", 3))

    @property
    def fitted(self) -> bool:
        return self._fitted

    def fit(self, images: Dataset[Tensor], *, progress: Progress | None = None) -> FitReport:
        """Fit on defect-free images; `images[i]` is a float [C, H, W] tensor in [0, 1]."""
        started = time.perf_counter()
        result = self._fit(images, progress or NullProgress())
        self._fitted = True
        return FitReport(
            n_images=dataset_size(images),
            seconds=time.perf_counter() - started,
            losses=result.losses,
            info=result.info,
        )

    def score(self, batch: Tensor, *, with_maps: bool = True) -> Scores:
        """Score a float [B, C, H, W] batch in [0, 1]."""
        self._require_fitted()
        return self._score(batch, with_maps=with_maps)

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"the {self.name} detector is not fitted: call fit() or load a trained state first")

    def score_flagged(self, batch: Tensor, threshold: float | None) -> Scores:
        """Scores for every image of a float [B, C, H, W] batch, maps only for the images scored
        above `threshold` (the rest get zeros; None flags none): what a heat map for each flagged
        image needs. A night flags a few images in a hundred, so their maps should cost little.

        By default the maps come from the one scoring pass, unless they are costly (a second pass
        over the flagged images only). A detector that can map a subset from the same pass (mvg)
        overrides this."""
        if not self.costly_maps:
            return self.score(batch, with_maps=True)
        scores = self.score(batch, with_maps=False)

        def second_pass(picked: Tensor) -> Tensor:
            picked_maps = self.score(batch[picked.to(batch.device)], with_maps=True).maps
            assert picked_maps is not None, "asked for with_maps=True"
            return picked_maps

        maps = maps_where_flagged(batch, scores.image, threshold, second_pass)
        return Scores(image=scores.image, maps=maps, extra=scores.extra)

    @abstractmethod
    def _fit(self, images: Dataset[Tensor], progress: Progress) -> FitResult: ...

    @abstractmethod
    def _score(self, batch: Tensor, *, with_maps: bool) -> Scores: ...

    def calibrate_threshold(self, normal_scores: np.ndarray, fpr: float) -> float:
        """The anomaly threshold from held-out normal images' scores, for a target false-alarm rate.

        By default the empirical quantile; a detector whose paper prescribes another rule overrides it.
        """
        return calibrate_threshold(normal_scores, fpr)

    @property
    def device(self) -> torch.device:
        for parameter in self.parameters():
            return parameter.device
        for buffer in self.buffers():
            return buffer.device
        return torch.device("cpu")

    def backbone_identity(self) -> dict[str, str]:
        """Name and weight hash of the frozen pretrained part, if any (checked on load)."""
        if not self.frozen_prefixes:
            return {}
        (prefix,) = self.frozen_prefixes  # a model file records a single backbone
        backbone = self.get_submodule(prefix.removesuffix("."))
        assert isinstance(backbone, FeatureExtractor)
        return backbone.identity()

    def trainable_state(self) -> dict[str, Tensor]:
        return {
            key: value
            for key, value in self.state_dict().items()
            if not key.startswith(self.frozen_prefixes)
        }

    def config_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self.config)))

    def load_fitted(self, state: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
        """Load a trained state (a model file's, without the frozen weights): the keys it lacks
        beyond the frozen ones, and those it has in excess. With neither, the detector is fitted
        (unless the state records that it was not)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        return self._missing_trained(missing), list(unexpected)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        # A state that sets every trained tensor is a fitted detector's, whichever way it is loaded,
        # unless it records that it was not; a partial one leaves the detector unfitted.
        self._fitted = False
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        complete = not self._missing_trained(result.missing_keys) and not result.unexpected_keys
        self._fitted = complete and (not self.fitted_state_key or bool(state_dict[self.fitted_state_key]))
        return result

    def _missing_trained(self, missing: list[str]) -> list[str]:
        return [key for key in missing if not key.startswith(self.frozen_prefixes)]

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fitted_state_key:
            destination[prefix + self.fitted_state_key] = torch.tensor(self._fitted, device=self.device)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.fitted_state_key:
            return
        # The entry is no parameter or buffer: account for it as nn.Module would for a bool buffer.
        key = prefix + self.fitted_state_key
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if state_dict[key].shape != torch.Size([]):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {state_dict[key].shape} from "
                              "checkpoint, the shape in current model is torch.Size([]).")


def dataset_size(images: Dataset[Tensor]) -> int:
    """How many images a fit gets: every dataset adqueue builds has a length."""
    return len(images)  # type: ignore[arg-type]  # torch's Dataset does not declare __len__


def maps_where_flagged(batch: Tensor, image_scores: Tensor, threshold: float | None,
                       compute: Callable[[Tensor], Tensor]) -> Tensor:
    """CPU maps [B, H, W] of a batch: `compute(picked)` for the images scored above `threshold`
    (given their indices), zeros for the rest."""
    maps = torch.zeros((len(batch), *batch.shape[-2:]))
    picked = flagged_indices(image_scores, threshold)
    if len(picked):
        maps[picked.cpu()] = compute(picked).cpu()
    return maps


def flagged_indices(image_scores: Tensor, threshold: float | None) -> Tensor:
    """Indices (int64, on the scores' device) of the images scored above `threshold`; none for None."""
    if threshold is None:
        return torch.zeros(0, dtype=torch.long, device=image_scores.device)
    return (image_scores > threshold).nonzero()[:, 0]
