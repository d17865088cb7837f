"""`adqueue demo`: the whole flow on a small real-texture dataset, with no servers.

Normal images are crops of scikit-image's brick photograph; defects are painted in (scratches,
stains) or pasted from the gravel photograph, each with its mask. The dump also holds a corrupt
PNG and a text file, which come back as result rows with errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from adqueue.cli.dispatch import make_dispatcher
from adqueue.cli.output import emit_object, emit_rows, info
from adqueue.cli.progress import ScoreBar, TrainBar, wait_for_job
from adqueue.cli.submit import describe_outcome, outcome_metrics
from adqueue.core.config import Settings
from adqueue.core.datadir import atomic_write_bytes
from adqueue.core.errors import AdqueueError
from adqueue.jobs.context import Context
from adqueue.jobs.submit import submit_evaluate, submit_score, submit_train
from adqueue.store.queries import job_metrics, job_summary
from adqueue.store.read_only_sql import run_read_only

CROP = 192
DEFECTS = ("scratch", "stain", "gravel")


def _textures() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    return np.asarray(data.brick(), dtype=np.uint8), np.asarray(data.gravel(), dtype=np.uint8)


def _crop(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = rng.integers(0, texture.shape[0] - CROP), rng.integers(0, texture.shape[1] - CROP)
    patch = texture[y:y + CROP, x:x + CROP].astype(np.float32)
    gain = rng.uniform(0.95, 1.05)  # a little lighting drift, as on a real line
    return np.clip(patch * gain, 0, 255).astype(np.uint8)


def _paint_defect(image: np.ndarray, kind: str, gravel: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    canvas = Image.fromarray(image)
    mask = Image.new("L", canvas.size, 0)
    size = CROP
    if kind == "scratch":
        x0, y0 = rng.integers(20, size - 20, 2)
        angle, length = rng.uniform(0, np.pi), rng.integers(50, 100)
        x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
        width = int(rng.integers(3, 6))
        shade = int(rng.choice([20, 235]))
        for target, value in ((canvas, shade), (mask, 255)):
            ImageDraw.Draw(target).line([(x0, y0), (x1, y1)], fill=value, width=width)
    elif kind == "stain":
        cx, cy = rng.integers(30, size - 30, 2)
        rx, ry = rng.integers(10, 22, 2)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        ImageDraw.Draw(canvas).ellipse(box, fill=int(rng.choice([15, 240])))
        ImageDraw.Draw(mask).ellipse(box, fill=255)
    else:
        side = int(rng.integers(36, 56))
        y, x = rng.integers(0, gravel.shape[0] - side, 2)
        top, left = rng.integers(10, size - side - 10, 2)
        canvas.paste(Image.fromarray(gravel[y:y + side, x:x + side]), (int(left), int(top)))
        ImageDraw.Draw(mask).rectangle([left, top, left + side - 1, top + side - 1], fill=255)
    return np.asarray(canvas), np.asarray(mask)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def build_dataset(root: Path, *, n_normal: int, n_dump: int, seed: int = 7) -> tuple[Path, Path]:
    """An MVTec-style root (train/good, test/<defect>, ground_truth/<defect>) and a flat dump."""
    rng = np.random.default_rng(seed)
    brick, gravel = _textures()
    mvtec, dump = root / "textures", root / "dump"
    for index in range(n_normal):
        _save_png(mvtec / "train" / "good" / f"{index:04d}.png", _crop(brick, rng))
    n_test = max(DEFECTS.__len__() * 2, n_dump // 2)
    for index in range(n_test):
        _save_png(mvtec / "test" / "good" / f"{index:04d}.png", _crop(brick, rng))
        kind = DEFECTS[index % len(DEFECTS)]
        image, mask = _paint_defect(_crop(brick, rng), kind, gravel, rng)
        _save_png(mvtec / "test" / kind / f"{index:04d}.png", image)
        _save_png(mvtec / "ground_truth" / kind / f"{index:04d}_mask.png", mask)
    for index in range(n_dump):
        image = _crop(brick, rng)
        if index % 2:
            image, _ = _paint_defect(image, DEFECTS[index % len(DEFECTS)], gravel, rng)
        _save_png(dump / f"line3_{index:05d}.png", image)
    atomic_write_bytes(dump / "line3_corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
    atomic_write_bytes(dump / "operator_notes.txt", b"shift B: camera 3 re-focused at 02:10\n")
    return mvtec, dump


def run_demo(settings: Settings, *, n_normal: int, n_dump: int) -> None:
    ctx = Context(settings)
    mvtec, dump = build_dataset(ctx.data_dir.root / "demo", n_normal=n_normal, n_dump=n_dump)
    info(f"demo data: {mvtec} (training/evaluation), {dump} (a dump to score)")
    train_bars: list[TrainBar] = []

    def train_bar() -> TrainBar:
        train_bars.append(TrainBar())
        return train_bars[-1]

    dispatcher = make_dispatcher(ctx, train_progress=train_bar, score_progress=ScoreBar)

    def follow(job_id: int) -> None:
        if not settings.embedded:
            wait_for_job(ctx, job_id)

    trained = submit_train(ctx, dispatcher, detector="mvg", data=str(mvtec), name="demo-bricks", settings={})
    follow(trained.job_id)
    for bar in train_bars:
        bar.stop()
    with ctx.store.session() as session:
        summary = job_summary(session, trained.job_id)
    describe_outcome(ctx, summary, outcome_metrics(ctx, summary), "table")  # the model, its self-check, warnings
    if summary["status"] != "done":
        raise AdqueueError(f"the demo's training (job {trained.job_id}) {summary['status']}: {summary['error']}")
    scored = submit_score(ctx, dispatcher, model="demo-bricks", data=str(dump))
    follow(scored.job_id)
    evaluated = submit_evaluate(ctx, dispatcher, model="demo-bricks", data=str(mvtec), heatmaps="none")
    follow(evaluated.job_id)
    with ctx.store.session() as session:
        metrics = job_metrics(session, evaluated.job_id)
    wanted = ("image_auroc", "pixel_auroc", "pro", "false_alarm_rate", "recall", "threshold")
    emit_object({k: metrics[k] for k in wanted if k in metrics}, "table", title="evaluation on the test split")
    query = (
        "SELECT path, round(score, 2) AS score, is_anomaly, heatmap_path, error FROM results "
        f"WHERE job_id = {scored.job_id} ORDER BY score IS NULL, score DESC LIMIT 8"
    )
    info(f"\n[bold]adqueue sql[/bold] \"{query}\"")
    columns, rows = run_read_only(settings.database_url, query)
    emit_rows([dict(zip(columns, row, strict=True)) for row in rows], columns, "table")
    errors = ("SELECT path, error FROM results WHERE job_id = "
              f"{scored.job_id} AND error IS NOT NULL ORDER BY path")
    columns, rows = run_read_only(settings.database_url, errors)
    emit_rows([dict(zip(columns, row, strict=True)) for row in rows], columns, "table")
    info(f"\nheat maps: {ctx.data_dir.root / 'heatmaps' / f'job{scored.job_id}'} (heatmap_path above is relative "
         f"to the data dir, {ctx.data_dir.root})")
    info(f"next: adqueue results {scored.job_id} --anomalous   |   adqueue jobs   |   adqueue models")
    info(f"\nstart `adqueue serve` and open http://127.0.0.1:8080/jobs/{scored.job_id}")
