"""`differnet`: a normalizing flow on multi-scale pretrained features, scored over many transforms.

Its settings and their checks, free of torch: `adqueue detectors` lists them and `adqueue train`
checks them when it submits. The detector itself is adqueue/detectors/differnet/model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from adqueue.detectors.components.backbone_specs import LAST_FEATURE_LEVEL, check_levels
from adqueue.detectors.settings import POSITIVE, Range, blur_range, require_at_least_one, require_choice, require_in

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
    require_at_least_one(config, ("n_scales",))
    smallest = 32 * 2 ** (config.n_scales - 1)
    if config.image_size < smallest:
        raise ValueError(f"image_size must be at least {smallest} with n_scales={config.n_scales} (the smallest "
                         f"scale, image_size / 2^(n_scales - 1), at least 32 pixels), not {config.image_size}")
    positive = ("train_transforms", "test_transforms", "map_transforms", "n_blocks", "hidden",
                "n_hidden", "epochs", "batch_size", "extract_batch")
    require_at_least_one(config, positive)
    jitter = Range(0, 1, high_open=True, why="factors drawn from [1 - x, 1 + x]")
    require_in(config, {"brightness": jitter, "contrast": jitter, "clamp": POSITIVE, "lr": POSITIVE,
                        "map_sigma": blur_range(config.image_size)})
    require_choice(config, "score", SCORES)
