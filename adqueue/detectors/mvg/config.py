"""`mvg`: a multivariate Gaussian on pretrained deep features, with OPCA.

Its settings and their checks, free of torch: `adqueue detectors` lists them and `adqueue train`
checks them when it submits. The detector itself is adqueue/detectors/mvg/model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from adqueue.detectors.components.backbone_specs import check_levels, default_levels
from adqueue.detectors.settings import Range, blur_range, require_at_least_one, require_in


@dataclass
class MVGConfig:
    # The paper's EfficientNet-B4 needs hub weights; Lite2 at its native 260 px is the deepest
    # EfficientNet that installs offline, and depth matters here (see README: Lite0 0.94, Lite2
    # 0.96 image AUROC on MTD with the same levels).
    backbone: str = "efficientnet_lite2"
    image_size: int = 260
    # Empty = the backbone's default (backbone_specs.default_levels), filled in at construction so
    # a saved model names its levels. EfficientNet levels: 0 stem, 1-7 MBConv stages, 8 head; the
    # paper uses the middle of the network, levels 3-7, where features are generic rather than
    # ImageNet-specific ("generic"); ResNets: layers 1-4.
    levels: tuple[int, ...] = ()
    # Localization: location Gaussians on these levels ("local": EfficientNet 3-5 localize best on MTD).
    map_levels: tuple[int, ...] = ()
    # OPCA: share of the variance carried by the kept least-variance components (paper: 0.05;
    # 0.01-0.03 is the plateau on MTD). None ("all") keeps every component, the paper's advice
    # for shallow networks such as resnet18.
    variance: float | None = 0.02
    map_variance: float | None = 0.1
    local_samples: int = 64  # location vectors per image and level for the map Gaussians
    map_sigma: float = 4.0  # Gaussian blur of the anomaly map, in input pixels
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels) or default_levels(self.backbone, "generic")
        self.map_levels = tuple(self.map_levels) or default_levels(self.backbone, "local")


def validate(config: MVGConfig) -> None:
    """Raise ValueError for settings that cannot work; cheap, loads no weights."""
    check_levels(config.backbone, config.levels)
    check_levels(config.backbone, config.map_levels)
    for name in ("variance", "map_variance"):
        value = getattr(config, name)
        if value is not None and value not in Range(0, 1, low_open=True):
            raise ValueError(f"{name} must be in (0, 1] or 'all', not {value}")
    require_at_least_one(config, ("local_samples", "batch_size"))
    if config.image_size < 32:
        raise ValueError(f"image_size must be at least 32, not {config.image_size}")
    require_in(config, {"map_sigma": blur_range(config.image_size)})
