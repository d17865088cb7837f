"""What a model takes from an image file: its square size and its channels.

A detector declares it; the decoding code (data/io.py, data/loader.py) produces exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the detector's input: square resize and channel count."""

    size: int
    channels: int  # 1 (grey) or 3 (RGB); grey files are replicated to 3 channels when 3

    @property
    def size_wh(self) -> tuple[int, int]:
        return (self.size, self.size)
