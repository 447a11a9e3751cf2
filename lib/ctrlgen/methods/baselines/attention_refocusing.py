"""Attention-Refocusing (Phung, Ge, Huang, "Grounded Text-to-Image Synthesis with Attention Refocusing",
CVPR 2024) as guidance terms: the second training-free mask → image baseline of thesis §4.4.4
(Table 4.5–4.6), applied to chapter 4's region-aware model.

Two losses on the attention of one U-Net call on z_t, descended on the latent:

* **Cross-attention refocusing** (CAR) on the token's map A (Attend-and-Excite softmax over the text tokens
  1..last−1 scaled by 100, Gaussian-smoothed — ``ctrlgen.guidance.TokenMap``):

      L_CAR = (1 − max_{p ∈ M} A_p) + w_bg · max_{p ∉ M} A_p

  the peak inside the region should be high and the peak outside it low. The official code
  (github.com/Attention-Refocusing/attention-refocusing, ``ldm/models/diffusion/loss.py``,
  ``caculate_loss_att_fixed_cnt``) adds the background peak with weight 1/2 (``max_background / 2.``):
  ``background_weight`` 0.5 by default. Its extra hinge (the foreground term only while the peak is below
  0.2, six-fold below 0.1, late steps always) is a schedule of the same loss and is not reproduced.
* **Self-attention refocusing** (SAR): the self-attention that region pixels send outside the region,
  averaged over the region's query pixels (official ``loss_one_att_outside``: rows of the in-box queries
  summed and divided by their count, times the outside mask, summed):

      L_SAR = Σ_{p ∈ M} Σ_{q ∉ M} A_S[p, q] / |M|

  which is L_SA of Eq. (4.8) with the per-query normalisation (``self_attention_layout_loss(...,
  normalize="queries")``; Eq. (4.9) divides by Σ(1 − M) instead), reused here rather than written twice: the
  official loss is per layer and averaged over the layers of the side, the same as the loss of the layer-averaged
  map the capture keeps because the loss is linear in A_S. ``SelfAttentionRefocusTerm`` is therefore the book's
  ``SelfAttentionLayoutTerm`` with that normalisation fixed; the CAR term shares L_CA's map and mask handling
  (``ctrlgen.guidance.terms.TokenMapMaskTerm``) and differs in its loss only.

For a soft mask (a pixel mask area-pooled to the attention side) the maxima weight each position by its mask
value: ``max_p A_p M_p`` and ``max_p A_p (1 − M_p)``, exactly the hard-mask maxima when M is binary. The
paper's boxes become the lesion mask: a box is a mask with straight edges.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ctrlgen.guidance import (GuidanceRefiner, SelfAttentionLayoutTerm, TokenMap, TokenMapMaskTerm,
                              self_attention_layout_loss)


def car_loss(token_map: torch.Tensor, mask: torch.Tensor, background_weight: float = 0.5) -> torch.Tensor:
    """L_CAR per sample ``(B,)`` (module doc). ``token_map`` ``(B, h, w)``; ``mask`` ``(B, h, w)`` or ``(1, h, w)``,
    values in [0, 1]."""
    if token_map.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"map side {tuple(token_map.shape[-2:])} and mask side {tuple(mask.shape[-2:])} differ")
    m = mask.to(token_map.dtype).expand_as(token_map).flatten(1)
    a = token_map.flatten(1)
    inside, outside = (a * m).amax(1), (a * (1 - m)).amax(1)
    return (1 - inside) + background_weight * outside


def sar_loss(self_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_SAR per sample ``(B,)``: ``self_attn`` ``(B, N, N)`` (rows: queries), ``mask`` ``(B, h, w)`` with h·w = N."""
    return self_attention_layout_loss(self_attn, mask, normalize="queries", reduction="none")


@dataclass
class CrossAttentionRefocusTerm(TokenMapMaskTerm):
    """L_CAR on ``token_map`` against ``mask`` (``(B, H, W)`` or ``(H, W)``, area-pooled to the map side): the map
    and mask handling of ``TokenMapMaskTerm`` (as L_CA's), the peaks of ``car_loss`` instead of L_CA's means."""

    mask: torch.Tensor
    token_map: TokenMap
    background_weight: float = 0.5
    weight: float = 1.0
    name: str = "car"
    self_res: tuple[int, ...] = ()

    def loss(self, token_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return car_loss(token_map, mask, self.background_weight)


@dataclass
class SelfAttentionRefocusTerm(SelfAttentionLayoutTerm):
    """L_SAR on the self-attention maps at side ``side`` against ``mask``: the thesis's L_SA term (Eq. 4.8) with the
    per-query normalisation of the official code (module doc), fixed: ``normalize`` is not an argument."""

    mask: torch.Tensor
    side: int = 16
    normalize: Literal["background", "queries"] = field(default="queries", init=False)
    weight: float = 1.0
    name: str = "sar"
    cross_res: tuple[int, ...] = ()


@dataclass(frozen=True)
class RefocusConfig:
    """Attention-Refocusing settings (profile ``ch04_downstream.attention_refocusing``; attention sides, smoothing and
    the text softmax scale from the profile's ``attention`` section, as every layout term of the book reads them)."""

    eta: float = 20.0
    fraction: float = 0.5
    iterations: int = 1
    background_weight: float = 0.5
    sar_weight: float = 1.0
    cross_res: int = 16
    self_res: int = 16
    softmax_scale: float = 100.0
    smoothing_kernel: int = 3
    smoothing_sigma: float = 0.5

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "RefocusConfig":
        r, a = cfg["ch04_downstream"]["attention_refocusing"], cfg["attention"]
        return cls(eta=float(r["eta"]), fraction=float(r["fraction"]), iterations=int(r["iterations"]),
                   background_weight=float(r["background_weight"]), sar_weight=float(r["sar_weight"]),
                   cross_res=int(a["cross_res"][0]), self_res=int(a["self_res"][0]),
                   softmax_scale=float(a["text_softmax_scale"]), smoothing_kernel=int(a["smoothing_kernel"]),
                   smoothing_sigma=float(a["smoothing_sigma"]))


def refocus_refiner(masks: torch.Tensor, lesion_index: int, last: int | tuple[int, ...],
                    config: RefocusConfig) -> GuidanceRefiner:
    """The refiner for one batch: CAR on ``<lesion>`` (end positions ``last``) and, with ``sar_weight`` > 0, SAR."""
    tmap = TokenMap(lesion_index, last, config.cross_res, config.softmax_scale, config.smoothing_kernel,
                    config.smoothing_sigma)
    terms: list = [CrossAttentionRefocusTerm(masks, tmap, config.background_weight)]
    if config.sar_weight > 0:
        terms.append(SelfAttentionRefocusTerm(masks, config.self_res, weight=config.sar_weight))
    return GuidanceRefiner(terms, eta=config.eta, fraction=config.fraction, iterations=config.iterations)


__all__ = ["car_loss", "sar_loss", "CrossAttentionRefocusTerm", "SelfAttentionRefocusTerm", "RefocusConfig",
           "refocus_refiner"]
