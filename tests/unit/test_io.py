"""Decoding: formats, channels, 16-bit grey, and every way a file can be broken."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adqueue.core.errors import ImageError
from adqueue.data.io import read_image, read_mask


def _save(path: Path, array: np.ndarray, fmt: str, **kwargs: object) -> Path:
    Image.fromarray(array).save(path, format=fmt, **kwargs)
    return path


def test_grey_and_rgb_resized_with_original_size_and_hash(tmp_path: Path) -> None:
    grey = _save(tmp_path / "g.png", np.tile(np.arange(64, dtype=np.uint8), (48, 1)), "PNG")
    decoded = read_image(grey, channels=3, size=(32, 32))
    assert decoded.pixels.shape == (32, 32, 3) and decoded.pixels.dtype == np.uint8
    assert (decoded.width, decoded.height) == (64, 48)
    assert np.array_equal(decoded.pixels[..., 0], decoded.pixels[..., 2])  # grey replicated
    import hashlib
    assert decoded.sha256 == hashlib.sha256(grey.read_bytes()).hexdigest()
    rgb = _save(tmp_path / "c.jpg", np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8), "JPEG")
    assert read_image(rgb, channels=1, size=None).pixels.shape == (20, 30, 1)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    wide = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "w.png"
    Image.fromarray(wide).save(path)
    pixels = read_image(path, channels=1, size=None).pixels[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 200


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"just some text\n", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt PNG"),
    ],
)
def test_broken_files_raise_image_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        read_image(path, channels=3, size=(16, 16))


def test_truncated_jpeg_is_an_image_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError):
        read_image(path, channels=3, size=(16, 16))


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "gone.png", channels=1, size=None)


def test_mask_is_boolean_at_size(tmp_path: Path) -> None:
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20, 10:20] = 255
    path = _save(tmp_path / "m.png", mask, "PNG")
    out = read_mask(path, (20, 20))
    assert out.dtype == bool and out.shape == (20, 20) and out.sum() == 25
