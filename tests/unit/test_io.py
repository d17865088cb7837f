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


def _camera_frame(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    """A smooth large JPEG (a gradient with a bright square), as a line camera writes at a larger scale."""
    width, height = size
    x = np.linspace(0, 200, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 55, height, dtype=np.float32)[:, None]
    grey = (x + y).astype(np.uint8)
    grey[height // 3:height // 2, width // 3:width // 2] = 250
    array = grey if mode == "L" else np.stack([grey, grey[::-1], 255 - grey], axis=-1)
    return _save(path, array, "JPEG", quality=95)


@pytest.mark.parametrize("channels", [1, 3])
def test_large_jpeg_decodes_at_a_reduced_scale_like_the_whole_image(tmp_path: Path, channels: int) -> None:
    from adqueue.data.io import decode_bytes, decode_sized

    path = _camera_frame(tmp_path / "frame.jpg", (1600, 1200))
    data = path.read_bytes()
    reduced, full_size = decode_sized(data, channels=channels, at_least=(96, 96))
    assert full_size == (1600, 1200)
    assert reduced.size == (200, 150)  # 1/8: the smallest DCT scale still no smaller than 96 px
    decoded = read_image(path, channels=channels, size=(96, 96))
    assert (decoded.width, decoded.height) == (1600, 1200) and decoded.pixels.shape == (96, 96, channels)
    whole = decode_bytes(data, channels=channels).resize((96, 96), Image.Resampling.BILINEAR, reducing_gap=3.0)
    difference = np.abs(decoded.pixels.astype(int) - np.asarray(whole).reshape(96, 96, channels).astype(int))
    assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12


def test_reduced_scale_stops_at_the_input_size(tmp_path: Path) -> None:
    from adqueue.data.io import decode_sized

    data = _camera_frame(tmp_path / "frame.jpg", (1000, 700), mode="L").read_bytes()
    # 700 // 300 = 2: half scale (500x350) is the smallest with both sides at least 300.
    assert decode_sized(data, channels=1, at_least=(300, 300))[0].size == (500, 350)
    # Under twice the input size: decoded whole, as every other format.
    assert decode_sized(data, channels=1, at_least=(400, 400))[0].size == (1000, 700)
    png = _save(tmp_path / "frame.png", np.zeros((700, 1000), dtype=np.uint8), "PNG").read_bytes()
    assert decode_sized(png, channels=1, at_least=(64, 64))[0].size == (1000, 700)


def test_pixel_limit_is_checked_before_a_reduced_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adqueue.data.io as io_module

    path = _camera_frame(tmp_path / "frame.jpg", (1600, 1200))
    monkeypatch.setattr(io_module, "MAX_PIXELS", 1600 * 1200 - 1)
    with pytest.raises(ImageError, match="too large: 1600x1200"):
        read_image(path, channels=3, size=(64, 64))


def test_decode_threads_follow_the_cores_the_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from adqueue.data import loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert loader.available_cores() == 6 and loader.default_threads() == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert loader.default_threads() == 2  # never fewer than two: one may wait on the disk


def test_jpegs_left_for_the_device_decode_there_or_fall_back_in_order(tmp_path: Path) -> None:
    import torch

    from adqueue.data.loader import device_batch, load_stream, stack_pixels, to_float
    from adqueue.data.preprocess import Preprocess
    from adqueue.data.sources import Item

    good = _camera_frame(tmp_path / "a.jpg", (400, 300))
    png = _save(tmp_path / "b.png", np.full((50, 60, 3), 90, dtype=np.uint8), "PNG")
    cut = tmp_path / "c.jpg"  # a valid header, then nothing: both decoders refuse it
    cut.write_bytes(good.read_bytes()[:700])
    prep = Preprocess(size=64, channels=3)
    items = [Item(str(good)), Item(str(png)), Item(str(cut))]
    entries = [entry for entry in load_stream(items, prep, threads=0, jpeg_for_device=True) if entry.ok]
    assert [entry.decoded.pixels is None for entry in entries if entry.decoded] == [True, False, True]
    # The device decoder run on the CPU: the same code a CUDA worker runs, with torchvision's CPU decoder.
    batch = device_batch(entries, prep, torch.device("cpu"))
    assert [Path(entry.item.path).name for entry in entries] == ["a.jpg", "b.png"] and batch.shape == (2, 3, 64, 64)
    reference = to_float(stack_pixels(list(load_stream(items[:2], prep, threads=0))))
    assert torch.allclose(batch[1], reference[1]) and (batch[0] - reference[0]).abs().mean() < 0.03


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grey_files_resampled_before_they_become_rgb_give_the_same_pixels(tmp_path: Path, fmt: str) -> None:
    from adqueue.data.io import decode_sized

    rng = np.random.default_rng(5)
    for index, (shape, size) in enumerate([((192, 192), (256, 256)), ((300, 410), (96, 96)), ((61, 47), (128, 64))]):
        path = _save(tmp_path / f"g{index}.{fmt.lower()}", rng.integers(0, 256, shape, dtype=np.uint8), fmt)
        got = read_image(path, channels=3, size=size).pixels
        # The order every other mode takes: to RGB first (at the same reduced scale), then resized.
        expected = np.asarray(decode_sized(path.read_bytes(), channels=3, at_least=size)[0].resize(
            size, Image.Resampling.BILINEAR, reducing_gap=3.0))
        assert got.shape == (size[1], size[0], 3) and got.flags.writeable
        assert np.array_equal(got, expected)


def test_small_files_keep_their_whole_pixels_when_asked(tmp_path: Path) -> None:
    from adqueue.data.io import decode_bytes

    rng = np.random.default_rng(6)
    grey = _save(tmp_path / "g.png", rng.integers(0, 256, (40, 50), dtype=np.uint8), "PNG")
    colour = _save(tmp_path / "c.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), "PNG")
    assert read_image(grey, channels=3, size=(32, 32)).original is None  # not asked
    kept = read_image(grey, channels=3, size=(32, 32), keep_original=2000).original
    assert kept is not None and kept.shape == (40, 50, 1)
    assert np.array_equal(kept[..., 0], np.asarray(decode_bytes(grey.read_bytes(), channels=1)))
    kept = read_image(colour, channels=1, size=(32, 32), keep_original=2000).original  # a grey model, a colour file
    assert kept is not None and np.array_equal(kept, np.asarray(decode_bytes(colour.read_bytes(), channels=3)))
    assert read_image(colour, channels=3, size=(32, 32), keep_original=1999).original is None  # over the bound
    frame = _camera_frame(tmp_path / "frame.jpg", (1600, 1200))
    assert read_image(frame, channels=3, size=(96, 96), keep_original=10**8).original is None  # decoded reduced


@pytest.mark.parametrize("side", [1, 600])
def test_a_file_is_read_whole_and_its_size_is_that_of_the_bytes_read(tmp_path: Path, side: int) -> None:
    # Read unbuffered to the size fstat gave, after the format's first bytes were checked: every
    # byte once, in order, for a 1-pixel file and a 1 MiB one.
    from adqueue.data.io import read_file

    noise = np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8)
    path = _save(tmp_path / "n.png", noise, "PNG", compress_level=0)
    data, info = read_file(path)
    assert data == path.read_bytes() and info.st_size == len(data)
    assert len(data) > 2**20 if side == 600 else len(data) < 100
