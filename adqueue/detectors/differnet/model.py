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

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adqueue.core.progress import Progress
from adqueue.detectors.base import Detector, FitResult, Scores, dataset_size
from adqueue.detectors.components.augment import (
    Transforms,
    evenly_spread_transforms,
    random_transforms,
    rotate,
    spread_indices,
)
from adqueue.detectors.components.backbones import FeatureExtractor, load_backbone
from adqueue.detectors.components.flows import (
    CouplingFlow,
    FlowSpec,
    FlowTraining,
    fit_flow,
    negative_log_likelihood,
)
from adqueue.detectors.components.gradient_maps import blurred_abs_sum, input_gradient
from adqueue.detectors.differnet.config import SCORES, DifferNetConfig, feature_levels


class MultiScalePooled(nn.Module):
    """[B, C, S, S] images -> [B, n_scales * channels]: pooled feature maps at every scale."""

    def __init__(self, backbone: FeatureExtractor, levels: Sequence[int], image_size: int, n_scales: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.levels = list(levels)
        self.sizes = [image_size // 2**scale for scale in range(n_scales)]
        self.dim = sum(backbone.channels(self.levels)) * n_scales

    def forward(self, images: Tensor) -> Tensor:
        pooled = []
        for size in self.sizes:
            scaled = images if images.shape[-1] == size else F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            pooled += [features.mean(dim=(2, 3)) for features in self.backbone(scaled, self.levels)]
        return torch.cat(pooled, dim=1)


class DifferNetDetector(Detector):
    name = "differnet"
    Config = DifferNetConfig
    frozen_prefixes = ("features.backbone.",)
    min_fit_images = 16  # the paper's few-shot runs go down to 16 images; a flow on fewer memorizes them
    costly_maps = True
    fitted_state_key = "fitted"  # its model files hold the flag there (see Detector.fitted_state_key)

    def __init__(self, config: DifferNetConfig) -> None:
        super().__init__(config)
        self.features = MultiScalePooled(load_backbone(config.backbone), feature_levels(config), config.image_size,
                                         config.n_scales)
        with torch.random.fork_rng(devices=[]):  # the flow's initial weights depend on the seed alone
            torch.manual_seed(config.seed)
            self.flow = CouplingFlow(FlowSpec(self.features.dim, config.n_blocks, config.hidden,
                                              config.n_hidden, config.clamp, config.seed))
        self.test_set = evenly_spread_transforms(config.test_transforms, config.seed, **self._augment())

    def _augment(self) -> dict[str, Any]:
        cfg = self.config
        return {"rotation": cfg.rotation, "brightness": cfg.brightness, "contrast": cfg.contrast}

    def _fit(self, images: Dataset[Tensor], progress: Progress) -> FitResult:
        cfg = self.config
        cache = self._feature_cache(images, progress)
        training = FlowTraining(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        losses = fit_flow(self.flow, cache, training, progress=progress)
        return FitResult(losses=losses, info={"feature_dim": self.features.dim, "cached_vectors": len(cache)})

    @torch.no_grad()
    def _feature_cache(self, images: Dataset[Tensor], progress: Progress) -> Tensor:
        """Pooled features of `train_transforms` random transforms of every image: [N * K, D]."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        count = dataset_size(images) * cfg.train_transforms
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

    def _scores(self, images: Tensor) -> dict[str, Tensor]:
        z, log_det = self.flow(self.features(images))
        return {"nll": negative_log_likelihood(z, log_det), "z2": z.pow(2).mean(dim=1)}

    def _scores_and_gradient(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Both scores and, from the same forward pass, the NLL's gradient w.r.t. the images.

        The map follows the NLL whichever score is chosen, as in the paper.
        """
        values: dict[str, Tensor] = {}

        def nll(x: Tensor) -> Tensor:
            values.update(self._scores(x))
            return values["nll"]

        _, grad = input_gradient(nll, images)
        return {name: value.detach() for name, value in values.items()}, grad

    def _score(self, batch: Tensor, *, with_maps: bool) -> Scores:
        batch = batch.to(self.device)
        count = len(self.test_set)
        with_map = set(spread_indices(count, self.config.map_transforms)) if with_maps else set()
        totals = {name: torch.zeros(len(batch), device=self.device) for name in SCORES}
        maps = torch.zeros((len(batch), *batch.shape[-2:]), device=self.device)
        for index in range(count):
            transform = self.test_set[index : index + 1].repeat(len(batch))
            transformed = transform.apply(batch)
            if index in with_map:
                values, grad = self._scores_and_gradient(transformed)
                maps += self._map_back(grad, transform)
            else:
                with torch.no_grad():
                    values = self._scores(transformed)
            for name, value in values.items():
                totals[name] += value
        means = {name: (total / count).cpu() for name, total in totals.items()}
        return Scores(
            image=means[self.config.score],
            maps=(maps / len(with_map)).cpu() if with_map else None,
            extra=means,
        )

    def _map_back(self, grad: Tensor, transform: Transforms) -> Tensor:
        """The paper's gradient map in the transformed frame, rotated back to the image's."""
        amap = blurred_abs_sum(grad, self.config.map_sigma)
        return rotate(amap[:, None], -transform.angles.to(amap.device))[:, 0]
