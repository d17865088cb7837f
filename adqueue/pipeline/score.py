"""Score one shard: claim it under a lease, score its images in batches, write everything at once.

The same function serves score and evaluate jobs (evaluate also keeps the anomaly maps for the
pixel metrics). A file that cannot be decoded becomes a result row with an error. The lease is
renewed as batches complete; a run that finds it gone (cancelled, or expired and taken over)
stops and writes nothing, and the rows of a shard are written in the same transaction as its
guarded completion. An exception releases the shard for another attempt, up to `max_attempts`,
after which its images get error rows and the shard is failed, so a poisoned shard cannot loop
forever; a missing or broken model file fails the whole job at once instead, since no retry can
fix it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from adqueue.core.datadir import atomic_write_bytes
from adqueue.data.io import read_image
from adqueue.data.loader import Loaded, batched, load_stream, stack_pixels, to_float
from adqueue.data.paths import to_os
from adqueue.data.sources import Item
from adqueue.detectors.base import Detector, Scores
from adqueue.core.errors import ImageError, ModelUnavailable
from adqueue.core.failpoints import failpoint
from adqueue.pipeline.heatmaps import render_overlay
from adqueue.jobs.context import Context
from adqueue.jobs.finishing import after_shard_closed
from adqueue.jobs.leases import DB_RETRY_S, Lease, LeaseLost, lease_until
from adqueue.pipeline.model_files import LoadedModel
from adqueue.store.models import JobKind, JobStatus, RunOutcome, ShardStatus, utcnow
from adqueue.store.queries import shard_job_id
from adqueue.store.transitions import (
    ClaimedShard,
    claim_shard,
    complete_shard,
    end_run,
    give_up_shard,
    release_shard,
    renew_shard_lease,
    stop_job,
)

if TYPE_CHECKING:
    from adqueue.jobs.ports import Dispatcher

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 300.0


class ShardOutcome(Enum):
    DONE = "done"
    RETRY = "retry"  # released for another attempt (its message is already sent)
    FAILED = "failed"  # gave up after max attempts
    SKIPPED = "skipped"  # closed, or held by a live run: a duplicate delivery
    LOST = "lost"  # the lease was lost mid-run (cancelled, or expired and taken over): nothing written
    JOB_FAILED = "job_failed"  # a permanent error (the model file) failed the whole job


ModelProvider = Callable[[int], LoadedModel]


def run_shard(
    ctx: Context,
    shard_id: int,
    *,
    models: ModelProvider,
    worker: str,
    dispatcher: Dispatcher,
    on_batch: Callable[[int], None] | None = None,
) -> ShardOutcome:
    claimed = ctx.store.transaction(
        lambda session: claim_shard(session, shard_id, worker, lease_until=lease_until(ctx)), retry_s=DB_RETRY_S)
    if claimed is None:
        # A duplicate delivery, or the redelivery of a shard whose worker died right after closing
        # it: make sure its job does not stay behind.
        job_id = ctx.store.transaction(lambda session: shard_job_id(session, shard_id))
        if job_id is not None:
            after_shard_closed(ctx, job_id, dispatcher)
        return ShardOutcome.SKIPPED
    if claimed.attempts > ctx.settings.max_attempts:
        _give_up(ctx, claimed, f"gave up after {claimed.attempts - 1} attempt(s)")
        after_shard_closed(ctx, claimed.job_id, dispatcher)
        return ShardOutcome.FAILED
    def batch_done(n: int) -> None:
        lease.touch()
        if on_batch is not None:
            on_batch(n)

    try:
        if claimed.model_id is None:
            raise ModelUnavailable(f"job {claimed.job_id} has no model")
        loaded = models(claimed.model_id)
        # Timed from here: loading a model once per process is not a step to stretch the lease by.
        lease = Lease(ctx, lambda session, until: renew_shard_lease(session, shard_id, claimed.run_id, until),
                      f"shard {shard_id} (job {claimed.job_id})")
        lease.touch(force=True)
        output = score_items(
            ctx, loaded, [Item.from_row(row) for row in claimed.items],
            job_id=claimed.job_id,
            heatmaps=str(claimed.job_params.get("heatmaps", "flagged")),
            keep_maps=claimed.job_kind == JobKind.EVALUATE,
            on_batch=batch_done,
        )
        if output.maps is not None:
            _save_eval_maps(ctx, claimed, output)
        won = ctx.store.transaction(lambda session: complete_shard(
            session, claimed, output.rows, n_ok=output.n_ok, n_failed=len(output.rows) - output.n_ok),
            retry_s=DB_RETRY_S)
        if not won:
            raise LeaseLost(f"shard {shard_id} (job {claimed.job_id}) lost its lease before its results were "
                            "written (cancelled, or taken over after it expired)")
    except LeaseLost as exc:
        log.warning("%s; its results were not written", exc)
        with ctx.store.session() as session:
            end_run(session, claimed.run_id, RunOutcome.LOST, str(exc))
        return ShardOutcome.LOST
    except ModelUnavailable as exc:
        log.error("job %s failed: %s", claimed.job_id, exc)
        with ctx.store.session() as session:
            stop_job(session, claimed.job_id, status=JobStatus.FAILED, error=str(exc), shards_to=ShardStatus.FAILED,
                     outcome=RunOutcome.FAILED)
        return ShardOutcome.JOB_FAILED
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, then retried or given up
        error = f"{type(exc).__name__}: {exc}"
        log.error("shard %s (job %s) attempt %s failed: %s\n%s", shard_id, claimed.job_id,
                  claimed.attempts, error, traceback.format_exc())
        if claimed.attempts >= ctx.settings.max_attempts:
            _give_up(ctx, claimed, error)
            after_shard_closed(ctx, claimed.job_id, dispatcher)
            return ShardOutcome.FAILED
        delay = min(ctx.settings.retry_delay_s * 4 ** (claimed.attempts - 1), MAX_RETRY_DELAY_S)
        retry_at = utcnow() + timedelta(seconds=delay)
        with ctx.store.session() as session:
            released = release_shard(session, claimed, error, retry_at=retry_at)
        if released:
            dispatcher.enqueue_shards([shard_id], countdown=delay)
        return ShardOutcome.RETRY
    except BaseException:  # Ctrl-C or a signal in an embedded run: this attempt does not count
        with ctx.store.session() as session:
            release_shard(session, claimed, "interrupted", retry_at=None, counted=False)
        raise
    failpoint("shard.committed")
    after_shard_closed(ctx, claimed.job_id, dispatcher)
    return ShardOutcome.DONE


def _give_up(ctx: Context, claimed: ClaimedShard, error: str) -> None:
    """Fail the shard, with an error row for each of its images so none goes missing."""
    with ctx.store.session() as session:
        give_up_shard(session, claimed.shard_id, claimed.run_id, error, model_id=claimed.model_id,
                      items=claimed.items)


@dataclass
class ScoredItems:
    rows: list[dict[str, Any]] = field(default_factory=list)
    n_ok: int = 0
    maps: dict[str, np.ndarray] | None = None  # path -> float32 [H, W], evaluate jobs only


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
        stream = load_stream(items, detector.preprocess, max_bytes=ctx.settings.max_file_bytes)
        for batch in batched(stream, batch_size):
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
                if row["error"] is None and scores is not None and index is not None:
                    output.n_ok += 1
                    amap = scores.maps[index].numpy() if scores.maps is not None else None
                    if output.maps is not None and amap is not None:
                        output.maps[entry.item.path] = kept_map(amap)
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
        "file_size": None, "file_mtime_ns": None,
    }
    if index is None or entry.decoded is None:
        return row
    decoded = entry.decoded
    row.update(sha256=decoded.sha256, width=decoded.width, height=decoded.height, file_size=decoded.file_size,
               file_mtime_ns=decoded.file_mtime_ns)
    score = float(scores.image[index])
    if not math.isfinite(score):
        # NaN compares false with any threshold: without this a broken model passes every image.
        row["error"] = f"detector produced a non-finite score ({score})"
        return row
    extra = {name: float(values[index]) for name, values in scores.extra.items()}
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
                         posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).min)


def _wants_heatmap(mode: str, is_anomaly: bool | None) -> bool:
    return mode == "all" or (mode == "flagged" and bool(is_anomaly))


def _write_heatmap(path: str, amap: np.ndarray, map_range: tuple[float, float], target: Any) -> None:
    try:
        original = read_image(to_os(path), channels=3, size=None).pixels
    except ImageError:
        return  # the file changed under us; the score stands, the overlay is skipped
    atomic_write_bytes(target, render_overlay(original, amap, map_range))


def _save_eval_maps(ctx: Context, claimed: ClaimedShard, output: ScoredItems) -> None:
    """Named by run: a copy that lost its lease cannot overwrite the maps of the run that closed it."""
    assert output.maps is not None
    atomic_write_bytes(ctx.data_dir.eval_maps_file(claimed.job_id, claimed.seq, claimed.run_id),
                       eval_maps_bytes(output.maps))


def eval_maps_bytes(maps_by_path: dict[str, np.ndarray]) -> bytes:
    """One shard's anomaly maps as an .npz that evaluation.py reads back (paths, maps, shape)."""
    paths = list(maps_by_path)
    maps = np.stack([maps_by_path[p] for p in paths]) if paths else np.zeros((0, 1, 1), dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, paths=np.array(paths), maps=maps, shape=np.array(maps.shape))
    return buffer.getvalue()
