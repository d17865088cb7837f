"""Decoded training images held in memory, served the way detectors take them."""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import Dataset


class TensorImages(Dataset[Tensor]):
    """Decoded uint8 images [N, C, H, W] served as float [C, H, W] in [0, 1]."""

    def __init__(self, pixels: Tensor) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.pixels[index].float().div_(255.0)
