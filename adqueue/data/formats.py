"""The image formats adqueue reads, known by their first bytes (before a file is read whole)."""

from __future__ import annotations

from typing import NamedTuple


class ImageFormat(NamedTuple):
    name: str
    media_type: str  # as browsers name it


_PNM = ImageFormat("PNM", "image/x-portable-anymap")
_SIGNATURES: tuple[tuple[bytes, ImageFormat], ...] = (
    (b"\x89PNG", ImageFormat("PNG", "image/png")), (b"\xff\xd8\xff", ImageFormat("JPEG", "image/jpeg")),
    (b"BM", ImageFormat("BMP", "image/bmp")), (b"II*\x00", ImageFormat("TIFF", "image/tiff")),
    (b"MM\x00*", ImageFormat("TIFF", "image/tiff")), (b"GIF8", ImageFormat("GIF", "image/gif")),
    (b"\x00\x00\x00\x0cjP  ", ImageFormat("JPEG 2000", "image/jp2")), (b"\xffO\xffQ", ImageFormat("JPEG 2000", "image/jp2")),
    (b"P1", _PNM), (b"P2", _PNM), (b"P3", _PNM), (b"P4", _PNM), (b"P5", _PNM), (b"P6", _PNM),
)
_WEBP = ImageFormat("WebP", "image/webp")
HEAD_BYTES = 16  # enough for every signature


def image_format(head: bytes) -> ImageFormat | None:
    """The format a file's first bytes announce, or None for anything adqueue does not read."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _WEBP
    return next((fmt for magic, fmt in _SIGNATURES if head.startswith(magic)), None)
