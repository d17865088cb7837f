"""Normalizing flows on feature vectors: Real-NVP/GLOW affine couplings with soft clamping.

Shared by `differnet` (a flow on pooled pretrained features) and `encoder_flow` (a flow on an
autoencoder's latent). The coupling blocks come from FrEIA; what is ours is the DifferNet
configuration (fixed random permutation, then an affine coupling whose scale and shift come from
one fully connected subnet, log-scales soft-clamped to (-alpha, alpha)), a fixed standardization
of the inputs, the negative log-likelihood, and a seeded maximum-likelihood training loop on
cached vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from torch import Tensor, nn

from adqueue.core.progress import NullProgress, Progress


class SoftClamp:
    """The paper's sigma_alpha(h) = 2 alpha / pi * atan(h / alpha), divided by alpha.

    FrEIA multiplies the activation's output by `clamp`, and its own "ATAN" is atan(h) rather than
    atan(h / alpha): with alpha = 3 that would be three times as steep near 0 as DifferNet's.
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def __call__(self, h: Tensor) -> Tensor:
        return (2.0 / math.pi) * torch.atan(h / self.alpha)


def fully_connected(hidden: int, n_hidden: int, dropout: float = 0.0) -> Callable[[int, int], nn.Module]:
    """Subnet constructor: `n_hidden` ReLU layers of width `hidden` (DifferNet: 3 x 2048)."""

    def build(dims_in: int, dims_out: int) -> nn.Module:
        layers: list[nn.Module] = []
        width = dims_in
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        last = nn.Linear(width, dims_out)
        # Start every coupling at the identity: stable first steps, whatever the depth.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(*layers, last)

    return build


@dataclass(frozen=True)
class FlowSpec:
    dim: int
    n_blocks: int = 8
    hidden: int = 2048
    n_hidden: int = 3
    clamp: float = 3.0
    seed: int = 0


class CouplingFlow(nn.Module):
    """x [B, D] -> z [B, D] with log|det dz/dx| [B]; inputs are standardized first.

    The standardization (per-dimension mean and scale of the training vectors) is a fixed affine
    map: it shifts every log-likelihood by the same constant and lets one learning rate suit
    features of any magnitude.
    """

    shift: Tensor
    log_scale: Tensor

    def __init__(self, spec: FlowSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("shift", torch.zeros(spec.dim))
        self.register_buffer("log_scale", torch.zeros(spec.dim))
        self.inn = Ff.SequenceINN(spec.dim)
        subnet = fully_connected(spec.hidden, spec.n_hidden)
        numpy_state = np.random.get_state()  # FrEIA's PermuteRandom reseeds numpy's global RNG
        for block in range(spec.n_blocks):
            self.inn.append(Fm.PermuteRandom, seed=spec.seed * 1000 + block)
            self.inn.append(
                Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=spec.clamp,
                clamp_activation=SoftClamp(spec.clamp),
            )
        np.random.set_state(numpy_state)

    def set_standardization(self, vectors: Tensor) -> None:
        """Fix the input standardization from training vectors [N, D]."""
        vectors = vectors.double()
        self.shift.copy_(vectors.mean(dim=0).float())
        std = vectors.std(dim=0) if len(vectors) > 1 else torch.ones(vectors.shape[1], dtype=torch.float64)
        self.log_scale.copy_(-torch.log(std.clamp_min(1e-6)).float())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = (x - self.shift) * torch.exp(self.log_scale)
        z, log_det = self.inn(x)
        return z, log_det + self.log_scale.sum()

    def inverse(self, z: Tensor) -> Tensor:
        x, _ = self.inn(z, rev=True)
        return x * torch.exp(-self.log_scale) + self.shift

    def nll(self, x: Tensor) -> Tensor:
        """Negative log-likelihood per vector, up to the constant D/2 log(2 pi): [B]."""
        z, log_det = self(x)
        return negative_log_likelihood(z, log_det)


def negative_log_likelihood(z: Tensor, log_det: Tensor) -> Tensor:
    """0.5 ||z||^2 - log|det J| per sample (DifferNet's loss, without the constant)."""
    return 0.5 * z.pow(2).sum(dim=1) - log_det


@dataclass(frozen=True)
class FlowTraining:
    epochs: int
    batch_size: int = 96
    lr: float = 2e-4
    weight_decay: float = 1e-5
    grad_clip: float = 10.0
    seed: int = 0


def fit_flow(
    flow: CouplingFlow, vectors: Tensor, training: FlowTraining, *, progress: Progress | None = None
) -> list[float]:
    """Maximum-likelihood training on cached vectors [N, D]; returns the mean loss per epoch.

    The loss is the NLL divided by D, so its scale does not depend on the feature size.
    Batches are drawn with a seeded generator: the same seed gives the same flow on a CPU.
    """
    progress = progress or NullProgress()
    flow.set_standardization(vectors)
    device = flow.shift.device
    vectors = vectors.to(device)
    optimizer = torch.optim.Adam(flow.inn.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    generator = torch.Generator().manual_seed(training.seed)
    batches_per_epoch = max(1, math.ceil(len(vectors) / training.batch_size))
    progress.phase("training flow", training.epochs * batches_per_epoch)
    losses: list[float] = []
    flow.train()
    for _ in range(training.epochs):
        order = torch.randperm(len(vectors), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(vectors), training.batch_size):
            batch = vectors[order[start : start + training.batch_size]]
            loss = flow.nll(batch).mean() / flow.spec.dim
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(flow.inn.parameters(), training.grad_clip)
            optimizer.step()
            value = loss.detach().item()
            total += value * len(batch)
            progress.advance(loss=value)
        losses.append(total / len(vectors))
    flow.eval()
    return losses
