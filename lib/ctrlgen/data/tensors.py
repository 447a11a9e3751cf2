"""Image arrays as model tensors: the one conversion every training and evaluation uses."""
from __future__ import annotations

import numpy as np
import torch


def image_tensor(images: np.ndarray, signed: bool = True) -> torch.Tensor:
    """Images ``(N, H, W, 3)`` or one ``(H, W, 3)`` — uint8, or float in [0, 1] — as float ``(N, 3, H, W)``.

    ``signed``: in [-1, 1] (what the VAE encodes), else in [0, 1] (metrics, figures). Channel-first
    input ``(N, 3, H, W)`` is accepted as is.
    """
    arr = np.asarray(images)
    x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images (N, H, W, 3), got an array of shape {tuple(arr.shape)}")
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got an array of shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        x = x / 255.0
    return x * 2 - 1 if signed else x


def region_maps(labels: np.ndarray, k: int, side: int) -> torch.Tensor:
    """One-hot region labels ``(N, H, W)`` -> area-pooled soft regions ``(N, k, side, side)`` (sum 1 per pixel)."""
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), k).permute(0, 3, 1, 2).float()
    return torch.nn.functional.adaptive_avg_pool2d(onehot, side)


__all__ = ["image_tensor", "region_maps"]
