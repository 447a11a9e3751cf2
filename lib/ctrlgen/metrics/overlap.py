"""Overlap of binary masks: IoU (Jaccard), Dice, and the ISIC 2018 thresholded Jaccard (thesis §4.7.1, §5.4).

The one module every segmentation score in the book goes through, so that all of them share one set of
conventions:

* **Batches only.** ``pred`` and ``target`` are ``(N, H, W)`` (or ``(N, ...)`` with any spatial
  dimensions); one value per image comes back. A single ``(H, W)`` mask is refused rather than read as
  H one-row images: pass ``mask[None]``.
* **Binary masks, explicit thresholds.** A mask is boolean, or numeric with only the values 0 and 1.
  Anything else (a probability map, a 0/255 mask) needs ``threshold``: ``pred > threshold`` is the
  lesion (the comparison torchmetrics uses). Nothing is cast to bool silently (0.2 is not "lesion").
  The target must be binary; it is never thresholded.
* **Two empty masks agree perfectly:** IoU = Dice = 1.0 when neither mask has a foreground pixel
  (nothing to find, nothing found). An empty prediction of a non-empty target scores 0.
* Shape mismatches and empty batches raise ``ValueError`` with both shapes in the message.

IoU = |P ∩ G| / |P ∪ G|; Dice = 2|P ∩ G| / (|P| + |G|) (thesis §4.7.1). The ISIC 2018 Task 1 challenge
scored the *thresholded Jaccard*: each image's IoU is set to 0 when below 0.65, then averaged
(Codella et al. 2019).
"""
from __future__ import annotations

from typing import Any

import numpy as np

ISIC_JACCARD_CUTOFF = 0.65  # ISIC 2018 Task 1: a per-image Jaccard below 0.65 counts as a failure (0)


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary(x: np.ndarray, name: str, threshold: float | None) -> np.ndarray:
    """``x`` as a boolean array: bool as is, ``x > threshold`` when given, else only 0/1 values allowed."""
    if threshold is not None:
        if x.dtype == bool:
            raise ValueError(f"{name} is already boolean: threshold={threshold} would do nothing; drop it")
        return x > threshold
    if x.dtype == bool:
        return x
    if x.size and not np.isin(x, (0, 1)).all():
        other = x[~np.isin(x, (0, 1))].flat[0].item()
        raise ValueError(f"{name} ({x.dtype}) has values other than 0 and 1 (e.g. {other!r}): pass threshold= "
                         f"(e.g. 0.5 for probabilities, 127 for 0/255 masks) or boolean masks")
    return x.astype(bool)


def binary_batches(pred: Any, target: Any, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and return ``(pred, target)`` as boolean ``(N, P)`` arrays (P pixels per image)."""
    p, g = _array(pred), _array(target)
    if p.shape != g.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {g.shape}")
    if p.ndim < 3:
        raise ValueError(f"masks must be a batch (N, H, W); got shape {p.shape}. For one image pass mask[None]")
    if p.shape[0] == 0:
        raise ValueError(f"empty batch: no masks to compare (shape {p.shape})")
    p = _binary(p, "pred", threshold)
    g = _binary(g, "target", None)
    return p.reshape(len(p), -1), g.reshape(len(g), -1)


def iou(pred: Any, target: Any, threshold: float | None = None) -> np.ndarray:
    """Per-image IoU (Jaccard) |P ∩ G| / |P ∪ G| of ``(N, H, W)`` masks, thesis §4.7.1; 1.0 where both are empty.

    ``threshold``: binarise a probability map ``pred`` as ``pred > threshold`` (required for non-binary input).
    """
    p, g = binary_batches(pred, target, threshold)
    inter, union = (p & g).sum(1), (p | g).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def dice(pred: Any, target: Any, threshold: float | None = None) -> np.ndarray:
    """Per-image Dice 2|P ∩ G| / (|P| + |G|) of ``(N, H, W)`` masks, thesis §4.7.1; 1.0 where both are empty."""
    p, g = binary_batches(pred, target, threshold)
    inter, total = (p & g).sum(1), p.sum(1) + g.sum(1)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def thresholded_jaccard(pred: Any, target: Any, threshold: float | None = None,
                        cutoff: float = ISIC_JACCARD_CUTOFF) -> float:
    """ISIC 2018 Task 1 score: the mean over images of IoU, each set to 0 when below ``cutoff`` (0.65)."""
    values = iou(pred, target, threshold)
    return float(np.where(values < cutoff, 0.0, values).mean())


def overlap_summary(pred: Any, target: Any, threshold: float | None = None) -> dict[str, float]:
    """Mean IoU, mean Dice and the thresholded Jaccard side by side (how the book reports segmentation)."""
    values = iou(pred, target, threshold)
    return {"IoU": float(values.mean()), "Dice": float(dice(pred, target, threshold).mean()),
            "thresholded Jaccard": float(np.where(values < ISIC_JACCARD_CUTOFF, 0.0, values).mean()),
            "images": float(len(values))}


__all__ = ["ISIC_JACCARD_CUTOFF", "binary_batches", "iou", "dice", "thresholded_jaccard", "overlap_summary"]
