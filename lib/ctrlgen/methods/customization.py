"""What chapter 3's four customization methods share (§3.4.1, §3.6.3): identifier tokens, prompts, subset batches.

Every method learns N concepts from **one** image holding all of them. They differ in how the identifier
tokens ``[V_i]`` start (class name, rare token), which prompt they train with ("[V1] and [V2]",
"[V1] [Class1] and [V2] [Class2]"), which concept subsets each step sees (always the group; union sampling;
AttenCraft's adaptive ratios) and which losses and parameters they use. This module holds the shared parts:

* ``identifier_tokens`` / ``add_identifiers`` — the ``<v1>, <v2>, …`` placeholders, initialised from words;
* ``rare_words`` — the "rare token" initialisation of Custom Diffusion and DisenDiff (Kumari et al. 2023 use
  rarely used tokens of the CLIP vocabulary, e.g. "ktn"; here: the last-learned whole-word BPE merges of the
  model's own tokenizer, the rarest words it has);
* ``subset_phrase`` / ``Customized.prompt`` — prompts for a subset of concepts in a context;
* ``subset_batches`` — endless batches for ``ctrlgen.training.train_diffusion``: the image's latent, the
  subset's prompt, the union mask ``M_s`` (Eq. 3.6), the subset's token positions and masks (Eq. 3.7), the
  subset size and the per-sample ``rec_weight`` (Eq. 3.8);
* ``trainable_state`` / ``load_state`` — only the trained tensors, so a finetuned model is cached by content as
  a few kilobytes instead of a model folder.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctrlgen.models import PlaceholderTokens, add_placeholder_tokens
from ctrlgen.models.sd import SDComponents
from ctrlgen.models.tokens import locate_tokens
from ctrlgen.training import TrainableParams

PROMPT_TEMPLATE = "a photo of {}"  # the book's prefix: the mini models are pretrained on "a photo of ..." captions
SubsetDraw = Callable[[np.random.Generator], tuple[int, ...]]


def identifier_tokens(n: int) -> tuple[str, ...]:
    """``("<v1>", …, "<vn>")``: the identifier tokens [V_1] … [V_N]."""
    if n < 1:
        raise ValueError(f"need at least one concept, got {n}")
    return tuple(f"<v{i + 1}>" for i in range(n))


def add_identifiers(model: SDComponents, init_words: Sequence[str], trainable: bool = False) -> PlaceholderTokens:
    """Add ``<v1>…<vN>`` to the tokenizer and text encoder, each initialised from its word (§3.4.1: class name)."""
    return add_placeholder_tokens(model.tokenizer, model.text_encoder, identifier_tokens(len(init_words)),
                                  list(init_words), trainable=trainable)


def rare_words(tokenizer, n: int, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The ``n`` rarest whole words of ``tokenizer``: the last BPE merges that are alphabetic words.

    Custom Diffusion initialises its modifier tokens from rarely used CLIP tokens; a BPE vocabulary lists its
    merges in the order learned, most frequent first, so the highest ids of whole words are the rarest.
    """
    vocab = tokenizer.get_vocab()
    skip = set(exclude)
    words = [(i, t[:-4]) for t, i in vocab.items() if t.endswith("</w>") and t[:-4].isalpha() and len(t) > 5
             and t[:-4] not in skip]
    words.sort(reverse=True)
    if len(words) < n:
        raise ValueError(f"the tokenizer has only {len(words)} whole words, {n} rare ones were asked for")
    return tuple(w for _, w in words[:n])


def subset_phrase(tokens: Sequence[str], subset: Sequence[int], class_names: Sequence[str] | None = None) -> str:
    """"<v1> and <v2>" (Break-a-Scene, AttenCraft) or, with ``class_names``, "<v1> circle and <v2> ring"
    (Custom Diffusion, DisenDiff: "[V1] [Class1] and [V2] [Class2]", §3.6.3)."""
    parts = [tokens[i] if class_names is None else f"{tokens[i]} {class_names[i]}" for i in subset]
    return " and ".join(parts)


@dataclass(frozen=True)
class Customized:
    """How a customized model is prompted: its tokens, the class names, and whether prompts name the class."""

    method: str
    tokens: PlaceholderTokens
    class_names: tuple[str, ...]
    with_class: bool
    template: str = PROMPT_TEMPLATE

    def prompt(self, subset: Sequence[int], context: str = "") -> str:
        """The prompt for concepts ``subset`` followed by ``context`` (e.g. "on a field background")."""
        phrase = subset_phrase(self.tokens.tokens, subset, self.class_names if self.with_class else None)
        text = self.template.format(phrase)
        return f"{text} {context}".strip()


def image_masks(masks: np.ndarray, n: int) -> torch.Tensor:
    """Check and convert the concept masks ``(N, H, W)`` to float ``(N, H, W)``."""
    m = np.asarray(masks)
    if m.ndim != 3 or m.shape[0] != n:
        raise ValueError(f"masks must be (N={n}, H, W), got shape {m.shape}")
    return torch.from_numpy(m.astype(bool)).float()


def subset_batches(model: SDComponents, latent: torch.Tensor, custom: Customized, masks: np.ndarray | None,
                   draw: SubsetDraw, batch_size: int = 1, seed: int = 0, rec_on_groups: bool = True,
                   extra: Callable[[tuple[int, ...], torch.Tensor], Mapping[str, torch.Tensor]] | None = None
                   ) -> Iterator[dict[str, Any]]:
    """Endless batches of concept subsets drawn by ``draw`` (module doc).

    ``latent`` ``(1, C, h, w)``: the image's latent. ``masks`` ``(N, H, W)`` or None (unmasked methods).
    ``rec_on_groups`` False sets ``rec_weight`` 0 for |s| > 1 (Eq. 3.8). ``extra(subset, ids)`` adds method keys.
    Keys: latents, input_ids, subset_size, rec_weight, and with masks: mask (union, Eq. 3.6), token_indices,
    token_masks, token_valid (Eq. 3.7; padded to N).
    """
    n = len(custom.class_names)
    m = image_masks(masks, n) if masks is not None else None
    rng = np.random.default_rng(seed)
    while True:
        rows = []
        for _ in range(batch_size):
            subset = tuple(draw(rng))
            ids = model.tokenize([custom.prompt(subset)])
            row: dict[str, Any] = {"latents": latent, "input_ids": ids, "subset_size": torch.tensor([len(subset)]),
                                   "rec_weight": torch.tensor([1.0 if len(subset) == 1 or rec_on_groups else 0.0])}
            if m is not None:
                pos = locate_tokens(model.tokenizer, ids, [custom.tokens.tokens[i] for i in subset]).positions[0]
                idx = torch.zeros(1, n, dtype=torch.long)
                tm = torch.zeros(1, n, *m.shape[-2:])
                valid = torch.zeros(1, n, dtype=torch.bool)
                idx[0, :len(subset)], tm[0, :len(subset)], valid[0, :len(subset)] = pos, m[list(subset)], True
                row.update(mask=m[list(subset)].amax(0)[None, None], token_indices=idx, token_masks=tm, token_valid=valid)
            if extra is not None:
                row.update(extra(subset, ids))
            rows.append(row)
        yield {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def trainable_state(trainable: TrainableParams) -> dict[str, torch.Tensor]:
    """The trained tensors by name (CPU copies): what a finetuned model adds to its base model."""
    return {name: p.detach().cpu().clone() for name, p in trainable.named.items()}


def load_state(model: SDComponents, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``trainable_state`` tensors into ``model`` (its identifier tokens must already be added)."""
    modules = {"unet": model.unet, "text_encoder": model.text_encoder}
    with torch.no_grad():
        for name, value in state.items():
            part, _, rest = name.partition(".")
            params = dict(modules[part].named_parameters())
            if rest not in params:
                raise KeyError(f"{name}: no such parameter in the model's {part}")
            if params[rest].shape != value.shape:
                raise ValueError(f"{name}: stored shape {tuple(value.shape)} != model's {tuple(params[rest].shape)} "
                                 "(add the identifier tokens before loading)")
            params[rest].copy_(value.to(params[rest]))


__all__ = ["PROMPT_TEMPLATE", "identifier_tokens", "add_identifiers", "rare_words", "subset_phrase", "Customized",
           "image_masks", "subset_batches", "trainable_state", "load_state"]
