"""`ebm`: an energy-based model trained from scratch; energy and gradient-map scores.

Its settings and their checks, free of torch: `adqueue detectors` lists them and `adqueue train`
checks them when it submits. The detector itself is adqueue/detectors/ebm/model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from adqueue.detectors.settings import (
    NON_NEGATIVE,
    POSITIVE,
    SHARE,
    blur_range,
    require_at_least_one,
    require_grey_or_rgb,
    require_in,
)


@dataclass
class EBMConfig:
    image_size: int = 64  # the paper: 128; any multiple of 32 works (see the module docstring)
    channels: int = 1  # 1 (grey) or 3 (RGB)
    # Standardize each image's brightness and contrast before the energy net (components/photometric).
    normalize: bool = True
    width: int = 32  # filters of the first layer (Table 3: 32); the rest scale with it
    iterations: int = 50  # parameter updates
    batch_size: int = 32  # data images per update
    negatives: int = 16  # SGLD chains per update: the main cost of training
    sgld_steps: int = 100  # the paper's chain length
    sgld_step_size: float = 10.0  # x <- x - step_size * dE/dx + sgld_noise * N(0, 1)
    sgld_noise: float = 0.005
    data_noise: float = 0.0  # std of Gaussian noise added to the data images during training
    replay_buffer: int = 0  # persistent chains kept between updates; 0 = non-persistent (paper)
    replay_reinit: float = 0.05  # share of chains restarted from noise when the buffer is on
    lr: float = 1e-4
    alpha: float = 0.1  # energy-magnitude regularization weight
    grad_clip: float = 1.0  # max norm of the parameter gradient; 0 = off
    norm: int = 2  # r of the paper: the default image score is A_std with this norm, L1 or L2
    map_sigma: float = 4.0  # Gaussian blur of the a_std map, in input pixels; 0 = the raw map
    seed: int = 0


def validate(config: EBMConfig) -> None:
    """Raise ValueError for settings that cannot work; cheap, loads no weights."""
    if config.image_size < 32 or config.image_size % 32:
        raise ValueError(
            f"image_size must be a multiple of 32 (five stride-2 convs), not {config.image_size}")
    require_grey_or_rgb(config)
    if config.norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2 (L1 or L2), not {config.norm}")
    require_at_least_one(config, ("width", "iterations", "batch_size", "negatives", "sgld_steps"))
    require_in(config, {
        "sgld_step_size": POSITIVE, "lr": POSITIVE, "sgld_noise": NON_NEGATIVE, "data_noise": NON_NEGATIVE,
        "alpha": NON_NEGATIVE, "grad_clip": NON_NEGATIVE, "replay_buffer": NON_NEGATIVE, "replay_reinit": SHARE,
        "map_sigma": blur_range(config.image_size),
    })
