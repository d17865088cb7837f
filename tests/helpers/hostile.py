"""A camera share at its worst: every kind of file a nightly dump can hold, and what each must give.

`build_hostile_dump` writes good images under odd names, broken and exotic images, and special
files (a FIFO, a socket, links) into one folder, and returns what adqueue must say about each:
a score, or an error containing a given phrase. Folders (even one named `x.png`) give no row.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Names that are legal on Linux and have broken tools before: undecodable bytes, a newline, a
# leading dash, the 255-byte limit, runs of spaces, non-ASCII text, a backslash.
ODD_NAMES: dict[str, bytes] = {
    "invalid UTF-8": b"l_\xe9\xff.png",
    "newline": b"new\nline.png",
    "leading dash": b"-rf.png",
    "255 bytes": b"n" * 251 + b".png",
    "spaces": b"  two  spaces .png",
    "unicode": "ünïcødé_画像.png".encode(),
    "backslash": b"back\\slash\\x41.png",
}


@dataclass(frozen=True)
class Expected:
    name: bytes  # the file name as bytes
    error: str | None  # None: scored; else a phrase its error row must contain


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (a decompression bomb's opening)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs: object) -> bytes:
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def build_hostile_dump(folder: Path, good: Path, *, max_file_mb: float) -> list[Expected]:
    """Fill `folder`; `good` is a real image; files over `max_file_mb` must be refused unread."""
    folder.mkdir(parents=True, exist_ok=True)
    base = os.fsencode(folder)
    expected: list[Expected] = []

    def put(name: bytes, data: bytes, error: str | None) -> None:
        with open(os.path.join(base, name), "wb") as handle:
            handle.write(data)
        expected.append(Expected(name, error))

    image = good.read_bytes()
    for name in ODD_NAMES.values():
        put(name, image, None)
    rng = np.random.default_rng(0)
    texture = np.asarray(Image.open(good).convert("RGB"))
    put(b"grey16.png", _encode((rng.integers(0, 65535, (64, 64))).astype(np.uint16), "PNG"), None)
    put(b"cmyk.jpg", _encode(texture, "JPEG", "CMYK"), None)
    palette = Image.fromarray(texture).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    put(b"palette_transparent.png", buffer.getvalue(), None)
    put(b"one_pixel.png", _encode(texture[:1, :1], "PNG"), None)
    put(b"scan.tif", _encode(texture, "TIFF"), None)
    put(b"anim.gif", _encode(texture, "GIF"), None)
    put(b"empty.png", b"", "empty file")
    put(b"truncated.jpg", _encode(texture, "JPEG")[:400], "corrupt")
    put(b"truncated.png", image[: len(image) // 3], "corrupt")
    put(b"bomb.png", _png_header(50_000, 50_000), "image too large")
    put(b"notes.txt", b"operator notes: line 3 camera refocused\n", "not an image")
    oversized = b"\x89PNG\r\n\x1a\n" + b"\0" * int((max_file_mb + 1) * 2**20)
    put(b"huge.png", oversized, "file too large")
    os.mkfifo(os.path.join(base, b"b.png"))
    expected.append(Expected(b"b.png", "named pipe"))
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.path.join(base, b"s.png"))  # left bound: a live socket file
    expected.append(Expected(b"s.png", "socket"))
    os.symlink(b"loop2.png", os.path.join(base, b"loop1.png"))
    os.symlink(b"loop1.png", os.path.join(base, b"loop2.png"))
    expected += [Expected(b"loop1.png", "symbolic links"), Expected(b"loop2.png", "symbolic links")]
    os.symlink(b"nowhere.png", os.path.join(base, b"dangling.png"))
    expected.append(Expected(b"dangling.png", "No such file"))
    os.symlink(b"/dev/null", os.path.join(base, b"devnull.png"))
    expected.append(Expected(b"devnull.png", "character device"))
    (folder / "x.png").mkdir()  # a folder named like an image: walked into, no row of its own
    shutil.copy(good, folder / "x.png" / "inside.png")
    expected.append(Expected(b"x.png/inside.png", None))
    return expected
