"""The only two ways a file leaves the server: a result's own image, and a result's heat map.

No route takes a path. A request names a result row by id, and:
- its image is served only if the file at that row's path is still a regular image file whose
  SHA-256 is the one recorded when it was scored: a path edited in SQL (to /etc/passwd, say)
  or a file swapped since serves nothing;
- its heat map only from the data dir's heatmaps/ folder (DataDir.resolve follows symlinks and
  refuses anything that ends up outside), and only if it is a PNG.
Bytes are served from memory after the checks, so what was checked is what is sent.
"""

from __future__ import annotations

import hashlib
import os
import stat

from adqueue.core.datadir import DataDir
from adqueue.core.errors import AdqueueError
from adqueue.data.formats import image_format
from adqueue.data.paths import to_os

HEATMAP_FOLDER = "heatmaps"  # where DataDir.heatmap_file writes every heat map
HEATMAP_TYPES = ("image/jpeg", "image/png")  # heat maps were PNG files until 2026-12

class Refused(AdqueueError):
    """This file may not be served; the message says why (for the log, not the client)."""


def media_type(data: bytes) -> str | None:
    """The image type named by the file's first bytes, or None for anything else."""
    fmt = image_format(data)
    return None if fmt is None else fmt.media_type


def _read_regular(path: str, max_bytes: int, *, follow_links: bool = True) -> bytes:
    """The bytes of the regular file at `path`, at most `max_bytes`; Refused for anything else."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        # O_NONBLOCK: a FIFO put in place of an image must not hang a server thread.
        fd = os.open(path, flags)
    except OSError as exc:
        raise Refused(f"cannot open {path!r}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"{path!r} is not a regular file")
        if info.st_size > max_bytes:
            raise Refused(f"{path!r} is larger than {max_bytes} bytes")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Refused(f"{path!r} grew past {max_bytes} bytes")
    return data


def result_image(path_text: str, sha256: str | None, max_bytes: int) -> tuple[bytes, str]:
    """(bytes, media type) of a result row's image, checked against the row's recorded SHA-256."""
    if not sha256:
        raise Refused("the result has no recorded SHA-256 (it was never read)")
    data = _read_regular(to_os(path_text), max_bytes)
    if hashlib.sha256(data).hexdigest() != sha256.lower():
        raise Refused(f"{path_text!r} changed since it was scored (SHA-256 differs)")
    kind = media_type(data)
    if kind is None:
        raise Refused(f"{path_text!r} is not an image")
    return data, kind


def heatmap_image(data_dir: DataDir, relative: str, max_bytes: int) -> tuple[bytes, str]:
    """(bytes, media type) of a heat map stored at `relative` (to the data dir), a JPEG (a PNG if older) under heatmaps/."""
    try:
        path = data_dir.resolve(relative)  # resolves symlinks; refuses anything outside the data dir
    except (AdqueueError, OSError, ValueError) as exc:
        raise Refused(str(exc)) from None
    if not path.is_relative_to(data_dir.root / HEATMAP_FOLDER):
        raise Refused(f"{relative!r} is not under the data dir's {HEATMAP_FOLDER}/")
    # The resolved path has no link left in it; O_NOFOLLOW refuses one swapped in since.
    data = _read_regular(str(path), max_bytes, follow_links=False)
    kind = media_type(data)
    if kind not in HEATMAP_TYPES:
        raise Refused(f"{relative!r} is not a heat map (JPEG, or PNG before 2026-12)")
    return data, kind
