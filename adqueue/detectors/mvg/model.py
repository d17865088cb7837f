"""`mvg`: a multivariate Gaussian on pretrained deep features, with OPCA.

Seed paper: M. Wang, H. Xu, Y. Chen, "Build Gaussian Distribution Under Deep Features for Anomaly
Detection and Localization", Journal of New Media 4(4), 2022.

Detection: each chosen backbone level is global-average-pooled; per level, OPCA keeps the
least-variance principal components and a Ledoit-Wolf Gaussian is fitted there; the image score is
the sum over levels of the Mahalanobis distances. Localization: the same recipe on the per-location
feature vectors of the map levels gives an h x w Mahalanobis map per level; maps are upsampled
bilinearly to the input size and averaged over levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adqueue.core.progress import Progress
from adqueue.detectors.base import Detector, FitResult, Scores, dataset_size, maps_where_flagged
from adqueue.detectors.components.backbones import load_backbone
from adqueue.detectors.components.gaussian import GaussianScorer, LevelGaussians
from adqueue.detectors.components.maps import smooth_maps
from adqueue.detectors.mvg.config import MVGConfig


class MVGDetector(Detector):
    name = "mvg"
    Config = MVGConfig
    frozen_prefixes = ("backbone.",)
    min_fit_images = 16  # OPCA's least-variance axes are noise below this (8 images: test AUROC 0.23)

    def __init__(self, config: MVGConfig) -> None:
        super().__init__(config)
        self.backbone = load_backbone(config.backbone)
        self._all_levels = sorted(set(config.levels) | set(config.map_levels))
        self.image_gaussians = LevelGaussians(len(config.levels))
        self.map_gaussians = nn.ModuleList(GaussianScorer() for _ in config.map_levels)

    def _features(self, batch: Tensor) -> dict[int, Tensor]:
        maps = self.backbone(batch.to(self.device), self._all_levels)
        return dict(zip(self._all_levels, maps, strict=True))

    @torch.no_grad()
    def _fit(self, images: Dataset[Tensor], progress: Progress) -> FitResult:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        pooled: dict[int, list[np.ndarray]] = {level: [] for level in cfg.levels}
        local: dict[int, list[np.ndarray]] = {level: [] for level in cfg.map_levels}
        loader = DataLoader(images, batch_size=cfg.batch_size, shuffle=False)
        progress.phase("extracting features", dataset_size(images))
        for batch in loader:
            features = self._features(batch)
            for level in cfg.levels:
                pooled[level].append(features[level].mean(dim=(2, 3)).double().cpu().numpy())
            for level in cfg.map_levels:
                local[level].append(_sample_locations(features[level], cfg.local_samples, generator))
            progress.advance(len(batch))
        progress.phase("fitting Gaussians", len(cfg.levels) + len(cfg.map_levels))
        kept: dict[str, int] = {}
        self.image_gaussians.fit([np.concatenate(pooled[level]) for level in cfg.levels], cfg.variance).to(self.device)
        kept.update({f"level{level}": scorer.kept
                     for level, scorer in zip(cfg.levels, self.image_gaussians, strict=True)})
        progress.advance(len(cfg.levels))
        for index, level in enumerate(cfg.map_levels):
            scorer = GaussianScorer.fit(np.concatenate(local[level]), cfg.map_variance).to(self.device)
            self.map_gaussians[index] = scorer
            kept[f"map_level{level}"] = scorer.kept
            progress.advance()
        return FitResult(info={"kept_components": kept})

    @torch.no_grad()
    def _score(self, batch: Tensor, *, with_maps: bool) -> Scores:
        features = self._features(batch)
        image = self._image_scores(features)
        maps = self._maps(features, batch.shape[-2:]) if with_maps else None
        return Scores(image=image.cpu(), maps=None if maps is None else maps.cpu())

    @torch.no_grad()
    def score_flagged(self, batch: Tensor, threshold: float | None) -> Scores:
        # One backbone pass; the maps (a third of what mvg computes besides it) only where flagged.
        self._require_fitted()
        features = self._features(batch)
        image = self._image_scores(features)
        maps = maps_where_flagged(batch, image, threshold, lambda picked: self._maps(
            {level: f[picked] for level, f in features.items()}, batch.shape[-2:]))
        return Scores(image=image.cpu(), maps=maps)

    def _image_scores(self, features: dict[int, Tensor]) -> Tensor:
        return self.image_gaussians([features[level].mean(dim=(2, 3)) for level in self.config.levels])

    def _maps(self, features: dict[int, Tensor], size: Sequence[int]) -> Tensor:
        cfg = self.config
        per_level = [
            cast(GaussianScorer, scorer).map_distances(features[level])
            for scorer, level in zip(self.map_gaussians, cfg.map_levels, strict=True)
        ]
        return smooth_maps(per_level, size, cfg.map_sigma)


def _sample_locations(features: Tensor, per_image: int, generator: torch.Generator) -> np.ndarray:
    """`per_image` random location vectors [B * n, C] from a [B, C, h, w] feature map."""
    batch, channels, height, width = features.shape
    flat = features.flatten(2).transpose(1, 2)  # [B, h*w, C]
    count = min(per_image, height * width)
    picks = torch.stack([torch.randperm(height * width, generator=generator)[:count] for _ in range(batch)])
    chosen = torch.gather(flat, 1, picks.to(flat.device)[:, :, None].expand(-1, -1, channels))
    return chosen.reshape(-1, channels).double().cpu().numpy()
