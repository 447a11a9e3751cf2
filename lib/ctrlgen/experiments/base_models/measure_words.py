"""Which caption token names which object of a scenes image, and how well its cross-attention localizes there.

Chapter 3's AttenCraft reads the class word's cross-attention map to cut a mask per concept (thesis §3.3.1);
chapter 2 measures whether the scenes base model's words localize (``analysis.cross_attention``). The
scenes world captions an image ``a photo of a red striped circle and a blue square on a plain background``
with its objects left to right, and ``DomainData.regions`` labels object k (1-based) with k
(``data.worlds.multiconcept.scene_caption``, ``render_scene``): each object's phrase is one colour word,
an optional texture word and one shape word, so the k-th shape word and the colour word before it name
region k. Derm and CXR captions name no per-object region this way and are not measured.

This module is deliberately not one of ``keys.CODE_FILES``: measuring never retrains a model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from transformers import CLIPTokenizer

from ctrlgen.analysis.cross_attention import WordRegion, word_localization_table
from ctrlgen.data.caption_labels import with_complete_captions
from ctrlgen.data.domains import DomainData
from ctrlgen.data.tensors import image_tensor
from ctrlgen.data.worlds.multiconcept import COLOURS, SHAPES
from ctrlgen.models.sd import SDComponents
from ctrlgen.models.tokens import token_id

KINDS = ("shape", "colour")


def _vocabulary_ids(tokenizer) -> dict[int, tuple[str, str]]:
    """``{token id: (kind, word)}`` of the world's shape and colour words the tokenizer holds as one token
    (a word missing from it cannot occur as one token; a caption using it fails the object count below)."""
    out = {}
    for kind, words in (("shape", SHAPES), ("colour", tuple(COLOURS))):
        for word in words:
            try:
                out[token_id(tokenizer, word)] = (kind, word)
            except ValueError:
                continue
    return out


def scene_word_regions(tokenizer: CLIPTokenizer, input_ids: torch.Tensor, n_objects: Sequence[int] | None = None
                       ) -> list[list[WordRegion]]:
    """Per tokenised scenes caption (``(B, L)`` ids): its shape and colour tokens with the region they name.

    The k-th shape word names region k and so does the colour word of its phrase (the one since the
    previous shape word). ``n_objects`` (per caption, e.g. the image's largest region label) is checked
    against the number of shape words. Raises ``ValueError`` naming the caption when a phrase has no
    colour, two colours, or a colour without a shape, or when the counts disagree.
    """
    vocab = _vocabulary_ids(tokenizer)
    out = []
    for b, row in enumerate(input_ids.tolist()):
        words, pending, k = [], [], 0
        for pos, tid in enumerate(row):
            kind, word = vocab.get(tid, (None, None))
            if kind == "colour":
                pending.append(WordRegion(pos, 0, "colour", word))
            elif kind == "shape":
                k += 1
                if len(pending) != 1:
                    raise ValueError(f"caption {_text(tokenizer, row)!r}: object {k} ({word}) has "
                                     f"{len(pending)} colour words, expected one")
                words += [WordRegion(pending[0].position, k, "colour", pending[0].word), WordRegion(pos, k, "shape", word)]
                pending = []
        if pending:
            raise ValueError(f"caption {_text(tokenizer, row)!r}: colour word {pending[0].word!r} names no shape")
        if n_objects is not None and k != int(n_objects[b]):
            raise ValueError(f"caption {_text(tokenizer, row)!r} names {k} objects, its image has {int(n_objects[b])} regions")
        out.append(words)
    return out


def _text(tokenizer, row: list[int]) -> str:
    return tokenizer.decode(row, skip_special_tokens=True)


def word_localization(cfg: Mapping[str, Any], model: SDComponents, data: DomainData) -> pd.DataFrame | None:
    """``analysis.word_localization_table`` of a model on its domain's held-out scenes (None for other domains).

    Measured where Stage I reads the maps: at ``ch03.attencraft.t_max`` / 2 (Stage I draws t from
    [0, t_max]; chapter 3's Fig. 3.7 analogue uses the same t), at the first side of ``attention.cross_res``,
    layers of ``attention.places``, one noise draw from ``seed``.
    """
    if data.domain != "scenes" or not data.has_regions:
        return None
    data = with_complete_captions(cfg, data)   # every object named by colour and shape (data.caption_labels)
    labels = torch.from_numpy(data.heldout_regions)
    ids = model.tokenize(list(data.heldout_captions))
    words = scene_word_regions(model.tokenizer, ids, n_objects=labels.flatten(1).max(1).values.tolist())
    with torch.no_grad():
        latents = model.encode_images(image_tensor(data.heldout_images))
    return word_localization_table(model, latents, ids, labels, words, t=int(cfg["ch03"]["attencraft"]["t_max"]) // 2,
                                   res=int(cfg["attention"]["cross_res"][0]), seed=int(cfg["seed"]),
                                   places=tuple(cfg["attention"]["places"]))


__all__ = ["KINDS", "scene_word_regions", "word_localization"]
