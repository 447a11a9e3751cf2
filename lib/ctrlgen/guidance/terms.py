"""Guidance objectives as weighted loss terms (the test-time counterpart of ``training.loop.LossTerm``).

A term reads a ``GuidanceContext`` (the captured attention maps of one U-Net call on z_t, z_t itself,
the timestep) and returns its loss **per sample** ``(B,)``; ``GuidanceRefiner`` sums
``Σ_k weight_k · L_k`` and takes the step of Eq. (4.10). A term says which attention sides it reads
(``cross_res``/``self_res``) so that the refiner captures only those. New objectives (chapter 3's
attention loss, chapter 5's style loss) are new terms, never new refiners.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from ctrlgen.attention.capture import AttentionStore
from ctrlgen.attention.maps import gaussian_smooth, resize_maps, text_token_softmax
from ctrlgen.guidance.losses import cross_attention_layout_loss, self_attention_layout_loss, style_loss


@dataclass
class GuidanceContext:
    """What a guidance term can read at one refinement iteration."""

    store: AttentionStore | None  # maps of the conditional U-Net call on ``latents`` (keep their graph); None if no term reads maps
    latents: torch.Tensor         # z_t, requires grad
    t: int
    step_index: int
    cache: dict = field(default_factory=dict)

    def token_map(self, spec: "TokenMap") -> torch.Tensor:
        """``spec``'s map, computed once per context: terms reading the same map share one graph to z_t."""
        if spec not in self.cache:
            self.cache[spec] = spec(self.store)
        return self.cache[spec]


class GuidanceTerm(Protocol):
    """``weight · term(ctx)``, per sample ``(B,)``; ``cross_res``/``self_res``: attention sides it reads."""

    name: str
    weight: float
    cross_res: tuple[int, ...]
    self_res: tuple[int, ...]

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor: ...


def mask_at(mask: torch.Tensor, side: int, like: torch.Tensor) -> torch.Tensor:
    """A layout mask ``(B, H, W)`` or ``(H, W)`` in [0, 1], area-pooled to ``side`` ``(B|1, side, side)``."""
    m = mask if mask.ndim == 3 else mask[None]
    return resize_maps(m.to(like.device, torch.float32), side, mode="area")


@dataclass(frozen=True)
class TokenMap:
    """A token's cross-attention map as layout losses read it (§4.3.4): Attend-and-Excite softmax over the
    text tokens ``1..last-1`` (scaled by ``softmax_scale``), the token's column, Gaussian smoothing.

    ``last``: the end position, one for the batch or one per sample (prompts of different lengths;
    ``ctrlgen.models.tokens.locate_tokens`` gives both ``token_index`` and the ends).

    Saturation: the softmax's gradient is ``scale · p (1 − p)``, nil where the token's column is 0 or 1. With
    ``softmax_scale`` 100 a gap of 0.3 between another token's raw attention and this one's (a region-aware model's
    ``<skin>`` against ``<lesion>``) makes the column e^-30 everywhere: the layout loss is constant and its gradient
    vanishes. Such a model needs a smaller scale (1: the softmax of the raw maps, not sharpened).
    """

    token_index: int
    last: int | tuple[int, ...]
    cross_res: int = 16
    softmax_scale: float = 100.0
    smoothing_kernel: int = 3
    smoothing_sigma: float = 0.5

    def __call__(self, store: AttentionStore) -> torch.Tensor:
        """``(B, h, w)`` map of the token at side ``cross_res``."""
        cross = store.cross(self.cross_res)
        if isinstance(self.last, int):
            a = text_token_softmax(cross, self.last, self.softmax_scale)[..., self.token_index]
        else:
            if len(self.last) != cross.shape[0]:
                raise ValueError(f"{len(self.last)} end positions for a batch of {cross.shape[0]}")
            a = torch.stack([text_token_softmax(cross[i], last, self.softmax_scale)[..., self.token_index]
                             for i, last in enumerate(self.last)])
        return gaussian_smooth(a, self.smoothing_kernel, self.smoothing_sigma)


class TokenMapMaskTerm(abc.ABC):
    """The shape every term comparing one token's cross-attention map with a layout mask shares: it reads the side
    ``token_map.cross_res``, the map once per context (``GuidanceContext.token_map``: terms on the same map share its
    graph), the mask area-pooled to that side (``mask_at``), and returns ``loss(map, mask)`` per sample ``(B,)``.

    Subclasses are dataclasses with fields ``mask``, ``token_map``, ``weight``, ``name`` and ``self_res`` and
    define ``loss`` (L_CA of Eq. 4.7 here; Attention-Refocusing's L_CAR among the baselines)."""

    @property
    def cross_res(self) -> tuple[int, ...]:
        return (self.token_map.cross_res,)

    @abc.abstractmethod
    def loss(self, token_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per sample ``(B,)`` from the map ``(B, h, w)`` and the mask at its side ``(B|1, h, w)``."""

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor:
        a = ctx.token_map(self.token_map)
        return self.loss(a, mask_at(self.mask, self.token_map.cross_res, a))


class SelfAttentionMaskTerm(abc.ABC):
    """The shape every term comparing the self-attention maps at one side with a layout mask shares: it reads
    ``store.self_attention(side)`` ``(B, N, N)`` (layers of that side averaged), the mask area-pooled to ``side``,
    and returns ``loss(self_attn, mask)`` per sample ``(B,)``.

    Subclasses are dataclasses with fields ``mask``, ``side``, ``weight``, ``name`` and ``cross_res`` and define
    ``loss`` (L_SA of Eq. 4.8–4.9)."""

    @property
    def self_res(self) -> tuple[int, ...]:
        return (self.side,)

    @abc.abstractmethod
    def loss(self, self_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per sample ``(B,)`` from the maps ``(B, N, N)`` (rows: queries) and the mask ``(B|1, side, side)``."""

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor:
        sa = ctx.store.self_attention(self.side)
        return self.loss(sa, mask_at(self.mask, self.side, sa))


@dataclass
class CrossAttentionLayoutTerm(TokenMapMaskTerm):
    """L_CA, Eq. (4.7) / (5.5), on ``token_map`` against the layout ``mask`` (area-pooled to the map side)."""

    mask: torch.Tensor
    token_map: TokenMap
    weight: float = 1.0
    name: str = "ca"
    self_res: tuple[int, ...] = ()

    def loss(self, token_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return cross_attention_layout_loss(token_map, mask, reduction="none")


@dataclass
class SelfAttentionLayoutTerm(SelfAttentionMaskTerm):
    """L_SA, Eq. (4.8)–(4.9) / (5.6)–(5.7), on the self-attention maps at side ``side``."""

    mask: torch.Tensor
    side: int = 32
    normalize: Literal["background", "queries"] = "background"
    weight: float = 1.0
    name: str = "sa"
    cross_res: tuple[int, ...] = ()

    def loss(self, self_attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self_attention_layout_loss(self_attn, mask, self.normalize, reduction="none")


@dataclass
class StyleTerm:
    """L_style, Eq. (5.8), of z_t against the style reference's latent at the same timestep
    (``style_latents``: a mapping ``t -> z_t^style`` or a callable). Reads no attention."""

    style_latents: Mapping[int, torch.Tensor] | Callable[[int], torch.Tensor]
    weight: float = 50.0
    name: str = "style"
    cross_res: tuple[int, ...] = ()
    self_res: tuple[int, ...] = ()

    def __call__(self, ctx: GuidanceContext) -> torch.Tensor:
        if callable(self.style_latents):
            ref = self.style_latents(ctx.t)
        elif int(ctx.t) in self.style_latents:
            ref = self.style_latents[int(ctx.t)]
        else:
            raise ValueError(f"no style latent for timestep {int(ctx.t)} (have {sorted(self.style_latents)[:5]}...): "
                             "invert the style image with the sampler's timesteps")
        return style_loss(ctx.latents, ref.to(ctx.latents), reduction="none")


def sides(terms: Sequence[GuidanceTerm]) -> tuple[list[int], list[int]]:
    """Sorted cross- and self-attention sides that ``terms`` read (what the refiner captures)."""
    return (sorted({s for term in terms for s in term.cross_res}), sorted({s for term in terms for s in term.self_res}))


__all__ = ["GuidanceContext", "GuidanceTerm", "TokenMap", "TokenMapMaskTerm", "SelfAttentionMaskTerm",
           "CrossAttentionLayoutTerm", "SelfAttentionLayoutTerm", "StyleTerm", "mask_at", "sides"]
