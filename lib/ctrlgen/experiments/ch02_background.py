"""Chapter 2's experiments: DDPM on a 2-D toy distribution, the background of thesis §2.1.3, small enough to watch.

The base models chapter 2 pretrains are ``ctrlgen.experiments.base_models`` (every chapter uses them).

The forward process uses the thesis's notation: q(x_t | x_{t-1}) = N(√α_t x_{t-1}, (1 − α_t) I)
(Eq. 2.12), whose T-fold product (Eq. 2.11) has the closed form q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)
with ᾱ_t = ∏_{s≤t} α_s. The noise predictor is trained with L_DDPM (Eq. 2.23) and sampled either
ancestrally (Eq. 2.24, diffusers' ``DDPMScheduler``) or deterministically (``DDIMScheduler``, η = 0).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from sklearn.datasets import make_moons, make_swiss_roll
from torch import nn

from ctrlgen.progress import tqdm

TOY_DISTRIBUTIONS = ("eight_gaussians", "two_moons", "swiss_roll")


def sample_toy(name: str, n: int, seed: int) -> np.ndarray:
    """``n`` points from a named 2-D distribution, standardised to zero mean and unit variance."""
    rng = np.random.default_rng(seed)
    if name == "eight_gaussians":
        angles = rng.integers(0, 8, size=n) * (2 * math.pi / 8)
        centres = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 2.0
        points = centres + 0.12 * rng.standard_normal((n, 2))
    elif name == "two_moons":
        points, _ = make_moons(n_samples=n, noise=0.06, random_state=int(rng.integers(2**31)))
    elif name == "swiss_roll":
        roll, _ = make_swiss_roll(n_samples=n, noise=0.4, random_state=int(rng.integers(2**31)))
        points = roll[:, [0, 2]]
    else:
        raise ValueError(f"unknown toy distribution {name!r}; choose one of {', '.join(TOY_DISTRIBUTIONS)}")
    points = (points - points.mean(0)) / points.std(0)
    return points.astype(np.float32)


def make_scheduler(kind: str, num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
    """A diffusers scheduler: ``"ddpm"`` (ancestral, Eq. 2.24) or ``"ddim"`` (deterministic, η = 0)."""
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**common, variance_type="fixed_small")
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)
    raise ValueError(f"unknown scheduler kind {kind!r}; use 'ddpm' or 'ddim'")


def forward_closed_form(scheduler, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε: one draw from q(x_t | x_0) (diffusers' ``add_noise``)."""
    timesteps = torch.full((x0.shape[0],), t, dtype=torch.long)
    return scheduler.add_noise(x0, noise, timesteps)


def forward_chain(scheduler, x0: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    """Iterate the Markov chain of Eq. (2.11)–(2.12) from x_0 to x_t, one Gaussian step at a time.

    diffusers indexes timesteps from 0, so "step t" here applies α_0 … α_t (t + 1 transitions),
    which is what ``add_noise(x0, ε, t)`` marginalises.
    """
    alphas = scheduler.alphas
    x = x0.clone()
    for s in range(t + 1):
        eps = torch.randn(x.shape, generator=generator)
        x = alphas[s].sqrt() * x + (1 - alphas[s]).sqrt() * eps
    return x


def chain_moments(alphas: torch.Tensor, t: int) -> tuple[float, float]:
    """Exact mean coefficient m and variance v of the iterated chain after steps 0..t.

    The recursion m_s = √α_s m_{s−1}, v_s = α_s v_{s−1} + (1 − α_s) never forms ᾱ_t, so it checks the
    closed form (m = √ᾱ_t, v = 1 − ᾱ_t) independently.
    """
    m, v = 1.0, 0.0
    for s in range(t + 1):
        a = float(alphas[s])
        m, v = math.sqrt(a) * m, a * v + (1.0 - a)
    return m, v


class SinusoidalEmbedding(nn.Module):
    """Transformer-style timestep embedding (as in the DDPM U-Net)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class EpsMLP(nn.Module):
    """ε_θ(x_t, t) for 2-D points: an MLP on [x_t, embed(t)]."""

    def __init__(self, hidden: int = 128, time_dim: int = 32, depth: int = 3):
        super().__init__()
        self.embed = SinusoidalEmbedding(time_dim)
        layers: list[nn.Module] = [nn.Linear(2 + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(torch.cat([x, self.embed(t)], dim=1))


def train_ddpm(model: nn.Module, data: np.ndarray, scheduler, steps: int, batch_size: int, lr: float,
               seed: int, progress: bool = True) -> list[float]:
    """Minimise L_DDPM = E_{t,x_0,ε} ||ε_θ(x_t, t) − ε||² (Eq. 2.23); return the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.from_numpy(data)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1))
    num_t = scheduler.config.num_train_timesteps
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="DDPM training", disable=not progress, mininterval=1.0):
        idx = torch.randint(0, len(points), (batch_size,), generator=generator)
        x0 = points[idx]
        t = torch.randint(0, num_t, (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        loss = torch.mean((model(x_t, t) - noise) ** 2)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        lr_schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def sample(model: nn.Module, scheduler, x_T: torch.Tensor, num_inference_steps: int, seed: int,
           keep_every: int = 0, callback: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``scheduler``'s reverse process from ``x_T``; return x_0 and (optionally) a thinned trajectory.

    With ``DDPMScheduler`` each step draws fresh noise (Eq. 2.24) from a generator seeded by ``seed``;
    with ``DDIMScheduler`` (η = 0) the map x_T → x_0 is deterministic.
    """
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters  # DDPM does, DDIM (η=0) needs none
    x = x_T.clone()
    trajectory = [x.clone()] if keep_every else []
    for i, t in enumerate(scheduler.timesteps):
        eps = model(x, t)
        kwargs = {"generator": generator} if takes_generator else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        if callback is not None:
            callback(i, x)
        if keep_every and ((i + 1) % keep_every == 0 or i + 1 == len(scheduler.timesteps)):
            trajectory.append(x.clone())
    return x, trajectory
