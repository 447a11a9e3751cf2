"""Horizontal flips that keep image, mask and prompt consistent (chapter 4 finetuning data).

A horizontal flip moves a lesion "on the left" to the right. The DermPrompt names the position
("on the left", "in the upper right", ... — ``dermprompt.POSITIONS``; a VLM caption may say
"left side", "right-hand", "leftmost"), so a flipped image is trained with ``mirror_sides(prompt)``:
every side word swapped (left <-> right), case kept. Words are matched whole ("bright", "lefty" are
left alone); "top"/"bottom" and "upper"/"lower" do not change under a horizontal flip.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

_SIDES = {"left": "right", "right": "left"}
_SIDE_WORD = re.compile(r"\b(left|right)(most|wards?)?\b", re.IGNORECASE)


def _swap(match: re.Match) -> str:
    word, tail = match.group(1), match.group(2) or ""
    other = _SIDES[word.lower()]
    if word.isupper():
        other = other.upper()
    elif word[0].isupper():
        other = other.capitalize()
    return other + tail


def mirror_sides(text: str) -> str:
    """``text`` as it reads for the horizontally flipped image: "left" <-> "right" (also "leftmost",
    "rightward(s)"), whole words, case kept. Applying it twice gives ``text`` back."""
    return _SIDE_WORD.sub(_swap, text)


def mirrored_ids(tokenize: Callable[[list[str]], torch.Tensor], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``prompts`` and of their mirrored text (``mirror_sides``), both ``(N, L)``."""
    return tokenize(list(prompts)), tokenize([mirror_sides(p) for p in prompts])


def random_flips(rng: np.random.Generator, n: int) -> torch.Tensor:
    """``(n,)`` bool: which samples of a batch are flipped (probability 1/2 each)."""
    return torch.as_tensor(rng.uniform(size=n) < 0.5)


def flip_where(flip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, ..., W)`` with the rows where ``flip`` is True mirrored along the last axis (width)."""
    return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


def pick_where(flip: torch.Tensor, plain: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Row-wise ``mirrored`` where ``flip`` else ``plain`` (token ids or positions of a flipped sample)."""
    return torch.where(flip.view(-1, *([1] * (plain.ndim - 1))), mirrored, plain)


__all__ = ["mirror_sides", "mirrored_ids", "random_flips", "flip_where", "pick_where"]
