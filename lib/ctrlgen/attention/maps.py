"""Pure functions on attention maps, each with the thesis equation it implements.

Conventions: a cross-attention map stack is ``(..., h, w, T)`` (T text tokens, as
``AttentionStore.cross`` returns it) or, after token selection, ``(..., h, w)``; a self-attention
map is ``(..., h*w, h*w)`` with rows indexed by the query pixel (row-major over (h, w)) and each
row summing to 1. Nothing here touches a model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu
from skimage.morphology import dilation, disk, erosion

Power = Literal["elementwise", "matrix"]


# ----------------------------------------------------------------------------------------------
# token selection and normalisation
# ----------------------------------------------------------------------------------------------
def select_tokens(cross: torch.Tensor, indices: int | Sequence[int]) -> torch.Tensor:
    """Maps of the given token positions: ``(..., h, w, T)`` -> ``(..., h, w)`` (int) or ``(..., K, h, w)`` (list)."""
    if isinstance(indices, int):
        return cross[..., indices]
    return cross[..., list(indices)].movedim(-1, -3)


def text_token_softmax(cross: torch.Tensor, last: int, scale: float = 100.0) -> torch.Tensor:
    """Attend-and-Excite re-normalisation of ``A_C`` over the prompt's own tokens (§4.3.4, "apply a Softmax").

    ``softmax(scale * A_C[..., 1:last])`` over the token axis: the start token (position 0, which
    soaks up most of the mass) and everything from the end token ``last`` on are excluded. Returns
    ``(..., h, w, T)`` with the excluded positions set to 0, so token indices are unchanged.
    """
    if not 1 < last <= cross.shape[-1]:
        raise ValueError(f"last={last} must lie in (1, {cross.shape[-1]}]")
    out = torch.zeros_like(cross)
    out[..., 1:last] = torch.softmax(cross[..., 1:last] * scale, dim=-1)
    return out


def normalize_minmax(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rescale every ``(h, w)`` map (last two axes) to [0, 1]: ``(A - min A) / (max A - min A)``."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def normalize_sum(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rescale every ``(h, w)`` map to sum 1 (a distribution over pixels)."""
    return maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(eps)


def gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A normalised 2-D Gaussian kernel ``(k, k)``."""
    ax = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    k2 = torch.outer(g, g)
    return (k2 / k2.sum()).to(dtype)


def gaussian_smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian smoothing of ``(..., h, w)`` maps with reflect padding (Attend-and-Excite; §4.3.4, §5.3.3).

    Differentiable; ``kernel_size`` 1 returns the input unchanged.
    """
    if kernel_size <= 1:
        return maps
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    pad = kernel_size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    k = gaussian_kernel(kernel_size, sigma, maps.dtype).to(maps.device)[None, None]
    return F.conv2d(x, k).reshape(*lead, h, w)


def resize_maps(maps: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``(..., h, w)`` maps to ``size`` (``mode="area"`` pools masks to an attention side)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w).float()
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=mode, **kw).reshape(*lead, *size).to(maps.dtype)


# ----------------------------------------------------------------------------------------------
# AttenCraft (§3.3.1–3.3.2)
# ----------------------------------------------------------------------------------------------
def suppress(cross_maps: torch.Tensor, nu: float = 2.0) -> torch.Tensor:
    """Cross-attention suppression, Eq. (3.2) left: ``Â_C = (A_C)^ν`` element-wise (thesis ν = 2)."""
    return cross_maps.clamp_min(0) ** nu


def _propagate(maps: torch.Tensor, self_attn: torch.Tensor, tau: float, power: Power) -> torch.Tensor:
    h, w = maps.shape[-2:]
    n = h * w
    if self_attn.shape[-1] != n or self_attn.shape[-2] != n:
        raise ValueError(f"self-attention {tuple(self_attn.shape[-2:])} does not match maps of side {h}x{w}")
    if power == "elementwise":
        affinity = self_attn.clamp_min(0) ** tau
    elif power == "matrix":
        if float(tau) != int(tau) or tau < 0:
            raise ValueError(f"a matrix power needs a non-negative integer τ, got {tau}")
        affinity = torch.linalg.matrix_power(self_attn, int(tau))
    else:
        raise ValueError(f"power must be 'elementwise' or 'matrix', got {power!r}")
    flat = maps.reshape(*maps.shape[:-2], n)
    # maps may carry an extra concept axis (..., K, h, w) while self_attn is (..., n, n)
    extra = flat.ndim - (affinity.ndim - 1)
    aff = affinity.reshape(*affinity.shape[:-2], *([1] * extra), n, n) if extra > 0 else affinity
    out = (aff @ flat.unsqueeze(-1)).squeeze(-1)
    return out.reshape(*out.shape[:-1], h, w)


def self_enhance(cross_hat: torch.Tensor, self_attn: torch.Tensor, tau: float = 4.0,
                 power: Power = "elementwise") -> torch.Tensor:
    """Self-attention enhancement, Eq. (3.2) right: ``A_C^S = Â_C ⊗ (A_S)^τ`` (thesis τ = 4).

    Pixel p receives ``Σ_q (A_S[p, q])^τ Â_C[q]``: activation spreads to the pixels p attends to.
    §3.3.1 raises A_S to τ element-wise ("element-wise exponentiation of A_S by τ"), the default;
    ``power="matrix"`` uses the matrix power instead (Eq. 4.11's reading). ``cross_hat`` is
    ``(..., h, w)`` or ``(..., K, h, w)``; ``self_attn`` is ``(..., h*w, h*w)``.
    """
    return _propagate(cross_hat, self_attn, tau, power)


def delta_mask(maps: torch.Tensor, gamma: float = 0.1, reduce: Literal["max", "min"] = "max",
               normalize: bool = True) -> torch.Tensor:
    """Delta masking, Eq. (3.3): ``M_i = max_{j≠i}(A_{C_i}^S − A_{C_j}^S) > γ`` per pixel (thesis γ = 0.1).

    ``maps`` is ``(..., K, h, w)`` with K ≥ 2 concepts; each map is min-max normalised to [0, 1]
    first (``normalize``) so that γ is a fraction of the activation range. ``reduce="min"`` asks
    for the margin over *every* other concept instead of the largest one (identical for K = 2).
    Returns a boolean ``(..., K, h, w)``.
    """
    k = maps.shape[-3]
    if k < 2:
        raise ValueError("delta masking needs at least two concept maps")
    a = normalize_minmax(maps) if normalize else maps
    diff = a.unsqueeze(-3) - a.unsqueeze(-4)  # (..., K_i, K_j, h, w) = A_i - A_j
    eye = torch.eye(k, dtype=torch.bool, device=maps.device)[..., None, None]
    fill = float("-inf") if reduce == "max" else float("inf")
    diff = diff.masked_fill(eye, fill)
    margin = diff.amax(dim=-3) if reduce == "max" else diff.amin(dim=-3)
    return margin > gamma


def topk_mean(maps: torch.Tensor, n: int = 5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the n largest values of each ``(h, w)`` map, after masking ``A_M = A_C ⊙ M`` (inner part of Eq. 3.4)."""
    a = maps if mask is None else maps * mask.to(maps.dtype)
    flat = a.reshape(*a.shape[:-2], -1)
    return flat.topk(min(n, flat.shape[-1]), dim=-1).values.mean(dim=-1)


def attention_score(maps_per_step: Sequence[torch.Tensor], masks: torch.Tensor | None = None, n: int = 5) -> torch.Tensor:
    """Eq. (3.4): ``S = 1/m Σ_{t∈T} 1/n Σ_{k=1..n} max^(k) A_{M_t}`` (thesis n = 5, T = {0, 20, 40, 60, 80}).

    ``maps_per_step``: one ``(..., h, w)`` map stack per timestep in T (m = its length).
    """
    if len(maps_per_step) == 0:
        raise ValueError("attention_score needs the maps of at least one timestep")
    return torch.stack([topk_mean(m, n, masks) for m in maps_per_step]).mean(dim=0)


# ----------------------------------------------------------------------------------------------
# DiDGen mask annotation (§4.3.4) and Otsu
# ----------------------------------------------------------------------------------------------
def cross_self_map(cross: torch.Tensor, self_attn: torch.Tensor, tau: int = 4, power: Power = "matrix") -> torch.Tensor:
    """Eq. (4.11): ``A_CS = (A_S)^τ · A_C`` (thesis τ = 4, maps at the last step t̂ = 0).

    Following Dataset Diffusion (Nguyen et al., 2023), whom §4.3.4 cites, ``(A_S)^τ`` is the matrix
    power: the self-attention is applied τ times as a transition matrix (τ = 0 returns A_C).
    ``power="elementwise"`` gives the element-wise reading of Eq. (3.2). ``cross`` is ``(..., h, w)``.
    """
    return _propagate(cross, self_attn, tau, power)


def otsu_threshold(values: torch.Tensor | np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold (Otsu, 1979) of all values: scikit-image's ``threshold_otsu``.

    A constant input has no threshold; it returns that constant (so ``a > t`` selects nothing).
    """
    x = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, np.float64)
    x = x.ravel()
    if x.min() == x.max():
        return float(x[0])
    return float(threshold_otsu(x, nbins=nbins))


def otsu_mask(a: torch.Tensor, dilate: int = 1, erode: int = 1) -> torch.Tensor:
    """``M̂ = Otsu(A)`` then dilation followed by erosion (Eq. 4.11 and its post-processing, §4.3.4).

    ``a`` is one ``(h, w)`` map or a stack ``(..., h, w)`` (each thresholded on its own). The
    morphology uses scikit-image with disk footprints of radius ``dilate`` and ``erode`` (0: skip).
    Returns a boolean tensor of the same shape on the same device. A constant map has no Otsu
    threshold and yields an empty mask: callers that build datasets must check for it and count it
    (``methods.didgen.pair_generation`` does).
    """
    lead, (h, w) = a.shape[:-2], a.shape[-2:]
    flat = a.detach().float().cpu().reshape(-1, h, w)
    out = np.zeros((flat.shape[0], h, w), dtype=bool)
    for i, m in enumerate(flat):
        mask = (m > otsu_threshold(m)).numpy()
        if dilate > 0:
            mask = dilation(mask, disk(dilate))
        if erode > 0:
            mask = erosion(mask, disk(erode))
        out[i] = mask
    return torch.from_numpy(out).reshape(*lead, h, w).to(a.device)


# ----------------------------------------------------------------------------------------------
# self-attention diagnostics (NOTES-mini-feasibility.md)
# ----------------------------------------------------------------------------------------------
def _labels_at(labels: torch.Tensor, n: int) -> torch.Tensor:
    side = int(round(math.sqrt(n)))
    if labels.shape[-1] * labels.shape[-2] != n:
        labels = F.interpolate(labels.reshape(-1, 1, *labels.shape[-2:]).float(), size=(side, side),
                               mode="nearest").reshape(*labels.shape[:-2], side, side)
    return labels.reshape(*labels.shape[:-2], n).long()


def affinity_ratio(self_attn: torch.Tensor, region_labels: torch.Tensor) -> torch.Tensor:
    """How much a self-attention map behaves like a same-region affinity (the notes' "affinity ratio").

    For each query pixel p in region r(p): the attention mass landing in r(p), divided by r(p)'s
    area fraction; averaged over query pixels. 1.0 means no structure (uniform attention); a perfect
    same-region affinity with two regions gives ``Σ_r a_r · (1/a_r) = number of regions present``
    (2.0 for lesion/skin). ``self_attn`` is ``(B, N, N)`` or ``(N, N)``; ``region_labels`` integer
    labels ``(B, h, w)`` or ``(h, w)`` (resized with nearest neighbour to ``sqrt(N)`` if needed).
    Returns one value per image.
    """
    single = self_attn.ndim == 2
    sa = self_attn[None] if single else self_attn
    lab = region_labels[None] if region_labels.ndim == 2 else region_labels
    n = sa.shape[-1]
    lab = _labels_at(lab, n).to(sa.device).expand(sa.shape[0], n)
    same = (lab.unsqueeze(-1) == lab.unsqueeze(-2)).to(sa.dtype)  # (B, N, N)
    mass = (sa * same).sum(-1)  # mass each query sends to its own region
    frac = same.mean(-1)  # area fraction of the query's region
    ratio = (mass / frac).mean(-1)
    return ratio[0] if single else ratio


def diagonal_mass(self_attn: torch.Tensor) -> torch.Tensor:
    """Mean attention a pixel pays to itself (uniform attention gives 1/N)."""
    return self_attn.diagonal(dim1=-2, dim2=-1).mean(-1)
