"""`encoder_flow`: a normalizing flow on the latent vectors of an autoencoder trained from scratch.

Seed paper: C. A. Salcedo, M. A. Alvarez, "Unsupervised image anomaly detection via likelihood
estimation on high-level representation" (Universidad de Ingenieria y Tecnologia / University of
Rhode Island).

Two training stages, as in the paper. Stage 1: a convolutional autoencoder whose encoder is a
DCGAN discriminator (strided 4x4 convolutions, BatchNorm, LeakyReLU) ending in a `latent_dim`
vector and whose decoder is a DCGAN generator (transposed convolutions, BatchNorm, ReLU, sigmoid
output), trained with the L1 reconstruction loss. Stage 2: the encoder is frozen and a Real-NVP
coupling flow (components/flows.py) is fitted by maximum likelihood on the latent vectors of the
training images. An image's score is the negative log-likelihood (NLL) of its latent; its map is
the per-pixel norm of the gradient of that NLL with respect to the input pixels, blurred and
log-compressed (or, as an option, the L1 reconstruction error). The paper draws the anomaly
threshold from a confidence interval of the training likelihoods; `calibrate_threshold` does so
on held-out normal images.

Two additions make the latent discriminative on industrial tiles, where normal images differ far
more in lighting than a defect changes them: each image's brightness and contrast are
standardized before encoding (`normalize`), so the latent spends itself on structure rather than
exposure; and both stages see label-preserving flips of the images (`augment`), over which the
score is also averaged (`tta`).
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from adqueue.core.progress import Progress
from adqueue.detectors.base import Detector, FitResult, Scores, dataset_size
from adqueue.detectors.components.flows import CouplingFlow, FlowSpec, FlowTraining, fit_flow
from adqueue.detectors.components.gradient_maps import channel_norm, input_gradient
from adqueue.detectors.components.maps import gaussian_blur
from adqueue.detectors.components.photometric import standardize_images
from adqueue.detectors.components.thresholds import calibrate_threshold, gaussian_bound
from adqueue.detectors.encoder_flow.config import AUGMENTS, EncoderFlowConfig


def _widths(cfg: EncoderFlowConfig) -> list[int]:
    n_halvings = int(math.log2(cfg.image_size)) - 2  # down to 4 x 4
    return [min(cfg.width * 2**level, cfg.max_width) for level in range(n_halvings)]


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialization: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_encoder(cfg: EncoderFlowConfig) -> nn.Sequential:
    """DCGAN discriminator body: [B, C, S, S] in [0, 1] -> [B, latent_dim]."""
    widths = _widths(cfg)
    layers: list[nn.Module] = [nn.Conv2d(cfg.channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
    for c_in, c_out in pairwise(widths):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
    layers += [nn.Conv2d(widths[-1], cfg.latent_dim, 4, 1, 0), nn.Flatten()]
    return nn.Sequential(*layers)


def build_decoder(cfg: EncoderFlowConfig) -> nn.Sequential:
    """DCGAN generator: [B, latent_dim] -> [B, C, S, S] in (0, 1)."""
    widths = _widths(cfg)[::-1]
    layers: list[nn.Module] = [
        nn.Unflatten(1, (cfg.latent_dim, 1, 1)),
        nn.ConvTranspose2d(cfg.latent_dim, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
    ]
    for c_in, c_out in pairwise(widths):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    layers += [nn.ConvTranspose2d(widths[-1], cfg.channels, 4, 2, 1), nn.Sigmoid()]
    return nn.Sequential(*layers)


def view(images: Tensor, index: int) -> Tensor:
    """The `index`-th of the 8 dihedral views: bit 0 flips left-right, bit 1 up-down, bit 2 transposes."""
    if index & 1:
        images = images.flip(-1)
    if index & 2:
        images = images.flip(-2)
    if index & 4:
        images = images.transpose(-1, -2)
    return images


class EncoderFlowDetector(Detector):
    name = "encoder_flow"
    Config = EncoderFlowConfig
    min_fit_images = 16  # AE and flow from scratch: on fewer, the latent density is a handful of points
    costly_maps = True  # the default map is a backward pass through flow and encoder
    # The paper's Gaussian bound may lie past the largest normal score. Set whatever threshold_rule
    # says, as training has always treated this detector.
    extrapolating_threshold = True
    fitted_state_key = "fitted"  # its model files hold the flag there (see Detector.fitted_state_key)

    def __init__(self, config: EncoderFlowConfig) -> None:
        super().__init__(config)
        with torch.random.fork_rng(devices=[]):  # initial weights depend on the seed alone
            torch.manual_seed(config.seed)
            self.encoder = build_encoder(config)
            self.decoder = build_decoder(config)
            self.encoder.apply(_dcgan_init)
            self.decoder.apply(_dcgan_init)
            self.flow = CouplingFlow(FlowSpec(config.latent_dim, config.flow_blocks, config.flow_hidden,
                                              config.flow_layers, config.flow_clamp, config.seed))

    @property
    def views(self) -> range:
        return range(AUGMENTS[self.config.augment])

    def _prepare(self, images: Tensor) -> Tensor:
        return standardize_images(images) if self.config.normalize else images

    def _fit(self, images: Dataset[Tensor], progress: Progress) -> FitResult:
        cfg = self.config
        pixels = self._prepare(torch.stack([images[i] for i in range(dataset_size(images))]))
        ae_losses = self._fit_autoencoder(pixels, progress)
        latents = self._latents(pixels, progress)
        training = FlowTraining(epochs=cfg.flow_epochs, batch_size=cfg.flow_batch_size, lr=cfg.flow_lr,
                                seed=cfg.seed)
        flow_losses = fit_flow(self.flow, latents, training, progress=progress)
        self.eval()
        return FitResult(
            losses=flow_losses,
            info={"autoencoder_l1": [round(x, 5) for x in ae_losses],
                  "flow_nll": [round(x, 5) for x in flow_losses], "latent_vectors": len(latents)},
        )

    def _fit_autoencoder(self, pixels: Tensor, progress: Progress) -> list[float]:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)  # batch order and views
        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        optimizer = torch.optim.Adam(params, lr=cfg.ae_lr, betas=(0.5, 0.999))  # DCGAN's betas
        progress.phase("training autoencoder", cfg.ae_epochs * math.ceil(len(pixels) / cfg.ae_batch_size))
        self.encoder.train()
        self.decoder.train()
        losses: list[float] = []
        for _ in range(cfg.ae_epochs):
            order = torch.randperm(len(pixels), generator=generator)
            total = 0.0
            for start in range(0, len(pixels), cfg.ae_batch_size):
                picked = pixels[order[start : start + cfg.ae_batch_size]]
                views = torch.randint(len(self.views), (len(picked),), generator=generator).tolist()
                batch = torch.stack([view(image, index)
                                     for image, index in zip(picked, views, strict=True)]).to(self.device)
                loss = (self.decoder(self.encoder(batch)) - batch).abs().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = loss.item()
                total += value * len(batch)
                progress.advance(1, loss=value)
            losses.append(total / len(pixels))
        self.encoder.eval()
        self.decoder.eval()
        return losses

    @torch.no_grad()
    def _latents(self, pixels: Tensor, progress: Progress) -> Tensor:
        """Frozen-encoder latents of every view of every training image: [N * views, latent_dim]."""
        self.encoder.eval()  # frozen: BatchNorm's running statistics must not move here
        progress.phase("encoding latents", len(pixels) * len(self.views))
        latents = []
        for start in range(0, len(pixels), 64):
            batch = pixels[start : start + 64].to(self.device)
            for index in self.views:
                latents.append(self.encoder(view(batch, index)).cpu())
                progress.advance(len(batch))
        return torch.cat(latents)

    def _nll(self, images: Tensor) -> Tensor:
        """Latent NLL of each raw image, averaged over the views when `tta` is on: [B]."""
        images = self._prepare(images)
        views = self.views if self.config.tta else range(1)
        return torch.stack([self.flow.nll(self.encoder(view(images, index))) for index in views]).mean(dim=0)

    def _score(self, batch: Tensor, *, with_maps: bool) -> Scores:
        cfg = self.config
        was_training = self.training
        self.eval()  # BatchNorm must use its running statistics, whatever the caller's mode
        try:
            batch = batch.to(self.device)
            with torch.no_grad():
                nll = self._nll(batch)
                prepared = self._prepare(batch)
                error = (self.decoder(self.encoder(prepared)) - prepared).abs().mean(dim=1)  # [B, S, S]
            maps = None
            if with_maps and cfg.map == "gradient":
                _, grad = input_gradient(self._nll, batch)
                # log1p ranks pixels as the raw norm does (pixel AUROC and PRO are unchanged) and
                # lets the heat map's linear colour scale show far outliers (gradients reach 1e5)
                # without flattening every other pixel to blue.
                maps = torch.log1p(gaussian_blur(channel_norm(grad), cfg.map_sigma))
            elif with_maps:
                maps = gaussian_blur(error, cfg.map_sigma)
        finally:
            self.train(was_training)
        return Scores(
            image=nll.cpu(),
            maps=None if maps is None else maps.cpu(),
            extra={"reconstruction_l1": error.mean(dim=(1, 2)).cpu()},
        )

    def calibrate_threshold(self, normal_scores: np.ndarray, fpr: float) -> float:
        """The paper's threshold: a one-sided confidence bound on the likelihoods of normal images.

        Normal NLLs are taken as Gaussian, and the threshold is the bound mean + z_(1-fpr) * std
        that a normal image exceeds with probability `fpr`. Unlike the empirical quantile it uses
        every held-out score, so it does not hinge on the one or two largest when `fpr` is small;
        but NLLs have a heavier right tail than a Gaussian, so the realized false-alarm rate can
        exceed `fpr` (MTD: 5.8% for a 1% target; "quantile" is the empirical rule). With fpr = 0
        the bound is infinite: the largest normal score is used instead.
        """
        if self.config.threshold_rule == "quantile" or fpr == 0.0:
            return calibrate_threshold(normal_scores, fpr)
        return gaussian_bound(normal_scores, fpr)
