"""Turn items into model-ready batches, decoding in background threads.

The window of in-flight decodes is bounded, so memory stays constant however long the item
stream is; order is preserved so results line up with items.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from adqueue.core.errors import ImageError
from adqueue.data.io import DEFAULT_MAX_BYTES, DecodedImage, decode_pixels, read_for_device, read_image
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


def load_one(item: Item, preprocess: Preprocess, max_bytes: int = DEFAULT_MAX_BYTES, *,
             jpeg_for_device: bool = False, keep_originals: bool = False) -> Loaded:
    """Read and decode one item; with `jpeg_for_device`, a JPEG is read and checked but left for the
    GPU to decode (its `decoded.encoded`). With `keep_originals`, a small image keeps its whole
    decoded pixels too (`decoded.original`, for a heat map; _original_pixels)."""
    read = read_for_device if jpeg_for_device else read_image
    try:
        decoded = read(to_os(item.path), channels=preprocess.channels, size=preprocess.size_wh, max_bytes=max_bytes,
                       keep_original=_original_pixels(preprocess) if keep_originals else 0)
    except ImageError as exc:
        return Loaded(item, None, str(exc))
    return Loaded(item, decoded, None)


def _original_pixels(preprocess: Preprocess) -> int:
    """The largest image that keeps its whole pixels: four times the input (a 192 px file for a 256 px
    model), at most 1 MP, so that what the decode window holds stays a few batches' worth."""
    return min(4 * preprocess.size**2, 1 << 20)


def load_stream(
    items: Iterable[Item], preprocess: Preprocess, *, threads: int | None = None, window: int = 64,
    max_bytes: int = DEFAULT_MAX_BYTES, jpeg_for_device: bool = False, keep_originals: bool = False,
) -> Iterator[Loaded]:
    """Decode `items` in order (load_one), keeping at most `window` decodes in flight (`threads`
    None: one per core; 0: in the caller's thread, overlapping nothing)."""
    load = partial(load_one, preprocess=preprocess, max_bytes=max_bytes, jpeg_for_device=jpeg_for_device,
                   keep_originals=keep_originals)
    if threads == 0:
        for item in items:
            yield load(item)
        return
    with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="decode") as pool:
        pending: deque[Future[Loaded]] = deque()
        for item in items:
            pending.append(pool.submit(load, item))
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


def stack_pixels(entries: Iterable[Loaded], *, pin: bool = False) -> torch.Tensor:
    """uint8 [B, C, H, W] from decoded entries (errors must be filtered out first): a channels-last
    view of the [B, H, W, C] the pixels are stacked into with one copy, in pinned memory with `pin`
    (a CUDA worker's non-blocking copy then overlaps the host's next work)."""
    arrays = [entry.decoded.pixels for entry in entries if entry.decoded is not None]
    assert all(array is not None for array in arrays), "JPEGs left for the GPU go through device_batch"
    height, width, channels = arrays[0].shape  # type: ignore[union-attr]  # checked just above
    host = torch.empty((len(arrays), height, width, channels), dtype=torch.uint8, pin_memory=pin)
    np.stack(arrays, out=host.numpy())  # type: ignore[arg-type]  # no None left (asserted)
    return host.permute(0, 3, 1, 2)


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] to float32 in [0, 1], the input every detector takes, in the pixels'
    own layout: decoded images arrive channels-last, which is what a channels-last backbone
    reads fastest (a contiguous-format one normalises into its layout in the same pass)."""
    return torch.empty_like(pixels, dtype=torch.float32).copy_(pixels).div_(255.0)


def device_batch(entries: list[Loaded], preprocess: Preprocess, device: torch.device, *,
                 pin_memory: bool = True) -> torch.Tensor:
    """float [B, C, H, W] in [0, 1] on `device` for decoded entries: pinned, non-blocking copies of
    uint8 pixels on CUDA (a quarter of float32's bytes), converted there. JPEGs left for the GPU
    (`decoded.encoded`) are decoded on it; any it refuses is decoded on the CPU, and any the CPU
    refuses too becomes an error entry, taken out of `entries` (in place)."""
    deferred = [entry for entry in entries if entry.decoded is not None and entry.decoded.pixels is None]
    on_device: dict[int, torch.Tensor] = {}
    if deferred:
        from adqueue.data.gpu_decode import decode_jpegs

        decoded = decode_jpegs([entry.decoded.encoded or b"" for entry in deferred if entry.decoded is not None],
                               channels=preprocess.channels, size=preprocess.size_wh, device=device)
        for entry, pixels in zip(deferred, decoded, strict=True):
            if pixels is not None:
                on_device[id(entry)] = pixels
            else:
                _decode_on_cpu(entry, preprocess)
        entries[:] = [entry for entry in entries if entry.ok]
    host = [entry for entry in entries if id(entry) not in on_device]
    cuda = device.type == "cuda"
    batch = torch.empty((0,))
    if host:
        pixels = stack_pixels(host, pin=pin_memory and cuda)
        batch = to_float(pixels.to(device, non_blocking=True))
    if not on_device:
        return batch
    # Mixed: put the GPU-decoded images and the CPU-decoded ones back in their entries' order.
    out = torch.empty((len(entries), preprocess.channels, preprocess.size, preprocess.size), device=device)
    rows = iter(range(len(host)))
    for index, entry in enumerate(entries):
        out[index] = on_device[id(entry)] if id(entry) in on_device else batch[next(rows)]
    return out


def _decode_on_cpu(entry: Loaded, preprocess: Preprocess) -> None:
    """The CPU path for a JPEG the GPU refused; an error entry if the CPU refuses it as well."""
    assert entry.decoded is not None and entry.decoded.encoded is not None
    try:
        pixels, _ = decode_pixels(entry.decoded.encoded, channels=preprocess.channels, size=preprocess.size_wh)
    except ImageError as exc:
        entry.decoded, entry.error = None, str(exc)
        return
    entry.decoded = replace(entry.decoded, pixels=pixels, encoded=None)
