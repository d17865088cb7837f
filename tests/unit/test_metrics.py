"""Metrics: scikit-learn AUROC wrappers, our PRO on a case computed by hand, thresholds."""

import numpy as np
import pytest

from adqueue.detectors.components.thresholds import calibrate_threshold
from adqueue.pipeline.metrics import image_auroc, pixel_auroc, pro_curve, pro_score, rates_at_threshold


def test_image_auroc_perfect_inverted_and_one_class() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert image_auroc([0, 0], [0.1, 0.2]) is None


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    """One 4x4 image with two defect regions:
    region A (2 px) scores 0.9 and 0.3; region B (1 px) scores 0.6;
    13 normal pixels score 0.1 x 10, 0.5 x 2, 0.7 x 1."""
    amap = np.full((4, 4), 0.1)
    mask = np.zeros((4, 4), dtype=bool)
    amap[0, 0], amap[0, 1] = 0.9, 0.3
    mask[0, 0] = mask[0, 1] = True
    amap[3, 3] = 0.6
    mask[3, 3] = True
    amap[2, 0], amap[2, 1], amap[1, 3] = 0.5, 0.5, 0.7
    return amap[None], mask[None]


def test_pro_curve_by_hand() -> None:
    maps, masks = _hand_case()
    fpr, pro = pro_curve(maps, masks, fpr_limit=0.3, steps=301)
    def at(rate: float) -> float:
        return float(pro[np.searchsorted(fpr, rate - 1e-12)])
    # No normal pixel may be flagged: threshold 0.7 flags only A's 0.9 -> (1/2 + 0) / 2.
    assert at(0.0) == pytest.approx(0.25)
    assert at(0.07) == pytest.approx(0.25)
    # One normal pixel (0.7) may be flagged: threshold 0.5 flags 0.9 and B's 0.6 -> (1/2 + 1) / 2.
    assert at(1 / 13) == pytest.approx(0.75)
    assert at(2 / 13) == pytest.approx(0.75)  # two allowed, but the next normals tie at 0.5
    # Three normal pixels may be flagged: threshold 0.1 flags every defect pixel.
    assert at(3 / 13) == pytest.approx(1.0)
    assert at(0.3) == pytest.approx(1.0)
    # The area: 0.25 * 1/13 + 0.75 * 2/13 + 1.0 * (0.3 - 3/13), normalized by 0.3.
    expected = (0.25 / 13 + 0.75 * 2 / 13 + (0.3 - 3 / 13)) / 0.3
    assert pro_score(maps, masks, steps=3001) == pytest.approx(expected, abs=2e-3)


def test_pro_score_perfect_and_useless_maps() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:14, 3:9] = True
    perfect = masks.astype(float) + rng.uniform(0, 0.1, masks.shape)
    assert pro_score(perfect, masks) == pytest.approx(1.0, abs=0.01)
    inverted = 1.0 - perfect
    assert pro_score(inverted, masks) < 0.01
    assert pro_score(perfect, np.zeros_like(masks)) is None


def test_pixel_auroc() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, :2, :2] = True
    maps = masks.astype(float)
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_auroc(maps, np.zeros_like(masks)) is None


def test_calibrate_threshold_bounds_the_false_alarm_rate() -> None:
    scores = np.arange(100, dtype=float)  # 0..99
    threshold = calibrate_threshold(scores, 0.05)
    assert (scores > threshold).mean() <= 0.05
    assert (scores > threshold).sum() == 5
    assert calibrate_threshold(scores, 0.0) == 99.0
    with pytest.raises(ValueError):
        calibrate_threshold(scores, 1.5)
    rates = rates_at_threshold(np.array([0, 0, 1, 1]), np.array([1.0, 3.0, 2.5, 4.0]), 2.0)
    assert rates.false_alarm_rate == 0.5 and rates.recall == 1.0


def test_large_evaluations_stride_the_maps(tmp_path, monkeypatch) -> None:
    import io

    from adqueue.pipeline import evaluate as evaluation

    for seq in range(2):
        buffer = io.BytesIO()
        np.savez(buffer, paths=np.array(["a", "b"]), maps=np.zeros((2, 100, 100), np.float16),
                 shape=np.array([2, 100, 100]))
        (tmp_path / f"shard{seq:06d}.npz").write_bytes(buffer.getvalue())
    files = sorted(tmp_path.glob("shard*.npz"))
    assert evaluation._stride(files) == 1
    monkeypatch.setattr(evaluation, "PIXEL_BUDGET", 10_000)
    assert evaluation._stride(files) == 2  # 40,000 pixels -> every 2nd row and column


def test_stored_maps_keep_the_order_of_values_past_float16s_range(tmp_path) -> None:
    """differnet's NLL gradients reach 1e5-1e6: stored maps must still rank the defect above the rest."""
    from adqueue.core.progress import NullProgress
    from adqueue.pipeline.evaluate import _pixel_metrics
    from adqueue.pipeline.score import eval_maps_bytes, kept_map

    side = 16
    mask = np.zeros((side, side), dtype=bool)
    mask[4:8, 4:8] = True
    defective = np.full((side, side), 7.0e4, dtype=np.float32)  # background already past 65,504
    defective[mask] = np.linspace(2.0e5, 9.0e5, mask.sum(), dtype=np.float32)
    normal = np.linspace(6.6e4, 1.9e5, side * side, dtype=np.float32).reshape(side, side)
    normal[0, 0] = np.nan
    stored = {"good.png": kept_map(normal), "bad.png": kept_map(defective)}
    assert all(np.isfinite(amap).all() for amap in stored.values())
    # every distinct value stays distinct, in the same order
    for raw, kept in ((defective, stored["bad.png"]), (normal, stored["good.png"])):
        finite = np.isfinite(raw)
        assert len(np.unique(kept[finite])) == len(np.unique(raw[finite]))
        assert (np.argsort(kept[finite], kind="stable") == np.argsort(raw[finite], kind="stable")).all()
    (tmp_path / "shard000000.npz").write_bytes(eval_maps_bytes(stored))
    mask_file = tmp_path / "bad_mask.png"
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_file)
    metrics = _pixel_metrics([tmp_path / "shard000000.npz"], {"good.png": 0, "bad.png": 1},
                             {"good.png": None, "bad.png": str(mask_file)}, NullProgress())
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(
        np.stack([np.nan_to_num(normal, nan=6.6e4), defective]), np.stack([np.zeros_like(mask), mask])))
    assert metrics["pixel_auroc"] > 0.99 and metrics["pro"] > 0.99
    # what float16 storage did: every pixel clipped to one value, the defect no longer ranked
    clipped = np.clip(defective, -65504, 65504).astype(np.float16)
    assert len(np.unique(clipped)) == 1
