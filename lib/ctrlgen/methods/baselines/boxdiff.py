"""BoxDiff's box constraints (Xie et al., 2023), used in §4.4.6 for bounding-box guided generation.

For a token's cross-attention map A (``(B, h, w)``, softmax-normalised over text tokens and smoothed)
and a box mask B (1 inside the box):

* inner-box constraint  L_IB = 1 − (1/P) Σ topk_P(A ⊙ B)          (high attention somewhere inside)
* outer-box constraint  L_OB = (1/P) Σ topk_P(A ⊙ (1 − B))        (no strong attention outside)
* corner constraint     L_CC = mean |proj(Â) − proj(B)| over the L columns/rows nearest each box edge,
  with proj the max over the other axis and Â = A / max A (the map's projection must rise exactly at
  the box edges).

P is ``topk_frac`` of the box (or outside) area, at least 1. The three constraints are guidance terms
(``InnerBoxTerm``, ``OuterBoxTerm``, ``CornerTerm``); ``box_guidance`` puts them in the one refiner,
``ctrlgen.guidance.GuidanceRefiner``, which applies ẑ_t = z_t − η ∇ (L_IB + L_OB + L_CC) on the first steps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctrlgen.guidance import GuidanceContext, GuidanceRefiner, GuidanceTerm, TokenMap, mask_at


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
    flat, w = values.flatten(1), weights.flatten(1)
    k = max(1, int(round(frac * float(w.sum(1).min()))))
    return (flat * w).topk(min(k, flat.shape[1]), dim=1).values.mean(1)


def inner_box_loss(maps: torch.Tensor, box: torch.Tensor, topk_frac: float = 0.8) -> torch.Tensor:
    """L_IB per image ``(B,)``."""
    return 1 - _topk_mean(maps, box, topk_frac)


def outer_box_loss(maps: torch.Tensor, box: torch.Tensor, topk_frac: float = 0.8) -> torch.Tensor:
    """L_OB per image ``(B,)``."""
    return _topk_mean(maps, 1 - box, topk_frac)


def corner_loss(maps: torch.Tensor, box: torch.Tensor, width: int = 2) -> torch.Tensor:
    """L_CC per image ``(B,)``: projections of the max-normalised map vs the box's, near the box edges."""
    a = maps / maps.flatten(1).amax(1).clamp_min(1e-8)[:, None, None]
    losses = []
    for axis in (1, 2):  # project over rows (x profile) then over columns (y profile)
        pa, pb = a.amax(axis), box.amax(axis)  # (B, n)
        n = pa.shape[1]
        idx = torch.arange(n, device=maps.device)
        weight = torch.zeros_like(pb)
        for i in range(len(pb)):
            inside = torch.nonzero(pb[i] > 0).flatten()
            lo, hi = int(inside.min()), int(inside.max())
            weight[i] = (((idx - lo).abs() < width) | ((idx - hi).abs() < width)).float()
        losses.append(((pa - pb).abs() * weight).sum(1) / weight.sum(1).clamp_min(1))
    return torch.stack(losses).mean(0)


def box_losses(maps: torch.Tensor, box: torch.Tensor, topk_frac: float = 0.8, width: int = 2) -> dict[str, torch.Tensor]:
    """``{"ib", "ob", "cc"}``, each averaged over the batch. ``box`` is at the map side (``box_masks``)."""
    box = box.to(maps)
    return {"ib": inner_box_loss(maps, box, topk_frac).mean(), "ob": outer_box_loss(maps, box, topk_frac).mean(),
            "cc": corner_loss(maps, box, width).mean()}


@dataclass
class _BoxTerm:
    """A box constraint on ``token_map`` against ``box`` (``(B, H, W)`` or ``(H, W)``, pooled to the map side
    and thresholded at 0.5; ``box_masks`` at the map side is exact)."""

    box: torch.Tensor
    token_map: TokenMap
    weight: float = 1.0
    self_res: tuple[int, ...] = ()

    @property
    def cross_res(self) -> tuple[int, ...]:
        return (self.token_map.cross_res,)

    def _maps(self, ctx: GuidanceContext) -> tuple[torch.Tensor, torch.Tensor]:
        a = ctx.token_map(self.token_map)
        return a, (mask_at(self.box, self.token_map.cross_res, a) > 0.5).float().expand_as(a)


@dataclass
class InnerBoxTerm(_BoxTerm):
    """L_IB per sample (module doc)."""

    topk_frac: float = 0.8
    name: str = "ib"

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor:
        return inner_box_loss(*self._maps(ctx), self.topk_frac)


@dataclass
class OuterBoxTerm(_BoxTerm):
    """L_OB per sample (module doc)."""

    topk_frac: float = 0.8
    name: str = "ob"

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor:
        return outer_box_loss(*self._maps(ctx), self.topk_frac)


@dataclass
class CornerTerm(_BoxTerm):
    """L_CC per sample (module doc)."""

    width: int = 2
    name: str = "cc"

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor:
        return corner_loss(*self._maps(ctx), self.width)


def box_terms(box: torch.Tensor, token_map: TokenMap, topk_frac: float = 0.8, corner_width: int = 2,
              weight: float = 1.0) -> list[GuidanceTerm]:
    """BoxDiff's three constraints ``ib``, ``ob``, ``cc`` as guidance terms of equal ``weight``."""
    return [InnerBoxTerm(box, token_map, weight, topk_frac=topk_frac), OuterBoxTerm(box, token_map, weight, topk_frac=topk_frac),
            CornerTerm(box, token_map, weight, width=corner_width)]


def box_guidance(box: torch.Tensor, token_map: TokenMap, eta: float, fraction: float = 0.5, topk_frac: float = 0.8,
                 corner_width: int = 2, iterations: int = 1) -> GuidanceRefiner:
    """The refiner of BoxDiff's guidance: ẑ_t = z_t − η ∇ (L_IB + L_OB + L_CC) on the first ``fraction`` of the steps."""
    return GuidanceRefiner(box_terms(box, token_map, topk_frac, corner_width), eta=eta, fraction=fraction,
                           iterations=iterations)


__all__ = ["box_masks", "inner_box_loss", "outer_box_loss", "corner_loss", "box_losses", "InnerBoxTerm", "OuterBoxTerm",
           "CornerTerm", "box_terms", "box_guidance"]
