"""Chapter 2 background: forward process closed form, DDPM/DDIM sampling, sliced Wasserstein."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctrlgen.experiments import ch02_background
from ctrlgen.metrics.distribution import sliced_wasserstein


@pytest.fixture(scope="module")
def ddpm():
    return ch02_background.make_scheduler("ddpm", 1000, "linear")


@pytest.mark.parametrize("t", [0, 1, 37, 500, 999])
def test_chain_moments_equal_the_closed_form(ddpm, t):
    m, v = ch02_background.chain_moments(ddpm.alphas, t)
    abar = float(ddpm.alphas_cumprod[t])
    assert m == pytest.approx(math.sqrt(abar), abs=1e-6) and v == pytest.approx(1 - abar, abs=1e-6)


def test_linear_schedule_matches_ddpm_paper(ddpm):
    """Ho et al. (2020): β_1 = 1e-4 → β_T = 0.02 linearly; ᾱ_T ≈ 4e-5."""
    assert float(ddpm.betas[0]) == pytest.approx(1e-4) and float(ddpm.betas[-1]) == pytest.approx(0.02)
    assert float(ddpm.alphas_cumprod[-1]) == pytest.approx(4.04e-5, rel=0.05)


def test_simulated_chain_matches_closed_form_moments(ddpm):
    x0 = torch.full((20000, 2), 1.5)
    gen = torch.Generator().manual_seed(0)
    chain = ch02_background.forward_chain(ddpm, x0, 300, gen)
    abar = float(ddpm.alphas_cumprod[300])
    assert chain.mean().item() == pytest.approx(1.5 * math.sqrt(abar), abs=0.02)
    assert chain.var().item() == pytest.approx(1 - abar, abs=0.02)


def test_closed_form_is_diffusers_add_noise(ddpm):
    x0, noise = torch.randn(5, 2), torch.randn(5, 2)
    abar = ddpm.alphas_cumprod[123]
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert torch.allclose(ch02_background.forward_closed_form(ddpm, x0, 123, noise), expected, atol=1e-6)


def test_sliced_wasserstein_of_a_shifted_point_mass():
    """Two point masses a vector v apart: W1 along direction u is |v·u|, whose mean over uniform
    directions in 2-D is 2|v|/π."""
    a = np.zeros((10, 2))
    b = a + np.array([3.0, 4.0])
    assert sliced_wasserstein(a, b, n_projections=4000, seed=1) == pytest.approx(2 * 5 / math.pi, rel=0.03)
    assert sliced_wasserstein(a, a) == 0.0
    with pytest.raises(ValueError):
        sliced_wasserstein(a, np.zeros((3, 3)))


def test_toy_distributions_are_standardised_and_seeded():
    for name in ch02_background.TOY_DISTRIBUTIONS:
        x = ch02_background.sample_toy(name, 4000, seed=3)
        assert x.shape == (4000, 2) and np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0), 1, atol=1e-4)
        assert np.array_equal(x, ch02_background.sample_toy(name, 4000, seed=3))
    with pytest.raises(ValueError, match="unknown toy distribution"):
        ch02_background.sample_toy("circle", 10, 0)


class _OracleGaussianEps(torch.nn.Module):
    """The exact ε-predictor for data ~ N(0, s²I): ε* = √(1−ᾱ) x_t / (ᾱ s² + 1 − ᾱ)."""

    def __init__(self, scheduler, s: float):
        super().__init__()
        self.abar, self.s2 = scheduler.alphas_cumprod, s * s

    def forward(self, x, t):
        abar = self.abar[int(t)]
        return (1 - abar).sqrt() * x / (abar * self.s2 + 1 - abar)


@pytest.mark.parametrize("kind,steps", [("ddpm", 1000), ("ddim", 50)])
def test_samplers_recover_a_gaussian_with_the_exact_denoiser(kind, steps):
    """With the closed-form ε for Gaussian data, both samplers must return std ≈ s (independent check)."""
    scheduler = ch02_background.make_scheduler(kind, 1000, "linear")
    oracle = _OracleGaussianEps(scheduler, s=0.5)
    x_T = torch.randn((4000, 2), generator=torch.Generator().manual_seed(0))
    x0, _ = ch02_background.sample(oracle, scheduler, x_T, steps, seed=1)
    assert x0.std().item() == pytest.approx(0.5, rel=0.06)


def test_ddim_is_deterministic_and_ddpm_is_not():
    model = ch02_background.EpsMLP(hidden=16)
    x_T = torch.randn((64, 2), generator=torch.Generator().manual_seed(0))
    ddim = ch02_background.make_scheduler("ddim")
    a, _ = ch02_background.sample(model, ddim, x_T, 10, seed=1)
    b, _ = ch02_background.sample(model, ddim, x_T, 10, seed=2)
    assert torch.equal(a, b)
    ddpm = ch02_background.make_scheduler("ddpm")
    c, _ = ch02_background.sample(model, ddpm, x_T, 20, seed=1)
    d, _ = ch02_background.sample(model, ddpm, x_T, 20, seed=2)
    e, _ = ch02_background.sample(model, ddpm, x_T, 20, seed=1)
    assert not torch.allclose(c, d) and torch.equal(c, e)


def test_training_reduces_the_ddpm_loss():
    data = ch02_background.sample_toy("eight_gaussians", 2000, seed=0)
    model = ch02_background.EpsMLP(hidden=64)
    losses = ch02_background.train_ddpm(model, data, ch02_background.make_scheduler("ddpm"), steps=300, batch_size=256, lr=2e-3,
                              seed=0, progress=False)
    assert np.mean(losses[-50:]) < 0.8 * np.mean(losses[:20])
