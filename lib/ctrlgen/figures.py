"""Small plotting helpers shared by the chapters (matplotlib; the chapters stay short)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np


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
