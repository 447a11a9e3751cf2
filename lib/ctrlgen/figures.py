"""Generic plotting helpers shared by the chapters and the library's figure code (matplotlib; the chapters stay
short). Layer 1: they take arrays and tensors, never the library's types; figures of one dataset or one
chapter live with it (``ctrlgen.data.figures``, ``ctrlgen.analysis.attention_views``, ``ctrlgen.experiments``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle


def scatter_panels(panels: Mapping[str, np.ndarray], limit: float = 3.5, size: float = 2.6, s: float = 2.0,
                   suptitle: str = ""):
    """One square scatter plot of 2-D points per panel, side by side, same axes limits."""
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels.items()):
        ax.scatter(points[:, 0], points[:, 1], s=s, alpha=0.5, linewidths=0)
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), title=title, xticks=[], yticks=[], aspect="equal")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def curve(values: Sequence[float], title: str, ylabel: str, smooth: int = 50, log: bool = True):
    """A training curve with a moving average on top of the raw values."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(values, alpha=0.3, lw=0.8, label="per step")
    if len(values) >= smooth > 1:
        kernel = np.ones(smooth) / smooth
        ax.plot(np.arange(smooth - 1, len(values)), np.convolve(values, kernel, mode="valid"), lw=1.5,
                label=f"moving mean ({smooth})")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return fig


def image_grid(images: list[np.ndarray], titles: list[str] | None = None, title: str = "", cmap: str | None = None):
    """One row of images ``(H, W[, 3])`` with optional titles."""
    fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 1.9), squeeze=False)
    for i, (ax, image) in enumerate(zip(axes[0], images)):
        ax.imshow(image, cmap=cmap)
        ax.axis("off")
        if titles:
            ax.set_title(titles[i], fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def image_grid_figure(rows: Mapping[str, torch.Tensor], n: int = 8, title: str = ""):
    """One row of ``n`` images ``(N, 3, H, W)`` in [0, 1] per label."""
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(imgs):
                x = imgs[c]
                ax.imshow(x.permute(1, 2, 0).clamp(0, 1).numpy() if x.ndim == 3 else x.numpy(), cmap="gray",
                          vmin=0, vmax=1)
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def boxes_figure(images: torch.Tensor, boxes: Sequence[Sequence[float]], prompts: Sequence[str] = ()):
    """Fig. 4.9: box-guided samples with their boxes drawn."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.0), squeeze=False)
    side = images.shape[-1]
    for c in range(n):
        ax = axes[0, c]
        ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy())
        x0, y0, x1, y1 = (v * side for v in boxes[c])
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.5))
        ax.axis("off")
    fig.tight_layout()
    return fig


__all__ = ["scatter_panels", "curve", "image_grid", "image_grid_figure", "boxes_figure"]
