"""Does a word's cross-attention map sit on the object it names? (chapter 2, for chapter 3's Stage I)

AttenCraft's mask creation (thesis §3.3.1) starts from the premise that "the cross-attention map A_C
[Eq. (3.1a)] outlines the location and shape of the target concept": the class word's map must
concentrate on its object. Stable Diffusion has that property from its pretraining; the book's mini base
models are trained from scratch, so chapter 2 measures it.

Localization ratio of one token in one image: its cross-attention map over pixels (head mean, layer mean
at one side, as ``AttentionCapture`` returns it), normalised to sum to 1, has mass ``m`` inside the named
object's region; the region covers a share ``a`` of the map; the ratio is ``m / a``. A map that ignores
where the object is (uniform over the pixels) scores exactly 1; a map entirely inside the region scores
``1 / a``. Regions come from integer label maps at the image resolution, area-averaged to the map side, so
a pixel of the map that an object covers partly counts with that fraction (a thin object is never lost,
as it can be with nearest-neighbour resizing).

Which token names which region is an input (``WordRegion`` per image), taken from the data by the caller.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ctrlgen.attention.capture import AttentionCapture
from ctrlgen.attention.layers import PLACES
from ctrlgen.models.sd import SDComponents


@dataclass(frozen=True)
class WordRegion:
    """Token ``position`` of a prompt names region ``region`` (a label of the image's region map);
    ``kind`` groups words in the table (e.g. "shape", "colour"), ``word`` is the token's text."""

    position: int
    region: int
    kind: str
    word: str


def region_shares(labels: torch.Tensor, region: int, side: int) -> torch.Tensor:
    """``(B, side, side)``: the share of each map pixel that region ``region`` of ``labels`` ``(B, H, W)``
    covers (area average; at ``H == side`` the 0/1 indicator itself)."""
    inside = (labels == region).float()[:, None]
    return F.interpolate(inside, size=(side, side), mode="area")[:, 0]


def localization_ratio(maps: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Mass of each map inside its region divided by the region's area share (module doc; 1 = no localization).

    ``maps``: ``(B, h, w)`` non-negative token maps (any scale: each is normalised to sum 1 here);
    ``shares``: ``(B, h, w)`` region coverage in [0, 1] (``region_shares``). Returns ``(B,)``.
    Raises ``ValueError`` when a map has no mass or a region covers no pixel (the ratio is undefined).
    """
    if maps.shape != shares.shape or maps.ndim != 3:
        raise ValueError(f"maps and shares must both be (B, h, w), got {tuple(maps.shape)} and {tuple(shares.shape)}")
    maps, shares = maps.double(), shares.double()
    total, area = maps.sum((1, 2)), shares.mean((1, 2))
    if bool((total <= 0).any()) or bool((area <= 0).any()):
        raise ValueError("a token map without mass or a region without pixels: the localization ratio is undefined")
    return ((maps * shares).sum((1, 2)) / total) / area


@torch.no_grad()
def _cross_maps(model, noisy: torch.Tensor, tt: torch.Tensor, input_ids: torch.Tensor, res: int,
                places: Sequence[str]) -> torch.Tensor:
    """Head- and layer-mean cross-attention ``(B, res, res, T)`` of one U-Net call."""
    with AttentionCapture(model.unet, cross_res=(res,), self_res=(), places=places,
                          latent_size=tuple(noisy.shape[-2:])) as store:
        model.unet(noisy, tt, encoder_hidden_states=model.encode_ids(input_ids))
    return store.cross(res)


def _check(word_regions: Sequence[Sequence[WordRegion]], labels: torch.Tensor, n: int, length: int) -> None:
    if len(word_regions) != n or len(labels) != n:
        raise ValueError(f"word_regions ({len(word_regions)}) and labels ({len(labels)}) need one entry per latent ({n})")
    for i, words in enumerate(word_regions):
        present = set(torch.unique(labels[i]).tolist())
        for w in words:
            if not 0 <= w.position < length:
                raise ValueError(f"image {i}: token position {w.position} of {w.word!r} is outside the prompt (0..{length - 1})")
            if w.region not in present:
                raise ValueError(f"image {i}: {w.word!r} names region {w.region}, absent from its labels {sorted(present)}")


def word_localization_table(model: SDComponents, latents: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                            word_regions: Sequence[Sequence[WordRegion]], t: int = 150, res: int = 16,
                            seed: int = 0, batch_size: int = 25, places: Sequence[str] = PLACES) -> pd.DataFrame:
    """Localization ratio (module doc) of the named words' cross-attention maps (Eq. (3.1a)), per kind and word.

    Args:
        model: the U-Net, text encoder and noise schedule are used.
        latents: ``(B, C, h, w)`` scaled latents of held-out images; ``input_ids`` ``(B, L)`` their prompts.
        labels: ``(B, H, W)`` integer region labels (e.g. ``DomainData.heldout_regions``).
        word_regions: per image, the tokens that name a region (``WordRegion``); an image may have none.
        t: the timestep the latents are noised to (one fixed noise draw from ``seed`` for all images).
        res: side of the cross-attention maps (the mean over every layer of that side in ``places``).
    Returns one row per (kind, word) and one per kind with word "all": columns kind, word,
    localization_ratio (mean over the token occurrences), median, n_tokens, n_images.
    """
    n = len(latents)
    _check(word_regions, labels, n, input_ids.shape[-1])
    if not any(word_regions):
        raise ValueError("no word names a region: nothing to measure")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=gen)
    tt = torch.full((n,), int(t), dtype=torch.long)
    noisy = model.noise_scheduler().add_noise(latents, noise, tt)
    found: list[tuple[str, str, int, float]] = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        cross = _cross_maps(model, noisy[sl], tt[sl], input_ids[sl], res, places)
        for i, words in enumerate(word_regions[sl], start):
            if not words:
                continue
            maps = torch.stack([cross[i - start, ..., w.position] for w in words])
            shares = torch.cat([region_shares(labels[i:i + 1], w.region, res) for w in words])
            for w, r in zip(words, localization_ratio(maps, shares).tolist()):
                found.append((w.kind, w.word, i, r))
    return _summarize(pd.DataFrame(found, columns=["kind", "word", "image", "ratio"]))


def _summarize(found: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, word) and per kind ("all"): mean and median ratio, token and image counts."""
    rows = []
    for kind, group in found.groupby("kind", sort=False):
        for word, sub in [("all", group), *group.groupby("word", sort=True)]:
            rows.append({"kind": kind, "word": word, "localization_ratio": float(sub["ratio"].mean()),
                         "median": float(np.median(sub["ratio"])), "n_tokens": len(sub),
                         "n_images": int(sub["image"].nunique())})
    return pd.DataFrame(rows)


__all__ = ["WordRegion", "region_shares", "localization_ratio", "word_localization_table"]
