"""BoxDiff's box constraints (Xie et al., 2023), used in §4.4.6 for bounding-box guided generation.

For a token's cross-attention map A (``(B, h, w)``, softmax-normalised over text tokens and smoothed)
and a box mask B (1 inside the box):

* inner-box constraint  L_IB = 1 − mean topk_k(A ⊙ B),  k = ⌊P · |B|⌋        (high attention inside)
* outer-box constraint  L_OB = mean topk_k(A ⊙ (1 − B)),  k = ⌊P · |1 − B|⌋  (no strong attention outside)
* corner constraint     L_CC = mean |proj(Â) − proj(B)| over the columns/rows within L of each box edge,
  with proj the max over the other axis and Â = A / max A (the map's projection must rise exactly at
  the box edges).

P and L are ``BoxDiffConfig`` (profile ``didgen.eval.box_topk_frac`` / ``box_corner_pixels``), as in the
official code (showlab/BoxDiff, ``config.py``: P = 0.8, L = 6; ``pipeline/sd_pipeline_boxdiff.py``):
k = ⌊P · area⌋ **per sample** (at least 1), and the edges are the first box column/row and the one just
past the box (the code's x1 and x2), each with the positions |i − edge| ≤ L. Two choices of this book:
L_CC is the mean over those positions (the code sums over the axis and divides by its length), averaged
over the two axes, and the map is max-normalised before projecting. The three constraints are guidance
terms (``BoxTerm``s from ``box_terms``); ``box_guidance`` puts them in the one refiner,
``ctrlgen.guidance.GuidanceRefiner``, which applies ẑ_t = z_t − η ∇ (L_IB + L_OB + L_CC) on the first steps.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ctrlgen.guidance import GuidanceContext, GuidanceRefiner, GuidanceTerm, TokenMap, mask_at


@dataclass(frozen=True)
class BoxDiffConfig:
    """BoxDiff's P (top-k share of an area) and L (positions either side of a box edge in L_CC).

    Defaults: the official code's (showlab/BoxDiff ``config.py``: ``P = 0.8``, ``L = 6``); its README's
    example commands use ``--P 0.2 --L 1``."""

    topk_frac: float = 0.8
    corner_pixels: int = 6

    def __post_init__(self):
        if not 0 < self.topk_frac <= 1:
            raise ValueError(f"BoxDiff P (topk_frac) must lie in (0, 1], got {self.topk_frac}")
        if self.corner_pixels < 0:
            raise ValueError(f"BoxDiff L (corner_pixels) must be >= 0, got {self.corner_pixels}")

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "BoxDiffConfig":
        """From ``didgen.eval.box_topk_frac`` and ``box_corner_pixels``; ``overrides`` replace fields."""
        e = cfg["didgen"]["eval"]
        return cls(**{"topk_frac": float(e["box_topk_frac"]), "corner_pixels": int(e["box_corner_pixels"]), **overrides})


def box_masks(boxes: Sequence[Sequence[float]], side: int) -> torch.Tensor:
    """Boolean ``(B, side, side)`` masks of boxes ``(x0, y0, x1, y1)`` in [0, 1] image fractions."""
    out = torch.zeros(len(boxes), side, side)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"box {i} {(x0, y0, x1, y1)} is not (x0, y0, x1, y1) with 0 ≤ x0 < x1 ≤ 1, 0 ≤ y0 < y1 ≤ 1")
        c0, c1 = int(round(x0 * side)), max(int(round(x1 * side)), int(round(x0 * side)) + 1)
        r0, r1 = int(round(y0 * side)), max(int(round(y1 * side)), int(round(y0 * side)) + 1)
        out[i, r0:r1, c0:c1] = 1
    return out


def _topk_mean(values: torch.Tensor, weights: torch.Tensor, frac: float) -> torch.Tensor:
    """Per sample: the mean of the k largest of ``values ⊙ weights``, k = max(1, ⌊frac · Σ weights⌋) of **that**
    sample (as the official code, which runs per image) — so a sample's loss does not depend on its batch."""
    flat = (values * weights).flatten(1)
    k = (frac * weights.flatten(1).sum(1) + 1e-6).floor().long().clamp(1, flat.shape[1])  # +1e-6: 0.8·5 = 4, not 3.99…
    top = flat.sort(dim=1, descending=True).values
    keep = torch.arange(flat.shape[1], device=flat.device)[None] < k[:, None]
    return (top * keep).sum(1) / k.to(top)


def inner_box_loss(maps: torch.Tensor, box: torch.Tensor, topk_frac: float = 0.8) -> torch.Tensor:
    """L_IB per image ``(B,)``."""
    return 1 - _topk_mean(maps, box, topk_frac)


def outer_box_loss(maps: torch.Tensor, box: torch.Tensor, topk_frac: float = 0.8) -> torch.Tensor:
    """L_OB per image ``(B,)``."""
    return _topk_mean(maps, 1 - box, topk_frac)


def _edge_weights(profile: torch.Tensor, pixels: int) -> torch.Tensor:
    """``(B, n)`` 1 at positions within ``pixels`` of a box edge: the first inside index and the one past the last."""
    idx = torch.arange(profile.shape[1], device=profile.device)
    weight = torch.zeros_like(profile)
    for i in range(len(profile)):
        inside = torch.nonzero(profile[i] > 0).flatten()
        lo, end = int(inside.min()), int(inside.max()) + 1
        weight[i] = (((idx - lo).abs() <= pixels) | ((idx - end).abs() <= pixels)).float()
    return weight


def corner_loss(maps: torch.Tensor, box: torch.Tensor, pixels: int = 6) -> torch.Tensor:
    """L_CC per image ``(B,)``: projections of the max-normalised map vs the box's, within ``pixels`` (L) of its edges."""
    a = maps / maps.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    losses = []
    for axis in (1, 2):  # project over rows (x profile) then over columns (y profile)
        pa, pb = a.amax(axis), box.amax(axis)  # (B, n)
        weight = _edge_weights(pb, pixels)
        losses.append(((pa - pb).abs() * weight).sum(1) / weight.sum(1).clamp_min(1))
    return torch.stack(losses).mean(0)


def box_losses(maps: torch.Tensor, box: torch.Tensor, config: BoxDiffConfig = BoxDiffConfig()) -> dict[str, torch.Tensor]:
    """``{"ib", "ob", "cc"}``, each averaged over the batch. ``box`` is at the map side (``box_masks``)."""
    box = box.to(maps)
    return {"ib": inner_box_loss(maps, box, config.topk_frac).mean(),
            "ob": outer_box_loss(maps, box, config.topk_frac).mean(),
            "cc": corner_loss(maps, box, config.corner_pixels).mean()}


@dataclass
class BoxTerm:
    """One of BoxDiff's constraints (``loss``: ``inner_box_loss``, ``outer_box_loss`` or ``corner_loss`` with
    P or L bound) per sample on ``token_map`` against ``box`` (``(B, H, W)`` or ``(H, W)``, pooled to the map
    side and thresholded at 0.5; ``box_masks`` at the map side is exact)."""

    box: torch.Tensor
    token_map: TokenMap
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    name: str
    weight: float = 1.0
    self_res: tuple[int, ...] = ()

    @property
    def cross_res(self) -> tuple[int, ...]:
        return (self.token_map.cross_res,)

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor:
        a = ctx.token_map(self.token_map)
        return self.loss(a, (mask_at(self.box, self.token_map.cross_res, a) > 0.5).float().expand_as(a))


def box_terms(box: torch.Tensor, token_map: TokenMap, config: BoxDiffConfig = BoxDiffConfig(),
              weight: float = 1.0) -> list[GuidanceTerm]:
    """BoxDiff's three constraints ``ib``, ``ob``, ``cc`` (P and L from ``config``) as guidance terms of equal ``weight``."""
    return [BoxTerm(box, token_map, partial(inner_box_loss, topk_frac=config.topk_frac), "ib", weight),
            BoxTerm(box, token_map, partial(outer_box_loss, topk_frac=config.topk_frac), "ob", weight),
            BoxTerm(box, token_map, partial(corner_loss, pixels=config.corner_pixels), "cc", weight)]


def box_guidance(box: torch.Tensor, token_map: TokenMap, eta: float, fraction: float = 0.5,
                 config: BoxDiffConfig = BoxDiffConfig(), iterations: int = 1, normalize: str = "none") -> GuidanceRefiner:
    """The refiner of BoxDiff's guidance: ẑ_t = z_t − η ∇ (L_IB + L_OB + L_CC) on the first ``fraction`` of the steps
    (``normalize="max"``: the step η·∇/‖∇‖∞ the mini profile uses for every layout guidance, see ``GuidanceRefiner``)."""
    return GuidanceRefiner(box_terms(box, token_map, config), eta=eta, fraction=fraction, iterations=iterations,
                           normalize=normalize)


__all__ = ["BoxDiffConfig", "box_masks", "inner_box_loss", "outer_box_loss", "corner_loss", "box_losses", "BoxTerm",
           "box_terms", "box_guidance"]
