"""`ebm`: an energy-based model trained from scratch; energy and gradient-map scores.

Seed paper: E. U. Genc, N. Ahuja, I. J. Ndiour, O. Tickoo, "Energy-Based Anomaly Detection and
Localization", Intel Labs (ICLR 2021 EBM workshop).

Network (their Table 3): a 3x3 conv to `width` filters, five 4x4 stride-2 convs (x2, x4, x8, x8,
x8 the width), a last conv that reduces the remaining map to one scalar, ELU between layers. At
128 px and width 32 this is exactly Table 3 (the last conv is 4x4, stride 1, no padding). Other
sizes must be multiples of 32: the last conv then covers the whole (size/32)^2 map, which is the
same topology with a differently sized receptive field at the end. Each image's brightness and
contrast are standardized first (`normalize`, components/photometric.py), as for encoder_flow.

Training: maximum likelihood by contrastive divergence, loss = E(data) - E(negatives). Negatives
come from short-run SGLD chains started from uniform noise, non-persistent by default (the paper's
setting); a replay buffer is an option. Sampling takes gradients w.r.t. the input only, so no
parameter gradient is accumulated. Blow-up guards (both on by default):
- energy-magnitude regularization alpha * (E+^2 + E-^2) (Du & Mordatch 2019): the CD loss only
  fixes energy differences, so without it both energies drift and the net saturates; this anchors
  them near zero and keeps the SGLD gradients on a stable scale;
- clipping the parameter-gradient norm: a single batch of badly mixed negatives can give one huge
  step that the regularizer alone does not stop.
A non-finite loss stops training with a clear error rather than saving a broken model.

Free knobs (the paper gives none): the regularized energy's input gradients are small, so with an
SGLD step size of 1 the chains hardly leave their uniform-noise start and the net only learns
"data vs. white noise"; a step of 10 with alpha 0.1 lets them move toward smooth, data-like
images; lr 1e-4 is stable where 1e-3 made the energies swing.

Size: the paper downsizes to 128 px "to keep the training time manageable" on GPUs; the default
here is 64 px, a quarter of the cost per SGLD step, because on a 2-core CPU one update at 128 px
(16 chains x 100 steps) takes about a minute, and 128 px scored no better on MTD. `image_size=128`
gives the paper's Table 3 exactly.

Measured on MTD (manifest split; grey, normalized; image AUROC of energy / A_std L2), one run
each: 64 px, 30 updates x 16 chains x 100 steps: 0.632 / 0.463; 200 x 16 x 20 steps: 0.606 /
0.519; the same with a 500-chain replay buffer: 0.586 / 0.527; 100 x 16 x 30 steps at lr 1e-3,
alpha 1, step 100: 0.546 / 0.547; 100 x 16 x 50 steps with data noise 0.02: 0.582 / 0.532;
128 px after 2 updates: 0.592 / 0.571. Without normalization, 128 px runs gave A_std 0.54-0.58.
No budget we could afford on a CPU moved MTD much past the untrained net; the paper's own EBM
averages 0.72 image AUROC on MVTec.

Scores (their Sec. 2): the energy E; the gradient map g = dE/dx; A_raw, the L_r norm over pixels
of the L_r channel norm of g; A_std the same on g standardized per pixel and channel with the
training images' gradient mean and std (stored with the model). r = 1 and 2 are both reported;
the image score is A_std with r = `norm`, the map a_std (its per-pixel channel norm), blurred by
`map_sigma` (which lifted pixel AUROC on MTD in most of our runs; 0 gives the paper's raw map).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from adqueue.core.progress import NullProgress, Progress
from adqueue.detectors.base import Detector, FitResult, Scores, dataset_size
from adqueue.detectors.components.gradient_maps import (
    RunningMoments,
    channel_norm,
    image_norm,
    input_gradient,
    standardize,
)
from adqueue.detectors.components.maps import gaussian_blur
from adqueue.detectors.components.photometric import standardize_images
from adqueue.detectors.ebm.config import EBMConfig


class EnergyNet(nn.Module):
    """Table 3 of the paper: [B, C, S, S] in [0, 1] -> energy [B]."""

    def __init__(self, channels: int, width: int, image_size: int, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize
        widths = [width * m for m in (1, 2, 4, 8, 8, 8)]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, 1, 1), nn.ELU()]
        for f_in, f_out in pairwise(widths):
            layers += [nn.Conv2d(f_in, f_out, 4, 2, 1), nn.ELU()]
        layers.append(nn.Conv2d(widths[-1], 1, image_size // 32, 1, 0))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize:
            x = standardize_images(x)
        # Centred input, as usual for EBMs on images; the gradient w.r.t. x just scales by 2.
        return self.layers(x * 2.0 - 1.0).flatten()


class EBMDetector(Detector):
    name = "ebm"
    Config = EBMConfig
    min_fit_images = 16  # trained from scratch: on fewer it learns those images, not the texture
    # The score needs the input gradient anyway, so a map costs only its blur.
    costly_maps = False
    grad_mean: Tensor
    grad_std: Tensor
    n_fitted: Tensor

    def __init__(self, config: EBMConfig) -> None:
        super().__init__(config)
        # Seeded initial weights without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = EnergyNet(config.channels, config.width, config.image_size, config.normalize)
        shape = (config.channels, config.image_size, config.image_size)
        # Training-gradient statistics; their shape is fixed by the config, so a fresh detector
        # loads a saved state as is.
        self.register_buffer("grad_mean", torch.zeros(shape))
        self.register_buffer("grad_std", torch.ones(shape))
        # How many images the statistics came from. Model files carry it, and older code reads a
        # zero as "not fitted", so it stays; whether this detector is fitted is the base's flag.
        self.register_buffer("n_fitted", torch.zeros((), dtype=torch.int64))

    def energy(self, x: Tensor) -> Tensor:
        return self.net(x)

    def sample(self, start: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        """Run SGLD chains from `start` for `steps` steps; gradients w.r.t. the samples only."""
        cfg = self.config
        x = start.detach()
        for _ in range(steps):
            _, grad = input_gradient(self.net, x)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = (x - cfg.sgld_step_size * grad + cfg.sgld_noise * noise).clamp_(0.0, 1.0)
        return x

    def _fit(self, images: Dataset[Tensor], progress: Progress) -> FitResult:
        cfg = self.config
        n_images = dataset_size(images)
        self._check_batch(images[0][None])
        generator = torch.Generator().manual_seed(cfg.seed)  # batch order and replay picks
        # Image noise is drawn where the chains run (a GPU would otherwise wait on the CPU); its own
        # seed keeps its stream apart from the batch order's.
        noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        buffer = _ReplayBuffer(cfg, generator) if cfg.replay_buffer else None
        optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        order = _BatchOrder(n_images, cfg.batch_size, generator)
        losses: list[float] = []
        progress.phase("training energy net", cfg.iterations)
        for _ in range(cfg.iterations):
            positives = _stack(images, order.next().tolist()).to(self.device)
            if cfg.data_noise > 0:
                positives = positives + cfg.data_noise * torch.randn(
                    positives.shape, generator=noise_gen, device=self.device)
            if buffer:
                start = buffer.draw().to(self.device)
            else:
                start = torch.rand(self._shape(cfg.negatives), generator=noise_gen, device=self.device)
            negatives = self.sample(start, cfg.sgld_steps, noise_gen)
            if buffer:
                buffer.store(negatives.cpu())
            e_pos, e_neg = self.net(positives), self.net(negatives)
            loss = e_pos.mean() - e_neg.mean() + cfg.alpha * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
            if not torch.isfinite(loss):
                raise RuntimeError(f"ebm training diverged (loss {loss.item()}): lower lr or raise alpha")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            progress.advance(1, loss=losses[-1], e_pos=e_pos.mean().item(), e_neg=e_neg.mean().item())
        self.net.zero_grad(set_to_none=True)
        self.fit_gradient_statistics(images, progress)
        return FitResult(losses=losses, info={"e_pos": e_pos.mean().item(), "e_neg": e_neg.mean().item()})

    def fit_gradient_statistics(
        self, images: Dataset[Tensor] | Tensor, progress: Progress | None = None
    ) -> None:
        """Per-pixel, per-channel mean and std of the gradient maps of `images` ([C, S, S] each)."""
        progress = progress or NullProgress()
        n_images = len(images) if isinstance(images, Tensor) else dataset_size(images)
        if n_images < 2:
            raise ValueError("need at least two training images for gradient statistics")
        moments = RunningMoments()
        progress.phase("gradient statistics", n_images)
        for start in range(0, n_images, self.config.batch_size):
            indices = range(start, min(start + self.config.batch_size, n_images))
            chunk = _stack(images, indices).to(self.device)
            moments.update(input_gradient(self.net, chunk)[1])
            progress.advance(len(chunk))
        assert moments.mean is not None
        self.grad_mean.copy_(moments.mean.to(self.grad_mean.dtype))
        self.grad_std.copy_(moments.std().to(self.grad_std.dtype))
        self.n_fitted.fill_(moments.count)

    def _score(self, batch: Tensor, *, with_maps: bool) -> Scores:
        self._check_batch(batch)
        energy, grad = input_gradient(self.net, batch.to(self.device))
        z = standardize(grad, self.grad_mean, self.grad_std)
        extra = {"energy": energy}
        for r in (1, 2):
            extra[f"a_raw_l{r}"] = image_norm(channel_norm(grad, r), r)
            extra[f"a_std_l{r}"] = image_norm(channel_norm(z, r), r)
        maps = None
        if with_maps:
            maps = gaussian_blur(channel_norm(z, self.config.norm), self.config.map_sigma).cpu()
        extra = {name: value.cpu() for name, value in extra.items()}
        return Scores(image=extra[f"a_std_l{self.config.norm}"], maps=maps, extra=extra)

    def _shape(self, n: int) -> tuple[int, int, int, int]:
        return (n, self.config.channels, self.config.image_size, self.config.image_size)

    def _check_batch(self, batch: Tensor) -> None:
        if batch.dim() != 4 or tuple(batch.shape[1:]) != self._shape(1)[1:]:
            raise ValueError(f"ebm expects [B, {', '.join(map(str, self._shape(1)[1:]))}] images, "
                             f"got {tuple(batch.shape)}")


def _stack(images: Dataset[Tensor] | Tensor, indices: Iterable[int]) -> Tensor:
    # Batches are built on demand: a float copy of a whole large training set could exhaust memory.
    return torch.stack([images[i] for i in indices])


class _BatchOrder:
    """Seeded epochs of shuffled indices, cut into batches (the last one of an epoch wraps)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self.queue = torch.empty(0, dtype=torch.int64)

    def next(self) -> Tensor:
        while len(self.queue) < self.batch_size:
            self.queue = torch.cat([self.queue, torch.randperm(self.n, generator=self.generator)])
        picked, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        return picked


class _ReplayBuffer:
    """Persistent SGLD chains (Du & Mordatch 2019): restart most chains where earlier ones ended."""

    def __init__(self, cfg: EBMConfig, generator: torch.Generator) -> None:
        self.cfg, self.generator = cfg, generator
        shape = (cfg.replay_buffer, cfg.channels, cfg.image_size, cfg.image_size)
        self.samples = torch.rand(shape, generator=generator)
        self.picked = torch.empty(0, dtype=torch.int64)

    def draw(self) -> Tensor:
        n = self.cfg.negatives
        self.picked = torch.randint(len(self.samples), (n,), generator=self.generator)
        start = self.samples[self.picked].clone()
        fresh = torch.rand(n, generator=self.generator) < self.cfg.replay_reinit
        start[fresh] = torch.rand((int(fresh.sum()), *start.shape[1:]), generator=self.generator)
        return start

    def store(self, samples: Tensor) -> None:
        self.samples[self.picked] = samples

