"""Stage I of AttenCraft (Algorithm 1, lines 1–8): attention-guided masks and attention scores (§3.3.1–3.3.2).

Decisions the thesis leaves open, stated here once:

* **Sides.** A_C is captured at ``cross_res`` (thesis 16x16) and A_S at ``self_res`` (thesis 32x32). A_C is
  upsampled bilinearly to the self-attention side *before* Eq. (3.2), so that ``⊗`` (a matrix product over
  pixels) is defined; the masks come out at the self-attention side.
* **Powers.** ν and τ are element-wise powers (§3.3.1: "element-wise exponentiation of A_S by τ").
* **Rows of (A_S)^τ.** Each row of the element-wise power is renormalised to sum to 1 (``renormalize_rows``), so
  that ``⊗`` stays what §3.3.1 says it is — activation spreading to the pixels a pixel attends to — and stays a
  row-stochastic operator as the source method's is (Nguyen et al.'s Dataset Diffusion takes the *matrix* power
  ``torch.matrix_power(A_S, 4)``, a product of row-stochastic matrices). Without it, pixel p's value is also scaled
  by Σ_q A_S[p, q]^τ, how peaked p's own attention is — a quantity unrelated to the concept, which after the
  per-concept min-max normalisation decides the mask (the mini scenes model: Stage I IoU 0.29 raw vs 0.67
  renormalised on 8 scenes, τ = 4; the chapter shows both).
* **Normalisation before γ.** Raw maps are tiny (Table 3.5: top scores 0.002–0.062), so an absolute γ = 0.1
  would select nothing: each concept's A_C^S is min-max normalised to [0, 1] before Eq. (3.3), making γ a
  fraction of that concept's activation range (``attention.maps.delta_mask``).
* **Any number of concepts.** Eq. (3.3) is read as "exceeds *every* other concept by γ" (the minimum over
  j ≠ i of the difference), which for two concepts is the thesis's formula and for three or more gives
  disjoint masks.
* **Ablations (Fig. 3.8).** ``suppression=False`` uses ν = 1, ``enhancement=False`` skips ``⊗ A_S^τ``,
  ``thresholding="otsu"`` thresholds each concept's normalised map with Otsu instead of delta masking.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ctrlgen.attention.capture import AttentionCapture
from ctrlgen.attention.maps import attention_score, delta_mask, normalize_minmax, otsu_mask, resize_maps, self_enhance, suppress
from ctrlgen.models.sd import SDComponents
from ctrlgen.models.tokens import locate_tokens

Thresholding = Literal["delta", "otsu"]


@dataclass(frozen=True)
class MaskSettings:
    """Stage I settings (§3.4.1: ν = 2, τ = 4, γ = 0.1, t ∈ [0, 300], n = 5, T = {0, 20, 40, 60, 80})."""

    nu: float = 2.0
    tau: float = 4.0
    gamma: float = 0.1
    suppression: bool = True
    enhancement: bool = True
    renormalize_rows: bool = True   # rows of (A_S)^τ summed to 1 (module doc)
    thresholding: Thresholding = "delta"
    t_max: int = 300
    n_top: int = 5
    score_timesteps: tuple[int, ...] = (0, 20, 40, 60, 80)
    cross_res: int = 16
    self_res: int = 32

    def __post_init__(self):
        if self.thresholding not in ("delta", "otsu"):
            raise ValueError(f"thresholding must be 'delta' or 'otsu', got {self.thresholding!r}")
        if not 0 <= self.t_max < 1000:
            raise ValueError(f"t_max={self.t_max} must lie in [0, 1000)")


def refined_maps(cross: torch.Tensor, self_attn: torch.Tensor, settings: MaskSettings) -> torch.Tensor:
    """Eq. (3.2): ``A_C^S = (A_C)^ν ⊗ (A_S)^τ`` for a concept stack ``cross`` ``(K, hc, wc)`` and ``self_attn`` ``(N, N)``.

    Returns ``(K, hs, ws)`` at the self-attention side (module doc: upsampling, element-wise powers), each map
    divided by its maximum (computed in float64: the raw product is tiny).
    """
    side = int(round(self_attn.shape[-1] ** 0.5))
    # float64: (A_S)^τ of a 32x32 map is ~(1e-3)^4 per entry, and the product lands near 1e-13
    a = resize_maps(cross.double(), side) if cross.shape[-1] != side else cross.double()
    a = a.clamp_min(0)
    if settings.suppression:
        a = suppress(a, settings.nu)
    if settings.enhancement:
        a = self_enhance(a, self_affinity(self_attn.double(), settings), 1.0)
    # each map divided by its own maximum: a scale, so the min-max normalisation before γ is unchanged, but the
    # maps no longer fall under normalize_minmax's 1e-8 range floor (which would empty every mask)
    peak = a.flatten(-2).amax(-1).clamp_min(torch.finfo(a.dtype).tiny)
    return (a / peak[..., None, None]).float()


def self_affinity(self_attn: torch.Tensor, settings: MaskSettings) -> torch.Tensor:
    """``(A_S)^τ`` of Eq. (3.2), element-wise, each row renormalised to sum to 1 unless ``renormalize_rows`` is off
    (module doc). ``self_attn`` ``(N, N)``, rows = query pixels."""
    affinity = self_attn.clamp_min(0) ** settings.tau
    if settings.renormalize_rows:
        affinity = affinity / affinity.sum(-1, keepdim=True).clamp_min(torch.finfo(affinity.dtype).tiny)
    return affinity


def concept_masks(cross: torch.Tensor, self_attn: torch.Tensor, settings: MaskSettings = MaskSettings()) -> torch.Tensor:
    """One boolean mask per concept, ``(K, hs, ws)``: Eq. (3.2) then delta masking Eq. (3.3) (or Otsu, Fig. 3.8)."""
    if cross.ndim != 3:
        raise ValueError(f"cross must be a concept stack (K, h, w), got shape {tuple(cross.shape)}")
    a = refined_maps(cross, self_attn, settings)
    if settings.thresholding == "otsu":
        return otsu_mask(normalize_minmax(a), dilate=0, erode=0)
    if a.shape[0] < 2:
        raise ValueError("delta masking needs at least two concepts (one concept: use thresholding='otsu')")
    return delta_mask(a, settings.gamma, reduce="min", normalize=True)


@dataclass
class StageOne:
    """What Stage I found for one image: masks ``(K, hs, ws)``, the maps it used, scores S_i (Eq. 3.4), t."""

    masks: torch.Tensor
    cross: torch.Tensor
    self_attn: torch.Tensor
    scores: torch.Tensor
    timestep: int


def _noisy(model: SDComponents, latent: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    return model.noise_scheduler().add_noise(latent, noise, torch.tensor([t]))


@torch.no_grad()
def token_maps(model: SDComponents, latent: torch.Tensor, prompt: str, tokens: Sequence[str], t: int,
               noise: torch.Tensor, settings: MaskSettings, with_self: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One U-Net call at timestep ``t``: the tokens' cross-attention maps ``(K, hc, wc)`` and A_S ``(N, N)``."""
    ids = model.tokenize([prompt]).to(model.device)
    pos = locate_tokens(model.tokenizer, ids, tokens).positions[0].tolist()
    emb = model.encode_ids(ids)
    z = _noisy(model, latent, noise, t)
    with AttentionCapture(model.unet, cross_res=(settings.cross_res,),
                          self_res=(settings.self_res,) if with_self else ()) as store:
        model.unet(z, torch.tensor([t], device=z.device), encoder_hidden_states=emb)
    cross = store.cross(settings.cross_res)[0][..., pos].movedim(-1, 0).cpu()
    return cross, store.self_attention(settings.self_res)[0].cpu() if with_self else None


def stage_one(model: SDComponents, latent: torch.Tensor, prompt: str, tokens: Sequence[str],
              settings: MaskSettings = MaskSettings(), seed: int = 0, masks: torch.Tensor | None = None) -> StageOne:
    """Algorithm 1, lines 2–7, on one image's latent ``(1, C, h, w)`` and a prompt holding every ``tokens``.

    One denoising step at t drawn uniformly from [0, t_max] gives A_C and A_S and the masks; Eq. (3.4) then
    averages the n largest values of the masked cross-attention ``A_C ⊙ M`` over the timesteps T (the same
    noise at each t). ``masks`` (``(K, H, W)``, e.g. ground truth) replaces the created masks if given.
    """
    g = torch.Generator().manual_seed(seed)
    t = int(torch.randint(0, settings.t_max + 1, (1,), generator=g))
    noise = torch.randn(latent.shape, generator=g).to(latent)
    cross, self_attn = token_maps(model, latent, prompt, tokens, t, noise, settings)
    created = concept_masks(cross, self_attn, settings)
    use = created.float() if masks is None else masks.float()
    per_step = [token_maps(model, latent, prompt, tokens, s, noise, settings, with_self=False)[0]
                for s in settings.score_timesteps]
    side = per_step[0].shape[-1]
    scores = attention_score(per_step, resize_maps(use, side, mode="area"), settings.n_top)
    return StageOne(created if masks is None else masks.bool(), cross, self_attn, scores, t)


def mask_iou(pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> np.ndarray:
    """IoU of each predicted concept mask with its true mask (both ``(K, h, w)``; the truth is resized to the
    prediction's side by area and thresholded at 0.5). An empty union gives IoU 1."""
    p = torch.as_tensor(np.asarray(pred)).bool()
    tr = torch.as_tensor(np.asarray(truth)).float()
    if tr.shape[-1] != p.shape[-1]:
        tr = resize_maps(tr, p.shape[-1], mode="area")
    tb = tr > 0.5
    inter = (p & tb).flatten(1).sum(1).float()
    union = (p | tb).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).numpy()


__all__ = ["MaskSettings", "refined_maps", "self_affinity", "concept_masks", "StageOne", "token_maps", "stage_one", "mask_iou"]
