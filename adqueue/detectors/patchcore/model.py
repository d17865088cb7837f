"""`patchcore`: a coreset memory bank of locally aware patch features, scored by nearest neighbours.

Paper: K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox, P. Gehler, "Towards Total Recall in
Industrial Anomaly Detection", CVPR 2022.

Features: middle levels of a frozen ImageNet backbone, each averaged over a p x p neighbourhood
(stride 1) so a patch sees its surroundings, the deeper ones upsampled to the shallowest one's
grid, each average-pooled over channels to a fixed width so every level weighs the same in the
distance (or, as a setting, kept whole and scaled to unit length), concatenated. Fit: every
training patch goes into a bank that greedy coreset selection thins to a fraction. Score: each
test patch's distance to its nearest bank entry is the anomaly map (upsampled, Gaussian-blurred);
the image score is the largest of them after a light smoothing over neighbouring patches,
reweighted by how isolated the nearest bank entry of that patch is among its own neighbours (paper
Eq. 7). The bank is a buffer, so it is saved in the model file; the backbone is not.

Beyond the paper (`global_weight`, on by default): a whole-image term, the summed Mahalanobis
distances of the globally pooled deeper levels (as `mvg` scores images), is added to the patch
score. The two live on different scales, so each is standardized by its mean and spread on normal
images the fit has not seen: the patch score of a sample of training images against the bank
without the rows taken from that image, and the Gaussian distance of each training image under
Gaussians fitted on the other folds. Fewer than GLOBAL_MIN_IMAGES training images leave the term
out (its least-variance directions would be noise) and the image score is the standardized patch
score alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adqueue.core.progress import Progress
from adqueue.detectors.base import Detector, FitResult, Scores, dataset_size
from adqueue.detectors.components.backbones import load_backbone
from adqueue.detectors.components.coreset import coreset_size, greedy_coreset
from adqueue.detectors.components.gaussian import LevelGaussians, out_of_fold_distances
from adqueue.detectors.components.maps import gaussian_blur, smooth_maps
from adqueue.detectors.components.nearest_neighbours import nearest_neighbours
from adqueue.detectors.patchcore.config import PatchCoreConfig

GLOBAL_MIN_IMAGES = 16  # as mvg's minimum: OPCA's least-variance axes are noise below it
HELD_OUT_IMAGES = 64  # training images whose patch score, without their own bank rows, sets its scale
FOLDS = 5  # out-of-fold Gaussian distances set the whole-image term's scale


class PatchCoreDetector(Detector):
    name = "patchcore"
    Config = PatchCoreConfig
    frozen_prefixes = ("backbone.",)
    # A nearest-neighbour bank needs no statistics to be estimated: it works from a few shots
    # (paper Sec. 4.4.2), so the base minimum of 2 stands.
    min_fit_images = 2
    memory_bank: Tensor  # a buffer, [rows, D]: empty until fitted or loaded
    score_norm: Tensor  # a buffer: mean and spread of both score terms (global_weight > 0)

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__(config)
        self.backbone = load_backbone(config.backbone)
        widths = [config.level_dim] * len(config.levels) if config.level_dim else self.backbone.channels(config.levels)
        self.register_buffer("memory_bank", torch.zeros(0, sum(widths)))
        if config.global_weight > 0:
            self.global_gaussians = LevelGaussians(len(config.global_levels))
            # Mean and spread of the patch score, then of the whole-image distance, on unseen normal
            # images. Unfitted Gaussians (too few training images) leave the whole-image term out.
            self.register_buffer("score_norm", torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The bank's row count is only known after fitting: take its shape from the saved state.
        saved = state_dict.get(prefix + "memory_bank")
        if saved is not None:
            self.memory_bank = torch.empty_like(saved, dtype=torch.float32, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _backbone_maps(self, batch: Tensor) -> dict[int, Tensor]:
        cfg = self.config
        levels = sorted(set(cfg.levels) | (set(cfg.global_levels) if cfg.global_weight > 0 else set()))
        return dict(zip(levels, self.backbone(batch.to(self.device), levels), strict=True))

    def _pooled(self, maps: dict[int, Tensor]) -> list[Tensor]:
        return [maps[level].mean(dim=(2, 3)) for level in self.config.global_levels]

    def patch_features(self, batch: Tensor) -> Tensor:
        """Locally aware patch features [B, h, w, D] on the shallowest chosen level's grid."""
        return self._patch_features(self._backbone_maps(batch))

    def _patch_features(self, by_level: dict[int, Tensor]) -> Tensor:
        cfg = self.config
        maps = [by_level[level] for level in cfg.levels]
        grid = max((m.shape[-2:] for m in maps), key=lambda size: size[0] * size[1])
        pad = cfg.neighbourhood // 2
        parts = []
        for feature in maps:
            if cfg.neighbourhood > 1:
                # count_include_pad=False: border patches average real neighbours, not zeros.
                feature = F.avg_pool2d(feature, cfg.neighbourhood, stride=1, padding=pad, count_include_pad=False)
            if feature.shape[-2:] != grid:
                feature = F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
            feature = feature.permute(0, 2, 3, 1)
            if cfg.level_dim:
                feature = _pool_channels(feature, cfg.level_dim)
            parts.append(F.normalize(feature, dim=-1) if cfg.level_norm else feature)
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def _fit(self, images: Dataset[Tensor], progress: Progress) -> FitResult:
        cfg = self.config
        loader = DataLoader(images, batch_size=cfg.batch_size, shuffle=False)
        progress.phase("extracting patch features", dataset_size(images))
        chunks, pooled = [], []
        for batch in loader:
            maps = self._backbone_maps(batch)
            features = self._patch_features(maps)
            chunks.append(features.reshape(-1, features.shape[-1]))
            if cfg.global_weight > 0:
                pooled.append([p.double().cpu().numpy() for p in self._pooled(maps)])
            progress.advance(len(batch))
        grid = features.shape[1:3]
        patches = torch.cat(chunks)
        del chunks
        count = coreset_size(patches.shape[0], cfg.coreset_fraction, cfg.bank_limit)
        progress.phase("selecting coreset", count)
        if count < patches.shape[0]:
            keep = greedy_coreset(patches, count, projection_dim=cfg.projection_dim, seed=cfg.seed,
                                  progress=progress.advance)
            self.memory_bank = patches[keep].contiguous()
        else:
            keep = torch.arange(patches.shape[0], device=patches.device)
            self.memory_bank = patches
        bank = self.memory_bank
        info: dict[str, object] = {"patches": int(patches.shape[0]), "bank_size": int(bank.shape[0]),
                                   "bank_dim": int(bank.shape[1]),
                                   "bank_mb": round(bank.numel() * bank.element_size() / 2**20, 2)}
        if cfg.global_weight > 0:
            per_level = [np.concatenate(level) for level in zip(*pooled, strict=True)]
            info["global_term"] = self._fit_score_norm(patches.view(-1, *grid, patches.shape[-1]),
                                                       keep // (grid[0] * grid[1]), per_level, progress)
        return FitResult(info=info)

    def _fit_score_norm(self, patches: Tensor, bank_sources: Tensor, per_level: list[np.ndarray],
                        progress: Progress) -> bool:
        """Fit the whole-image Gaussians and the scales that standardize both terms (see the module
        docstring); `patches` [N, h, w, D] per training image, `bank_sources` the image of each bank row.
        Returns whether the whole-image term is used."""
        cfg = self.config
        count = patches.shape[0]
        picks = torch.randperm(count, generator=torch.Generator().manual_seed(cfg.seed))[:HELD_OUT_IMAGES]
        progress.phase("measuring scores of unseen images", len(picks))
        local = []
        for image in picks.tolist():
            others = self.memory_bank[bank_sources != image]
            if others.shape[0]:  # a tiny bank may hold rows of this one image only
                local.append(self._patch_scores(patches[image:image + 1], others)[0])
            progress.advance()
        norm = [0.0, 1.0, 0.0, 1.0]
        if local:
            local_scores = torch.cat(local).double()
            norm[:2] = [local_scores.mean().item(), _spread(local_scores)]
        used = count >= GLOBAL_MIN_IMAGES
        if used:
            distances = torch.from_numpy(out_of_fold_distances(per_level, cfg.global_variance, folds=FOLDS,
                                                               seed=cfg.seed))
            norm[2:] = [distances.mean().item(), _spread(distances)]
            self.global_gaussians.fit(per_level, cfg.global_variance).to(self.device)
        self.score_norm = torch.tensor(norm, dtype=torch.float64, device=self.device)
        return used

    def _patch_scores(self, features: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
        """Image scores [B] (smoothed largest patch distance, reweighted) and patch-distance grids [B, h, w]
        of patch features [B, h, w, D] against `bank`."""
        size, height, width, dim = features.shape
        queries = features.reshape(-1, dim)
        distances, nearest = nearest_neighbours(queries, bank)
        grid = distances.view(size, height, width)
        smoothed = gaussian_blur(grid, self.config.score_sigma).flatten(1)
        worst = smoothed.argmax(dim=1)
        rows = torch.arange(size, device=distances.device)
        image = smoothed[rows, worst] * isolation_weights(
            queries.view(size, height * width, dim)[rows, worst], nearest.view(size, -1)[rows, worst],
            bank, self.config.neighbours)
        return image, grid

    @torch.no_grad()
    def _score(self, batch: Tensor, *, with_maps: bool) -> Scores:
        maps_by_level = self._backbone_maps(batch)
        image, grid = self._patch_scores(self._patch_features(maps_by_level), self.memory_bank)
        if self.config.global_weight > 0:
            local_mean, local_spread, global_mean, global_spread = self.score_norm.tolist()
            image = (image - local_mean) / local_spread
            if self.global_gaussians.fitted:
                whole = self.global_gaussians(self._pooled(maps_by_level))
                image = image + self.config.global_weight * (whole - global_mean) / global_spread
        maps = None
        if with_maps:
            maps = smooth_maps([grid], batch.shape[-2:], self.config.map_sigma)
        return Scores(image=image.cpu(), maps=None if maps is None else maps.cpu())


def isolation_weights(patches: Tensor, nearest_rows: Tensor, bank: Tensor, neighbours: int) -> Tensor:
    """The paper's reweighting factor (Eq. 7) for patches [B, D] whose nearest bank rows are `nearest_rows` [B].

    With m* the nearest row and N(m*) the `neighbours` bank rows nearest to m* (m* itself first),
    the factor is 1 - exp|patch - m*| / sum over m in N(m*) of exp|patch - m|: larger when m* is an
    isolated, rarely seen normal patch, whose nearness is weaker evidence of normality.
    `neighbours` = 1 gives 1: a lone m* has nothing to be compared with.
    """
    if neighbours == 1:
        return torch.ones(patches.shape[0], dtype=patches.dtype, device=patches.device)
    _, support = nearest_neighbours(bank[nearest_rows], bank, neighbours)
    # m* comes first: its distance to itself is zero (ties with duplicates leave the set the same).
    support[:, 0] = nearest_rows
    distances = torch.linalg.vector_norm(patches[:, None, :] - bank[support], dim=-1)  # [B, k]
    return 1.0 - torch.softmax(distances, dim=1)[:, 0]


def _pool_channels(features: Tensor, dim: int) -> Tensor:
    """Average-pool the last axis [..., C] to `dim` values (paper: adaptive average pooling)."""
    if features.shape[-1] == dim:
        return features
    leading = features.shape[:-1]
    pooled = F.adaptive_avg_pool1d(features.reshape(-1, 1, features.shape[-1]), dim)
    return pooled.reshape(*leading, dim)


def _spread(values: Tensor) -> float:
    """Standard deviation, kept away from 0 so that identical scores still standardize to finite values."""
    return max(values.std().item() if values.numel() > 1 else 0.0, 1e-6 * max(1.0, values.abs().mean().item()))
