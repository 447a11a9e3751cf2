"""Figures of the data chapter (book appendix): samples with masks, distributions, co-occurrence, world controls.

Generic grids are ``ctrlgen.figures``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ctrlgen.data.attributes import lesion_attributes
from ctrlgen.data.records import Dataset
from ctrlgen.data.worlds.dermoscopy import DermWorldConfig, generate_dermoscopy

ATTRIBUTE_COLUMNS = ("ita_skin", "ita_lesion", "ita_difference", "area_ratio", "circularity")


def show_samples(dataset: Dataset, n: int = 8, title: str = ""):
    """A row of images with their mask outlines (when the dataset has masks)."""
    records = dataset.with_images()[:n]
    fig, axes = plt.subplots(1, max(len(records), 1), figsize=(1.6 * max(len(records), 1), 1.9), squeeze=False)
    for ax, r in zip(axes[0], records):
        ax.imshow(r.load_image())
        if r.mask_path is not None:
            ax.contour(r.load_mask(), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_title(r.label or r.split, fontsize=7)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle(title or f"{dataset.name} ({dataset.source})", fontsize=9)
    fig.tight_layout()
    return fig


def class_distribution(dataset: Dataset) -> pd.DataFrame:
    """Records and share per primary label."""
    counts = pd.Series(dataset.label_counts(), name="records")
    return pd.DataFrame({"records": counts, "share": (counts / counts.sum()).round(3)})


def dataset_attributes(dataset: Dataset) -> pd.DataFrame:
    """§5.3.2 attributes of every record with image and mask (images of one size: resize first)."""
    records = [r for r in dataset.with_images() if r.mask_path is not None]
    images, masks = dataset.load_arrays(records)
    return lesion_attributes(images, masks, [r.id for r in records])


def plot_attributes(frame: pd.DataFrame, title: str = ""):
    """Histograms of ITA skin / lesion / difference, area ratio and circularity."""
    fig, axes = plt.subplots(1, len(ATTRIBUTE_COLUMNS), figsize=(12, 2.2))
    for ax, column in zip(axes, ATTRIBUTE_COLUMNS):
        ax.hist(frame[column].dropna(), bins=20, color="tab:brown", alpha=0.8)
        ax.set_title(column.replace("_", " "), fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_ita_changes(changes: pd.DataFrame, bins: int = 40):
    """Histograms of ITA skin / lesion / difference (degrees) under both angles of Eq. (5.1), overlaid: the printed
    arctan((L* − 50)/b*) (``*_old`` columns of ``attributes.dataset_ita_changes``) and the book's atan2 (``*_new``)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.4))
    for ax, part in zip(axes, ("skin", "lesion", "difference")):
        columns = {"arctan": f"ita_{part}_old", "atan2": f"ita_{part}_new"}
        missing = [c for c in columns.values() if c not in changes]
        if missing:
            raise KeyError(f"plot_ita_changes: no column {missing[0]!r}; expected dataset_ita_changes' output "
                           f"(ita_skin_old, ita_skin_new, ...), got {list(changes.columns)}")
        values = {label: changes[c].dropna().to_numpy(float) for label, c in columns.items()}
        edges = np.histogram_bin_edges(np.concatenate(list(values.values())), bins=bins)  # one set of bins for both
        for label, v in values.items():
            ax.hist(v, bins=edges, alpha=0.5, label=label)
        ax.set_title(f"ITA {part} (degrees)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def label_cooccurrence(labels: pd.DataFrame, positive_only: bool = True) -> pd.DataFrame:
    """P(column positive | row positive) for CheXpert-style label columns (1 = positive)."""
    positive = (labels == 1.0).astype(float) if positive_only else labels.isin([1.0, -1.0]).astype(float)
    joint = positive.T @ positive
    return joint.div(np.maximum(np.diag(joint), 1), axis=0)


def plot_cooccurrence(matrix: pd.DataFrame, title: str = ""):
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(matrix.to_numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(matrix)), matrix.index, fontsize=7)
    fig.colorbar(im, ax=ax, label="P(column | row)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def derm_controls_figure(seed: int = 0, resolution: int = 64):
    """The dermoscopy world's controls, one swept per row with everything else fixed."""
    clean = DermWorldConfig(resolution=resolution, hair_probability=0.0, vignette_probability=0.0)
    base = {"dx": "nv", "target_area": 0.15, "aspect": 1.1, "angle": 0.3, "cy": 0.5, "cx": 0.5, "skin_ita": 50.0,
            "skin_a": 12.0, "skin_b": 16.0, "ita_difference": 45.0, "lesion_a": 13.0, "delta_b": 8.0,
            "irregularity": 0.05, "veil": False, "vessels": False}
    rows = {
        "ITA difference 0→80": ({"ita_difference": np.linspace(0, 80, 6)}, clean),
        "skin ITA 65→-10": ({"skin_ita": np.linspace(65, -10, 6)}, clean),
        "area 0.04→0.35": ({"target_area": np.linspace(0.04, 0.35, 6)}, clean),
        "irregularity 0→0.25": ({"irregularity": np.linspace(0, 0.25, 6)}, clean),
        "hair count 0→10": ({"hair_count": np.linspace(0, 10, 6).astype(int)},
                            DermWorldConfig(resolution=resolution, hair_probability=1.0, vignette_probability=0.0)),
    }
    fig, axes = plt.subplots(len(rows), 6, figsize=(7, 1.3 * len(rows)))
    for (label, (override, config)), row in zip(rows.items(), axes):
        scenes = generate_dermoscopy(6, seed, config, overrides={**base, **override})
        for ax, image in zip(row, scenes.images):
            ax.imshow(image)
            ax.axis("off")
        row[0].set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    return fig
