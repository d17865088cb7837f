"""Safe decoding of one image file: bytes in, a resized array out, or an ImageError.

Everything here runs in decode threads: Pillow releases the GIL while it decodes and resizes, so
a small thread pool keeps the model busy without a process pool.

A JPEG far larger than the model's input (a line camera's 5-20 MP frame for a 260 px model) is
decoded at a reduced scale: libjpeg scales the DCT by 1/2, 1/4 or 1/8 while decoding (Pillow's
`draft`), to the smallest scale that is still no smaller than the input, and the usual resize
takes it from there. One 12 MP JPEG to 260 px: 142-186 ms of one core decoded whole, 19-45 ms
reduced, by how noisy the frame is (benchmarks/decode.py). An image under twice the input size
decodes whole, as before, and so do every other format and the masks. The format, size and
pixel-count checks come first either way.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from adqueue.core.errors import ImageError
from adqueue.data.formats import HEAD_BYTES, image_format

# A factory image is rarely past 100 MP; anything bigger is more likely a decompression bomb.
MAX_PIXELS = 120_000_000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def _claimed_format(data: bytes) -> str | None:
    fmt = image_format(data)
    return None if fmt is None else fmt.name


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray | None  # uint8, [H, W, C] with C = 1 or 3, at the requested size; None: see `encoded`
    width: int  # of the file, before resizing
    height: int
    sha256: str
    file_size: int = 0  # the file as read: with sha256, how `score --skip-scored` knows it again
    file_mtime_ns: int = 0
    # A checked JPEG left for the GPU to decode (read_for_device): its bytes, and no pixels yet.
    encoded: bytes | None = None
    # The whole file's pixels (uint8 [H, W, 1 or 3]) when asked for and small (keep_original): a
    # heat map paints on them instead of reading and decoding the file a second time.
    original: np.ndarray | None = None


def read_image(path: str | Path, *, channels: int, size: tuple[int, int] | None,
               max_bytes: int = DEFAULT_MAX_BYTES, at_least: tuple[int, int] | None = None,
               keep_original: int = 0) -> DecodedImage:
    """Decode `path` (an OS path) to `channels` (1 or 3) and resize to `size` (width, height).

    A large JPEG is decoded at a reduced scale no smaller than `size`, or with no `size` than
    `at_least` (an overlay's bound, say); `width` and `height` are the file's either way. A file
    of at most `keep_original` pixels, decoded whole, also keeps those pixels (`original`)."""
    data, info = read_file(path, max_bytes=max_bytes)
    return _decoded(data, info, channels=channels, size=size, at_least=at_least, keep_original=keep_original)


def _decoded(data: bytes, info: os.stat_result, *, channels: int, size: tuple[int, int] | None,
             at_least: tuple[int, int] | None = None, keep_original: int = 0) -> DecodedImage:
    digest = hashlib.sha256(data).hexdigest()
    pixels, (width, height), original = _decode(data, channels=channels, size=size, at_least=at_least,
                                                keep_original=keep_original)
    return DecodedImage(pixels=pixels, width=width, height=height, sha256=digest, file_size=info.st_size,
                        file_mtime_ns=info.st_mtime_ns, original=original)


def decode_pixels(data: bytes, *, channels: int, size: tuple[int, int] | None,
                  at_least: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [H, W, C] at `size` (or the reduced scale `at_least` asks for, or whole), and the
    file's (width, height)."""
    pixels, full_size, _ = _decode(data, channels=channels, size=size, at_least=at_least, keep_original=0)
    return pixels, full_size


def _decode(data: bytes, *, channels: int, size: tuple[int, int] | None, at_least: tuple[int, int] | None,
            keep_original: int) -> tuple[np.ndarray, tuple[int, int], np.ndarray | None]:
    image, full_size = _decode_eight_bit(data, at_least=size or at_least)
    original = None
    if image.size == full_size and image.width * image.height <= keep_original and image.mode in ("L", "RGB"):
        original = _as_hwc(np.asarray(image))
    # Grey resampled before it becomes RGB: a third of the work for the same bytes (RGB made of grey
    # resamples each channel as the grey), and most line cameras are monochrome.
    grey_first = channels == 3 and image.mode == "L"
    if not grey_first:
        image = _to_channels(image, channels)
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    if grey_first:
        image = image.convert("RGB")
    pixels = np.array(image, dtype=np.uint8)  # a writable copy: torch refuses read-only buffers
    return _as_hwc(pixels), full_size, original


def _as_hwc(pixels: np.ndarray) -> np.ndarray:
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def read_for_device(path: str | Path, *, channels: int, size: tuple[int, int],
                    max_bytes: int = DEFAULT_MAX_BYTES, keep_original: int = 0) -> DecodedImage:
    """As read_image, but a JPEG that a GPU decoder takes (8-bit grey or colour, within the pixel
    limit: checked from its header, as before any decode) comes back undecoded, its bytes in
    `encoded`; every other file is decoded here (and keeps its pixels as read_image's do)."""
    data, info = read_file(path, max_bytes=max_bytes)
    header = _jpeg_header(data)
    if header is None:
        return _decoded(data, info, channels=channels, size=size, keep_original=keep_original)
    return DecodedImage(pixels=None, width=header[0], height=header[1], sha256=hashlib.sha256(data).hexdigest(),
                        file_size=info.st_size, file_mtime_ns=info.st_mtime_ns, encoded=data)


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG nvJPEG decodes, from its header alone; None for anything else."""
    if _claimed_format(data) != "JPEG":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.mode not in ("L", "RGB") or image.width * image.height > MAX_PIXELS:
                    return None  # CMYK, or too large: the CPU path says what is wrong with it
                return image.size
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return None


def read_file(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, os.stat_result]:
    """The bytes (and stat) of a regular image file of at most `max_bytes`, or an ImageError why not.

    Only regular files are opened (a FIFO would block the reader forever, a device never ends);
    the format is checked from the first bytes and the size from the inode before the rest is
    read, so a huge non-image costs nothing. The bytes are those the inode counted: a file still
    being written stays bounded, and the hash and size a row records describe the same bytes."""
    try:
        kind = stat.S_IFMT(os.stat(path).st_mode)
        if kind != stat.S_IFREG:
            raise ImageError(f"not a regular file: {_KINDS.get(kind, 'a special file')}")
        # O_NONBLOCK: should a FIFO appear here after the check, opening it still returns at once.
        # Unbuffered, and asked for the file's own size: a buffered read of "up to max_bytes"
        # allocated that much first, 1.1 of the 1.2 ms a 1.3 MiB camera frame took to read.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb", buffering=0) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ImageError("not a regular file")
            head = os.pread(handle.fileno(), HEAD_BYTES, 0)  # the offset stays at 0 for the read below
            if not head:
                raise ImageError("empty file")
            if _claimed_format(head) is None:
                raise ImageError("not an image (unknown or unsupported format)")
            if info.st_size > max_bytes:
                raise ImageError(f"file too large: {info.st_size / 2**20:.0f} MiB "
                                 f"(limit {max_bytes / 2**20:.0f} MiB, ADQUEUE_MAX_FILE_MB)")
            return _read_up_to(handle, info.st_size), info
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc


def _read_up_to(handle: io.FileIO, count: int) -> bytes:
    """`count` bytes, or fewer at the end of the file (an unbuffered read may return short)."""
    chunks = []
    while count > 0 and (chunk := handle.read(count)):
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)  # one chunk (the usual case) comes back as itself, not a copy


def decode_bytes(data: bytes, *, channels: int) -> Image.Image:
    """The whole image in `channels` (1 or 3), or an ImageError why not."""
    return decode_sized(data, channels=channels, at_least=None)[0]


def decode_sized(data: bytes, *, channels: int,
                 at_least: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    """The image in `channels`, decoded at the smallest reduced scale (JPEG only) that is still at
    least `at_least` (width, height) in both sides, and the file's own (width, height).

    None decodes whole. Files that are not JPEGs, and JPEGs under twice `at_least`, decode whole."""
    image, full_size = _decode_eight_bit(data, at_least=at_least)
    return _to_channels(image, channels), full_size


def _decode_eight_bit(data: bytes, *, at_least: tuple[int, int] | None) -> tuple[Image.Image, tuple[int, int]]:
    """decode_sized before the channels: the file's own mode, 12/16-bit grey scaled to 8 bits."""
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            full_size = image.size
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"image too large: {image.width}x{image.height}")
            if at_least is not None:
                # A no-op for other formats; keeps the mode, so only the scale changes.
                image.draft(None, at_least)
            image.load()
    except UnidentifiedImageError:
        claimed = _claimed_format(data)
        if claimed:
            raise ImageError(f"corrupt {claimed} file: cannot be decoded") from None
        raise ImageError("not an image (unknown or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large: refused as a possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt image: {exc}") from None
    if image.mode in _SIXTEEN_BIT_MODES:
        # Industrial cameras write 12/16-bit grey; scale to 8 bits rather than clip.
        wide = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if wide.max() > 4095 else 4095.0
        image = Image.fromarray(np.clip(wide / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image, full_size


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    if channels == 1:
        return image.convert("L")
    if channels == 3:
        return image.convert("RGB")
    raise ValueError(f"channels must be 1 or 3, not {channels}")


def read_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as a boolean [H, W] array at `size` (width, height)."""
    try:
        data, _ = read_file(path)
        with Image.open(io.BytesIO(data)) as image:
            mask = image.convert("L").resize(size, Image.Resampling.NEAREST)
    except ImageError as exc:
        raise ImageError(f"cannot read mask {path}: {exc}") from None
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read mask {path}: {exc}") from None
    return np.asarray(mask) > 127
