"""PGAN baseline of Tables 4.1–4.4 (§4.4.2, §4.4.3): progressive growing of GANs (Karras et al., 2018).

"Progressive Growing of GANs for Improved Quality, Stability, and Variation", ICLR 2018, as used for
dermoscopy by Baur et al. (2018). Unconditional, one model per class (§4.4.3: "Since PGAN and
SL-StyleGAN are unconditional, I train them separately in each category"). The pieces of the paper:

* **pixelwise feature normalisation** (§4.2): b = a / sqrt(mean_c a_c² + ε), ε = 1e-8, after every
  generator convolution (``pixel_norm``);
* **minibatch standard deviation** (§3): the standard deviation of each feature over a group of
  samples, averaged to one number per group and appended as a constant feature map to the
  discriminator's last block (``minibatch_stddev``);
* **equalized learning rate** (§4.1): weights drawn from N(0, 1) and scaled at run time by He's
  constant c = √2 / √fan_in (``EqualConv2d``, ``EqualLinear``);
* **progressive growing with fade-in** (§2, Fig. 2): training starts at 4×4 and adds a block per
  resolution; the new block is blended in, out = (1 − α)·up(old) + α·new, with α rising 0 → 1 over
  the fade phase (``fade_in``), the real images blended the same way between resolutions;
* the loss of the paper's official code: WGAN-GP (λ = 10) with the drift term ε_drift·E[D(x)²],
  ε_drift = 0.001 (Appendix A.1), one discriminator step per generator step, and an exponential
  moving average of the generator's weights (decay 0.999) used for sampling.

Training length: ``train_steps`` generator steps split equally into the phases 4×4 (stable), then
for every further resolution a fade-in phase and a stable phase (the paper: 800k images per phase).
The optimiser is AdamW with the profile's betas and weight decay (``gan_baselines.pgan``: the thesis
§4.7.2 trains its GANs with the diffusion models' AdamW; the paper used Adam β = (0, 0.99)).

The training loop (seeding, optimisers, step loop, EMA, checkpoint/resume) is the one of ``gan_training``, shared
with StyleGAN (``stylegan``) and Pix2PixHD (``pix2pixhd``); this module supplies PGAN's networks and its losses.
Its shared names (``GANModel``, ``run_gan_training``, ``save_gan``, ...) are re-exported here as before.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrlgen.methods.baselines.gan_training import (
    AdversarialLosses,
    GANModel,
    GANSetup,
    adamw,
    config_from_section,
    ema_update,
    load_gan,
    load_gan_parts,
    pixels,
    run_gan_training,
    sample_images,
    save_gan,
    setup_gan,
    train_adversarial,
)

LRELU = 0.2  # leaky ReLU slope of both papers


# --------------------------------------------------------------------------- the paper's pieces
def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pixelwise feature vector normalisation (Karras et al. 2018, §4.2): b = a / sqrt(mean_c a² + ε)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """Append the minibatch standard-deviation feature(s) to ``x`` ``(N, C, H, W)`` (Karras et al. 2018, §3).

    As the official code (``minibatch_stddev_layer``): samples are split into groups of ``G = min(group_size, N)``
    (sample i in group i mod N/G), the standard deviation of every feature over a group (biased, + 1e-8 under
    the root) is averaged over features and pixels — per slice of C/``num_channels`` channels — and the value
    is broadcast to an extra ``(H, W)`` map of every sample of the group."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"minibatch std: batch {n} is not a multiple of the group size {g}")
    y = x.reshape(g, -1, num_channels, c // num_channels, h, w)
    y = y - y.mean(dim=0)
    y = (y.pow(2).mean(dim=0) + 1e-8).sqrt()  # (N/G, F, C/F, H, W)
    y = y.mean(dim=(2, 3, 4))  # (N/G, F)
    y = y.reshape(-1, num_channels, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


def fade_in(alpha: float, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The fade-in blend of a new resolution (Karras et al. 2018, Fig. 2): (1 − α)·old + α·new."""
    return old + (new - old) * alpha


class EqualLinear(nn.Module):
    """Dense layer with equalized learning rate (Karras et al. 2018, §4.1): w ~ N(0, 1)/lr_mul, used as
    w·c·lr_mul with c = gain/√fan_in; bias·lr_mul (StyleGAN's mapping network uses lr_mul = 0.01)."""

    def __init__(self, in_features: int, out_features: int, gain: float = math.sqrt(2), lr_mul: float = 1.0,
                 bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul))
        self.scale = gain / math.sqrt(in_features) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """Convolution with equalized learning rate (Karras et al. 2018, §4.1): c = gain/√(in·k·k), 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = math.sqrt(2),
                 bias: bool = True, padding: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


def wgan_gp_penalty(discriminator: Callable[[torch.Tensor], torch.Tensor], reals: torch.Tensor,
                    fakes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gradient penalty of WGAN-GP (Gulrajani et al., 2017; PGAN's loss): E[(‖∇D(x̂)‖₂ − 1)²] on
    x̂ = ε·x + (1 − ε)·G(z), ε ~ U(0, 1) per sample."""
    eps = torch.rand(reals.shape[0], 1, 1, 1, generator=generator).to(reals)
    mixed = (eps * reals + (1 - eps) * fakes).detach().requires_grad_(True)
    grad, = torch.autograd.grad(discriminator(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PGANConfig:
    """PGAN sizes and optimisation (profile ``gan_baselines.pgan``; full: the paper's widths at the thesis's
    256 px and the thesis's §4.7.2 GAN training: 20k steps, batch 32, lr 1e-3, AdamW)."""

    image_size: int = 64
    latent_dim: int = 64
    channels: tuple[int, ...] = (64, 64, 64, 32, 16)  # features at 4, 8, ...; a smaller image_size uses the first ones
    train_steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.0, 0.99)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    gp_weight: float = 10.0  # WGAN-GP λ
    drift_weight: float = 1e-3  # ε_drift
    ema_decay: float = 0.999  # generator weights for sampling
    mbstd_group: int = 4
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        _check_sizes("gan_baselines.pgan", self.image_size, self.channels, self.batch_size, self.mbstd_group)

    @property
    def widths(self) -> tuple[int, ...]:
        """The features at 4, 8, ..., ``image_size`` px (the first entries of ``channels``)."""
        return self.channels[:levels_of(self.image_size)]

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "PGANConfig":
        """From the profile section ``gan_baselines.pgan``; ``overrides`` replace fields."""
        return config_from_section(cls, cfg["gan_baselines"]["pgan"], overrides)


def levels_of(image_size: int) -> int:
    """Resolutions 4, 8, ..., ``image_size``: log2(image_size) − 1."""
    return int(round(math.log2(image_size))) - 1 if image_size >= 4 else 0


def _check_sizes(section: str, image_size: int, channels: Sequence[int], batch_size: int, group: int) -> None:
    levels = levels_of(image_size)
    if image_size < 4 or 2 ** (levels + 1) != image_size:
        raise ValueError(f"{section}.image_size must be a power of two >= 4, got {image_size}")
    if len(channels) < levels:
        raise ValueError(f"{section}.channels needs a width per resolution 4..{image_size} (at least {levels} values), "
                         f"got {len(channels)}: {list(channels)}")
    if batch_size % min(group, batch_size):
        raise ValueError(f"{section}.batch_size {batch_size} must be a multiple of the minibatch-std group {group}")


# --------------------------------------------------------------------------- networks
class _GBlock(nn.Module):
    """Two 3×3 convolutions (the first after a 2× nearest upsampling), each with leaky ReLU and pixel norm."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = EqualConv2d(cin, cout, 3), EqualConv2d(cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = pixel_norm(F.leaky_relu(self.conv1(x), LRELU))
        return pixel_norm(F.leaky_relu(self.conv2(x), LRELU))


class PGANGenerator(nn.Module):
    """Generator of Table 2 (Karras et al. 2018): latent → 4×4 (dense 'conv 4×4' + conv 3×3), a block per
    doubling, a linear 1×1 toRGB per resolution; ``forward(z, level, alpha)`` draws at 4·2^level px."""

    def __init__(self, latent_dim: int, channels: Sequence[int]):
        super().__init__()
        self.latent_dim, self.channels = latent_dim, tuple(channels)
        c0 = channels[0]
        self.dense = EqualLinear(latent_dim, c0 * 16, gain=math.sqrt(2) / 4)  # as the official code: gain/4
        self.conv0 = EqualConv2d(c0, c0, 3)
        self.blocks = nn.ModuleList(_GBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.to_rgb = nn.ModuleList(EqualConv2d(c, 3, 1, gain=1.0) for c in channels)

    @property
    def max_level(self) -> int:
        return len(self.channels) - 1

    def forward(self, z: torch.Tensor, level: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        level = self.max_level if level is None else level
        x = self.dense(pixel_norm(z)).view(-1, self.channels[0], 4, 4)
        x = pixel_norm(F.leaky_relu(x, LRELU))
        x = pixel_norm(F.leaky_relu(self.conv0(x), LRELU))
        prev = x
        for block in self.blocks[:level]:
            prev, x = x, block(x)
        rgb = self.to_rgb[level](x)
        if level > 0 and alpha < 1:
            rgb = fade_in(alpha, F.interpolate(self.to_rgb[level - 1](prev), scale_factor=2, mode="nearest"), rgb)
        return rgb


class _DBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = EqualConv2d(cin, cin, 3), EqualConv2d(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), LRELU)), LRELU)
        return F.avg_pool2d(x, 2)


class PGANDiscriminator(nn.Module):
    """Discriminator of Table 2 (Karras et al. 2018), the generator mirrored: fromRGB 1×1, a block per halving,
    then minibatch stddev, conv 3×3, dense 'conv 4×4', dense → 1 score (no sigmoid: WGAN-GP)."""

    def __init__(self, channels: Sequence[int], mbstd_group: int = 4):
        super().__init__()
        self.channels, self.mbstd_group = tuple(channels), mbstd_group
        self.from_rgb = nn.ModuleList(EqualConv2d(3, c, 1) for c in channels)
        self.blocks = nn.ModuleList(_DBlock(b, a) for a, b in zip(channels[:-1], channels[1:]))
        c0 = channels[0]
        self.conv = EqualConv2d(c0 + 1, c0, 3)
        self.dense = EqualLinear(c0 * 16, c0)
        self.out = EqualLinear(c0, 1, gain=1.0)

    def forward(self, img: torch.Tensor, level: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        level = len(self.channels) - 1 if level is None else level
        x = F.leaky_relu(self.from_rgb[level](img), LRELU)
        if level > 0:
            x = self.blocks[level - 1](x)
            if alpha < 1:
                old = F.leaky_relu(self.from_rgb[level - 1](F.avg_pool2d(img, 2)), LRELU)
                x = fade_in(alpha, old, x)
        for block in reversed(self.blocks[:level - 1] if level > 0 else []):
            x = block(x)
        x = minibatch_stddev(x, self.mbstd_group)
        x = F.leaky_relu(self.conv(x), LRELU)
        x = F.leaky_relu(self.dense(x.flatten(1)), LRELU)
        return self.out(x).squeeze(1)


# --------------------------------------------------------------------------- PGAN training
def phase_schedule(train_steps: int, levels: int) -> list[tuple[int, bool]]:
    """(level, fading) of each step: 4×4 stable, then per further level a fade-in and a stable phase,
    every phase ``train_steps // (2·levels − 1)`` steps (the last takes the remainder)."""
    phases = [(0, False)] + [(lv, fade) for lv in range(1, levels) for fade in (True, False)]
    per = max(1, train_steps // len(phases))
    plan = [p for p in phases for _ in range(per)][:train_steps]
    return plan + [phases[-1]] * (train_steps - len(plan))


def level_alpha(plan: Sequence[tuple[int, bool]], step: int) -> tuple[int, float]:
    """Level and fade-in α at ``step``: α rises linearly through a fade phase, 1 elsewhere."""
    level, fading = plan[step]
    if not fading:
        return level, 1.0
    first = next(i for i, p in enumerate(plan) if p == (level, True))
    length = sum(1 for p in plan if p == (level, True))
    return level, (step - first) / length


def real_at(x: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
    """Real images at the resolution of ``level``, blended during a fade-in like the generator's output
    (the official code's ``process_reals``): (1 − α)·up(down(x)) + α·x at the new resolution."""
    side = 4 * 2 ** level
    x = F.adaptive_avg_pool2d(x, side) if x.shape[-1] != side else x
    if level > 0 and alpha < 1:
        x = fade_in(alpha, F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest"), x)
    return x


def pgan_losses(setup: GANSetup, data: torch.Tensor, config: PGANConfig,
                device: str | torch.device = "cpu") -> AdversarialLosses:
    """PGAN's losses (Karras et al. 2018, Appendix A.1) at the step's level and fade-in α (``phase_schedule``):
    D: E[D(G(z))] − E[D(x)] + λ·WGAN-GP + ε_drift·E[D(x)²]; G: −E[D(G(z))]. Logs the level, α and the penalty."""
    g, d, plan = setup.generator, setup.discriminator, phase_schedule(config.train_steps, len(config.widths))

    def d_loss(step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        level, alpha = level_alpha(plan, step)
        reals = real_at(data[setup.rng.integers(0, len(data), config.batch_size)], level, alpha).to(device)
        fakes = g(torch.randn(config.batch_size, config.latent_dim).to(device), level, alpha).detach()
        d_real, d_fake = d(reals, level, alpha), d(fakes, level, alpha)
        gp = wgan_gp_penalty(lambda x: d(x, level, alpha), reals, fakes)
        loss = d_fake.mean() - d_real.mean() + config.gp_weight * gp + config.drift_weight * d_real.pow(2).mean()
        return loss, {"level": level, "alpha": alpha, "gp": gp}

    def g_loss(ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        level, alpha = ctx["level"], ctx["alpha"]
        z = torch.randn(config.batch_size, config.latent_dim).to(device)
        return -d(g(z, level, alpha), level, alpha).mean(), ctx

    return AdversarialLosses(d_loss, g_loss)


def train_pgan(images: np.ndarray, config: PGANConfig, seed: int = 0, progress: bool = True,
               output_dir: str | Path = "", device: str | torch.device = "cpu") -> GANModel:
    """Train one PGAN on ``images`` (uint8 ``(N, H, W, 3)``, resized to ``config.image_size``), WGAN-GP with
    drift, fade-in growth (``pgan_losses`` in ``gan_training``'s loop); returns the EMA generator (``generate``
    draws from it). Checkpoints every ``config.checkpoint_every`` steps into ``output_dir``; a rerun there resumes."""
    data = pixels(images, config.image_size, "PGAN training images")
    setup = setup_gan(lambda: PGANGenerator(config.latent_dim, config.widths),
                      lambda: PGANDiscriminator(config.widths, config.mbstd_group), seed, device)
    return train_adversarial("pgan", config, setup, pgan_losses(setup, data, config, device), output_dir, progress,
                             "PGAN")


def generate(model: GANModel, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """``n`` PGAN samples at full resolution: float32 ``(n, 3, H, W)`` in [0, 1] on the CPU."""
    if model.kind != "pgan":
        raise ValueError(f"progressive_gan.generate draws from a PGAN, got a {model.kind!r} model")
    return sample_images(model.generator, model.config.latent_dim, n, seed, batch_size)


def load_pgan(folder: str | Path) -> GANModel:
    """A PGAN written by ``save_gan``."""
    return load_gan(folder, "pgan", PGANConfig, lambda c: PGANGenerator(c.latent_dim, c.widths), "a PGAN")


__all__ = [
    "PGANConfig", "PGANGenerator", "PGANDiscriminator", "GANModel", "EqualConv2d", "EqualLinear", "pixel_norm",
    "minibatch_stddev", "fade_in", "wgan_gp_penalty", "phase_schedule", "level_alpha", "real_at", "train_pgan",
    "generate", "save_gan", "load_pgan", "load_gan_parts", "sample_images", "run_gan_training", "ema_update",
    "pixels", "adamw", "pgan_losses",
]
