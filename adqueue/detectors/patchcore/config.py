"""`patchcore`: a coreset memory bank of locally aware patch features, scored by nearest neighbours.

Its settings and their checks, free of torch: `adqueue detectors` lists them and `adqueue train`
checks them when it submits. The detector itself is adqueue/detectors/patchcore/model.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from adqueue.detectors.components.backbone_specs import LEVEL_COUNTS, check_levels, default_levels
from adqueue.detectors.settings import Range, blur_range, require_at_least_one, require_in


@dataclass
class PatchCoreConfig:
    # The paper's WideResNet-50 needs hub weights; the EfficientNet-Lites install offline.
    backbone: str = "efficientnet_lite2"
    image_size: int = 260
    # Two middle levels, the deeper one upsampled to the shallower one's grid (paper: ResNet
    # layer2 + layer3). Empty = the backbone's own middle pair, written back explicitly on creation
    # so a saved model always names its levels.
    levels: tuple[int, ...] = ()
    # Each level's channels are average-pooled to this many (paper: 1024 for 512/1024 channels),
    # so every level weighs the same in the patch distance whatever its width (Lite2: 48 and 120).
    # 0 keeps each level's own channels (see level_norm).
    level_dim: int = 64
    # Each level's patch vector scaled to unit length before concatenation: the levels then weigh
    # the same without pooling, and a patch is compared by the pattern of its channels, not their
    # strength. On MTD it ranks images better (with levels=4,5,6 level_dim=0 bank_limit=12000:
    # image AUROC 0.968 vs 0.919) but localizes worse (PRO 0.62 vs 0.73; battery welds' pixel
    # AUROC 0.77 vs 0.93): off by default.
    level_norm: bool = False
    neighbourhood: int = 3  # patch aggregation: p x p average pooling, stride 1 (paper: 3)
    # Share of all training patches kept in the memory bank by greedy coreset selection (paper:
    # 0.1-0.25; on battery welds 0.1 beats 0.01: pixel AUROC 0.926 vs 0.891, PRO 0.726 vs 0.660).
    coreset_fraction: float = 0.1
    # ...but at most this many rows (0: no limit). Scoring costs patches x rows x dims per image:
    # MTD's 610 training images give 664,000 patches, and a 10% bank of 66,000 rows would take
    # seconds per image on a CPU. The limit keeps scoring within about twice mvg's time there.
    bank_limit: int = 6000
    projection_dim: int = 128  # random projection the coreset distances are computed in (paper: 128)
    # Bank neighbours of the nearest entry that reweight the image score (paper Eq. 7); 1 = no reweighting.
    neighbours: int = 9
    map_sigma: float = 4.0  # Gaussian blur of the anomaly map, in input pixels (paper: 4)
    # Gaussian smoothing of the patch-distance grid, in patches, before its largest value is taken
    # as the image score: one stray patch weighs less than a defect spanning a few (MTD image AUROC
    # 0.890 at 0, 0.919 at 1). 0 = the paper's plain largest patch distance.
    score_sigma: float = 1.0
    # Weight of a whole-image term in the image score: a Gaussian on the globally pooled features of
    # `global_levels` (mvg's image statistics), added to the patch score after both are standardized
    # by how they spread on unseen normal images (estimated at fit, see detectors/patchcore/model.py). The
    # patch score misses defects that change a tile's overall texture or shade more than any one
    # patch; the Gaussian misses small ones. Through the CLI (benchmarks/detectors.py): MTD image
    # AUROC 0.923 -> 0.958, battery welds 0.972 -> 0.984. Maps stay patch distances. 0 = the
    # paper's score.
    global_weight: float = 1.0
    # Levels pooled for that term. Empty = the backbone's "generic" levels (mvg's defaults).
    global_levels: tuple[int, ...] = ()
    global_variance: float = 0.02  # OPCA's kept share of the variance, as mvg's `variance`
    batch_size: int = 16
    seed: int = 0
    # Settings added after models had been saved, with the value that reproduces how a model file
    # without them scored: its threshold was calibrated on the plain largest patch distance.
    saved_before: ClassVar[dict[str, object]] = {"score_sigma": 0.0, "global_weight": 0.0}

    def __post_init__(self) -> None:
        if self.backbone in LEVEL_COUNTS:
            self.levels = self.levels or default_levels(self.backbone, "middle")
            self.global_levels = self.global_levels or default_levels(self.backbone, "generic")
        self.levels, self.global_levels = tuple(self.levels), tuple(self.global_levels)


def validate(config: PatchCoreConfig) -> None:
    """Raise ValueError for settings that cannot work; cheap, loads no weights."""
    check_levels(config.backbone, config.levels)
    check_levels(config.backbone, config.global_levels)
    if len(set(config.levels)) != len(config.levels) or len(set(config.global_levels)) != len(config.global_levels):
        raise ValueError(f"levels must not repeat, not {config.levels} / {config.global_levels}")
    require_at_least_one(config, ("neighbourhood", "projection_dim", "neighbours", "batch_size"))
    if config.neighbourhood % 2 == 0:
        raise ValueError(f"neighbourhood must be odd (a centred p x p window), not {config.neighbourhood}")
    if config.image_size < 32:
        raise ValueError(f"image_size must be at least 32, not {config.image_size}")
    share = Range(0, 1, low_open=True)
    require_in(config, {
        "global_weight": Range(0, why="0: the patch score only"), "global_variance": share,
        "level_dim": Range(0, why="0: each level's own channels"), "bank_limit": Range(0, why="0: no limit"),
        "coreset_fraction": share, "map_sigma": blur_range(config.image_size),
        "score_sigma": blur_range(config.image_size, "patches"),
    })
