"""`patchcore`: a coreset memory bank of locally aware patch features, scored by nearest neighbours.

Paper: K. Roth, L. Pemula, J. Zepeda, B. Schölkopf, T. Brox, P. Gehler, "Towards Total Recall in
Industrial Anomaly Detection", CVPR 2022.

Features: middle levels of a frozen ImageNet backbone, each averaged over a p x p neighbourhood
(stride 1) so a patch sees its surroundings, the deeper ones upsampled to the shallowest one's
grid, each average-pooled over channels to a fixed width so every level weighs the same in the
distance (or, as a setting, kept whole and scaled to unit length), concatenated. Fit: every
training patch goes into a bank that greedy coreset selection thins to a fraction. Score: each test patch's distance to its nearest bank entry
is the anomaly map (upsampled, Gaussian-blurred); the image score is the largest of them after a
light smoothing over neighbouring patches, reweighted by how isolated the nearest bank entry of
that patch is among its own neighbours (paper Eq. 7). The bank is a buffer, so it is saved in the
model file; the backbone is not.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adqueue.detectors.base import Detector, FitReport, Preprocess, Scores
from adqueue.detectors.components.backbones import load_backbone
from adqueue.detectors.components.coreset import coreset_size, greedy_coreset
from adqueue.detectors.components.maps import gaussian_blur, upsample_maps
from adqueue.detectors.components.nearest_neighbours import nearest_neighbours
from adqueue.detectors.configs.patchcore import PatchCoreConfig
from adqueue.detectors.configs.patchcore import validate as validate_patchcore_config
from adqueue.progress import NullProgress, Progress


class PatchCoreDetector(Detector):
    name = "patchcore"
    Config = PatchCoreConfig
    frozen_prefixes = ("backbone.",)
    # A nearest-neighbour bank needs no statistics to be estimated: it works from a few shots
    # (paper Sec. 4.4.2), so the base minimum of 2 stands.
    min_fit_images = 2

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__(config)
        self.backbone = load_backbone(config.backbone)
        widths = [config.level_dim] * len(config.levels) if config.level_dim else self.backbone.channels(config.levels)
        self.register_buffer("memory_bank", torch.zeros(0, sum(widths)))

    @classmethod
    def validate_config(cls, config: PatchCoreConfig) -> None:
        validate_patchcore_config(config)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.config.image_size, channels=3)

    def backbone_identity(self) -> dict[str, str]:
        return self.backbone.identity()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # The bank's row count is only known after fitting: take its shape from the saved state.
        saved = state_dict.get(prefix + "memory_bank")
        if saved is not None:
            self.memory_bank = torch.empty_like(saved, dtype=torch.float32, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def patch_features(self, batch: Tensor) -> Tensor:
        """Locally aware patch features [B, h, w, D] on the shallowest chosen level's grid."""
        cfg = self.config
        maps = self.backbone(batch.to(self.device), cfg.levels)
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
    def fit(self, images: Dataset[Tensor], *, progress: Progress | None = None) -> FitReport:
        progress = progress or NullProgress()
        started = time.perf_counter()
        cfg = self.config
        loader = DataLoader(images, batch_size=cfg.batch_size, shuffle=False)
        progress.phase("extracting patch features", len(images))  # type: ignore[arg-type]
        chunks = []
        for batch in loader:
            features = self.patch_features(batch)
            chunks.append(features.reshape(-1, features.shape[-1]))
            progress.advance(len(batch))
        patches = torch.cat(chunks)
        del chunks
        count = coreset_size(patches.shape[0], cfg.coreset_fraction, cfg.bank_limit)
        progress.phase("selecting coreset", count)
        if count < patches.shape[0]:
            keep = greedy_coreset(patches, count, projection_dim=cfg.projection_dim, seed=cfg.seed,
                                  progress=progress.advance)
            self.memory_bank = patches[keep].contiguous()
        else:
            self.memory_bank = patches
        bank = self.memory_bank
        return FitReport(
            n_images=len(images),  # type: ignore[arg-type]
            seconds=time.perf_counter() - started,
            info={"patches": int(patches.shape[0]), "bank_size": int(bank.shape[0]), "bank_dim": int(bank.shape[1]),
                  "bank_mb": round(bank.numel() * bank.element_size() / 2**20, 2)},
        )

    @torch.no_grad()
    def score(self, batch: Tensor, *, with_maps: bool = True) -> Scores:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("the patchcore detector is not fitted: call fit() or load a trained state first")
        features = self.patch_features(batch)
        size, height, width, dim = features.shape
        queries = features.reshape(-1, dim)
        distances, nearest = nearest_neighbours(queries, self.memory_bank)
        grid = distances.view(size, height, width)
        smoothed = gaussian_blur(grid, self.config.score_sigma).flatten(1)
        worst = smoothed.argmax(dim=1)
        rows = torch.arange(size, device=distances.device)
        image = smoothed[rows, worst] * isolation_weights(
            queries.view(size, height * width, dim)[rows, worst], nearest.view(size, -1)[rows, worst],
            self.memory_bank, self.config.neighbours)
        maps = None
        if with_maps:
            maps = upsample_maps([grid], batch.shape[-2:])[0]
            maps = gaussian_blur(maps, self.config.map_sigma)
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
