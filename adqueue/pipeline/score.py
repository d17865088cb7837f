"""Score a list of images with a loaded model: result rows, heat maps, evaluation maps.

Pure work on files and tensors: claiming, leases and SQL are the runner's (adqueue/runners/shard.py).
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from adqueue.core.clock import utcnow
from adqueue.core.datadir import DataDir, atomic_write_bytes
from adqueue.core.errors import ImageError
from adqueue.data.gpu_decode import gpu_decode_available
from adqueue.data.io import DEFAULT_MAX_BYTES, decode_pixels, read_file
from adqueue.data.loader import Loaded, batched, device_batch, load_stream
from adqueue.data.paths import to_os
from adqueue.data.sources import Item
from adqueue.detectors.base import Scores
from adqueue.pipeline.heatmaps import MAX_OVERLAY_SIDE, render_overlay
from adqueue.pipeline.model_files import LoadedModel

PAINT_BACKLOG = 64


@dataclass(frozen=True)
class ScoreIO:
    """How images reach the model (the worker's settings, core/config.py): decode threads (None:
    one per core; 0: inline), pinned host batches on CUDA, JPEG decoding on the GPU."""

    decode_threads: int | None = None
    pin_memory: bool = True
    gpu_decode: bool = False


@dataclass
class ScoredItems:
    rows: list[dict[str, Any]] = field(default_factory=list)
    n_ok: int = 0
    maps: dict[str, np.ndarray] | None = None  # path -> float32 [H, W], evaluate jobs only
    heatmaps_unwritten: int = 0  # heat maps that could not be written (their rows keep the score)
    unwritten_reason: str | None = None  # why the last one was not, e.g. "No space left on device"


def score_items(
    loaded: LoadedModel,
    items: list[Item],
    *,
    data_dir: DataDir,
    job_id: int,
    run_id: int,
    heatmaps: str,
    keep_maps: bool,
    batch_size: int = 32,
    max_bytes: int = DEFAULT_MAX_BYTES,
    on_batch: Callable[[int], None] | None = None,
    transfer: ScoreIO | None = None,
) -> ScoredItems:
    """Score `items` in batches of `batch_size`, decoding in background threads: one result row per
    item (a score, or the error that kept it from one), heat-map JPEGs under `data_dir` for the
    images `heatmaps` asks for, and (`keep_maps`) every anomaly map for an evaluation.

    A heat map that cannot be written (a full disk) costs only itself: its row keeps its score with
    no heat map, and the output counts it. If scoring stops with an exception (the lease lost, a
    crash), the heat maps this run wrote are removed again: no row will point to them."""
    writes: list[tuple[dict[str, Any], Future[str | None]]] = []
    try:
        output = _score(loaded, items, data_dir=data_dir, job_id=job_id, run_id=run_id, heatmaps=heatmaps,
                        keep_maps=keep_maps, batch_size=batch_size, max_bytes=max_bytes, on_batch=on_batch,
                        transfer=transfer, writes=writes)
    except BaseException:
        remove_heatmaps(data_dir, [row for row, _ in writes])
        raise
    return output


def heatmap_key(path: str) -> str:
    """The file name part of an image's heat map: short, safe, one per path."""
    return hashlib.sha256(path.encode()).hexdigest()[:24]


def remove_heatmaps(data_dir: DataDir, rows: list[dict[str, Any]]) -> None:
    """Delete the heat maps `rows` point to (rows that will never be written)."""
    for row in rows:
        if row.get("heatmap_path"):
            data_dir.resolve(row["heatmap_path"]).unlink(missing_ok=True)


def _score(
    loaded: LoadedModel, items: list[Item], *, data_dir: DataDir, job_id: int, run_id: int, heatmaps: str,
    keep_maps: bool, batch_size: int, max_bytes: int, on_batch: Callable[[int], None] | None,
    transfer: ScoreIO | None, writes: list[tuple[dict[str, Any], Future[str | None]]],
) -> ScoredItems:
    detector = loaded.detector
    transfer = transfer or ScoreIO()
    device = detector.device
    want_maps = keep_maps or heatmaps != "none"
    output = ScoredItems(maps={} if keep_maps else None)
    on_gpu = transfer.gpu_decode and gpu_decode_available(device)
    # Heat maps waiting for the painter hold their map and image: at most PAINT_BACKLOG of them, so
    # memory stays bounded whatever the shard size and however slow the disk (scoring waits).
    backlog = threading.BoundedSemaphore(PAINT_BACKLOG)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="heatmap") as painter:
        stream = load_stream(items, detector.preprocess, max_bytes=max_bytes, threads=transfer.decode_threads,
                             jpeg_for_device=on_gpu, keep_originals=heatmaps != "none")
        for batch in batched(stream, batch_size):
            decoded = [entry for entry in batch if entry.ok]
            scores = None
            if decoded:
                pixels = device_batch(decoded, detector.preprocess, device, pin_memory=transfer.pin_memory)
                if heatmaps == "flagged" and not keep_maps:
                    scores = detector.score_flagged(pixels, loaded.threshold)
                else:
                    scores = detector.score(pixels, with_maps=want_maps)
            position = {id(entry): index for index, entry in enumerate(decoded)}
            values = _BatchValues.of(scores)
            for entry in batch:
                index = position.get(id(entry))
                row = _row(entry, loaded, values, index)
                if row["error"] is None and scores is not None and index is not None:
                    output.n_ok += 1
                    amap = scores.maps[index].numpy() if scores.maps is not None else None
                    if output.maps is not None and amap is not None:
                        output.maps[entry.item.path] = kept_map(amap)
                    if amap is not None and _wants_heatmap(heatmaps, row["is_anomaly"]):
                        target = data_dir.heatmap_file(job_id, heatmap_key(entry.item.path), run_id)
                        row["heatmap_path"] = data_dir.relative(target)
                        backlog.acquire()
                        write = painter.submit(_write_heatmap, entry, amap, loaded.map_range, target)
                        write.add_done_callback(lambda _: backlog.release())
                        writes.append((row, write))
                output.rows.append(row)
            if on_batch is not None:
                on_batch(len(batch))
    for row, write in writes:
        reason = write.result()
        if reason is not None:
            row["heatmap_path"] = None
            output.heatmaps_unwritten += 1
            output.unwritten_reason = reason
    return output


@dataclass(frozen=True)
class _BatchValues:
    """A batch's scores as Python floats, converted once: reading a tensor one element at a time
    costs microseconds an element, on the thread that feeds the model."""

    image: list[float]
    extra: dict[str, list[float]]
    scored_at: datetime

    @classmethod
    def of(cls, scores: Scores | None) -> _BatchValues:
        if scores is None:
            return cls([], {}, utcnow())
        return cls(scores.image.tolist(), {name: values.tolist() for name, values in scores.extra.items()}, utcnow())


def _row(entry: Loaded, loaded: LoadedModel, values: _BatchValues, index: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model_id": loaded.model_id,
        "path": entry.item.path,
        "label": entry.item.label,
        "defect": entry.item.defect,
        "error": entry.error,
        "scored_at": values.scored_at,
        "heatmap_path": None,
        "sha256": None, "score": None, "is_anomaly": None, "width": None, "height": None, "scores": None,
        "file_size": None, "file_mtime_ns": None,
    }
    if index is None or entry.decoded is None:
        return row
    decoded = entry.decoded
    row.update(sha256=decoded.sha256, width=decoded.width, height=decoded.height, file_size=decoded.file_size,
               file_mtime_ns=decoded.file_mtime_ns)
    score = values.image[index]
    if not math.isfinite(score):
        # NaN compares false with any threshold: without this a broken model passes every image.
        row["error"] = f"detector produced a non-finite score ({score})"
        return row
    extra = {name: per_image[index] for name, per_image in values.extra.items()}
    row.update(
        score=score,
        is_anomaly=None if loaded.threshold is None else bool(score > loaded.threshold),
        scores={name: value if math.isfinite(value) else None for name, value in extra.items()} or None,
    )
    return row


def kept_map(amap: np.ndarray) -> np.ndarray:
    """The map as pixel metrics will rank it: float32, as the detectors compute it, so no two pixels
    tie that the detector told apart. float16 halved the disk but clipped everything past 65,504 to
    one value (differnet's NLL gradients reach 1e6: PRO fell to 0), and a log before float16 still
    merges neighbours at its 3 significant digits. NaN becomes the map's lowest value."""
    amap = np.asarray(amap, dtype=np.float32)
    return np.nan_to_num(amap, nan=float(np.nanmin(amap)) if np.isfinite(amap).any() else 0.0,
                         posinf=float(np.finfo(np.float32).max), neginf=float(np.finfo(np.float32).min))


def _wants_heatmap(mode: str, is_anomaly: bool | None) -> bool:
    return mode == "all" or (mode == "flagged" and bool(is_anomaly))


def _write_heatmap(entry: Loaded, amap: np.ndarray, map_range: tuple[float, float], target: Any) -> str | None:
    """Paint and write one heat map; None if written, else why not (the score stands either way)."""
    original = entry.decoded.original if entry.decoded is not None else None
    if original is None:  # a large file: read again, decoded at the overlay's scale
        try:
            bound = (MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE)  # a camera frame need not decode whole for a 1024 px overlay
            # Not read_image: the row has the file's hash already, and hashing it again costs the forward pass CPU.
            original, _ = decode_pixels(read_file(to_os(entry.item.path))[0], channels=3, size=None, at_least=bound)
        except ImageError:
            return "the image changed while it was scored"
    try:
        atomic_write_bytes(target, render_overlay(original, amap, map_range))
    except OSError as exc:  # a full or read-only disk: atomic_write_bytes left nothing behind
        return exc.strerror or str(exc)
    return None


def eval_maps_bytes(maps_by_path: dict[str, np.ndarray]) -> bytes:
    """One shard's anomaly maps as an .npz that evaluation.py reads back (paths, maps, shape)."""
    paths = list(maps_by_path)
    maps = np.stack([maps_by_path[p] for p in paths]) if paths else np.zeros((0, 1, 1), dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, paths=np.array(paths), maps=maps, shape=np.array(maps.shape))
    return buffer.getvalue()
