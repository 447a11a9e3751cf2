"""The two ITA skin-tone baselines of Table 5.1 (thesis §5.2.2, §5.4.1) as three-group annotators.

Both estimate the skin's Individual Typology Angle (Eq. 5.1, ``ctrlgen.data.attributes.ita_from_lab``) and
map it to a Fitzpatrick type with the thesis's thresholds (§5.2.2: I > 55 ≥ II > 41 ≥ III > 28 ≥ IV > 19 ≥
V > 10 ≥ VI), aggregated to the three DDI groups I-II, III-IV, V-VI (§5.4.1):

* "ITA w/ YCbCr" (Groh et al. 2021): ITA over the pixels a YCbCr rule calls skin;
* "8-patch ITA" (Bevan & Atapour-Abarghouei 2022): ITA of eight 20×20 patches along the image edges,
  the highest kept.

The angle, the thresholds and the patches live in the data layer (``ctrlgen.data.attributes``) because the
procedural world uses them too; this module names the two methods and turns their angles into labels.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ctrlgen.data.attributes import FST_GROUPS, fitzpatrick_group, fitzpatrick_type, ita_eight_patch, ita_ycbcr

ITA_METHODS: dict[str, Callable[..., np.ndarray]] = {"ITA w/ YCbCr": ita_ycbcr, "8-patch ITA": ita_eight_patch}


def group_index(groups: np.ndarray | list[str]) -> np.ndarray:
    """Fitzpatrick group names ("I-II", "III-IV", "V-VI") -> class indices 0, 1, 2 (the classifiers' labels).

    Raises ``ValueError`` naming the first value that is not a group (an empty label from a NaN ITA included)."""
    lookup = {g: i for i, g in enumerate(FST_GROUPS)}
    out = np.empty(len(groups), dtype=np.int64)
    for i, g in enumerate(groups):
        if g not in lookup:
            raise ValueError(f"skin-tone label {g!r} at position {i} is not a Fitzpatrick group; expected one of {FST_GROUPS}")
        out[i] = lookup[g]
    return out


def ita_to_group(ita: np.ndarray | float) -> np.ndarray:
    """Fitzpatrick group of each ITA value (thesis §5.2.2 thresholds, groups of §5.4.1); NaN -> ""."""
    return fitzpatrick_group(ita)


def ita_to_type(ita: np.ndarray | float) -> np.ndarray:
    """Fitzpatrick type I..VI of each ITA value (thesis §5.2.2); NaN -> ""."""
    return fitzpatrick_type(ita)


def ita_annotate(method: str, images: np.ndarray, patch_size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(ITA in degrees, Fitzpatrick group) of each image by one Table 5.1 baseline.

    ``images``: (N, H, W, 3) uint8 or float in [0, 1]. ``patch_size`` applies to "8-patch ITA" (20 px in
    Bevan & Atapour-Abarghouei 2022; images smaller than two patches use half their side)."""
    if method not in ITA_METHODS:
        raise ValueError(f"unknown ITA method {method!r}; choose one of {', '.join(ITA_METHODS)}")
    ita = ita_eight_patch(images, patch_size) if method == "8-patch ITA" else ita_ycbcr(images)
    return ita, ita_to_group(ita)
