"""The patchcore detector and its parts, against brute-force computations (small data, CPU)."""

from pathlib import Path

import pytest
import torch

from adqueue.core.datadir import DataDir
from adqueue.data.loader import to_float
from adqueue.detectors import registry
from adqueue.detectors.components.backbone_specs import default_levels
from adqueue.detectors.components.coreset import coreset_size, greedy_coreset, random_projection
from adqueue.detectors.components.maps import gaussian_blur
from adqueue.detectors.components.nearest_neighbours import nearest_neighbours
from adqueue.detectors.patchcore.model import PatchCoreDetector, isolation_weights
from adqueue.pipeline.images import TensorImages
from adqueue.pipeline.metrics import image_auroc, pixel_auroc
from adqueue.pipeline.model_files import RegisteredModel, load_detector, load_model, save_detector, save_model
from tests.helpers.datasets import load_split, split_masks

SIZE = 128
# The stride-8 level 3 keeps a fine grid at this small size; the channels are pooled to 32 per level.
FAST = {"backbone": "efficientnet_lite0", "image_size": str(SIZE), "levels": "3,5", "level_dim": "32",
        "coreset_fraction": "0.05"}


def _brute_force_coreset(points: torch.Tensor, count: int, first: int) -> list[int]:
    """Farthest-point selection the slow way: every step measures every row against every pick."""
    chosen = [first]
    for _ in range(count - 1):
        chosen.append(int(torch.cdist(points, points[chosen]).min(dim=1).values.argmax()))
    return chosen


def _clustered(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Rows in a few clusters of different spreads, like patch features (the pruning's real case)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, dim, generator=generator, dtype=torch.float64) * 4
    which = torch.randint(6, (rows,), generator=generator)
    spread = torch.rand(6, 1, generator=generator, dtype=torch.float64)[which] + 0.1
    return centres[which] + spread * torch.randn(rows, dim, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize(("rows", "dim", "count"), [(300, 3, 60), (800, 24, 120)])
def test_greedy_coreset_is_farthest_point_selection(rows: int, dim: int, count: int) -> None:
    points = _clustered(rows, dim, seed=rows)
    got = greedy_coreset(points, count, projection_dim=None, seed=5).tolist()
    assert len(set(got)) == count
    assert got == _brute_force_coreset(points, count, got[0])


def test_greedy_coreset_selects_in_the_random_projection() -> None:
    points = _clustered(600, 40, seed=1)
    got = greedy_coreset(points, 50, projection_dim=8, seed=2).tolist()
    assert got == _brute_force_coreset(random_projection(points, 8, seed=2), 50, got[0])
    assert got != greedy_coreset(points, 50, projection_dim=8, seed=3).tolist()  # the seed matters


def test_coreset_size_keeps_at_least_one_and_at_most_all() -> None:
    assert (coreset_size(1000, 0.1), coreset_size(3, 0.01), coreset_size(7, 1.0)) == (100, 1, 7)
    assert (coreset_size(1000, 0.1, limit=30), coreset_size(1000, 0.1, limit=500)) == (30, 100)
    with pytest.raises(ValueError, match="cannot be taken"):
        greedy_coreset(torch.zeros(3, 2), 4)


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbours_equal_cdist_across_chunks(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    queries, bank = torch.randn(97, 16, generator=generator), torch.randn(41, 16, generator=generator)
    expected = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    # 41 * 3 entries per block: 32 chunks of 3 queries and one of 1.
    distances, indices = nearest_neighbours(queries, bank, k, max_block=41 * 3)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(distances, expected.values, rtol=1e-5, atol=1e-5)
    whole, _ = nearest_neighbours(queries, bank, k)
    torch.testing.assert_close(distances, whole)


def test_reweighting_by_hand() -> None:
    """Eq. 7 on a line: bank 0, 1, 3, 10; a patch at 4 is nearest to 3, whose 3 neighbours are 3, 1, 0."""
    bank = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    patch = torch.tensor([[4.0]])
    distances = torch.tensor([1.0, 3.0, 4.0])  # patch to 3, 1 and 0
    expected = (1 - torch.exp(distances[0]) / torch.exp(distances).sum()) * 1.0
    got = isolation_weights(patch, torch.tensor([2]), bank, neighbours=3)
    torch.testing.assert_close(got, expected[None])
    assert torch.equal(isolation_weights(patch, torch.tensor([2]), bank, neighbours=1), torch.tensor([1.0]))
    # An isolated nearest entry (10, far from the others) weighs the same distance more heavily.
    lone = isolation_weights(torch.tensor([[11.0]]), torch.tensor([3]), bank, neighbours=3)
    assert lone > got



@pytest.fixture(scope="module")
def fitted(textures) -> tuple[PatchCoreDetector, Path]:
    root, _ = textures
    detector = registry.create("patchcore", FAST)
    pixels, _ = load_split(root, "train", SIZE)
    report = detector.fit(TensorImages(pixels))
    grid = (SIZE // 8) ** 2  # level 3: stride 8
    assert report.info["patches"] == len(pixels) * grid
    assert report.info["bank_size"] == coreset_size(len(pixels) * grid, 0.05) == detector.memory_bank.shape[0]
    assert detector.memory_bank.shape[1] == 2 * 32
    return detector, root


def test_separates_and_localizes_painted_defects(fitted) -> None:
    detector, root = fitted
    pixels, items = load_split(root, "test", SIZE)
    scores = detector.score(to_float(pixels))
    labels = [item.label for item in items]
    assert scores.image.shape == (len(items),) and scores.maps.shape == (len(items), SIZE, SIZE)
    assert image_auroc(labels, scores.image.numpy()) > 0.9
    masks = split_masks(items, SIZE)
    assert pixel_auroc(scores.maps.numpy(), masks) > 0.85


def test_model_file_round_trip_scores_identically(fitted, tmp_path: Path) -> None:
    detector, root = fitted
    data_dir = DataDir(tmp_path)
    artifact = save_detector(data_dir, detector, name="pc", version=1, job_id=1, extra={"map_range": [0.0, 1.0]})
    loaded = load_detector(data_dir, RegisteredModel(1, "pc", 1, artifact, None, None)).detector
    assert torch.equal(loaded.memory_bank, detector.memory_bank)
    assert loaded.config.levels == detector.config.levels
    pixels, _ = load_split(root, "test", SIZE)
    a, b = detector.score(to_float(pixels[:6])), loaded.score(to_float(pixels[:6]))
    assert torch.equal(a.image, b.image) and torch.equal(a.maps, b.maps)


def _mahalanobis_by_hand(scorer, features: torch.Tensor) -> torch.Tensor:
    z = (features.double() - scorer.mean) @ scorer.basis
    return ((z @ scorer.precision) * z).sum(dim=1).sqrt()


def test_image_score_is_the_smoothed_largest_patch_distance_reweighted(fitted) -> None:
    """By hand with torch.cdist: the patch-distance grid, smoothed by score_sigma, its largest value
    times Eq. 7's weight of the patch there (score_sigma=0 is the paper's own s*), standardized and
    added to the standardized whole-image Mahalanobis distance of the pooled global levels."""
    detector, root = fitted
    local_mean, local_spread, global_mean, global_spread = detector.score_norm.tolist()
    weight = detector.config.global_weight
    assert weight == 1.0 and detector.global_gaussians.fitted and local_spread > 0 and global_spread > 0
    pixels, _ = load_split(root, "test", SIZE)
    images = to_float(pixels[:5])
    bank = detector.memory_bank
    features = detector.patch_features(images)
    size, height, width, dim = features.shape
    exact = torch.cdist(features.reshape(-1, dim), bank).min(dim=1)
    rows = torch.arange(size)
    default = detector.config.score_sigma
    for sigma in (default, 0.0):
        detector.config.score_sigma = sigma
        grid = exact.values.view(size, height, width)
        smoothed = (gaussian_blur(grid, sigma) if sigma else grid).flatten(1)
        worst = smoothed.argmax(dim=1)
        weights = isolation_weights(features.view(size, height * width, dim)[rows, worst],
                                    exact.indices.view(size, -1)[rows, worst], bank, detector.config.neighbours)
        local = (smoothed[rows, worst] * weights - local_mean) / local_spread
        pooled = [m.mean(dim=(2, 3)) for m in detector.backbone(images, detector.config.global_levels)]
        whole = sum(_mahalanobis_by_hand(g, p) for g, p in zip(detector.global_gaussians, pooled, strict=True))
        expected = local + weight * (whole.float() - global_mean) / global_spread
        torch.testing.assert_close(detector.score(images, with_maps=False).image, expected, rtol=1e-4, atol=1e-4)
    detector.config.score_sigma = default


def test_patch_score_scale_comes_from_images_scored_without_their_own_bank_rows(textures) -> None:
    """With the whole bank kept (coreset_fraction=1), a training image scored against a bank holding
    its own patches would score 0: the scale must come from the other images' patches, by brute force."""
    root, _ = textures
    size = 64
    detector = registry.create("patchcore", {**FAST, "image_size": str(size), "coreset_fraction": "1",
                                             "neighbours": "1", "score_sigma": "0"})
    pixels, _ = load_split(root, "train", size)
    detector.fit(TensorImages(pixels))
    features = detector.patch_features(to_float(pixels))
    per_image = features.reshape(len(pixels), -1, features.shape[-1])
    held_out = torch.stack([
        torch.cdist(per_image[i], torch.cat([per_image[:i], per_image[i + 1:]]).flatten(0, 1)).min(dim=1).values.max()
        for i in range(len(pixels))
    ]).double()
    assert len(pixels) <= 64  # every image is one of the sampled ones
    torch.testing.assert_close(detector.score_norm[:2], torch.stack([held_out.mean(), held_out.std()]),
                               rtol=1e-4, atol=1e-6)


def test_the_whole_image_term_needs_enough_images(textures) -> None:
    """Below GLOBAL_MIN_IMAGES the Gaussians are left out and the score is the standardized patch score."""
    root, _ = textures
    detector = registry.create("patchcore", FAST)
    pixels, _ = load_split(root, "train", SIZE)
    report = detector.fit(TensorImages(pixels[:8]))
    assert report.info["global_term"] is False and not detector.global_gaussians.fitted
    tiny = registry.create("patchcore", {**FAST, "bank_limit": "1"})  # one bank row, from one of 2 images
    tiny.fit(TensorImages(pixels[:2]))
    assert torch.isfinite(tiny.score(to_float(pixels[8:10]), with_maps=False).image).all()
    images = to_float(pixels[8:12])
    local, _ = detector._patch_scores(detector.patch_features(images), detector.memory_bank)
    mean, spread = detector.score_norm[:2].tolist()
    torch.testing.assert_close(detector.score(images, with_maps=False).image, (local - mean) / spread)


def test_level_norm_gives_each_whole_level_unit_length() -> None:
    detector = registry.create("patchcore", {"backbone": "efficientnet_lite0", "image_size": "96", "levels": "4,5,6",
                                             "level_dim": "0", "level_norm": "true"})
    widths = detector.backbone.channels(detector.config.levels)
    assert detector.memory_bank.shape[1] == sum(widths)
    features = detector.patch_features(torch.rand(2, 3, 96, 96))
    assert features.shape == (2, 96 // 16, 96 // 16, sum(widths))  # the stride-16 grid of levels 4, 5, 6
    for part in features.split(widths, dim=-1):
        torch.testing.assert_close(torch.linalg.vector_norm(part, dim=-1), torch.ones(2, 6, 6))


def test_a_model_file_saved_before_score_sigma_keeps_scoring_as_it_was_calibrated(fitted, tmp_path: Path) -> None:
    detector, root = fitted
    data_dir = DataDir(tmp_path)
    artifact = save_detector(data_dir, detector, name="pc", version=1, job_id=1, extra={"map_range": [0.0, 1.0]})
    path = data_dir.resolve(artifact)
    older = load_model(path)
    del older.config["score_sigma"], older.config["global_weight"]
    older.state = {k: v for k, v in older.state.items() if not k.startswith(("global_gaussians.", "score_norm"))}
    save_model(path, older)
    loaded = load_detector(data_dir, RegisteredModel(1, "pc", 1, artifact, None, None)).detector
    assert loaded.config.score_sigma == 0.0 and loaded.config.global_weight == 0.0
    pixels, _ = load_split(root, "test", SIZE)
    images = to_float(pixels[:4])
    plain, _ = loaded._patch_scores(loaded.patch_features(images), loaded.memory_bank)
    torch.testing.assert_close(loaded.score(images, with_maps=False).image, plain)  # the plain patch score
    fresh = registry.create("patchcore", older.config).config  # a new training: the defaults
    assert fresh.score_sigma == 1.0 and fresh.global_weight == 1.0


def test_same_seed_same_bank(fitted) -> None:
    """Two fits with one seed keep the same rows in the same order (other seeds: see the coreset tests)."""
    detector, root = fitted
    pixels, _ = load_split(root, "train", SIZE)
    again = registry.create("patchcore", FAST)
    again.fit(TensorImages(pixels))
    assert torch.equal(again.memory_bank, detector.memory_bank)


def test_levels_default_per_backbone() -> None:
    config = registry.config_spec("patchcore").build({"backbone": "efficientnet_lite0"})
    assert config.levels == default_levels("efficientnet_lite0", "middle") == (3, 5)
    assert registry.config_spec("patchcore").build({"backbone": "resnet18"}).levels == (2, 3)
    assert registry.config_spec("patchcore").build({"levels": "2,4"}).levels == (2, 4)
    with pytest.raises(ValueError, match="unknown backbone"):
        registry.config_spec("patchcore").build({"backbone": "vgg"})
    with pytest.raises(ValueError, match="coreset_fraction"):
        registry.config_spec("patchcore").build({"coreset_fraction": "0"})
    with pytest.raises(ValueError, match="odd"):
        registry.config_spec("patchcore").build({"neighbourhood": "2"})


def test_unfitted_detector_says_so() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        registry.create("patchcore", FAST).score(torch.zeros(1, 3, SIZE, SIZE))
