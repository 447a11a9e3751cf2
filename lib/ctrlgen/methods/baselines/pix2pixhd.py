"""Pix2PixHD baseline of Tables 4.5–4.7 (§4.4.4): mask → lesion image translation (Wang et al., 2018).

"High-Resolution Image Synthesis and Semantic Manipulation with Conditional GANs", CVPR 2018, trained
on the image–mask pairs of ISIC 2018 Task 1 (§4.7.2) and then conditioned on DiDGen's new masks (the
thesis's leakage-avoiding design). The pieces, as in NVIDIA/pix2pixHD (``models/networks.py``):

* **coarse-to-fine generator** (§3.2): a global generator G1 (conv 7×7, ``n_downsample_global``
  stride-2 convs, ``n_blocks_global`` residual blocks, as many transposed convs, conv 7×7, tanh) and
  ``n_local_enhancers`` local enhancers G2 that run at twice the resolution and add G1's last feature
  map to their own downsampled features before their residual blocks; instance norm, reflection padding;
* **multi-scale discriminators** (§3.2): ``num_d`` 70×70-style PatchGANs (``n_layers_d`` stride-2
  layers) on the (mask, image) pair at 1, ½, ¼ … resolution, average-pooled 3×3 stride 2;
* **LSGAN** adversarial loss (the code's default ``no_lsgan = False``);
* **feature-matching loss** (Eq. 4): Σ_k Σ_i (1/num_d)·(4/(n_layers_d + 1))·‖D_k^(i)(s, x) − D_k^(i)(s, G(s))‖₁,
  weight λ_feat = 10 (``feature_matching_loss``);
* **VGG perceptual loss** (§3.2, λ = 10), VGG19 relu1_1 … relu5_1 with weights 1/32 … 1: only with local
  ImageNet weights (``vgg_weights``, a torchvision ``vgg19`` state dict) — off in mini (no weights offline).

The label map is the binary lesion mask one-hot encoded (2 channels; no instance or feature maps,
the code's ``--no_instance``). Training runs all networks jointly from the start (the paper first
trains G1 at half resolution, then G2, then fine-tunes both: a simplification of this book, said so).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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
    setup_gan,
    train_adversarial,
)
from ctrlgen.models.registry import weight_path

LABELS = 2  # background, lesion


@dataclass(frozen=True)
class Pix2PixHDConfig:
    """Pix2PixHD sizes and optimisation (profile ``gan_baselines.pix2pixhd``; full: the code's defaults)."""

    image_size: int = 64
    ngf: int = 16
    n_downsample_global: int = 3
    n_blocks_global: int = 3
    n_local_enhancers: int = 0
    n_blocks_local: int = 3
    ndf: int = 16
    n_layers_d: int = 3
    num_d: int = 2
    lambda_feat: float = 10.0
    lambda_vgg: float = 0.0
    vgg_weights: str = ""  # torchvision vgg19 state dict; required when lambda_vgg > 0
    train_steps: int = 400
    batch_size: int = 8
    lr: float = 2e-4
    adam_betas: tuple[float, float] = (0.5, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        factor = 2 ** (self.n_downsample_global + self.n_local_enhancers)
        if self.image_size % factor:
            raise ValueError(f"gan_baselines.pix2pixhd.image_size {self.image_size} must be a multiple of "
                             f"2^(n_downsample_global + n_local_enhancers) = {factor}")
        if self.lambda_vgg > 0 and not self.vgg_weights:
            raise ValueError("gan_baselines.pix2pixhd.lambda_vgg > 0 needs vgg_weights: the path of a torchvision "
                             "vgg19 ImageNet state dict (nothing is downloaded)")

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "Pix2PixHDConfig":
        """From the profile section ``gan_baselines.pix2pixhd``; ``overrides`` replace fields. A relative
        ``vgg_weights`` is a file under the models root (``ctrlgen.models.registry.weight_path``)."""
        config = config_from_section(cls, cfg["gan_baselines"]["pix2pixhd"], overrides)
        if config.vgg_weights and "vgg_weights" not in overrides:
            config = dataclasses.replace(config, vgg_weights=str(weight_path(cfg, config.vgg_weights, "file")))
        return config


# --------------------------------------------------------------------------- generator
def _conv_block(cin: int, cout: int, k: int, stride: int = 1, transpose: bool = False) -> list[nn.Module]:
    if transpose:
        conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
    elif k == 7:
        return [nn.ReflectionPad2d(3), nn.Conv2d(cin, cout, 7), nn.InstanceNorm2d(cout), nn.ReLU(True)]
    else:
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    return [conv, nn.InstanceNorm2d(cout), nn.ReLU(True)]


class ResnetBlock(nn.Module):
    """x + [reflect-pad, conv 3×3, IN, ReLU, reflect-pad, conv 3×3, IN](x)."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
                                  nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _global_trunk(cin: int, ngf: int, n_down: int, n_blocks: int) -> list[nn.Module]:
    layers = _conv_block(cin, ngf, 7)
    for i in range(n_down):
        layers += _conv_block(ngf * 2 ** i, ngf * 2 ** (i + 1), 3, stride=2)
    layers += [ResnetBlock(ngf * 2 ** n_down) for _ in range(n_blocks)]
    for i in range(n_down, 0, -1):
        layers += _conv_block(ngf * 2 ** i, ngf * 2 ** (i - 1), 3, transpose=True)
    return layers


def _rgb_head(ngf: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]


def _downsample(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)


class Pix2PixHDGenerator(nn.Module):
    """G = {G1, G2…}: ``forward(labels)`` maps one-hot label maps ``(B, 2, H, W)`` to images in [-1, 1]."""

    def __init__(self, config: Pix2PixHDConfig):
        super().__init__()
        n_local = config.n_local_enhancers
        ngf_global = config.ngf * 2 ** n_local
        trunk = _global_trunk(LABELS, ngf_global, config.n_downsample_global, config.n_blocks_global)
        self.global_g = nn.Sequential(*trunk, *(_rgb_head(ngf_global) if n_local == 0 else []))
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        for n in range(1, n_local + 1):
            ngf_n = config.ngf * 2 ** (n_local - n)
            self.down.append(nn.Sequential(*_conv_block(LABELS, ngf_n, 7), *_conv_block(ngf_n, ngf_n * 2, 3, stride=2)))
            up = [ResnetBlock(ngf_n * 2) for _ in range(config.n_blocks_local)]
            up += _conv_block(ngf_n * 2, ngf_n, 3, transpose=True)
            self.up.append(nn.Sequential(*up, *(_rgb_head(config.ngf) if n == n_local else [])))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        pyramid = [labels]
        for _ in self.down:
            pyramid.append(_downsample(pyramid[-1]))
        out = self.global_g(pyramid[-1])
        for n, (down, up) in enumerate(zip(self.down, self.up), start=1):
            out = up(down(pyramid[len(self.down) - n]) + out)
        return out


# --------------------------------------------------------------------------- discriminators
class NLayerDiscriminator(nn.Module):
    """PatchGAN returning every layer's output (``getIntermFeat``): n_layers + 2 feature maps, the last
    the patch scores (LSGAN: no sigmoid)."""

    def __init__(self, cin: int, ndf: int, n_layers: int):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(cin, ndf, 4, 2, 2), nn.LeakyReLU(0.2, True))]
        nf = ndf
        for n in range(1, n_layers + 1):
            prev, nf = nf, min(nf * 2, 512)
            stride = 2 if n < n_layers else 1
            layers.append(nn.Sequential(nn.Conv2d(prev, nf, 4, stride, 2), nn.InstanceNorm2d(nf), nn.LeakyReLU(0.2, True)))
        layers.append(nn.Sequential(nn.Conv2d(nf, 1, 4, 1, 2)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs on the input at 1, ½, ¼ … resolution; returns each one's feature list."""

    def __init__(self, cin: int, ndf: int, n_layers: int, num_d: int):
        super().__init__()
        self.ds = nn.ModuleList(NLayerDiscriminator(cin, ndf, n_layers) for _ in range(num_d))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, d in enumerate(self.ds):
            out.append(d(x))
            if i + 1 < len(self.ds):
                x = _downsample(x)
        return out


# --------------------------------------------------------------------------- losses
def lsgan_loss(outputs: Sequence[Sequence[torch.Tensor]], real: bool) -> torch.Tensor:
    """LSGAN loss summed over the discriminators: Σ_k mean((D_k − 1)²) for ``real`` targets, Σ_k mean(D_k²) else."""
    target = 1.0 if real else 0.0
    return sum(F.mse_loss(feats[-1], torch.full_like(feats[-1], target)) for feats in outputs)


def feature_matching_loss(fake: Sequence[Sequence[torch.Tensor]], real: Sequence[Sequence[torch.Tensor]],
                          n_layers: int) -> torch.Tensor:
    """Eq. (4) of Wang et al. (2018) as the code weights it: Σ_k Σ_i (1/num_d)·(4/(n_layers+1))·
    mean|D_k^(i)(fake) − D_k^(i)(real)| over the intermediate features i (the final scores left out),
    the real features detached; to be multiplied by λ_feat."""
    num_d = len(fake)
    w = (1.0 / num_d) * (4.0 / (n_layers + 1))
    return sum(w * F.l1_loss(f, r.detach()) for fk, rk in zip(fake, real) for f, r in zip(fk[:-1], rk[:-1]))


class VGGLoss(nn.Module):
    """Σ_i w_i·‖VGG_i(x) − VGG_i(y)‖₁ at relu1_1 … relu5_1, w = 1/32, 1/16, 1/8, 1/4, 1 (pix2pixHD's
    ``VGGLoss``), from a local torchvision ``vgg19`` ImageNet state dict."""

    SLICES = (2, 7, 12, 21, 30)
    WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)

    def __init__(self, weights: str | Path):
        super().__init__()
        import torchvision  # heavy, and needed only when the perceptual loss is on

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"VGG19 weights not found at {path}: expected a torchvision vgg19 state dict (.pth)")
        vgg = torchvision.models.vgg19(weights=None)
        vgg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        feats = vgg.features.eval().requires_grad_(False)
        bounds = (0,) + self.SLICES
        self.slices = nn.ModuleList(feats[a:b] for a, b in zip(bounds[:-1], bounds[1:]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros(())
        for w, s in zip(self.WEIGHTS, self.slices):
            x, y = s(x), s(y)
            loss = loss + w * F.l1_loss(x, y.detach())
        return loss


# --------------------------------------------------------------------------- training and generation
def one_hot_masks(masks: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Binary masks ``(N, H, W)`` as one-hot label maps ``(N, 2, size, size)`` (nearest resize if needed)."""
    m = torch.as_tensor(np.asarray(masks))
    if m.ndim != 3 or len(m) == 0:
        raise ValueError(f"masks: expected a non-empty (N, H, W) array of 0/1 values, got shape {tuple(m.shape)}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("masks must be binary (bool or 0/1); threshold probabilities first")
    m = m.float()[:, None]
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m, size=(size, size), mode="nearest")
    return torch.cat([1 - m, m], dim=1)


def pix2pixhd_losses(setup: GANSetup, labels: torch.Tensor, x: torch.Tensor, config: Pix2PixHDConfig,
                     vgg: VGGLoss | None = None, device: str | torch.device = "cpu") -> AdversarialLosses:
    """Pix2PixHD's losses (Wang et al. 2018, Eq. 4 and §3.2) on (label map s, image x) batches: D: ½·(LSGAN on
    D(s, G(s)) as fake + on D(s, x) as real), summed over the scales; G: LSGAN(D(s, G(s))) + λ_feat·feature matching
    (+ λ_vgg·VGG with local weights). Logs the adversarial and feature-matching terms."""
    g, d = setup.generator, setup.discriminator

    def d_loss(step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        idx = setup.rng.integers(0, len(x), config.batch_size)
        s, real = labels[idx].to(device), x[idx].to(device)
        fake = g(s)
        d_fake, d_real = d(torch.cat([s, fake.detach()], 1)), d(torch.cat([s, real], 1))
        loss = 0.5 * (lsgan_loss(d_fake, False) + lsgan_loss(d_real, True))
        return loss, {"s": s, "real": real, "fake": fake, "d_real": d_real}

    def g_loss(ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        g_out = d(torch.cat([ctx["s"], ctx["fake"]], 1))
        loss_gan = lsgan_loss(g_out, True)
        loss_fm = feature_matching_loss(g_out, ctx["d_real"], config.n_layers_d)
        loss = loss_gan + config.lambda_feat * loss_fm
        if vgg is not None:
            loss = loss + config.lambda_vgg * vgg(ctx["fake"], ctx["real"])
        return loss, {"gan": loss_gan, "fm": loss_fm}

    return AdversarialLosses(d_loss, g_loss)


def train_pix2pixhd(images: np.ndarray, masks: np.ndarray, config: Pix2PixHDConfig, seed: int = 0,
                    progress: bool = True, output_dir: str | Path = "", device: str | torch.device = "cpu") -> GANModel:
    """Train Pix2PixHD on (mask, image) pairs: uint8 images ``(N, H, W, 3)`` and binary masks ``(N, H, W)``,
    resized to ``config.image_size`` (``pix2pixhd_losses`` in ``gan_training``'s loop; no EMA, as the paper).
    Checkpoints every ``config.checkpoint_every`` steps into ``output_dir``; a rerun there resumes."""
    x = pixels(images, config.image_size, "Pix2PixHD training images")
    labels = one_hot_masks(masks, config.image_size)
    if len(labels) != len(x):
        raise ValueError(f"Pix2PixHD needs one mask per image: {len(x)} images, {len(labels)} masks")
    setup = setup_gan(lambda: Pix2PixHDGenerator(config),
                      lambda: MultiscaleDiscriminator(LABELS + 3, config.ndf, config.n_layers_d, config.num_d),
                      seed, device, ema=False)
    vgg = VGGLoss(config.vgg_weights).to(device) if config.lambda_vgg > 0 else None  # built after D: same init
    return train_adversarial("pix2pixhd", config, setup, pix2pixhd_losses(setup, labels, x, config, vgg, device),
                             output_dir, progress, "Pix2PixHD")


@torch.no_grad()
def pix2pixhd_generate(model: GANModel, masks: np.ndarray | torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """One image per binary mask ``(N, H, W)`` (deterministic: Pix2PixHD has no noise input), float32
    ``(N, 3, S, S)`` in [0, 1] on the CPU at the model's ``image_size`` S."""
    if model.kind != "pix2pixhd":
        raise ValueError(f"pix2pixhd_generate needs a Pix2PixHD model, got a {model.kind!r} model")
    g = model.generator.eval()
    device = next(g.parameters()).device
    labels = one_hot_masks(masks, model.config.image_size)
    out = [((g(labels[i:i + batch_size].to(device)).float().clamp(-1, 1) + 1) / 2).cpu()
           for i in range(0, len(labels), batch_size)]
    return torch.cat(out)


def load_pix2pixhd(folder: str | Path) -> GANModel:
    """A Pix2PixHD generator written by ``gan_training.save_gan``."""
    return load_gan(folder, "pix2pixhd", Pix2PixHDConfig, Pix2PixHDGenerator, "Pix2PixHD")


__all__ = ["Pix2PixHDConfig", "Pix2PixHDGenerator", "MultiscaleDiscriminator", "NLayerDiscriminator", "ResnetBlock",
           "VGGLoss", "lsgan_loss", "feature_matching_loss", "one_hot_masks", "train_pix2pixhd", "pix2pixhd_losses",
           "pix2pixhd_generate", "load_pix2pixhd"]
