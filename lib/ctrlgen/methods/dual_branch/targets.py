"""Low-contrast-targeted generation inputs (thesis §5.5.1): which style references and layouts to generate from.

The mitigation generates pairs that look like the poorly segmented cases: low contrast between lesion
and skin, i.e. ITA Difference = ITA skin − ITA lesion (Eq. 5.1, ``ctrlgen.data.attributes``) below a
threshold (thesis: < 30, 569 images of ISIC 2018). Every training image of that subset is a style
reference; its layout masks are its own mask, geometrically augmented (flip, rotation, expansion /
compression by isotropic scaling: ``didgen.augment_masks``), ``per_sample`` per reference (thesis: n = 1,
Fig. 5.10 varies n = 1..4).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctrlgen.data.attributes import lesion_attributes
from ctrlgen.methods.didgen.pair_generation import augment_masks


def low_contrast_subset(images: np.ndarray, masks: np.ndarray, threshold: float,
                        max_references: int | None = None, fallback: int = 0) -> pd.DataFrame:
    """§5.3.2 attributes of the images whose ITA Difference is below ``threshold``, lowest first, with their
    row ``index`` in ``images``; at most ``max_references`` rows (the lowest-contrast ones).

    When no image falls below the threshold: ValueError, or with ``fallback > 0`` the ``fallback``
    lowest-contrast images stand in (a small data set, e.g. the smoke profile's 13 real training images) and
    the frame's ``attrs["fallback"]`` says so, for the caller to report.
    """
    images, masks = np.asarray(images), np.asarray(masks, bool)
    if len(images) != len(masks) or images.shape[1:3] != masks.shape[1:3]:
        raise ValueError(f"images {images.shape} and masks {masks.shape} do not pair up (N, H, W)")
    attrs = lesion_attributes(images, masks)
    attrs.insert(0, "index", np.arange(len(attrs)))
    low = attrs[attrs["ita_difference"] < threshold].sort_values("ita_difference", kind="stable")
    if low.empty and fallback > 0:
        low = attrs.sort_values("ita_difference", kind="stable").head(fallback).reset_index(drop=True)
        low.attrs["fallback"] = True
        return low
    if low.empty:
        raise ValueError(f"the low-contrast subset is empty: no image of {len(attrs)} has ITA difference < "
                         f"{threshold:g} (smallest {attrs['ita_difference'].min():.1f}); raise the threshold")
    return low.head(max_references).reset_index(drop=True) if max_references else low.reset_index(drop=True)


@dataclass
class StyleTargets:
    """``style_index[k]``: the training image used as style reference for layout ``layout_masks[k]``."""

    style_index: np.ndarray     # (K,) int
    layout_masks: np.ndarray    # (K, H, W) bool
    subset: pd.DataFrame        # the low-contrast subset's attributes (``low_contrast_subset``)
    kept_unaugmented: int       # layouts left as the original mask (augmentation kept failing)


def style_targets(images: np.ndarray, masks: np.ndarray, threshold: float, per_sample: int = 1, seed: int = 0,
                  augment: bool = True, scale: tuple[float, float] = (0.8, 1.2),
                  max_references: int | None = None, fallback: int = 0) -> StyleTargets:
    """``per_sample`` (style reference, layout mask) targets per low-contrast training image (module doc)."""
    if per_sample < 1:
        raise ValueError(f"per_sample must be at least 1, got {per_sample}")
    subset = low_contrast_subset(images, masks, threshold, max_references, fallback)
    index = np.repeat(subset["index"].to_numpy(), per_sample)
    layouts = np.asarray(masks, bool)[index]
    kept = 0
    if augment:
        layouts, kept = augment_masks(layouts, np.random.default_rng(seed), scale=scale)
    return StyleTargets(index, layouts, subset, kept)


__all__ = ["low_contrast_subset", "StyleTargets", "style_targets"]
