"""SL-StyleGAN baseline of Tables 4.1–4.4 (§4.4.2, §4.4.3): a style-based GAN trained per skin-lesion class.

The thesis's "SL-StyleGAN" is Qin et al. (2020), "A GAN-based image synthesis method for skin lesion
classification" (Comput. Methods Programs Biomed.): a StyleGAN (Karras et al., 2019) adapted to
dermoscopy and trained separately per diagnostic class (§4.4.3: "Since PGAN and SL-StyleGAN are
unconditional, I train them separately in each category"). Qin et al.'s code is not public; this
module implements the style-based generator in its **StyleGAN2 form** (Karras et al., 2020, "Analyzing
and Improving the Image Quality of StyleGAN"), trained as StyleGAN2-ADA's official code trains it:

* mapping network f: z → w, z normalised to unit second moment, ``mapping_layers`` dense layers with
  equalized learning rate and lr multiplier 0.01 (StyleGAN §2);
* synthesis network from a learned constant 4×4 input; every convolution is **modulated and
  demodulated** (StyleGAN2 Eq. 1–3, the successor of StyleGAN's AdaIN): w'_ijk = s_i·w_ijk,
  w''_ijk = w'_ijk / sqrt(Σ_i,k w'_ijk² + ε), with styles s = A(w) from a learned affine map (bias 1);
* per-pixel **noise inputs** scaled by a learned per-layer strength (StyleGAN §2, B in Fig. 1);
* skip-connection toRGB outputs summed over resolutions, a residual discriminator with the minibatch
  standard-deviation layer (StyleGAN2 Fig. 7, config E/F);
* the non-saturating logistic loss, softplus(D(G(z))) + softplus(−D(x)) for D (phase Dmain, every step)
  and softplus(−D(G(z))) for G, with **lazy R1 regularisation**: every ``r1_interval`` = k steps a separate
  D update (phase Dreg) on γ/2·E‖∇_x D(x)‖²·k over the step's real batch, and D's Adam corrected by
  c = k/(k+1) (StyleGAN2 §3.1 and Appendix B; ``training/loss.py`` and ``training/training_loop.py`` of
  stylegan2-ada-pytorch);
* an exponential moving average of the generator for sampling (no truncation: ψ = 1).

Left out, as choices of this book, and said so: ADA's augmentation pipeline, path-length
regularisation, style mixing, the FIR up/down-sampling filters (bilinear resampling here) and
progressive growing (StyleGAN2 drops it).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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
    config_from_section,
    load_gan,
    pixels,
    sample_images,
    setup_gan,
    train_adversarial,
)
from ctrlgen.methods.baselines.progressive_gan import (
    LRELU,
    EqualConv2d,
    EqualLinear,
    _check_sizes,
    levels_of,
    minibatch_stddev,
)

SQRT2 = math.sqrt(2)


@dataclass(frozen=True)
class StyleGANConfig:
    """StyleGAN2 sizes and optimisation (profile ``gan_baselines.stylegan``; full: the official 256 px
    widths, the thesis's §4.7.2 GAN training: 20k steps, batch 32, lr 1e-3, AdamW)."""

    image_size: int = 64
    z_dim: int = 64
    w_dim: int = 64
    mapping_layers: int = 2
    channels: tuple[int, ...] = (64, 64, 64, 32, 16)  # features at 4, 8, ...; a smaller image_size uses the first ones
    train_steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    adam_betas: tuple[float, float] = (0.0, 0.99)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    r1_gamma: float = 1.0  # γ of the R1 penalty
    r1_interval: int = 16  # lazy regularisation: R1 every 16 minibatches (StyleGAN2 §3.1)
    mapping_lr_mult: float = 0.01
    ema_decay: float = 0.999
    mbstd_group: int = 4
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        _check_sizes("gan_baselines.stylegan", self.image_size, self.channels, self.batch_size, self.mbstd_group)
        if self.r1_interval < 1 or self.mapping_layers < 1:
            raise ValueError(f"gan_baselines.stylegan: r1_interval and mapping_layers must be >= 1, got "
                             f"{self.r1_interval}, {self.mapping_layers}")

    @property
    def widths(self) -> tuple[int, ...]:
        """The features at 4, 8, ..., ``image_size`` px (the first entries of ``channels``)."""
        return self.channels[:levels_of(self.image_size)]

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "StyleGANConfig":
        """From the profile section ``gan_baselines.stylegan``; ``overrides`` replace fields."""
        return config_from_section(cls, cfg["gan_baselines"]["stylegan"], overrides)


# --------------------------------------------------------------------------- the paper's pieces
def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     padding: int | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Modulated convolution (StyleGAN2 Eq. 1 and 3): per sample b, w'_oik = s_bi·w_oik and, with
    ``demodulate``, w''_oik = w'_oik / sqrt(Σ_ik w'_oik² + ε); one grouped convolution for the batch.

    ``x`` ``(B, I, H, W)``, ``weight`` ``(O, I, k, k)``, ``styles`` ``(B, I)``."""
    b, cin, h, w = x.shape
    k = weight.shape[-1]
    wts = weight[None] * styles[:, None, :, None, None]  # (B, O, I, k, k)
    if demodulate:
        wts = wts * torch.rsqrt(wts.pow(2).sum(dim=(2, 3, 4), keepdim=True) + eps)
    out = F.conv2d(x.reshape(1, b * cin, h, w), wts.reshape(-1, cin, k, k),
                   padding=k // 2 if padding is None else padding, groups=b)
    return out.reshape(b, -1, *out.shape[-2:])


def r1_penalty(discriminator: Callable[[torch.Tensor], torch.Tensor], reals: torch.Tensor) -> torch.Tensor:
    """E_x ‖∇_x D(x)‖² over real images (Mescheder et al., 2018; the R1 of StyleGAN2-ADA's loss, to be
    weighted by γ/2)."""
    reals = reals.detach().requires_grad_(True)
    grad, = torch.autograd.grad(discriminator(reals).sum(), reals, create_graph=True)
    return grad.pow(2).flatten(1).sum(dim=1).mean()


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """z / sqrt(mean z² + ε) (the mapping network's input normalisation)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)


# --------------------------------------------------------------------------- generator
class MappingNetwork(nn.Module):
    """f: z → w, dense layers with leaky ReLU, lr multiplier ``lr_mul`` (StyleGAN §2)."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mul: float):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        # weight gain 1/√fan_in only: the √2 of the leaky ReLU is applied after it (bias_act's 'lrelu' gain)
        self.layers = nn.ModuleList(EqualLinear(a, b, gain=1.0, lr_mul=lr_mul) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = normalize_2nd_moment(z)
        for layer in self.layers:
            x = F.leaky_relu(layer(x), LRELU) * SQRT2  # bias_act 'lrelu' gain √2
        return x


class StyledConv(nn.Module):
    """Modulated 3×3 convolution (optionally after a 2× upsampling), noise input, bias, leaky ReLU."""

    def __init__(self, cin: int, cout: int, w_dim: int, up: bool = False):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, gain=1.0, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.up = up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = modulated_conv2d(x, self.weight, self.affine(w))
        noise = torch.randn(x.shape[0], 1, *x.shape[-2:], device=x.device, dtype=x.dtype)
        x = x + noise * self.noise_strength + self.bias[None, :, None, None]
        return F.leaky_relu(x, LRELU) * SQRT2


class ToRGB(nn.Module):
    """Modulated 1×1 convolution to RGB without demodulation (StyleGAN2's ToRGBLayer)."""

    def __init__(self, cin: int, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, cin, gain=1.0, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(3, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(3))
        self.gain = 1 / math.sqrt(cin)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return modulated_conv2d(x, self.weight, self.affine(w) * self.gain, demodulate=False) + self.bias[None, :, None, None]


class StyleGANGenerator(nn.Module):
    """Mapping + synthesis networks; ``forward(z)`` → images in [-1, 1] (unclamped) at ``image_size``."""

    def __init__(self, config: StyleGANConfig):
        super().__init__()
        ch = config.widths
        self.z_dim = config.z_dim
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.mapping_layers, config.mapping_lr_mult)
        self.const = nn.Parameter(torch.randn(ch[0], 4, 4))
        self.conv0 = StyledConv(ch[0], ch[0], config.w_dim)
        self.rgb0 = ToRGB(ch[0], config.w_dim)
        self.up_convs = nn.ModuleList(StyledConv(a, b, config.w_dim, up=True) for a, b in zip(ch[:-1], ch[1:]))
        self.convs = nn.ModuleList(StyledConv(b, b, config.w_dim) for b in ch[1:])
        self.rgbs = nn.ModuleList(ToRGB(b, config.w_dim) for b in ch[1:])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.mapping(z)
        x = self.conv0(self.const[None].expand(z.shape[0], -1, -1, -1), w)
        img = self.rgb0(x, w)
        for up, conv, rgb in zip(self.up_convs, self.convs, self.rgbs):
            x = conv(up(x, w), w)
            img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + rgb(x, w)
        return img


# --------------------------------------------------------------------------- discriminator
class _ResBlock(nn.Module):
    """Residual discriminator block (StyleGAN2 Fig. 7c): two 3×3 convs and a 2× downsampling, a 1×1 skip,
    summed and scaled by √½."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = EqualConv2d(cin, cin, 3, gain=1.0), EqualConv2d(cin, cout, 3, gain=1.0)
        self.skip = EqualConv2d(cin, cout, 1, gain=1.0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv1(x), LRELU) * SQRT2
        y = F.avg_pool2d(F.leaky_relu(self.conv2(y), LRELU) * SQRT2, 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) * math.sqrt(0.5)


class StyleGANDiscriminator(nn.Module):
    """fromRGB, residual blocks down to 4×4, then minibatch stddev, conv 3×3, dense, dense → 1 logit."""

    def __init__(self, config: StyleGANConfig):
        super().__init__()
        ch = config.widths
        self.mbstd_group = config.mbstd_group
        # as stylegan2-ada's Conv2dLayer/FullyConnectedLayer: weight gain 1/√fan_in, the activation's gain √2 after
        self.from_rgb = EqualConv2d(3, ch[-1], 1, gain=1.0)
        self.blocks = nn.ModuleList(_ResBlock(b, a) for a, b in zip(reversed(ch[:-1]), reversed(ch[1:])))
        self.conv = EqualConv2d(ch[0] + 1, ch[0], 3, gain=1.0)
        self.dense = EqualLinear(ch[0] * 16, ch[0], gain=1.0)
        self.out = EqualLinear(ch[0], 1, gain=1.0)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.from_rgb(img), LRELU) * SQRT2
        for block in self.blocks:
            x = block(x)
        x = minibatch_stddev(x, self.mbstd_group)
        x = F.leaky_relu(self.conv(x), LRELU) * SQRT2
        x = F.leaky_relu(self.dense(x.flatten(1)), LRELU) * SQRT2
        return self.out(x).squeeze(1)


# --------------------------------------------------------------------------- training and sampling
def stylegan_losses(setup: GANSetup, data: torch.Tensor, config: StyleGANConfig,
                    device: str | torch.device = "cpu") -> AdversarialLosses:
    """StyleGAN2's losses (Karras et al. 2020, §3.1; stylegan2-ada's ``training/loss.py``), as its phases:
    Dmain softplus(D(G(z))) + softplus(−D(x)) every step, no R1; Dreg γ/2·R1·k on the same real batch as its own
    D update every k = ``r1_interval`` steps (lazy R1; none when γ = 0, as the official ``do_Dr1``; logs R1);
    G softplus(−D(G(z))). Path-length regularisation (Greg) is left out (module doc)."""
    g, d = setup.generator, setup.discriminator

    def d_loss(step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        reals = data[setup.rng.integers(0, len(data), config.batch_size)].to(device)
        z = torch.randn(config.batch_size, config.z_dim).to(device)
        return F.softplus(d(g(z).detach())).mean() + F.softplus(-d(reals)).mean(), {"reals": reals}

    def d_reg(ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        r1 = r1_penalty(d, ctx["reals"])
        # scaled by the interval (the official gain = phase.interval): one R1 step stands for k of them
        return config.r1_gamma / 2 * r1 * config.r1_interval, {"r1": r1}

    def g_loss(ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        z = torch.randn(config.batch_size, config.z_dim).to(device)
        return F.softplus(-d(g(z))).mean(), {}

    return AdversarialLosses(d_loss, g_loss, d_reg if config.r1_gamma > 0 else None, config.r1_interval)


def train_stylegan(images: np.ndarray, config: StyleGANConfig, seed: int = 0, progress: bool = True,
                   output_dir: str | Path = "", device: str | torch.device = "cpu") -> GANModel:
    """Train one StyleGAN2 on ``images`` (uint8 ``(N, H, W, 3)``, resized to ``config.image_size``):
    non-saturating logistic loss with lazy R1 as its own D update every ``config.r1_interval`` steps
    (``stylegan_losses`` in ``gan_training``'s loop; D's AdamW corrected for it, StyleGAN2 Appendix B); returns the
    EMA generator. Checkpoints every ``config.checkpoint_every`` steps into ``output_dir``; a rerun there resumes."""
    data = pixels(images, config.image_size, "StyleGAN training images")
    setup = setup_gan(lambda: StyleGANGenerator(config), lambda: StyleGANDiscriminator(config), seed, device)
    return train_adversarial("stylegan", config, setup, stylegan_losses(setup, data, config, device), output_dir,
                             progress, "StyleGAN")


def generate(model: GANModel, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """``n`` StyleGAN samples (ψ = 1; noise inputs fixed by ``seed``): float32 ``(n, 3, H, W)`` in [0, 1], CPU."""
    if model.kind != "stylegan":
        raise ValueError(f"stylegan.generate draws from a StyleGAN, got a {model.kind!r} model")
    return sample_images(model.generator, model.config.z_dim, n, seed, batch_size)


def load_stylegan(folder: str | Path) -> GANModel:
    """A StyleGAN written by ``gan_training.save_gan``."""
    return load_gan(folder, "stylegan", StyleGANConfig, StyleGANGenerator, "a StyleGAN")


__all__ = ["StyleGANConfig", "StyleGANGenerator", "StyleGANDiscriminator", "MappingNetwork", "modulated_conv2d",
           "r1_penalty", "normalize_2nd_moment", "train_stylegan", "stylegan_losses", "generate",
           "load_stylegan"]
