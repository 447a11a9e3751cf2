"""Where the attention layers of a U-Net are, and at which resolution they work.

Stable Diffusion's ``UNet2DConditionModel`` holds one self-attention (``attn1``) and one
cross-attention (``attn2``) module per transformer block. The thesis selects them by the side of
their feature map: cross-attention at 16x16 and self-attention at 32x32 for a 64x64 latent
(§3.4.1, §4.3.4, §5.3.3). The resolution of each block follows from the model's structure (a
down block halves the map after itself if it has a downsampler, an up block doubles it), so layers
can be chosen before anything runs and only those layers get a non-default processor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from diffusers.models.attention_processor import Attention

Place = Literal["down", "mid", "up"]
Kind = Literal["self", "cross"]
PLACES: tuple[str, ...] = ("down", "mid", "up")

_BLOCK = re.compile(r"(?:^|\.)(down_blocks|up_blocks)\.(\d+)\.|(?:^|\.)mid_block\.")


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of the U-Net: its dotted name, kind, place and map side."""

    name: str
    module: Attention
    kind: Kind
    place: Place
    block: int
    factor: int  # the latent side divided by this layer's map side

    def side(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of this layer's feature map for a latent of size ``latent_hw``."""
        return latent_hw[0] // self.factor, latent_hw[1] // self.factor


def _downsample_factors(unet: torch.nn.Module) -> tuple[list[int], int, list[int]]:
    """Downsampling factor of every down block, of the mid block and of every up block."""
    down, f = [], 1
    for block in unet.down_blocks:
        down.append(f)
        if getattr(block, "downsamplers", None):
            f *= 2
    mid = f
    up = []
    for block in unet.up_blocks:
        up.append(f)
        if getattr(block, "upsamplers", None):
            f //= 2
    return down, mid, up


def attention_layers(unet: torch.nn.Module) -> list[AttentionLayer]:
    """Every ``Attention`` module of a (possibly PEFT-wrapped) U-Net, in forward order."""
    down, mid, up = _downsample_factors(unet)
    found: list[AttentionLayer] = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        match = _BLOCK.search(name)
        if match is None:
            continue
        if match.group(1) == "down_blocks":
            place, block = "down", int(match.group(2))
            factor = down[block]
        elif match.group(1) == "up_blocks":
            place, block = "up", int(match.group(2))
            factor = up[block]
        else:
            place, block, factor = "mid", 0, mid
        kind: Kind = "cross" if module.is_cross_attention else "self"
        found.append(AttentionLayer(name, module, kind, place, block, factor))
    return found


def latent_hw_of(unet: torch.nn.Module, latent_size: int | Sequence[int] | None = None) -> tuple[int, int]:
    """(h, w) of the latent: ``latent_size`` if given, else the U-Net's ``sample_size``."""
    size = unet.config.sample_size if latent_size is None else latent_size
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def select_layers(
    unet: torch.nn.Module,
    kind: Kind,
    resolutions: Iterable[int],
    places: Iterable[str] = PLACES,
    latent_size: int | Sequence[int] | None = None,
) -> list[AttentionLayer]:
    """Layers of ``kind`` whose map side (the height) is in ``resolutions`` and whose place is in ``places``."""
    hw = latent_hw_of(unet, latent_size)
    res, pl = set(int(r) for r in resolutions), set(places)
    bad = pl - set(PLACES)
    if bad:
        raise ValueError(f"unknown places {sorted(bad)}; allowed: {', '.join(PLACES)}")
    return [l for l in attention_layers(unet) if l.kind == kind and l.place in pl and l.side(hw)[0] in res]


def available_resolutions(unet: torch.nn.Module, kind: Kind, latent_size: int | Sequence[int] | None = None) -> list[int]:
    """Map sides at which the U-Net has attention layers of ``kind`` (for error messages and notebooks)."""
    hw = latent_hw_of(unet, latent_size)
    return sorted({l.side(hw)[0] for l in attention_layers(unet) if l.kind == kind}, reverse=True)
