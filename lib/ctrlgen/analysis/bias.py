"""Bias identification in lesion segmentation (thesis §5.3.2, §5.4.2, §5.5.4; Fig. 5.4 and 5.8).

1. Every image gets the attributes of §5.3.2: skin-tone group, ITA Skin, ITA Lesion, ITA Difference
   (= ITA Skin − ITA Lesion, Eq. 5.1 on each region), lesion area ratio and circularity 4πS/P² (Eq. 5.2) —
   computed by ``ctrlgen.data.attributes`` from the ground-truth mask; circularity's perimeter is scikit-image's
   Crofton perimeter (``skimage.measure.perimeter_crofton``, unbiased for digital disks).
2. A segmentation model's poorly segmented subsets S_θ = {images with IoU < θ} (θ = 0.8, 0.6; 0.4 on the
   external set).
3. The thesis compares each subset's attribute distribution with the whole set by eye (Fig. 5.4). Here each
   comparison is also a number: the two-sample Kolmogorov–Smirnov test (``scipy.stats.ks_2samp``) and a
   permutation test on the difference of means (``scipy.stats.permutation_test``) between S_θ and the
   *rest* of the set (S_θ is part of the whole set, so the whole set is not an independent sample; S_θ
   against its complement is the two-sample question "does the attribute differ where the model fails?"),
   plus the standardised mean shift (mean(S_θ) − mean(all)) / sd(all). The categorical skin-tone group gets
   a χ² test of the group counts (``scipy.stats.chi2_contingency``) in place of KS.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from ctrlgen.data.attributes import FST_GROUPS, lesion_attributes

# continuous attributes of §5.3.2 (column, display name); the skin-tone group is the categorical one
CONTINUOUS = {"ita_skin": "ITA Skin", "ita_lesion": "ITA Lesion", "ita_difference": "ITA Difference",
              "area_ratio": "Lesion area", "circularity": "Circularity"}
CATEGORICAL = {"skin_tone": "Skin tone"}
ATTRIBUTE_NAMES = {**CATEGORICAL, **CONTINUOUS}


def annotate(images: np.ndarray, masks: np.ndarray, skin_tone: Sequence[str] | None = None,
             ids: Sequence[str] | None = None) -> pd.DataFrame:
    """The §5.3.2 attributes of every image (one row each): ``skin_tone`` (the annotator's group; without one,
    the Fitzpatrick group of the ITA Skin), ITA Skin / Lesion / Difference, lesion area ratio, circularity.

    ``images`` (N, H, W, 3) uint8, ``masks`` (N, H, W) bool ground truth."""
    images, masks = np.asarray(images), np.asarray(masks, dtype=bool)
    if images.shape[:3] != masks.shape:
        raise ValueError(f"images {images.shape} and masks {masks.shape} differ in number or size")
    frame = lesion_attributes(images, masks, list(ids) if ids is not None else None)
    if skin_tone is not None:
        if len(skin_tone) != len(frame):
            raise ValueError(f"{len(skin_tone)} skin-tone labels for {len(frame)} images")
        frame["skin_tone"] = list(skin_tone)
    else:
        frame["skin_tone"] = frame["fst_group"]
    return frame


def poor_subsets(iou: np.ndarray, thresholds: Sequence[float]) -> dict[str, np.ndarray]:
    """S_θ membership (IoU < θ) per threshold, named "S_0.8", "S_0.6", ..."""
    iou = np.asarray(iou, dtype=float)
    return {f"S_{t:g}": iou < t for t in thresholds}


def poor_vs_rest(values: np.ndarray, iou_values: np.ndarray, threshold: float,
                 label: str = "IoU") -> tuple[np.ndarray, np.ndarray, str]:
    """``(values of the poorly segmented images, values of the rest, note)``: the two arms of a "poorly segmented
    vs the rest" claim (chapter 4's Fig. 4.11 gains, chapter 5's S_θ of §5.4.2). ``values[i]`` belongs to the image
    whose IoU is ``iou_values[i]``; images with a non-finite value or IoU are left out.

    The split, in order, the first that leaves both arms non-empty (the note says which was used):

    1. the threshold: poor = IoU < ``threshold`` (S_θ);
    2. an arm is empty (weak models on a small profile): the median m of the IoUs, poor = IoU < m;
    3. nothing is below m (at least half the IoUs tie at the minimum m): poor = IoU ≤ m, so that equal IoUs stay in
       one arm and every poor image is segmented no better than every other one;
    4. every IoU is equal (ties all through): the lower half by IoU rank, ties in input order (``n // 2`` poor).

    With fewer than two images one arm is necessarily empty. ``label`` names the IoU in the note
    ("original IoU").
    """
    values, iou_values = np.asarray(values, dtype=float), np.asarray(iou_values, dtype=float)
    if values.shape != iou_values.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and iou_values {iou_values.shape} must be 1-D and of one length")
    keep = np.isfinite(values) & np.isfinite(iou_values)
    values, iou_values = values[keep], iou_values[keep]
    poor, note = iou_values < threshold, f"poorly segmented: {label} < {threshold:g} (S_{threshold:g}) vs the rest"
    if _one_sided(poor):
        m = float(np.median(iou_values)) if len(iou_values) else float("nan")
        empty = f"{label} < {threshold:g} leaves an arm empty"
        poor, note = iou_values < m, f"{empty}: split at the median {label} {m:.3g} instead ({label} < median)"
        if not poor.any():
            poor, note = iou_values <= m, f"{empty}: split at the median {label} {m:.3g} instead ({label} ≤ median)"
        if _one_sided(poor) and len(values) >= 2:
            poor = np.zeros(len(values), bool)
            poor[np.argsort(iou_values, kind="stable")[: len(values) // 2]] = True
            note = f"{empty} and every {label} is {m:.3g}: the lower half by {label} rank (input order) instead"
    return values[poor], values[~poor], note


def _one_sided(member: np.ndarray) -> bool:
    return bool(member.all() or not member.any())


def ks_test(subset: np.ndarray, rest: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic and p-value (scipy, exact/asymptotic by its rule); NaNs dropped."""
    a, b = _finite(subset), _finite(rest)
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    r = stats.ks_2samp(a, b)
    return float(r.statistic), float(r.pvalue)


def permutation_mean_test(subset: np.ndarray, rest: np.ndarray, n_resamples: int = 9999, seed: int = 0) -> tuple[float, float]:
    """Difference of means (subset − rest) and its two-sided permutation p-value (``scipy.stats.permutation_test``,
    independent samples; exact when the number of distinct splits is at most ``n_resamples``)."""
    a, b = _finite(subset), _finite(rest)
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    if len(a) < 2 or len(b) < 2:  # scipy's permutation_test needs two observations per sample: no p-value
        return float(np.mean(a) - np.mean(b)), float("nan")
    r = stats.permutation_test((a, b), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                               permutation_type="independent", n_resamples=n_resamples, alternative="two-sided",
                               vectorized=True, random_state=seed)
    return float(r.statistic), float(r.pvalue)


def chi2_groups(subset: Sequence[str], rest: Sequence[str], groups: Sequence[str] = FST_GROUPS) -> tuple[float, float]:
    """χ² test of independence of group counts in the subset vs the rest (groups absent from both dropped)."""
    table = np.array([[int(np.sum(np.asarray(s) == g)) for g in groups] for s in (subset, rest)])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2 or table.sum(1).min() == 0:
        return float("nan"), float("nan")
    r = stats.chi2_contingency(table)
    return float(r.statistic), float(r.pvalue)


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[np.isfinite(x)]


@dataclass(frozen=True)
class ShiftSettings:
    """How the distribution comparison runs (profile ``ch05.bias``)."""

    thresholds: tuple[float, ...] = (0.8, 0.6)
    n_resamples: int = 9999
    seed: int = 0


def shift_row(attrs: pd.DataFrame, member: np.ndarray, column: str, settings: ShiftSettings) -> dict[str, float]:
    """One attribute of one subset against the rest: sizes, means, standardised shift, test statistics and p-values."""
    member = np.asarray(member, dtype=bool)
    values = attrs[column].to_numpy()
    sub, rest = values[member], values[~member]
    row = {"n subset": int(member.sum()), "n rest": int((~member).sum())}
    if column in CATEGORICAL:
        stat, p = chi2_groups(sub, rest)
        shares = {f"share {g} (subset)": float(np.mean(sub == g)) if len(sub) else np.nan for g in FST_GROUPS}
        return row | shares | {"test": "chi2", "statistic": stat, "p (KS / chi2)": p, "p (permutation, mean)": np.nan,
                                "mean all": np.nan, "mean subset": np.nan, "standardised shift": np.nan}
    whole = _finite(values)
    sd = float(np.std(whole)) if len(whole) > 1 else float("nan")
    ks, p_ks = ks_test(sub, rest)
    _, p_perm = permutation_mean_test(sub, rest, settings.n_resamples, settings.seed)
    mean_sub = float(np.mean(_finite(sub))) if len(_finite(sub)) else float("nan")
    shift = (mean_sub - float(np.mean(whole))) / sd if sd and np.isfinite(sd) and sd > 0 else float("nan")
    return row | {"test": "KS", "statistic": ks, "p (KS / chi2)": p_ks, "p (permutation, mean)": p_perm,
                  "mean all": float(np.mean(whole)), "mean subset": mean_sub, "standardised shift": shift}


def shift_table(attrs: pd.DataFrame, iou_by_model: Mapping[str, np.ndarray], settings: ShiftSettings,
                attributes: Sequence[str] = tuple(ATTRIBUTE_NAMES)) -> pd.DataFrame:
    """Rows (model, subset, attribute): every attribute of every poorly segmented subset against the rest."""
    rows = {}
    for model, iou in iou_by_model.items():
        if len(iou) != len(attrs):
            raise ValueError(f"{model}: {len(iou)} IoU values for {len(attrs)} annotated images")
        for subset, member in poor_subsets(iou, settings.thresholds).items():
            for column in attributes:
                rows[(model, subset, ATTRIBUTE_NAMES[column])] = shift_row(attrs, member, column, settings)
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["model", "subset", "attribute"])
    return frame


def histogram_grid(attrs: pd.DataFrame, iou_by_model: Mapping[str, np.ndarray], thresholds: Sequence[float],
                   attributes: Sequence[str] = tuple(ATTRIBUTE_NAMES), title: str = "", bins: int = 20) -> plt.Figure:
    """The Fig. 5.4 / 5.8 grid: one row per model, one column per attribute; the whole set's distribution and each
    S_θ's, as densities on shared bins (bars for the skin-tone group)."""
    models = list(iou_by_model)
    fig, axes = plt.subplots(len(models), len(attributes), figsize=(2.6 * len(attributes), 2.1 * len(models)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for r, model in enumerate(models):
        subsets = {"all": np.ones(len(attrs), bool)} | poor_subsets(iou_by_model[model], thresholds)
        for c, column in enumerate(attributes):
            ax = axes[r, c]
            _panel(ax, attrs[column].to_numpy(), subsets, column, colours, bins)
            if r == 0:
                ax.set_title(ATTRIBUTE_NAMES[column], fontsize=9)
            if c == 0:
                ax.set_ylabel(model, fontsize=9)
            ax.tick_params(labelsize=7)
    axes[0, -1].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _panel(ax, values: np.ndarray, subsets: Mapping[str, np.ndarray], column: str, colours, bins: int) -> None:
    if column in CATEGORICAL:
        width = 0.8 / len(subsets)
        for k, (name, member) in enumerate(subsets.items()):
            sub = values[member]
            share = [np.mean(sub == g) if len(sub) else 0.0 for g in FST_GROUPS]
            ax.bar(np.arange(len(FST_GROUPS)) + k * width, share, width, color=colours(k), label=f"{name} (n={member.sum()})")
        ax.set_xticks(np.arange(len(FST_GROUPS)) + 0.4 - width / 2, FST_GROUPS)
        return
    finite = _finite(values)
    edges = np.histogram_bin_edges(finite, bins=bins) if len(finite) else np.linspace(0, 1, bins + 1)
    for k, (name, member) in enumerate(subsets.items()):
        sub = _finite(values[member])
        if len(sub):
            ax.hist(sub, bins=edges, density=True, histtype="step" if k else "stepfilled", alpha=1.0 if k else 0.3,
                    color=colours(k), label=f"{name} (n={member.sum()})")
