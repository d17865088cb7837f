"""Turn items into model-ready batches, decoding in background threads.

The window of in-flight decodes is bounded, so memory stays constant however long the item
stream is; order is preserved so results line up with items.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from adqueue.core.errors import ImageError
from adqueue.data.io import DEFAULT_MAX_BYTES, DecodedImage, read_image
from adqueue.data.paths import to_os
from adqueue.data.preprocess import Preprocess
from adqueue.data.sources import Item


@dataclass
class Loaded:
    item: Item
    decoded: DecodedImage | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.decoded is not None


def available_cores() -> int:
    """The cores this process may run on: its affinity mask (a container's cpuset, `taskset`,
    a worker pinned to some cores), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Decode threads: one per core the process has (at least 2, so a file read that waits on
    the disk never leaves the pool idle), at most 16."""
    return max(2, min(16, available_cores()))


def load_one(item: Item, preprocess: Preprocess, max_bytes: int = DEFAULT_MAX_BYTES) -> Loaded:
    try:
        decoded = read_image(to_os(item.path), channels=preprocess.channels, size=preprocess.size_wh,
                             max_bytes=max_bytes)
    except ImageError as exc:
        return Loaded(item, None, str(exc))
    return Loaded(item, decoded, None)


def load_stream(
    items: Iterable[Item], preprocess: Preprocess, *, threads: int | None = None, window: int = 64,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[Loaded]:
    """Decode `items` in order, keeping at most `window` decodes in flight."""
    with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="decode") as pool:
        pending: deque[Future[Loaded]] = deque()
        for item in items:
            pending.append(pool.submit(load_one, item, preprocess, max_bytes))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def batched(loaded: Iterable[Loaded], batch_size: int) -> Iterator[list[Loaded]]:
    batch: list[Loaded] = []
    for entry in loaded:
        batch.append(entry)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def stack_pixels(entries: Iterable[Loaded]) -> torch.Tensor:
    """uint8 [B, C, H, W] from decoded entries (errors must be filtered out first)."""
    arrays = [entry.decoded.pixels for entry in entries if entry.decoded is not None]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] to float32 in [0, 1], the input every detector takes."""
    return pixels.float().div_(255.0)
