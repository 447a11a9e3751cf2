"""Scores of the downstream models (thesis §4.7.1 Eqs. (4.18)–(4.22)), the paired t-test of §4.5 and the per-sample
gain analysis of Fig. 4.11.

Overlap (Dice, IoU, the ISIC challenge's thresholded Jaccard) is :mod:`ctrlgen.metrics.overlap`'s: one definition
in the book (two empty masks agree: 1.0). Precision, recall and F1 are scikit-learn's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import f1_score, precision_recall_fscore_support

from ctrlgen.metrics.overlap import dice, iou, overlap_summary


def segmentation_scores(pred: Any, target: Any, threshold: float | None = None) -> dict[str, np.ndarray]:
    """Per-image ``{"IoU": (N,), "Dice": (N,)}`` of masks ``(N, H, W)`` (Eqs. (4.21)–(4.22))."""
    return {"IoU": iou(pred, target, threshold), "Dice": dice(pred, target, threshold)}


def segmentation_summary(pred: Any, target: Any, threshold: float | None = None) -> dict[str, float]:
    """Dataset means of IoU and Dice, the ISIC 2018 thresholded Jaccard (per-image IoU < 0.65 counts 0) and the count."""
    return overlap_summary(pred, target, threshold)


@dataclass(frozen=True)
class ClassificationScores:
    """Micro-averaged precision, recall, F1 (Eqs. (4.18)–(4.20)) and the F1 of each class (by label)."""

    precision: float
    recall: float
    f1: float
    class_f1: dict[Any, float]
    n: int

    def as_row(self) -> dict[str, float]:
        """One table row: ``Precision``, ``Recall``, ``F1``, then ``F1 <class>`` per class."""
        return {"Precision": self.precision, "Recall": self.recall, "F1": self.f1,
                **{f"F1 {label}": value for label, value in self.class_f1.items()}}


def classification_scores(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any] | None = None,
                          average: str = "micro") -> ClassificationScores:
    """Precision, recall and F1 averaged over ``labels`` (scikit-learn, ``average="micro"`` as issue 14 asks;
    ``"macro"``/``"weighted"`` also accepted), plus each class's F1.

    For single-label multi-class data micro precision = recall = F1 = accuracy over ``labels``; a class with no
    true and no predicted sample has F1 0 (scikit-learn's ``zero_division=0``). ``labels`` default: the sorted
    union of both arrays.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of the same length, got {y_true.shape} and {y_pred.shape}")
    if len(y_true) == 0:
        raise ValueError("no samples to score (empty y_true)")
    labels = list(labels) if labels is not None else sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return ClassificationScores(float(p), float(r), float(f), dict(zip(labels, map(float, per_class))), len(y_true))


@dataclass(frozen=True)
class PairedTest:
    """Paired t-test of ``a`` against ``b`` (§4.5): scipy's statistic and two-sided p, mean of ``a - b``, pairs."""

    statistic: float
    p: float
    mean_difference: float
    n: int


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """``scipy.stats.ttest_rel(a, b)`` over paired values (e.g. per-image IoU with and without augmentation).

    The sign follows scipy: a positive statistic and ``mean_difference`` mean ``a`` is larger, so pass
    ``(augmented, baseline)`` to read a gain as positive. Needs at least two pairs of finite values.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be 1-D of the same length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired values contain NaN or infinity")
    result = stats.ttest_rel(a, b)
    return PairedTest(float(result.statistic), float(result.pvalue), float((a - b).mean()), len(a))


def gain_analysis(baseline_iou: Sequence[float], augmented_iou: Sequence[float],
                  bins: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)) -> pd.DataFrame:
    """Fig. 4.11's table: per-image gain (augmented − baseline IoU) binned by the baseline IoU.

    One row per bin ``[low, high)`` (the last bin closed, so IoU 1.0 counts): ``count``, ``mean gain`` and
    ``share improved`` (fraction with gain > 0); NaN for an empty bin. Images outside the bins are refused.
    """
    base, aug = np.asarray(baseline_iou, dtype=float), np.asarray(augmented_iou, dtype=float)
    edges = np.asarray(bins, dtype=float)
    if base.shape != aug.shape or base.ndim != 1:
        raise ValueError(f"baseline and augmented IoU must be 1-D of the same length, got {base.shape} and {aug.shape}")
    if len(edges) < 2 or not (np.diff(edges) > 0).all():
        raise ValueError(f"bins must be at least two increasing edges, got {list(bins)}")
    outside = (base < edges[0]) | (base > edges[-1])
    if outside.any():
        raise ValueError(f"{int(outside.sum())} baseline IoU value(s) outside the bins [{edges[0]}, {edges[-1]}] "
                         f"(e.g. {base[outside][0]})")
    which = np.clip(np.searchsorted(edges, base, side="right") - 1, 0, len(edges) - 2)
    gain = aug - base
    rows = []
    for k in range(len(edges) - 1):
        g = gain[which == k]
        rows.append({"bin": f"[{edges[k]:g}, {edges[k + 1]:g}" + ("]" if k == len(edges) - 2 else ")"),
                     "low": edges[k], "high": edges[k + 1], "count": int(len(g)),
                     "mean gain": float(g.mean()) if len(g) else float("nan"),
                     "share improved": float((g > 0).mean()) if len(g) else float("nan")})
    return pd.DataFrame(rows)


__all__ = ["segmentation_scores", "segmentation_summary", "ClassificationScores", "classification_scores",
           "PairedTest", "paired_test", "gain_analysis"]
