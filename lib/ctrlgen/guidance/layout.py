"""Layout guidance of §4.3.4 (Eq. 4.10) as a ready-made refiner: L_CA + L_SA (+ the style term of Eq. 5.9).

``LayoutGuidance(...)`` builds a ``GuidanceRefiner`` with a ``CrossAttentionLayoutTerm`` ("ca"), a
``SelfAttentionLayoutTerm`` ("sa", unless ``self_res=0``) and, with ``lambda_style`` and
``style_latents``, a ``StyleTerm`` ("style"): L = λ_attn (L_CA + L_SA) + λ_style L_style
(§5.3.3: λ_attn = 1, λ_style = 50). Other objectives: build the refiner with their terms directly.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch

from ctrlgen.guidance.refiner import GuidanceRefiner
from ctrlgen.guidance.terms import CrossAttentionLayoutTerm, GuidanceTerm, SelfAttentionLayoutTerm, StyleTerm, TokenMap


def layout_terms(mask: torch.Tensor, token_index: int, last: int | tuple[int, ...], cross_res: int = 16,
                 self_res: int = 32, lambda_attn: float = 1.0, smoothing_kernel: int = 3, smoothing_sigma: float = 0.5,
                 softmax_scale: float = 100.0, sa_normalize: Literal["background", "queries"] = "background",
                 ) -> list[GuidanceTerm]:
    """The terms λ_attn L_CA and λ_attn L_SA (Eq. 4.7–4.9) of a layout ``mask`` ``(B, H, W)`` or ``(H, W)``
    for the token at ``token_index`` (end position ``last``, one or one per sample); ``self_res=0`` drops L_SA."""
    tmap = TokenMap(token_index, last, cross_res, softmax_scale, smoothing_kernel, smoothing_sigma)
    terms: list[GuidanceTerm] = [CrossAttentionLayoutTerm(mask, tmap, weight=lambda_attn)]
    if self_res:
        terms.append(SelfAttentionLayoutTerm(mask, self_res, sa_normalize, weight=lambda_attn))
    return terms


def LayoutGuidance(mask: torch.Tensor, token_index: int, last: int | tuple[int, ...], cross_res: int = 16,  # noqa: N802
                   self_res: int = 32, eta: float = 20.0, iterations: int = 1, lambda_attn: float = 1.0,
                   lambda_style: float = 0.0,
                   style_latents: Mapping[int, torch.Tensor] | Callable[[int], torch.Tensor] | None = None,
                   smoothing_kernel: int = 3, smoothing_sigma: float = 0.5, softmax_scale: float = 100.0,
                   sa_normalize: Literal["background", "queries"] = "background",
                   places: tuple[str, ...] = ("down", "mid", "up"), fraction: float = 0.5,
                   normalize: Literal["none", "max"] = "none") -> GuidanceRefiner:
    """Refiner of Eq. (4.10) (Eq. 5.9 with a style term): see the module doc.

    Args:
        mask: layout mask ``(B, H, W)`` or ``(H, W)`` at any resolution, values in [0, 1].
        token_index: position of the P-Token (``<lesion>``) in the tokenised prompt.
        last: position of the end token (Attend-and-Excite softmax over tokens 1..last-1).
        cross_res, self_res: attention sides for L_CA and L_SA (``self_res=0`` drops L_SA).
        eta: guidance step η (thesis 20); ``fraction``: share of the steps guided (thesis 0.5).
        normalize: what η multiplies (``GuidanceRefiner.normalize``): the raw gradient (thesis) or ∇/‖∇‖_∞.
    """
    terms = layout_terms(mask, token_index, last, cross_res, self_res, lambda_attn, smoothing_kernel, smoothing_sigma,
                         softmax_scale, sa_normalize)
    if lambda_style and style_latents is not None:
        terms.append(StyleTerm(style_latents, weight=lambda_style))
    return GuidanceRefiner(terms, eta=eta, fraction=fraction, iterations=iterations, places=places, normalize=normalize)


__all__ = ["LayoutGuidance", "layout_terms"]
