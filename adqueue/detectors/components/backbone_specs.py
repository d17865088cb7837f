"""What each backbone offers, known without loading it (or torch): its names and feature levels.

Submitting a job checks `--set levels=...` against these tables, so they live apart from the
extractors themselves (backbones.py), which need torch. `load_backbone` asserts that every built
extractor has exactly the levels listed here.
"""

from __future__ import annotations

from collections.abc import Sequence

# Levels per backbone, known without loading weights so a job is validated when it is submitted.
LEVEL_COUNTS = {
    "efficientnet_lite0": 9, "efficientnet_lite1": 9, "efficientnet_lite2": 9, "efficientnet_b4": 9,
    "resnet18": 5, "wide_resnet50_2": 5, "alexnet": 5,
}


# The last feature map before the classifier head: EfficientNets' last MBConv stage (their level 8
# is a 1x1 convolution that only re-mixes it for the classifier), ResNets' layer4, AlexNet's pooled
# `features` output.
LAST_FEATURE_LEVEL = {
    "efficientnet_lite0": 7, "efficientnet_lite1": 7, "efficientnet_lite2": 7, "efficientnet_b4": 7,
    "resnet18": 4, "wide_resnet50_2": 4, "alexnet": 4,
}


_EFFICIENTNETS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_b4")
_RESNETS = ("resnet18", "wide_resnet50_2")

# The levels each kind of detector uses unless `--set levels=...` says otherwise, per backbone, so
# that every listed backbone works with a detector's defaults:
# - "generic": the middle-to-last stages, whose pooled features describe an image without being
#   ImageNet-specific (mvg's image Gaussians; EfficientNet levels 3-7 as in its paper);
# - "local": the earlier of those, fine enough to localize (mvg's map Gaussians);
# - "middle": two mid-level feature maps at strides 8 and 16 (PatchCore's layer2 + layer3).
_DEFAULT_LEVELS: dict[str, dict[str, tuple[int, ...]]] = {
    "generic": {**dict.fromkeys(_EFFICIENTNETS, (3, 4, 5, 6, 7)), **dict.fromkeys(_RESNETS, (1, 2, 3, 4)),
                "alexnet": (1, 2, 3, 4)},
    "local": {**dict.fromkeys(_EFFICIENTNETS, (3, 4, 5)), **dict.fromkeys(_RESNETS, (1, 2, 3)),
              "alexnet": (1, 2, 3)},
    "middle": {**dict.fromkeys(_EFFICIENTNETS, (3, 5)), **dict.fromkeys(_RESNETS, (2, 3)),
               "alexnet": (2, 3)},
}
LEVEL_ROLES = tuple(_DEFAULT_LEVELS)


def default_levels(backbone: str, role: str) -> tuple[int, ...]:
    """The levels a detector uses on `backbone` for `role` (see above); () for an unknown backbone,
    which `check_levels` then reports."""
    return _DEFAULT_LEVELS[role].get(backbone, ())


def backbone_names() -> list[str]:
    return sorted(LEVEL_COUNTS)


def check_levels(backbone: str, levels: Sequence[int]) -> None:
    """Raise ValueError unless `backbone` is known and every level exists in it."""
    if backbone not in LEVEL_COUNTS:
        raise ValueError(f"unknown backbone {backbone!r}; available: {', '.join(backbone_names())}")
    if not levels:
        raise ValueError("at least one feature level is needed")
    count = LEVEL_COUNTS[backbone]
    bad = [level for level in levels if not 0 <= level < count]
    if bad:
        raise ValueError(f"backbone {backbone} has levels 0-{count - 1}, not {bad}")
