"""Shared pieces of the procedural generators: seeded parameter tables, smooth noise, line drawing."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_noise(rng: np.random.Generator, n: int, height: int, width: int, cells: int = 6) -> np.ndarray:
    """Low-frequency noise (n, H, W) in about [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(-1.0, 1.0, size=(n, cells + 1, cells + 1)).astype(np.float32)
    return ndimage.zoom(coarse, (1, height / (cells + 1), width / (cells + 1)), order=1, grid_mode=True,
                        mode="nearest")[:, :height, :width]


def grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates normalised to [0, 1): (yy, xx), each (H, W) float32."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return (yy + 0.5) / height, (xx + 0.5) / width


def draw_curves(shape: tuple[int, int, int], owner: np.ndarray, p0: np.ndarray, p1: np.ndarray, p2: np.ndarray,
                width_px: float = 1.0, samples: int = 0) -> np.ndarray:
    """Rasterise quadratic Bézier curves into coverage maps (n, H, W) in [0, 1].

    ``owner[j]`` is the image index of curve j; ``p0, p1, p2`` are (m, 2) control points in
    normalised (y, x) coordinates. Points along each curve are splatted and blurred to ``width_px``.
    """
    n, height, width = shape
    cover = np.zeros(shape, np.float32)
    if len(owner) == 0:
        return cover
    samples = samples or 3 * max(height, width)
    t = np.linspace(0.0, 1.0, samples, dtype=np.float32)[None, :, None]
    pts = (1 - t) ** 2 * p0[:, None] + 2 * (1 - t) * t * p1[:, None] + t**2 * p2[:, None]  # (m, s, 2)
    ys = np.clip((pts[..., 0] * height).astype(int), 0, height - 1)
    xs = np.clip((pts[..., 1] * width).astype(int), 0, width - 1)
    inside = (pts[..., 0] >= 0) & (pts[..., 0] < 1) & (pts[..., 1] >= 0) & (pts[..., 1] < 1)
    idx = np.broadcast_to(owner[:, None], ys.shape)
    cover[idx[inside], ys[inside], xs[inside]] = 1.0
    if width_px > 1.0:
        cover = ndimage.gaussian_filter(cover, sigma=(0, (width_px - 1) / 2, (width_px - 1) / 2))
        cover = np.clip(cover * 2.0, 0, 1)
    return cover
