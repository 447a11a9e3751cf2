"""ZestGuide (Couairon et al., "Zero-shot spatial layout conditioning for text-to-image diffusion models",
ICCV 2023) as a guidance term: the training-free mask → image baseline of thesis §4.4.4 (Table 4.5–4.6),
applied to chapter 4's region-aware model.

ZestGuide reads an *estimated segmentation* of every conditioned segment i off the cross-attention maps of
its text tokens, Ŝ_i = A_i / max A_i (head- and layer-averaged maps of the segment's tokens, scaled to a
maximum of 1), and compares it with the target segment S_i by the share of the estimate that falls inside
the target:

    L_Zest = Σ_i ( 1 − Σ_{x,y} Ŝ_i ⊙ S_i / Σ_{x,y} Ŝ_i )                       (Couairon et al. 2023, §3)

then descends it on the latent during the first half of the denoising steps. Here the segments are the
lesion (token ``<lesion>``, target M) and the skin (token ``<skin>``, target 1 − M) of the DermPrompt
prefix; the term plugs into ``ctrlgen.guidance.GuidanceRefiner`` (the Eq. 4.10 step, η from the profile)
and sampling is ``ctrlgen.sampling.text_to_image``: no loop of its own.

What differs from the paper, and why: the authors released no code, so the loss follows the paper's text.
The paper normalises the latent gradient by its ∞-norm before the step: ``ZestGuideConfig.normalize="max"``
(``GuidanceRefiner.normalize``, z − η ∇L/‖∇L‖_∞ per sample, η then being the largest change of a latent entry);
the default ``"none"`` takes the plain step z − η∇L with the same η as every training-free row of the
profile (``ch04_downstream.zestguide.normalize``, when a profile names it, chooses), and ZestGuide's complementary attention
re-weighting (paint-with-words style) is not used — the comparison of §4.4.4 is about gradient guidance.
The ratio in L_Zest does not change when Ŝ_i is scaled, so Ŝ_i = A_i / max A_i and the raw map give the
same loss; the normalisation is kept because the paper's Ŝ_i is what a figure of the estimate shows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ctrlgen.guidance import GuidanceContext, GuidanceRefiner, mask_at

EPS = 1e-8


def estimated_segmentation(cross_map: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Ŝ = A / max A per sample: a token's cross-attention map ``(B, h, w)`` scaled to a maximum of 1."""
    peak = cross_map.flatten(1).amax(1).clamp_min(eps)
    return cross_map / peak[:, None, None]


def zestguide_loss(cross_map: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """One segment's term of L_Zest per sample ``(B,)``: ``1 − Σ Ŝ·S / Σ Ŝ`` (module doc).

    ``cross_map``: the segment token's map ``(B, h, w)`` (non-negative); ``target``: the segment at the same side
    ``(B, h, w)`` or ``(1, h, w)``, values in [0, 1]. 0 when all attention lies inside the target, 1 when none does.
    """
    if cross_map.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"map side {tuple(cross_map.shape[-2:])} and target side {tuple(target.shape[-2:])} differ")
    s_hat = estimated_segmentation(cross_map, eps)
    s = target.to(s_hat.dtype).expand_as(s_hat)
    return 1 - (s_hat * s).sum((-2, -1)) / s_hat.sum((-2, -1)).clamp_min(eps)


@dataclass
class ZestGuideTerm:
    """L_Zest over segments: token ``token_indices[i]`` is steered into ``masks[i]`` (each ``(B, H, W)`` or ``(H, W)``,
    area-pooled to ``cross_res``). Reads the raw (model-softmax, head-averaged) cross-attention at ``cross_res``."""

    masks: Sequence[torch.Tensor]
    token_indices: Sequence[int]
    cross_res: tuple[int, ...] = (16,)
    weight: float = 1.0
    name: str = "zest"
    self_res: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.masks) != len(self.token_indices) or not self.masks:
            raise ValueError(f"ZestGuide needs one mask per segment token: {len(self.masks)} masks, "
                             f"{len(self.token_indices)} tokens")

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor:
        cross = ctx.store.cross(self.cross_res[0])                  # (B, h, w, T)
        side = cross.shape[1]
        return sum(zestguide_loss(cross[..., k], mask_at(m, side, cross))
                   for m, k in zip(self.masks, self.token_indices))


@dataclass(frozen=True)
class ZestGuideConfig:
    """ZestGuide's guidance settings (profile ``ch04_downstream.zestguide``): step η, share of the steps guided
    (paper: the first half), refinement iterations per step, the cross-attention side read, and what η multiplies
    (``normalize``: "max" = the paper's ∇/‖∇‖_∞, "none" = the raw gradient of the book's shared η)."""

    eta: float = 20.0
    fraction: float = 0.5
    iterations: int = 1
    cross_res: int = 16
    normalize: Literal["none", "max"] = "none"

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "ZestGuideConfig":
        z = cfg["ch04_downstream"]["zestguide"]
        return cls(eta=float(z["eta"]), fraction=float(z["fraction"]), iterations=int(z["iterations"]),
                   cross_res=int(cfg["attention"]["cross_res"][0]), normalize=str(z.get("normalize", "none")))


def zestguide_refiner(masks: torch.Tensor, lesion_index: int, skin_index: int | None,
                      config: ZestGuideConfig) -> GuidanceRefiner:
    """The refiner for one batch: ``<lesion>`` into ``masks`` ``(B, H, W)`` and, when the prompt has it, ``<skin>``
    into ``1 − masks``."""
    segments, tokens = [masks], [lesion_index]
    if skin_index is not None:
        segments.append(1 - masks)
        tokens.append(skin_index)
    term = ZestGuideTerm(segments, tokens, (config.cross_res,))
    return GuidanceRefiner([term], eta=config.eta, fraction=config.fraction, iterations=config.iterations,
                           normalize=config.normalize)


__all__ = ["estimated_segmentation", "zestguide_loss", "ZestGuideTerm", "ZestGuideConfig", "zestguide_refiner"]
