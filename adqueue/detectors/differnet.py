"""`differnet`: a normalizing flow on multi-scale pretrained features, scored over many transforms.

Seed paper: M. Rudolph, B. Wandt, B. Rosenhahn, "Same Same But DifferNet: Semi-Supervised Defect
Detection with Normalizing Flows", WACV 2021.

A frozen ImageNet extractor sees each image at three scales (full, 1/2, 1/4 of `image_size`);
each scale's feature map is globally average-pooled and the three vectors are concatenated. A
flow of coupling blocks (components/flows.py) maps these vectors to a standard normal by maximum
likelihood. Training images are augmented by random rotations and brightness/contrast changes;
since the extractor is frozen, the features of `train_transforms` transformed copies of each
image are extracted once and the flow trains on that cache. An image's score is its negative
log-likelihood averaged over a fixed set of `test_transforms` transforms; its anomaly map is the
gradient of that NLL with respect to the transformed input, blurred, absolute-summed over
channels, rotated back and averaged over `map_transforms` of those transforms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adqueue.detectors.base import Detector, FitReport, NullProgress, Preprocess, Progress, Scores
from adqueue.detectors.components.augment import (
    Transforms, evenly_spread_transforms, random_transforms, rotate, spread_indices,
)
from adqueue.detectors.components.backbones import (
    LAST_FEATURE_LEVEL, FeatureExtractor, check_levels, load_backbone,
)
from adqueue.detectors.components.flows import CouplingFlow, FlowSpec, FlowTraining, fit_flow
from adqueue.detectors.components.gradient_maps import blurred_abs_sum, input_gradient


@dataclass
class DifferNetConfig:
    backbone: str = "efficientnet_lite0"
    # The feature map pooled at every scale; none = the backbone's last one before its classifier
    # head (the paper pools AlexNet's last conv block, 256 channels; for Lite0 that is level 7,
    # 320 channels).
    level: int | None = None
    image_size: int = 224  # the largest scale; the others are /2 and /4 (paper: 448, 224, 112)
    n_scales: int = 3
    train_transforms: int = 8  # transformed copies of each training image in the feature cache
    test_transforms: int = 16  # transforms averaged per scored image (paper: 64)
    map_transforms: int = 4  # of those, how many also give a gradient map (a backward pass each)
    rotation: bool = True
    brightness: float = 0.15  # factors uniform in [1 - x, 1 + x] (paper, on MTD: 0.15)
    contrast: float = 0.15
    n_blocks: int = 8
    hidden: int = 2048  # 3 hidden layers of 2048 (paper)
    n_hidden: int = 3
    clamp: float = 3.0  # soft clamp alpha (paper)
    epochs: int = 16  # passes over the feature cache
    batch_size: int = 96
    lr: float = 2e-4
    map_sigma: float = 4.0  # Gaussian blur of the gradient maps, in input pixels
    extract_batch: int = 32
    seed: int = 0


class MultiScalePooled(nn.Module):
    """[B, C, S, S] images -> [B, n_scales * channels]: one pooled feature map per scale."""

    def __init__(self, backbone: FeatureExtractor, level: int, image_size: int, n_scales: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.level = level
        self.sizes = [image_size // 2**scale for scale in range(n_scales)]
        self.dim = backbone.channels([level])[0] * n_scales

    def forward(self, images: Tensor) -> Tensor:
        pooled = []
        for size in self.sizes:
            scaled = images if images.shape[-1] == size else F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            pooled.append(self.backbone(scaled, [self.level])[0].mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


class DifferNetDetector(Detector):
    name = "differnet"
    Config = DifferNetConfig
    frozen_prefixes = ("features.backbone.",)
    costly_maps = True

    def __init__(self, config: DifferNetConfig) -> None:
        super().__init__(config)
        level = LAST_FEATURE_LEVEL[config.backbone] if config.level is None else config.level
        self.features = MultiScalePooled(load_backbone(config.backbone), level, config.image_size, config.n_scales)
        with torch.random.fork_rng(devices=[]):  # the flow's initial weights depend on the seed alone
            torch.manual_seed(config.seed)
            self.flow = CouplingFlow(FlowSpec(self.features.dim, config.n_blocks, config.hidden,
                                              config.n_hidden, config.clamp, config.seed))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.test_set = evenly_spread_transforms(config.test_transforms, config.seed, **self._augment())

    @classmethod
    def validate_config(cls, config: DifferNetConfig) -> None:
        check_levels(config.backbone, [LAST_FEATURE_LEVEL.get(config.backbone, 0) if config.level is None
                                       else config.level])
        if config.n_scales < 1 or config.image_size // 2 ** (config.n_scales - 1) < 32:
            raise ValueError("image_size / 2^(n_scales - 1) must be at least 32 pixels")
        positive = ("train_transforms", "test_transforms", "map_transforms", "n_blocks", "hidden",
                    "n_hidden", "epochs", "batch_size", "extract_batch")
        bad = [name for name in positive if getattr(config, name) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be at least 1")
        if not (0 <= config.brightness < 1 and 0 <= config.contrast < 1):
            raise ValueError("brightness and contrast must be in [0, 1)")
        if config.clamp <= 0 or config.lr <= 0 or config.map_sigma < 0:
            raise ValueError("clamp and lr must be positive, map_sigma non-negative")

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.config.image_size, channels=3)

    def backbone_identity(self) -> dict[str, str]:
        backbone = self.features.backbone
        return {"name": backbone.name, "sha256": backbone.weights.sha256}

    def _augment(self) -> dict[str, float | bool]:
        cfg = self.config
        return {"rotation": cfg.rotation, "brightness": cfg.brightness, "contrast": cfg.contrast}

    def fit(self, images: Dataset[Tensor], *, progress: Progress | None = None) -> FitReport:
        progress = progress or NullProgress()
        cfg = self.config
        started = time.perf_counter()
        cache = self._feature_cache(images, progress)
        training = FlowTraining(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        losses = fit_flow(self.flow, cache, training, progress=progress)
        self.fitted.fill_(True)
        return FitReport(
            n_images=len(images),  # type: ignore[arg-type]
            seconds=time.perf_counter() - started,
            losses=losses,
            info={"feature_dim": self.features.dim, "cached_vectors": len(cache)},
        )

    @torch.no_grad()
    def _feature_cache(self, images: Dataset[Tensor], progress: Progress) -> Tensor:
        """Pooled features of `train_transforms` random transforms of every image: [N * K, D]."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        count = len(images) * cfg.train_transforms  # type: ignore[arg-type]
        cache = torch.empty(count, self.features.dim)
        progress.phase("extracting features", count)
        row = 0
        for batch in DataLoader(images, batch_size=cfg.extract_batch, shuffle=False):
            batch = batch.to(self.device)
            for _ in range(cfg.train_transforms):
                transforms = random_transforms(len(batch), generator, **self._augment())
                cache[row : row + len(batch)] = self.features(transforms.apply(batch)).cpu()
                row += len(batch)
                progress.advance(len(batch))
        return cache

    def _nll(self, images: Tensor) -> Tensor:
        return self.flow.nll(self.features(images))

    def score(self, batch: Tensor, *, with_maps: bool = True) -> Scores:
        if not bool(self.fitted):
            raise RuntimeError("the differnet detector is not fitted: call fit() or load a trained state first")
        batch = batch.to(self.device)
        count = len(self.test_set)
        with_map = set(spread_indices(count, self.config.map_transforms)) if with_maps else set()
        total = torch.zeros(len(batch), device=self.device)
        maps = torch.zeros((len(batch), *batch.shape[-2:]), device=self.device)
        for index in range(count):
            transform = self.test_set[index : index + 1].repeat(len(batch))
            transformed = transform.apply(batch)
            if index in with_map:
                nll, grad = input_gradient(self._nll, transformed)
                maps += self._map_back(grad, transform)
            else:
                with torch.no_grad():
                    nll = self._nll(transformed)
            total += nll
        return Scores(
            image=(total / count).cpu(),
            maps=(maps / len(with_map)).cpu() if with_map else None,
        )

    def _map_back(self, grad: Tensor, transform: Transforms) -> Tensor:
        """The paper's gradient map in the transformed frame, rotated back to the image's."""
        amap = blurred_abs_sum(grad, self.config.map_sigma)
        return rotate(amap[:, None], -transform.angles.to(amap.device))[:, 0]
