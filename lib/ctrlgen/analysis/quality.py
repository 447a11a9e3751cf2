"""Image-quality figures for the mini models that need no pretrained network.

FID with a randomly initialised Inception network measures nothing, and no pretrained weights
exist offline, so the book uses:

* **PSNR** of the VAE round trip on held-out images (peak 1 for images in [0, 1]).
* **Sample-vs-data distance**: every image is area-pooled to ``side x side x 3`` (8x8x3 = 192
  numbers in [0, 1] — colour layout, no texture) and the sliced Wasserstein-1 distance between the
  two feature clouds is computed (``ctrlgen.metrics.distribution.sliced_wasserstein``). It is
  reported between a *floor* (training images vs held-out images: what a perfect model scores with
  this many images) and a *ceiling* (independent per-feature Gaussians with the data's mean and
  standard deviation: a model that learned each pixel's colour but no image structure).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ctrlgen.metrics.distribution import sliced_wasserstein


def _unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 or (N, 3, H, W) float in [-1, 1] -> (N, 3, H, W) float in [0, 1]."""
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images)
        if x.dtype == torch.uint8:
            return x.permute(0, 3, 1, 2).float() / 255.0
        return x.permute(0, 3, 1, 2).float()
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-image PSNR in dB between two image batches (uint8 NHWC or [-1, 1] NCHW), peak 1."""
    x, y = _unit(a), _unit(b)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).numpy()


def image_features(images: np.ndarray | torch.Tensor, side: int = 8) -> np.ndarray:
    """Area-pooled colour layout: (N, side*side*3) features in [0, 1]."""
    x = _unit(images)
    return F.adaptive_avg_pool2d(x, side).reshape(x.shape[0], -1).numpy().astype(np.float64)


def sample_distance(samples, heldout, train, side: int = 8, seed: int = 0) -> dict[str, float]:
    """Sliced W1 on ``image_features`` of samples vs held-out data, with its floor and ceiling (module docstring)."""
    fs, fh, ft = image_features(samples, side), image_features(heldout, side), image_features(train, side)
    rng = np.random.default_rng(seed)
    n = min(len(fh), len(ft))
    floor_set = ft[rng.choice(len(ft), size=n, replace=False)]
    mu, sd = ft.mean(0), ft.std(0)
    ceiling_set = np.clip(mu + sd * rng.standard_normal((max(len(fs), 2), ft.shape[1])), 0, 1)
    return {"samples": sliced_wasserstein(fs, fh, seed=seed),
            "floor (train vs held-out data)": sliced_wasserstein(floor_set, fh, seed=seed),
            "ceiling (per-pixel Gaussian)": sliced_wasserstein(ceiling_set, fh, seed=seed)}
