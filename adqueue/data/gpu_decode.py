"""JPEG batches decoded on a CUDA device (nvJPEG through torchvision), resized there.

Optional: used only where the worker's settings ask for it (ADQUEUE_GPU_DECODE=1) and torchvision
can decode on the device. The files were read and checked on the CPU first (format, size, pixel
count: data/io.py read_for_device); whatever the GPU refuses is decoded on the CPU instead.
The resize is torch's antialiased bilinear one, not Pillow's: scores may differ slightly from the
CPU path's, as between any two decoders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def gpu_decode_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401 - probing only
    except ImportError:
        return False
    return True


def decode_jpegs(encoded: Sequence[bytes], *, channels: int, size: tuple[int, int],
                 device: torch.device) -> list[Tensor | None]:
    """Each JPEG as float [C, H, W] in [0, 1] at `size` (width, height) on `device`, or None where
    the device decoder refused it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in encoded]
    images: list[Tensor | None]
    try:
        images = list(decode_jpeg(data, mode=mode, device=device))
    except RuntimeError:  # one file nvJPEG refuses fails the whole batch: find it
        images = []
        for one in data:
            try:
                images.append(decode_jpeg(one, mode=mode, device=device))
            except RuntimeError:
                images.append(None)
    width, height = size
    out: list[Tensor | None] = []
    for image in images:
        if image is None:
            out.append(None)
            continue
        pixels = image[None].float()
        if pixels.shape[-2:] != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        out.append(pixels[0].clamp_(0.0, 255.0).div_(255.0))
    return out
