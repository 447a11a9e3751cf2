"""Training losses (§3.3.3, §4.3.1, §4.3.3) and the auxiliary self-attention structure term (NOTES-mini-feasibility.md).

Normalisation (stated, because it sets the meaning of the weights α): every loss here is a *mean*
over pixels (and channels, tokens, map sides), not a sum. The notes measured that a pixel sum
swamps L_rec at α = 0.1 on a 16x16 latent.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ctrlgen.attention.maps import resize_maps


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_rec: Eq. (4.3) ``‖ε − ε_θ(z_t, t, τ(y))‖²``; with ``mask``, Eq. (3.6) ``‖(ε − ε_θ) ⊙ M_s‖²``.

    ``target`` is the model's own target: ε under ε-prediction, diffusers' ``get_velocity``
    v = √ᾱ_t ε − √(1−ᾱ_t) z_0 under v-prediction (the mini models' zero-terminal-SNR schedule);
    ``train_diffusion`` picks it.

    Mean over channels and pixels; ``mask`` ``(B, 1, h, w)`` or ``(B, h, w)`` at any side is
    area-pooled to the latent side; ``weights`` ``(B,)`` scale each sample (0 drops L_rec for it,
    as AttenCraft does for multi-concept subsets, Eq. 3.8).
    """
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        m = mask if mask.ndim == 4 else mask[:, None]
        m = resize_maps(m.float(), tuple(pred.shape[-2:]), mode="area") if m.shape[-2:] != pred.shape[-2:] else m.float()
        err = err * m.to(err.device) ** 2
    per_sample = err.mean(dim=tuple(range(1, err.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def attention_alignment_loss(cross_by_res: Mapping[int, torch.Tensor], token_indices: torch.Tensor,
                             masks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_attn: Eq. (3.7) ``1/|s| Σ_i ‖A_C(v_i, z_t) − M_i‖²`` and Eq. (4.5) ``1/2 Σ_{l,s} ‖A_C(v_i, z_t) − M_i‖²``.

    Args:
        cross_by_res: ``{side: (B, h, w, T)}`` layer-mean cross-attention maps (``AttentionStore.cross_by_res``).
        token_indices: ``(B, K)`` prompt positions of the K tokens (``<lesion>``, ``<skin>``; ``[V_i]``).
        masks: ``(B, K, H, W)`` their region masks at any resolution (area-pooled to each side).
        valid: ``(B, K)`` bool, False for padding entries when samples have different |s|.
    The squared norm is averaged over pixels, then over the valid tokens (the 1/|s|, 1/2) and over
    the map sides.
    """
    if not cross_by_res:
        raise ValueError("no cross-attention maps: capture train_cross_res during the U-Net call")
    b, k = token_indices.shape
    valid_f = torch.ones(b, k) if valid is None else valid.float()
    losses = []
    for side, maps in cross_by_res.items():
        idx = token_indices.to(maps.device)[:, None, None, :].expand(-1, maps.shape[1], maps.shape[2], -1)
        a = maps.gather(-1, idx).permute(0, 3, 1, 2)  # (B, K, h, w)
        m = resize_maps(masks.to(maps.device).float(), (maps.shape[1], maps.shape[2]), mode="area")
        per_token = ((a - m) ** 2).mean(dim=(-2, -1))  # (B, K)
        v = valid_f.to(per_token)
        losses.append(((per_token * v).sum(-1) / v.sum(-1).clamp_min(1)).mean())
    return torch.stack(losses).mean()


def self_attention_structure_loss(self_by_res: Mapping[int, torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Auxiliary self-attention structure loss (NOTES-mini-feasibility.md, not a thesis loss).

    Penalises the head/layer-mean self-attention mass each query pixel sends to the *other* region
    of a two-region mask M (lesion vs skin): for soft masks at the attention side,
    ``mass_p = M_p Σ_q A[p,q] (1 − M_q) + (1 − M_p) Σ_q A[p,q] M_q``, averaged over query pixels,
    images and map sides. ``self_by_res`` is ``{side: (B, N, N)}``; ``masks`` ``(B, H, W)`` or ``(B, 1, H, W)``.
    Used while pretraining the mini base models so that self-attention becomes an affinity.
    """
    if not self_by_res:
        raise ValueError("no self-attention maps: capture self-attention during the U-Net call")
    m0 = masks[:, 0] if masks.ndim == 4 else masks
    losses = []
    for side, sa in self_by_res.items():
        m = resize_maps(m0.to(sa.device).float(), side, mode="area").reshape(sa.shape[0], -1).to(sa.dtype)  # (B, N)
        to_fg = sa @ m.unsqueeze(-1)  # (B, N, 1): mass landing in the lesion
        to_bg = sa @ (1 - m).unsqueeze(-1)  # mass landing in the skin
        mass = m * to_bg.squeeze(-1) + (1 - m) * to_fg.squeeze(-1)
        losses.append(mass.mean())
    return torch.stack(losses).mean()


def vae_loss(recon: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, l1_weight: float = 0.5,
             kl_weight: float = 1e-6) -> torch.Tensor:
    """VAE objective used to pretrain the mini VAE: MSE + 0.5·L1 (+ 1e-6·KL, which applies to an ``AutoencoderKL``
    only: the mini ``AutoencoderTiny`` is deterministic and ``train_vae`` passes it a zero ``kl``;
    NOTES-mini-feasibility.md)."""
    return F.mse_loss(recon, target) + l1_weight * F.l1_loss(recon, target) + kl_weight * kl.mean()
