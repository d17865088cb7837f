"""Heat maps: every map level gets its colormap entry whatever the overlay's shape, and the painter."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adqueue.pipeline.heatmaps import COLORMAP, colorize, render_overlay


def test_colorize_is_the_colormap_lookup_at_every_level_and_shape() -> None:
    rng = np.random.default_rng(3)
    every_level = np.arange(256, dtype=np.uint8)[None]
    for indices in [every_level, *(rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(7, 13), (31, 1024)])]:
        height, width = indices.shape
        got = np.asarray(colorize(indices))
        assert got.shape == (height, width, 3)
        assert np.array_equal(got, COLORMAP[indices])
    columns = np.arange(256, dtype=np.uint8)[None, ::2].repeat(3, axis=0)  # a strided view
    assert np.array_equal(np.asarray(colorize(columns)), COLORMAP[columns])


def test_overlay_is_red_where_the_map_is_high() -> None:
    image = np.full((64, 96, 1), 128, dtype=np.uint8)  # grey frames are painted in colour
    amap = np.zeros((16, 24), dtype=np.float32)
    amap[4:8, 12:18] = 10.0
    overlay = np.asarray(Image.open(io.BytesIO(render_overlay(image, amap, (0.0, 10.0)))))
    assert overlay.shape == (64, 96, 3)
    hot, cold = overlay[16:32, 48:72].reshape(-1, 3).mean(0), overlay[48:, :24].reshape(-1, 3).mean(0)
    assert hot[0] > hot[2] + 40 and cold[2] > cold[0] + 40


def test_a_small_image_is_painted_from_the_pixels_it_was_scored_on(tmp_path: Path) -> None:
    from adqueue.data.loader import load_one
    from adqueue.data.preprocess import Preprocess
    from adqueue.data.sources import Item
    from adqueue.pipeline.score import _write_heatmap

    rng = np.random.default_rng(4)
    path = tmp_path / "frame.png"
    Image.fromarray(rng.integers(0, 256, (96, 80), dtype=np.uint8)).save(path)
    amap = rng.random((64, 64)).astype(np.float32)
    kept = load_one(Item(str(path)), Preprocess(64, 3), keep_originals=True)
    reread = load_one(Item(str(path)), Preprocess(64, 3))
    assert kept.decoded is not None and kept.decoded.original is not None
    assert reread.decoded is not None and reread.decoded.original is None
    assert _write_heatmap(reread, amap, (0.0, 1.0), tmp_path / "reread.jpg") is None
    path.unlink()  # the painter no longer needs the file
    assert _write_heatmap(kept, amap, (0.0, 1.0), tmp_path / "kept.jpg") is None
    assert (tmp_path / "kept.jpg").read_bytes() == (tmp_path / "reread.jpg").read_bytes()
    assert _write_heatmap(reread, amap, (0.0, 1.0), tmp_path / "gone.jpg") == "the image changed while it was scored"


def test_heat_maps_waiting_for_the_painter_are_bounded(tmp_path: Path, textures: tuple[Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow disk makes scoring wait, not the backlog of maps and images grow with the shard."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from adqueue.pipeline import score
    from benchmarks.harness.cli import FAST_MVG
    from tests.helpers.cli import invoke_cli

    root, dump = textures
    invoke_cli(tmp_path, "train", "--data", str(root), "--name", "m", *FAST_MVG)
    lock, waiting, most = threading.Lock(), [0], [0]
    paint = score._write_heatmap

    def slow_paint(*args: object) -> str | None:
        time.sleep(0.05)
        try:
            return paint(*args)  # type: ignore[arg-type]
        finally:
            with lock:
                waiting[0] -= 1

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            if fn is slow_paint:
                with lock:
                    waiting[0] += 1
                    most[0] = max(most[0], waiting[0])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(score, "PAINT_BACKLOG", 3)
    monkeypatch.setattr(score, "_write_heatmap", slow_paint)
    monkeypatch.setattr(score, "ThreadPoolExecutor", CountingPool)
    invoke_cli(tmp_path, "score", "--model", "m", str(dump), "--heatmaps", "all")
    written = list((tmp_path / "heatmaps").rglob("*.jpg"))
    assert len(written) == 16 and most[0] == 3  # every image painted, never more than 3 waiting
