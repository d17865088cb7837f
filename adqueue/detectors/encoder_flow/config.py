"""`encoder_flow`: a normalizing flow on the latent vectors of an autoencoder trained from scratch.

Its settings and their checks, free of torch: `adqueue detectors` lists them and `adqueue train`
checks them when it submits. The detector itself is adqueue/detectors/encoder_flow/model.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from adqueue.detectors.settings import (
    POSITIVE,
    blur_range,
    require_at_least_one,
    require_choice,
    require_grey_or_rgb,
    require_in,
)

MAPS = ("gradient", "reconstruction")
# Label-preserving views of a tile: "flips" keeps the orientation of directional textures (the
# brushed streaks of magnetic tiles); "dihedral" adds the 90-degree rotations.
AUGMENTS = {"none": 1, "flips": 4, "dihedral": 8}
THRESHOLD_RULES = ("gaussian", "quantile")


@dataclass
class EncoderFlowConfig:
    # Defaults chosen on MTD (image AUROC of the NLL, manifest split): 64 px scores as well as
    # 128 px (0.954 vs 0.948) at a quarter of the compute; `normalize` lifts 0.69 to 0.95.
    image_size: int = 64  # a power of two >= 16: the encoder halves it down to 4 x 4
    channels: int = 1  # 1 (grey) or 3 (RGB)
    normalize: bool = True  # standardize each image's brightness and contrast before encoding
    latent_dim: int = 64  # 16-128 score alike on MTD
    width: int = 32  # channels of the first conv; doubled at every halving up to max_width
    max_width: int = 256
    ae_epochs: int = 30  # 60 did not score better
    ae_batch_size: int = 32
    ae_lr: float = 1e-3
    augment: str = "flips"  # views for both stages: one at random per image and step, all for the flow
    tta: bool = True  # score = NLL averaged over all the `augment` views of the image
    # Smaller flows (4 x 128 x 1, 8 x 128 x 1) or 20 epochs lost 0.01-0.05 AUROC on MTD.
    flow_blocks: int = 8
    flow_hidden: int = 256
    flow_layers: int = 2  # hidden layers per coupling subnet
    flow_clamp: float = 3.0
    flow_epochs: int = 40  # passes over the cached latents
    flow_batch_size: int = 64
    flow_lr: float = 2e-4
    map: str = "gradient"  # "gradient" (of the latent NLL) or "reconstruction" (L1 error)
    map_sigma: float = 2.0  # Gaussian blur of the map, in input pixels
    threshold_rule: str = "gaussian"  # "gaussian" (paper: confidence bound) or "quantile"
    seed: int = 0


def validate(config: EncoderFlowConfig) -> None:
    """Raise ValueError for settings that cannot work; cheap, loads no weights."""
    size = config.image_size
    if size < 16 or size & (size - 1):
        raise ValueError(f"image_size must be a power of two >= 16 (the encoder halves it to 4), not {size}")
    require_grey_or_rgb(config)
    if config.latent_dim < 2:
        raise ValueError(f"latent_dim must be at least 2 (the coupling flow splits the latent in two), "
                         f"not {config.latent_dim}")
    positive = ("width", "max_width", "ae_epochs", "ae_batch_size", "flow_blocks", "flow_hidden",
                "flow_layers", "flow_epochs", "flow_batch_size")
    require_at_least_one(config, positive)
    require_in(config, {"ae_lr": POSITIVE, "flow_lr": POSITIVE, "flow_clamp": POSITIVE,
                        "map_sigma": blur_range(config.image_size)})
    for key, allowed in (("augment", tuple(AUGMENTS)), ("map", MAPS), ("threshold_rule", THRESHOLD_RULES)):
        require_choice(config, key, allowed)
