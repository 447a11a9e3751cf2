"""Chapter 2 background: forward process closed form, DDPM/DDIM sampling, sliced Wasserstein."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
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


# ------------------------------------------------------------------------------ the chapter's tables and claim
TOY = {"distribution": "eight_gaussians", "chain_samples": 300, "n_data": 500, "hidden": 16, "train_steps": 3,
       "batch_size": 32, "lr": 1e-3, "num_train_timesteps": 1000, "ddim_steps": 8, "n_samples": 40,
       "beta_schedule": "linear"}


def test_moments_table_matches_the_closed_form_and_its_gap_is_the_largest_difference(ddpm):
    moments = ch02_background.moments_table(ddpm)
    assert list(moments.index) == [0, 10, 50, 100, 250, 500, 750, 999]
    assert ch02_background.max_moment_gap(moments) < 1e-6
    hand = pd.DataFrame({"chain mean coef.": [1.0, 0.5], "√ᾱ_t": [1.0, 0.25], "chain variance": [0.0, 0.4],
                         "1 − ᾱ_t": [0.1, 0.4]})
    assert ch02_background.max_moment_gap(hand) == pytest.approx(0.25)  # |0.5 − 0.25| beats |0 − 0.1|


def test_forward_simulation_is_seeded_and_names_the_record_rows(ddpm):
    table, panels = ch02_background.forward_simulation(TOY, ddpm, seed=4)
    again, _ = ch02_background.forward_simulation(TOY, ddpm, seed=4)
    assert list(table.index) == ["simulation t=50", "simulation t=200", "simulation t=999"]
    assert list(table.columns) == ["SW(chain, closed form)", "SW floor"]
    pd.testing.assert_frame_equal(table, again)
    assert set(panels) == {f"{kind}, t={t}" for kind in ("chain", "closed form") for t in (50, 200, 999)}
    assert panels["chain, t=50"].shape == (300, 2)


def test_train_toy_neither_reads_nor_moves_the_global_generator(ddpm):
    """The network's initial weights come from ``seed`` alone: two different global states give the same losses,
    and the global generator is where it was (nothing later in the kernel depends on the toy model)."""
    torch.manual_seed(123)
    _, model_a, losses_a = ch02_background.train_toy(TOY, ddpm, seed=0)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))
    torch.manual_seed(456)
    _, model_b, losses_b = ch02_background.train_toy(TOY, ddpm, seed=0)
    assert losses_a == losses_b and len(losses_a) == TOY["train_steps"]
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    assert ch02_background.final_loss([4.0] * 18 + [1.0, 3.0]) == pytest.approx(2.0)  # last 10 % of 20 steps


def test_compare_samplers_labels_and_determinism(ddpm):
    _, model, _ = ch02_background.train_toy(TOY, ddpm, seed=0)
    samplers = ch02_background.compare_samplers(model, TOY, ddpm, seed=0)
    column = "max |x₀ − x₀'| for the same x_T, another seed"
    assert list(samplers.determinism.index) == ["DDPM ancestral (1000 steps)", "DDIM η=0 (8 steps)"]
    assert samplers.determinism.loc["DDIM η=0 (8 steps)", column] == 0.0  # η = 0: the sampler seed changes nothing
    assert samplers.determinism.loc["DDPM ancestral (1000 steps)", column] > 0.0
    assert len(samplers.ddpm_path) == 5 and len(samplers.ddim_path) == 5  # x_T and four kept steps
    distances = ch02_background.distance_table(TOY, samplers, seed=0)
    assert list(distances.index) == ["data vs data (floor)", samplers.ddpm_label, samplers.ddim_label,
                                     "x_T noise (ceiling)"]


class _Recorder:
    def __init__(self):
        self.metrics, self.timings = {}, {}

    def log_table(self, table, frame):
        for row, values in frame.to_dict(orient="index").items():
            for column, value in values.items():
                self.metrics.setdefault(table, {}).setdefault(" / ".join(row), {})[column] = value

    def log_timing(self, table, row, column, value):
        self.timings.setdefault(table, {}).setdefault(row, {})[column] = value


def _fake_base():
    def result(domain, variant, seconds, cached):
        metrics = {c: 0.5 for c in ch02_background.QUALITY_COLUMNS} | {"seconds per sample": seconds / 10}
        return SimpleNamespace(is_default=variant == "selfattn", dataset="isic", source="procedural", steps=6,
                               train_seconds=seconds, cached=cached, folder=f"/m/{domain}-{variant}", metrics=metrics)
    datas = {"derm": SimpleNamespace(images=np.zeros((13, 4, 4, 3)))}
    results = {"derm": {"selfattn": result("derm", "selfattn", 1.26, False), "plain": result("derm", "plain", 0.4, True)}}
    return ch02_background.BaseModels(datas, results)


def test_pretraining_and_quality_tables_keep_wall_times_and_cache_state_out_of_the_metrics():
    base = _fake_base()
    run = _Recorder()
    pretraining = ch02_background.pretraining_table(base)
    pretraining.log(run, "ch02.pretraining")
    quality = ch02_background.quality_table(base)
    quality.log(run, "ch02.quality")
    assert run.metrics["ch02.pretraining"]["derm / plain"] == {"default base": False, "data": "isic (procedural)",
                                                               "train images": 13, "U-Net steps": 6}
    assert run.timings["ch02.pretraining"] == {"derm / selfattn": {"training wall time [s]": 1.3},
                                               "derm / plain": {"training wall time [s]": 0.4}}
    assert set(run.metrics["ch02.quality"]["derm / selfattn"]) == set(ch02_background.QUALITY_COLUMNS)
    assert run.timings["ch02.quality"]["derm / plain"] == {"seconds per sample": pytest.approx(0.04)}
    shown = pretraining.shown()  # the reader still sees all of it
    assert shown.loc[("derm", "plain"), "from cache"] and shown.loc[("derm", "selfattn"), "training wall time [s]"] == 1.3


def test_refinement_ious_by_hand():
    """A 4×4 map whose true region is the left half: A_C is 1 on two left pixels and one stray right pixel, so
    Otsu(A_C) has IoU 2/9. A_S spreads uniformly within each half, so (A_S)^τ · A_C is 2c on the left and c on
    the right (Eq. 2.29) and its Otsu mask is the left half: IoU 1."""
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, :2] = 1
    cross = torch.zeros(1, 4, 4, 2)
    cross[0, 0, 0, 1] = cross[0, 1, 0, 1] = cross[0, 3, 3, 1] = 1.0
    flat = labels[0].reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    self_attn = (same / same.sum(1, keepdim=True))[None]
    refined, plain = ch02_background.refinement_ious({"cross": cross, "self": self_attn, "labels": labels}, token=1, tau=4)
    assert refined.tolist() == [1.0] and plain.tolist() == pytest.approx([2 / 9])


def test_colour_dispersion_and_vae_slope_on_an_affine_copy():
    """images = 0.5·held + 0.25 keeps half the spread and half the within-image std, at slope 0.5; a copy keeps all."""
    held = np.random.default_rng(0).uniform(0, 1, (20, 8, 8, 3))
    from_copy = ch02_background.colour_dispersion(held, held.copy())
    assert all(abs(v - 1) < 1e-12 for v in from_copy.values()) and len(from_copy) == 6
    shrunk = ch02_background.colour_dispersion(held, 0.5 * held + 0.25)
    assert all(abs(v - 0.5) < 1e-12 for v in shrunk.values())
    slopes = ch02_background.colour_mean_slopes(held, 0.5 * held + 0.25)
    assert set(slopes) == {"VAE colour-mean slope R", "VAE colour-mean slope G", "VAE colour-mean slope B"}
    assert all(abs(v - 0.5) < 1e-9 for v in slopes.values())
    flipped = held.copy()
    flipped[..., 0] = 1 - held[..., 0]  # the red mean reversed: slope -1 in R only
    slopes = ch02_background.colour_mean_slopes(held, flipped)
    assert abs(slopes["VAE colour-mean slope R"] + 1) < 1e-9 and abs(slopes["VAE colour-mean slope G"] - 1) < 1e-9
