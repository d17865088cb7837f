"""Score one shard: claim it, decode and score its images in batches, write everything at once.

The same function serves score and evaluate jobs (evaluate also keeps the anomaly maps for the
pixel metrics). A file that cannot be decoded becomes a result row with an error; an exception
anywhere else releases the shard for another attempt, up to `max_attempts`, after which its
images get error rows and the shard is failed, so a poisoned shard cannot loop forever.
"""

from __future__ import annotations

import hashlib
import io
import logging
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from adqueue.artifacts import atomic_write_bytes
from adqueue.data.io import read_image
from adqueue.data.loader import Loaded, batched, load_stream, stack_pixels, to_float
from adqueue.data.sources import Item
from adqueue.detectors.base import Detector, Scores
from adqueue.errors import ImageError
from adqueue.heatmaps import render_overlay
from adqueue.service.context import Context
from adqueue.service.finishing import finish_if_complete
from adqueue.service.models import LoadedModel
from adqueue.store.models import JobKind, ShardStatus, utcnow
from adqueue.store.writes import ClaimedShard, claim_shard, complete_shard, release_shard, upsert_results

log = logging.getLogger(__name__)

HEATMAP_MODES = ("flagged", "all", "none")


class ShardOutcome(Enum):
    DONE = "done"
    RETRY = "retry"  # released for another attempt
    FAILED = "failed"  # gave up after max attempts
    SKIPPED = "skipped"  # already finished by someone else


ModelProvider = Callable[[int], LoadedModel]


def run_shard(
    ctx: Context,
    shard_id: int,
    *,
    models: ModelProvider,
    worker: str,
    on_batch: Callable[[int], None] | None = None,
) -> ShardOutcome:
    with ctx.store.session() as session:
        claimed = claim_shard(session, shard_id, worker)
    if claimed is None:
        return ShardOutcome.SKIPPED
    if claimed.attempts > ctx.settings.max_attempts:
        _give_up(ctx, claimed, f"gave up after {claimed.attempts - 1} attempt(s)")
        return ShardOutcome.FAILED
    try:
        if claimed.model_id is None:
            raise RuntimeError(f"job {claimed.job_id} has no model")
        output = score_items(
            ctx, models(claimed.model_id), [Item.from_row(row) for row in claimed.items],
            job_id=claimed.job_id,
            heatmaps=str(claimed.job_params.get("heatmaps", "flagged")),
            keep_maps=claimed.job_kind == JobKind.EVALUATE,
            on_batch=on_batch,
        )
        if output.maps is not None:
            _save_eval_maps(ctx, claimed, output)
        with ctx.store.session() as session:
            rows = [{**row, "job_id": claimed.job_id, "shard_id": claimed.shard_id} for row in output.rows]
            upsert_results(session, rows)
            complete_shard(session, claimed, n_ok=output.n_ok, n_failed=len(rows) - output.n_ok)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, then retried or given up
        error = f"{type(exc).__name__}: {exc}"
        log.error("shard %s (job %s) attempt %s failed: %s\n%s", shard_id, claimed.job_id,
                  claimed.attempts, error, traceback.format_exc())
        if claimed.attempts < ctx.settings.max_attempts:
            with ctx.store.session() as session:
                release_shard(session, shard_id, error)
            return ShardOutcome.RETRY
        _give_up(ctx, claimed, error)
        return ShardOutcome.FAILED
    finish_if_complete(ctx, claimed.job_id)
    return ShardOutcome.DONE


def _give_up(ctx: Context, claimed: ClaimedShard, error: str) -> None:
    """Fail the shard, with an error row for each of its images so none goes missing."""
    message = f"shard failed: {error}"
    rows = [
        {
            "job_id": claimed.job_id, "shard_id": claimed.shard_id, "model_id": claimed.model_id,
            "path": item.path, "label": item.label, "defect": item.defect, "error": message,
            "scored_at": utcnow(),
        }
        for item in (Item.from_row(row) for row in claimed.items)
    ]
    with ctx.store.session() as session:
        upsert_results(session, rows)
        complete_shard(session, claimed, n_ok=0, n_failed=len(rows), status=ShardStatus.FAILED, error=error)
    finish_if_complete(ctx, claimed.job_id)


@dataclass
class ScoredItems:
    rows: list[dict[str, Any]] = field(default_factory=list)
    n_ok: int = 0
    maps: dict[str, np.ndarray] | None = None  # path -> float16 [H, W], evaluate jobs only


def score_items(
    ctx: Context,
    loaded: LoadedModel,
    items: list[Item],
    *,
    job_id: int,
    heatmaps: str,
    keep_maps: bool,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ScoredItems:
    detector = loaded.detector
    batch_size = batch_size or ctx.settings.batch_size
    want_maps = keep_maps or heatmaps != "none"
    output = ScoredItems(maps={} if keep_maps else None)
    writes: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="heatmap") as painter:
        for batch in batched(load_stream(items, detector.preprocess), batch_size):
            decoded = [entry for entry in batch if entry.ok]
            scores = None
            if decoded:
                pixels = to_float(stack_pixels(decoded)).to(detector.device)
                if want_maps and detector.costly_maps and heatmaps == "flagged" and not keep_maps:
                    scores = _maps_for_flagged(detector, pixels, loaded.threshold)
                else:
                    scores = detector.score(pixels, with_maps=want_maps)
            position = {id(entry): index for index, entry in enumerate(decoded)}
            for entry in batch:
                index = position.get(id(entry))
                row = _row(entry, loaded, scores, index)
                if index is not None and scores is not None:
                    output.n_ok += 1
                    amap = scores.maps[index].numpy() if scores.maps is not None else None
                    if output.maps is not None and amap is not None:
                        output.maps[entry.item.path] = _as_float16(amap)
                    if amap is not None and _wants_heatmap(heatmaps, row["is_anomaly"]):
                        key = hashlib.sha256(entry.item.path.encode()).hexdigest()[:24]
                        target = ctx.data_dir.heatmap_file(job_id, key)
                        row["heatmap_path"] = ctx.data_dir.relative(target)
                        writes.append(painter.submit(_write_heatmap, entry.item.path, amap, loaded.map_range, target))
                output.rows.append(row)
            if on_batch is not None:
                on_batch(len(batch))
        for write in writes:
            write.result()
    return output


def _maps_for_flagged(detector: Detector, pixels: torch.Tensor, threshold: float | None) -> Scores:
    """Score the batch, then compute maps only for the images above the threshold.

    For detectors whose maps cost a backward pass, a nightly dump with few flagged images then
    costs little more than its scores. Unflagged images get no map (and no heat map).
    """
    scores = detector.score(pixels, with_maps=False)
    flagged = torch.zeros(len(pixels), dtype=torch.bool) if threshold is None else scores.image > threshold
    maps = torch.zeros((len(pixels), *pixels.shape[-2:]))
    if flagged.any():
        picked = flagged.nonzero()[:, 0]
        maps[picked] = detector.score(pixels[picked.to(pixels.device)], with_maps=True).maps
    return Scores(image=scores.image, maps=maps, extra=scores.extra)


def _row(entry: Loaded, loaded: LoadedModel, scores: Any, index: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model_id": loaded.model_id,
        "path": entry.item.path,
        "label": entry.item.label,
        "defect": entry.item.defect,
        "error": entry.error,
        "scored_at": utcnow(),
        "heatmap_path": None,
        "sha256": None, "score": None, "is_anomaly": None, "width": None, "height": None, "scores": None,
    }
    if index is None or entry.decoded is None:
        return row
    score = float(scores.image[index])
    row.update(
        sha256=entry.decoded.sha256,
        width=entry.decoded.width,
        height=entry.decoded.height,
        score=score,
        is_anomaly=None if loaded.threshold is None else bool(score > loaded.threshold),
        scores={name: float(values[index]) for name, values in scores.extra.items()} or None,
    )
    return row


def _as_float16(amap: np.ndarray) -> np.ndarray:
    """Half the disk of float32; values past float16's range are clipped, not made infinite."""
    limit = float(np.finfo(np.float16).max)
    return np.clip(np.nan_to_num(amap, nan=0.0), -limit, limit).astype(np.float16)


def _wants_heatmap(mode: str, is_anomaly: bool | None) -> bool:
    return mode == "all" or (mode == "flagged" and bool(is_anomaly))


def _write_heatmap(path: str, amap: np.ndarray, map_range: tuple[float, float], target: Any) -> None:
    try:
        original = read_image(path, channels=3, size=None).pixels
    except ImageError:
        return  # the file changed under us; the score stands, the overlay is skipped
    atomic_write_bytes(target, render_overlay(original, amap, map_range))


def _save_eval_maps(ctx: Context, claimed: ClaimedShard, output: ScoredItems) -> None:
    assert output.maps is not None
    paths = list(output.maps)
    maps = np.stack([output.maps[p] for p in paths]) if paths else np.zeros((0, 1, 1), dtype=np.float16)
    buffer = io.BytesIO()
    np.savez(buffer, paths=np.array(paths), maps=maps, shape=np.array(maps.shape))
    atomic_write_bytes(ctx.data_dir.eval_maps_file(claimed.job_id, claimed.seq), buffer.getvalue())
