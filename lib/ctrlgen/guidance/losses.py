"""Test-time guidance losses on attention maps and latents (§4.3.4, §5.3.3).

Masks are soft region masks at the attention side (area-pool a pixel mask with
``ctrlgen.attention.resize_maps(mask, side, mode="area")``).
"""
from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["mean", "none"]


def _reduce(per_sample: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_sample.mean() if reduction == "mean" else per_sample


def cross_attention_layout_loss(cross_map: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                                reduction: Reduction = "mean") -> torch.Tensor:
    """L_CA, Eq. (4.7) / (5.5): ``(1 − Σ A·M / Σ M) + Σ A·(1−M) / Σ (1−M)`` per image, averaged over the batch
    (``reduction="none"``: the per-image values ``(B,)``).

    ``cross_map`` is the (softmax-normalised, smoothed) map of the ``<lesion>`` token ``(B, h, w)``;
    ``mask`` the layout mask at the same side ``(B, h, w)`` or ``(h, w)``, values in [0, 1].
    """
    m = mask.to(cross_map.dtype).expand_as(cross_map)
    inside = (cross_map * m).sum((-2, -1)) / m.sum((-2, -1)).clamp_min(eps)
    outside = (cross_map * (1 - m)).sum((-2, -1)) / (1 - m).sum((-2, -1)).clamp_min(eps)
    return _reduce((1 - inside) + outside, reduction)


def self_attention_layout_loss(self_attn: torch.Tensor, mask: torch.Tensor,
                               normalize: Literal["background", "queries"] = "background", eps: float = 1e-8,
                               reduction: Reduction = "mean") -> torch.Tensor:
    """L_SA, Eq. (4.8)–(4.9) / (5.6)–(5.7): self-attention mass that mask pixels send to the background.

    For each pixel p in M (weighted by M(p) for a soft mask), ``A_S^{p,B} = A_S^p · (1 − M)``
    (Eq. 4.8); the loss sums these over p and over the background pixels. ``normalize="background"``
    divides by ``Σ(1 − M)`` as Eq. (4.9) writes; ``"queries"`` divides by ``Σ M`` instead, the mean
    background mass per mask pixel (in [0, 1], as NOTES-mini-feasibility.md reports L_SA).
    ``self_attn`` is ``(B, N, N)`` (rows: query pixels), ``mask`` ``(B, h, w)`` or ``(h, w)`` with h*w = N.
    Averaged over the batch (``reduction="none"``: per image ``(B,)``).
    """
    b, n = self_attn.shape[0], self_attn.shape[-1]
    m = mask.to(self_attn.dtype).reshape(-1, n).expand(b, n)
    background_mass = (self_attn * (1 - m)[:, None, :]).sum(-1)  # (B, N): Σ_q A_S[p, q] (1 − M_q)
    total = (m * background_mass).sum(-1)
    denom = (1 - m).sum(-1) if normalize == "background" else m.sum(-1)
    if normalize not in ("background", "queries"):
        raise ValueError("normalize must be 'background' or 'queries'")
    return _reduce(total / denom.clamp_min(eps), reduction)


def style_loss(latents: torch.Tensor, style_latents: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """L_style, Eq. (5.8): ``‖μ(z_t) − μ(z_t^style)‖² + ‖σ(z_t) − σ(z_t^style)‖²`` over (H, W) per channel.

    Summed over channels, averaged over the batch (``reduction="none"``: per sample ``(B,)``).
    """
    mu, sd = latents.mean((-2, -1)), latents.std((-2, -1))
    mu_s, sd_s = style_latents.mean((-2, -1)), style_latents.std((-2, -1))
    return _reduce(((mu - mu_s) ** 2).sum(-1) + ((sd - sd_s) ** 2).sum(-1), reduction)
