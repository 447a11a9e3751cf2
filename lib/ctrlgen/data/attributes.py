"""Lesion attributes of dermoscopic images (thesis §5.3.2) and the ITA skin-tone baselines of Table 5.1.

* ITA = arctan((L* − 50) / b*) · 180/π (Eq. 5.1) from CIELAB (scikit-image), computed from the mean
  L* and b* of a region (skin = outside the lesion mask, lesion = inside it), as the quadrant-aware
  angle atan2(L* − 50, b*) in (−180°, 180°]: for b* > 0 it equals Eq. (5.1); for b* < 0 (bluish
  regions, 5–12% of ISIC 2018 Task 1 skins) the plain arctangent would flip light skin (L* > 50) to a
  negative, "dark" angle, while atan2 puts it above 90° (lighter than any b* > 0 skin of the same L*).
  ITA Difference = ITA Skin − ITA Lesion (lesion–skin colour contrast).
* Fitzpatrick skin type from ITA (thesis §5.2): I > 55, II (41, 55], III (28, 41], IV (19, 28],
  V (10, 19], VI ≤ 10, and the aggregated groups I-II, III-IV, V-VI used with DDI.
* Lesion area ratio = lesion pixels / image pixels; circularity = 4πS/P² (Eq. 5.2), P the lesion
  perimeter by the Crofton formula (``skimage.measure.perimeter_crofton``, 4 directions), which
  is unbiased for digital disks (circularity ≈ 1.00 from radius 5 to 80 px, where the 4-connected
  boundary length gives 1.16 to 0.91).
* Baselines (Table 5.1): ITA over YCbCr-detected skin pixels (Groh et al. 2021) and 8-patch ITA over
  edge patches, keeping the highest (Bevan & Atapour-Abarghouei 2022).

All functions take batches: images (N, H, W, 3) uint8 or float in [0, 1], masks (N, H, W) bool.
This module lives in the data layer so the procedural generators can use it; the analysis layer
imports it from here (DESIGN §3).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.color import rgb2lab, rgb2ycbcr
from skimage.measure import perimeter_crofton

# Upper ITA bounds (exclusive lower side) of Fitzpatrick types I..VI, thesis §5.2.
FST_THRESHOLDS = (55.0, 41.0, 28.0, 19.0, 10.0)
FST_TYPES = ("I", "II", "III", "IV", "V", "VI")
FST_GROUP_OF_TYPE = {"I": "I-II", "II": "I-II", "III": "III-IV", "IV": "III-IV", "V": "V-VI", "VI": "V-VI"}
FST_GROUPS = ("I-II", "III-IV", "V-VI")
# YCbCr skin rule (Kolkur et al. 2017, as used by Groh et al. 2021 for Fitzpatrick17k): Y > 80, 85 < Cb < 135, 135 < Cr < 180.
YCBCR_SKIN = {"y_min": 80.0, "cb": (85.0, 135.0), "cr": (135.0, 180.0)}


def _as_float_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    return images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)


def ita_from_lab(lightness: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Individual Typology Angle in degrees, Eq. (5.1), as the quadrant-aware angle atan2(L* − 50, b*).

    * b* > 0: identical to arctan((L* − 50) / b*) · 180/π, in (−90°, 90°).
    * b* < 0: the angle lies in (90°, 180°] when L* ≥ 50 (light, bluish: lighter than every b* > 0 value,
      so Fitzpatrick I) and in (−180°, −90°) when L* < 50 (dark, bluish: Fitzpatrick VI). The plain
      arctangent gave these the opposite sign. The branch cut of atan2 lies on b* < 0, L* = 50, where the
      angle jumps from 180° to −180°: a mid-grey bluish region is the one case the angle cannot order.
    * b* = 0: +90° for L* > 50, −90° for L* < 50 (the limits of Eq. 5.1), 0° for L* = 50 (atan2(0, 0));
      a negative zero b* counts as zero, so it never turns 0° into 180°.
    * NaN inputs (the mean of an empty region, see ``region_lab_means``) give NaN.
    """
    lightness, b = np.asarray(lightness, dtype=float), np.asarray(b, dtype=float)
    return np.degrees(np.arctan2(lightness - 50.0, b + 0.0))  # + 0.0 maps b* = -0.0 to +0.0


def ita_arctan(lightness: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Eq. (5.1) read literally, arctan((L* − 50) / b*) · 180/π: wrong for b* < 0 (see ``ita_from_lab``).

    Kept only to measure what the quadrant-aware angle changes (``ita_formula_changes``).
    """
    lightness, b = np.asarray(lightness, dtype=float), np.asarray(b, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.degrees(np.arctan((lightness - 50.0) / b))


def region_lab_means(images: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean L* and b* of each image over its boolean region.

    An empty region (a mask covering the whole image leaves no skin; an empty mask no lesion) gives NaN,
    hence NaN ITA and an empty Fitzpatrick type, rather than an error: one such image must not stop a
    batch, and NaN is visibly "no value" in every table (``pandas`` skips it in means and counts).
    """
    lab = rgb2lab(_as_float_batch(images))
    regions = np.asarray(regions, dtype=bool).reshape(lab.shape[:3])
    count = regions.sum(axis=(1, 2)).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        lightness = (lab[..., 0] * regions).sum(axis=(1, 2)) / count
        b = (lab[..., 2] * regions).sum(axis=(1, 2)) / count
    return lightness, b


def region_ita(images: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """ITA of each image over a region, from the region's mean L* and b*."""
    return ita_from_lab(*region_lab_means(images, regions))


def fitzpatrick_type(ita: np.ndarray | float) -> np.ndarray:
    """Fitzpatrick type ("I".."VI") from ITA with the thesis thresholds (NaN -> "")."""
    ita = np.atleast_1d(np.asarray(ita, dtype=float))
    index = np.searchsorted(-np.asarray(FST_THRESHOLDS), -ita, side="right")  # > 55 -> 0, (41, 55] -> 1, ...
    out = np.asarray(FST_TYPES, dtype=object)[np.minimum(index, 5)]
    out[np.isnan(ita)] = ""
    return out


def fitzpatrick_group(ita: np.ndarray | float) -> np.ndarray:
    """Aggregated Fitzpatrick group ("I-II", "III-IV", "V-VI") from ITA."""
    return np.array([FST_GROUP_OF_TYPE.get(t, "") for t in fitzpatrick_type(ita)], dtype=object)


def area_ratio(masks: np.ndarray) -> np.ndarray:
    """Lesion pixels / image pixels for each mask."""
    masks = np.asarray(masks, dtype=bool)
    masks = masks[None] if masks.ndim == 2 else masks
    return masks.mean(axis=(1, 2))


def circularity(masks: np.ndarray) -> np.ndarray:
    """4πS/P² (Eq. 5.2): S lesion pixels, P the Crofton perimeter of the mask; NaN if the mask is empty."""
    masks = np.asarray(masks, dtype=bool)
    masks = masks[None] if masks.ndim == 2 else masks
    out = np.full(len(masks), np.nan)
    for i, mask in enumerate(masks):
        p = perimeter_crofton(mask, directions=4)
        if p > 0:
            out[i] = 4.0 * np.pi * mask.sum() / p**2
    return out


def lesion_attributes(images: np.ndarray, masks: np.ndarray, ids: list[str] | None = None) -> pd.DataFrame:
    """All §5.3.2 attributes for a batch: ita_skin, ita_lesion, ita_difference, fitzpatrick (type of the
    skin ITA), fst_group, area_ratio, circularity — one row per image."""
    masks = np.asarray(masks, dtype=bool)
    masks = masks[None] if masks.ndim == 2 else masks
    ita_skin = region_ita(images, ~masks)
    ita_lesion = region_ita(images, masks)
    frame = pd.DataFrame({
        "ita_skin": ita_skin, "ita_lesion": ita_lesion, "ita_difference": ita_skin - ita_lesion,
        "fitzpatrick": fitzpatrick_type(ita_skin), "fst_group": fitzpatrick_group(ita_skin),
        "area_ratio": area_ratio(masks), "circularity": circularity(masks),
    })
    if ids is not None:
        frame.insert(0, "id", list(ids))
    return frame


def ita_formula_changes(images: np.ndarray, masks: np.ndarray, low_contrast_threshold: float,
                        ids: list[str] | None = None) -> pd.DataFrame:
    """Per image: skin/lesion ITA by the quadrant-aware angle (``ita_from_lab``) and by the plain arctangent
    (``ita_arctan``), with the labels each gives: Fitzpatrick type and group of the skin ITA, and the
    low-contrast label (ITA Difference < ``low_contrast_threshold``, thesis §5.5.1).

    Columns ``*_new`` / ``*_old`` and ``changed_type``, ``changed_group``, ``changed_contrast``.
    """
    masks = np.asarray(masks, dtype=bool)
    masks = masks[None] if masks.ndim == 2 else masks
    skin_l, skin_b = region_lab_means(images, ~masks)
    lesion_l, lesion_b = region_lab_means(images, masks)
    frame = pd.DataFrame({"skin_L": skin_l, "skin_b": skin_b, "lesion_L": lesion_l, "lesion_b": lesion_b})
    for tag, angle in (("new", ita_from_lab), ("old", ita_arctan)):
        skin, lesion = angle(skin_l, skin_b), angle(lesion_l, lesion_b)
        frame[f"ita_skin_{tag}"], frame[f"ita_lesion_{tag}"] = skin, lesion
        frame[f"ita_difference_{tag}"] = skin - lesion
        frame[f"fitzpatrick_{tag}"] = fitzpatrick_type(skin)
        frame[f"fst_group_{tag}"] = fitzpatrick_group(skin)
        frame[f"low_contrast_{tag}"] = (skin - lesion) < low_contrast_threshold
    for label, column in (("type", "fitzpatrick"), ("group", "fst_group"), ("contrast", "low_contrast")):
        frame[f"changed_{label}"] = frame[f"{column}_new"] != frame[f"{column}_old"]
    if ids is not None:
        frame.insert(0, "id", list(ids))
    return frame


def dataset_ita_changes(records, low_contrast_threshold: float) -> pd.DataFrame:
    """``ita_formula_changes`` for records with image and mask (``Record.load_image``/``load_mask``),
    one image at a time so that any image size works and memory stays at one image."""
    rows = [ita_formula_changes(r.load_image()[None], r.load_mask()[None], low_contrast_threshold, [r.id])
            for r in records if r.image_path is not None and r.mask_path is not None]
    if not rows:
        raise ValueError("no record with both an image and a mask: nothing to measure ITA on")
    return pd.concat(rows, ignore_index=True)


def summarize_ita_changes(changes: pd.DataFrame) -> pd.DataFrame:
    """Counts of ``dataset_ita_changes``: images, b* < 0 regions, changed type / group / contrast label,
    and the low-contrast subset size under each formula."""
    n = len(changes)
    counts = {
        "images": n,
        "skin b* < 0": int((changes.skin_b < 0).sum()),
        "lesion b* < 0": int((changes.lesion_b < 0).sum()),
        "Fitzpatrick type changed": int(changes.changed_type.sum()),
        "Fitzpatrick group changed": int(changes.changed_group.sum()),
        "low-contrast label changed": int(changes.changed_contrast.sum()),
        "low-contrast (arctan)": int(changes.low_contrast_old.sum()),
        "low-contrast (atan2)": int(changes.low_contrast_new.sum()),
    }
    return pd.DataFrame({"count": counts, "share": {k: (v / n if n else np.nan) for k, v in counts.items()}})


def ycbcr_skin_mask(images: np.ndarray) -> np.ndarray:
    """Skin pixels by the YCbCr rule (``YCBCR_SKIN``), scikit-image's ITU-R BT.601 conversion."""
    ycc = rgb2ycbcr(_as_float_batch(images))
    y, cb, cr = ycc[..., 0], ycc[..., 1], ycc[..., 2]
    (cb_lo, cb_hi), (cr_lo, cr_hi) = YCBCR_SKIN["cb"], YCBCR_SKIN["cr"]
    return (y > YCBCR_SKIN["y_min"]) & (cb > cb_lo) & (cb < cb_hi) & (cr > cr_lo) & (cr < cr_hi)


def ita_ycbcr(images: np.ndarray) -> np.ndarray:
    """Table 5.1 baseline "ITA w/ YCbCr": ITA over YCbCr skin pixels (all pixels where none is found)."""
    images = _as_float_batch(images)
    skin = ycbcr_skin_mask(images)
    empty = ~skin.any(axis=(1, 2))
    skin[empty] = True
    return region_ita(images, skin)


def edge_patches(height: int, width: int, size: int = 20) -> list[tuple[slice, slice]]:
    """The eight ``size``×``size`` patches along the image edges: four corners and four edge midpoints."""
    size = max(1, min(size, height // 2, width // 2))
    rows = (0, (height - size) // 2, height - size)
    cols = (0, (width - size) // 2, width - size)
    return [(slice(r, r + size), slice(c, c + size)) for r in rows for c in cols if (r, c) != (rows[1], cols[1])]


def ita_eight_patch(images: np.ndarray, patch_size: int = 20) -> np.ndarray:
    """Table 5.1 baseline "8-patch ITA": ITA of each of eight edge patches, the highest one kept."""
    images = _as_float_batch(images)
    lab = rgb2lab(images)
    values = [ita_from_lab(lab[:, rs, cs, 0].mean(axis=(1, 2)), lab[:, rs, cs, 2].mean(axis=(1, 2)))
              for rs, cs in edge_patches(*images.shape[1:3], patch_size)]
    return np.nanmax(np.stack(values, axis=1), axis=1)
