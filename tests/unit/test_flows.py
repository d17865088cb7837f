"""The coupling flow shared by differnet and encoder_flow, against brute-force computations."""

import math

import numpy as np
import pytest
import torch

from adqueue.detectors.components.flows import CouplingFlow, FlowSpec, FlowTraining, SoftClamp, fit_flow


def _random_flow(dim: int = 6, seed: int = 0) -> CouplingFlow:
    """A small flow far from the identity: its zero-initialized output layers get random weights."""
    torch.manual_seed(seed)
    flow = CouplingFlow(FlowSpec(dim, n_blocks=4, hidden=16, n_hidden=2, clamp=3.0, seed=seed))
    with torch.no_grad():
        for parameter in flow.inn.parameters():
            if parameter.dtype.is_floating_point:
                parameter.normal_(0.0, 0.2)
        flow.shift.normal_()
        flow.log_scale.normal_(0.0, 0.3)
    return flow.double().eval()


def test_log_det_matches_the_brute_force_jacobian() -> None:
    flow = _random_flow()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        z, log_det = flow(x)
    for i in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        sign, brute = torch.linalg.slogdet(jacobian)
        assert sign != 0
        assert float(log_det[i]) == pytest.approx(float(brute), abs=1e-6)
    # and the NLL is exactly -log N(z; 0, I) - log|det J| without the constant
    gaussian = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1)
    constant = 0.5 * 6 * math.log(2 * math.pi)
    with torch.no_grad():
        assert torch.allclose(flow.nll(x), -gaussian - log_det - constant, atol=1e-9)


def test_inverse_recovers_the_input() -> None:
    flow = _random_flow(dim=7)  # odd: unequal halves
    x = torch.randn(5, 7, dtype=torch.float64)
    z, _ = flow(x)
    assert not torch.allclose(z, x)
    assert torch.allclose(flow.inverse(z), x, atol=1e-9)


def test_soft_clamp_is_the_papers_activation() -> None:
    alpha = 3.0
    h = torch.linspace(-50, 50, 101)
    scaled = alpha * SoftClamp(alpha)(h)  # FrEIA multiplies by clamp
    assert torch.allclose(scaled, 2 * alpha / math.pi * torch.atan(h / alpha))
    assert scaled.abs().max() < alpha
    slope = (alpha * SoftClamp(alpha)(torch.tensor(1e-3, dtype=torch.float64)) / 1e-3).item()
    assert slope == pytest.approx(2 / math.pi, rel=1e-4)  # FrEIA's own "ATAN" would give alpha * 2 / pi


def test_training_raises_likelihood_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    # correlated, skewed 4-d data with a large offset and scale: the flow must learn all of it
    latent = rng.normal(size=(512, 4))
    data = torch.from_numpy(np.exp(latent @ rng.normal(size=(4, 4)) * 0.5) * 40 + 100).float()

    def trained() -> tuple[CouplingFlow, list[float]]:
        torch.manual_seed(1)
        flow = CouplingFlow(FlowSpec(4, n_blocks=4, hidden=32, n_hidden=2))
        return flow, fit_flow(flow, data, FlowTraining(epochs=15, batch_size=64, lr=1e-3, seed=3))

    flow, losses = trained()
    assert losses[-1] < losses[0] - 0.2
    with torch.no_grad():
        outlier = data[:8] + torch.tensor([0.0, 0.0, 150.0, 0.0])
        assert flow.nll(outlier).mean() > flow.nll(data[:8]).mean() + 5
        z, _ = flow(data)
    assert abs(float(z.mean())) < 0.3 and 0.6 < float(z.std()) < 1.4  # close to N(0, I)
    again, losses_again = trained()
    assert losses == losses_again
    assert torch.equal(flow.nll(data[:4]), again.nll(data[:4]))
