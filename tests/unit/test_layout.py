"""Batch arithmetic in memory order gives the plain per-channel arithmetic's floats, bit for bit."""

import pytest
import torch

from adqueue.data.layout import is_channels_last, normalise_into
from adqueue.data.loader import to_float

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def channels_last_pixels(batch: int, height: int, width: int, channels: int) -> torch.Tensor:
    """uint8 [B, C, H, W] as decoding makes it: a view of [B, H, W, C] memory."""
    return torch.randint(0, 256, (batch, height, width, channels), dtype=torch.uint8).permute(0, 3, 1, 2)


@pytest.mark.parametrize("height,width", [(32, 48), (7, 5), (1, 1)])
@pytest.mark.parametrize("grey", [False, True])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_normalise_into_equals_the_broadcast_arithmetic(height, width, grey, layout) -> None:
    images = to_float(channels_last_pixels(3, height, width, 1 if grey else 3))
    if grey:
        images = images.expand(-1, 3, -1, -1)  # as the backbones take grey batches
    out = torch.empty(images.shape, memory_format=layout)
    result = normalise_into(out, images, MEAN.view(1, 3, 1, 1), STD.view(1, 3, 1, 1))
    assert result is out and out.is_contiguous(memory_format=layout)
    assert torch.equal(out, (images - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1))


def test_channels_last_means_laid_out_pixel_by_pixel() -> None:
    assert is_channels_last(channels_last_pixels(2, 4, 6, 3))
    assert not is_channels_last(torch.rand(2, 3, 4, 6))
    assert not is_channels_last(torch.rand(2, 1, 4, 6))  # one channel: both layouts at once
