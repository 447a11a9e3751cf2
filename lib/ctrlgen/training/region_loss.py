"""The auxiliary self-attention structure loss for K regions of the ``selfattn`` base models (not a thesis loss).

A loss term in the ``LossTerm`` protocol of ``training/loop.py``; the K = 2 case is
``training.losses.self_attention_structure_loss``. Used by ``ctrlgen.experiments.base_models``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class RegionSelfAttentionTerm:
    """Auxiliary self-attention structure loss for K regions (NOTES-mini-feasibility.md; not a thesis loss).

    With soft one-hot regions ``R`` (B, K, s, s) area-pooled to the self-attention side and the
    head/layer-mean self-attention ``A`` (B, N, N): the mass a query pixel p sends outside its region,
    ``1 − Σ_k R_k(p) Σ_q A[p, q] R_k(q)``, averaged over p, images and sides. For K = 2 it equals
    ``ctrlgen.training.losses.self_attention_structure_loss`` (lesion vs skin).
    """

    weight: float = 0.3
    name: str = "sa_struct"
    needs_cross: bool = False
    needs_self: bool = True

    def __call__(self, ctx) -> torch.Tensor:
        return region_self_attention_loss(ctx.store.self_by_res(), ctx.batch["regions"])


def region_self_attention_loss(self_by_res: Mapping[int, torch.Tensor], regions: torch.Tensor) -> torch.Tensor:
    losses = []
    for side, sa in self_by_res.items():
        r = regions if regions.shape[-1] == side else torch.nn.functional.adaptive_avg_pool2d(regions, side)
        r = r.reshape(r.shape[0], r.shape[1], -1).to(sa)  # (B, K, N)
        same = torch.einsum("bpq,bkq->bkp", sa, r)  # mass of p in region k
        inside = (same * r).sum(1)  # (B, N)
        losses.append((1 - inside).mean())
    return torch.stack(losses).mean()


__all__ = ["RegionSelfAttentionTerm", "region_self_attention_loss"]
