"""`differnet`: a normalizing flow on multi-scale pretrained features, scored over many transforms.

Its settings and their checks, free of torch: `adqueue detectors` lists them and `adqueue train`
checks them when it submits. The detector itself is adqueue/detectors/differnet/model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from adqueue.detectors.components.backbone_specs import LAST_FEATURE_LEVEL, check_levels
from adqueue.detectors.settings import require_at_least_one, require_choice

SCORES = ("nll", "z2")


@dataclass
class DifferNetConfig:
    backbone: str = "efficientnet_lite0"
    # Feature maps pooled at every scale; empty = the backbone's last two before its classifier
    # head (Lite0: levels 6 and 7, 192 + 320 channels). The paper pools AlexNet's last conv block
    # alone; on MTD Lite0's level 6 scores higher than its level 7, and the two together highest.
    levels: tuple[int, ...] = ()
    image_size: int = 224  # the largest scale; the others are /2 and /4 (paper: 448, 224, 112)
    n_scales: int = 3
    train_transforms: int = 8  # transformed copies of each training image in the feature cache
    test_transforms: int = 16  # transforms averaged per scored image (paper: 64)
    map_transforms: int = 4  # of those, how many also give a gradient map (a backward pass each)
    rotation: bool = True
    brightness: float = 0.15  # factors uniform in [1 - x, 1 + x] (paper, on MTD: 0.15)
    contrast: float = 0.15
    n_blocks: int = 8
    # The paper's subnets have 3 hidden layers of 2048; those cost ~10x more per step on a CPU and
    # reached 0.939 on MTD in the 4 epochs we could afford, where 512 reaches 0.974 in 40.
    hidden: int = 512
    n_hidden: int = 3
    clamp: float = 3.0  # soft clamp alpha (paper)
    epochs: int = 40  # passes over the feature cache (MTD: 10 -> 0.950, 40 -> 0.974)
    batch_size: int = 96
    lr: float = 2e-4
    # The image score: "nll", the paper's mean negative log-likelihood (eq. 5), or "z2", the mean
    # of z^2 that the authors' code scores with (it leaves out the log-determinant). Both are
    # stored per image; this picks the one that sets `score` and `is_anomaly`.
    score: str = "nll"
    map_sigma: float = 4.0  # Gaussian blur of the gradient maps, in input pixels
    extract_batch: int = 32
    seed: int = 0


def feature_levels(config: DifferNetConfig) -> list[int]:
    if config.levels:
        return list(config.levels)
    last = LAST_FEATURE_LEVEL[config.backbone]
    return [last - 1, last]


def validate(config: DifferNetConfig) -> None:
    """Raise ValueError for settings that cannot work; cheap, loads no weights."""
    check_levels(config.backbone, feature_levels(config) if config.backbone in LAST_FEATURE_LEVEL else [])
    if config.n_scales < 1 or config.image_size // 2 ** (config.n_scales - 1) < 32:
        raise ValueError("image_size / 2^(n_scales - 1) must be at least 32 pixels")
    positive = ("train_transforms", "test_transforms", "map_transforms", "n_blocks", "hidden",
                "n_hidden", "epochs", "batch_size", "extract_batch")
    require_at_least_one(config, positive)
    if not (0 <= config.brightness < 1 and 0 <= config.contrast < 1):
        raise ValueError("brightness and contrast must be in [0, 1)")
    require_choice(config, "score", SCORES)
    if config.clamp <= 0 or config.lr <= 0 or config.map_sigma < 0:
        raise ValueError("clamp and lr must be positive, map_sigma non-negative")
