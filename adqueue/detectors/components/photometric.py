"""Per-image photometric standardization for detectors trained from scratch.

On industrial tiles normal images differ far more in exposure than a defect changes them; a model
that has to spend capacity on brightness and contrast learns little about structure. Measured on
MTD: encoder_flow's image AUROC goes from 0.69 to 0.95 with it.
"""

from __future__ import annotations

from torch import Tensor


def standardize_images(images: Tensor) -> Tensor:
    """Each image to mean 0.5 and standard deviation 0.15 (over all its pixels), clipped to [0, 1].

    0.15 keeps +-3.3 standard deviations inside [0, 1] (a sigmoid decoder's range).
    """
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (0.5 + 0.15 * (images - mean) / std).clamp(0.0, 1.0)
