"""Prompt-to-Prompt attention control (Hertz et al., 2022) for Null-text editing (Mokady et al., 2023; §4.4.6).

The source branch (the reconstruction) and E edited branches run in ONE batched U-Net call. The
batch is read group-major as ``groups x (1 + E)`` rows, ``[g0 src, g0 e1, …, g0 eE, g1 src, …]``; under
classifier-free guidance the groups are (unconditional, conditional) and, as in the authors' batched code,
only the conditional group is edited (``edit_groups=(-1,)``: the last group — the conditional half
under guidance, the whole batch without). At sampling step i of N:

* cross-attention, i < ⌊cross_replace_fraction·N⌋ (Hertz et al. §3.2): the edited branch's maps
  M*_t are replaced token by token, ``M̂_t[..., j] = α_j M_t[..., A(j)] + (1 − α_j) M*_t[..., j]``
  with M_t the source maps and (A, α) a token alignment (``token_alignment``):
  - *word swap* (same token count): A(j) = j, α = 1 — a swapped word receives the source word's map;
  - *refinement* (different token counts): A is the global alignment of the two token sequences
    (match +1, mismatch −1, gap 0, as in the authors' ``seq_aligner``); new tokens (α_j = 0) keep
    their own maps.
  ``mode="auto"`` picks word swap for equal token counts and refinement otherwise.
* self-attention, i < ⌊self_replace_fraction·N⌋: M*_t ← M_t in layers with at most
  ``self_max_pixels`` queries (the released Null-text + P2P code: 32×32).

The edited probabilities multiply the edited branch's own values V*. The constructor's defaults 0.8 / 0.4
are the word-swap example of the Stable Diffusion notebook released with Hertz et al. (2022)
(google/prompt-to-prompt ``prompt-to-prompt_stable.ipynb``); the book's real-image edits pass the profile's
fractions instead (``didgen.eval.edit_cross_replace_fraction`` / ``edit_self_replace_fraction``, through
``methods.baselines.null_text_inversion.NullTextConfig``: 0.8 / 0.5, the null-text notebook's edits). ``PromptToPrompt`` is a
``processor.ProcessorSwap``: its processor (which overrides only the attention step of
``processor.AttentionProcessorBase``) goes on the layers it edits only, and the originals are restored
on exit, also after an exception.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from diffusers.models.attention_processor import Attention

from ctrlgen.attention.layers import attention_layers, latent_hw_of
from ctrlgen.attention.processor import AttentionProcessorBase, ProcessorSwap, Projected

AlignMode = Literal["auto", "replace", "refine"]


def real_tokens(ids: Sequence[int], eos_token_id: int) -> list[int]:
    """The prompt's own tokens of a padded id row: start token up to and including the first end token."""
    row = [int(i) for i in ids]
    end = next((k for k in range(1, len(row)) if row[k] == eos_token_id), len(row) - 1)
    return row[:end + 1]


def global_alignment(source: Sequence[int], edit: Sequence[int]) -> list[int]:
    """For each edit position the aligned source position or −1 (Needleman–Wunsch: match 1, mismatch −1, gap 0)."""
    n, m = len(source), len(edit)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if source[i - 1] == edit[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    out = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        if source[i - 1] == edit[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return out


def token_alignment(source: Sequence[int], edit: Sequence[int], length: int,
                    mode: AlignMode = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, α)`` of length ``length`` (the padded sequence) for the real tokens ``source`` and ``edit``.

    ``replace`` needs equal token counts (a ``ValueError`` otherwise); padding positions of the edit
    map to the source's padding positions in order (α = 1).
    """
    if mode == "auto":
        mode = "replace" if len(source) == len(edit) else "refine"
    if mode == "replace":
        if len(source) != len(edit):
            raise ValueError(f"word-swap attention replacement needs prompts with the same number of tokens "
                             f"({len(source)} vs {len(edit)}); use mode='refine' (or 'auto')")
        return torch.arange(length), torch.ones(length)
    if mode != "refine":
        raise ValueError(f"unknown alignment mode {mode!r}: auto, replace or refine")
    mapper, alphas = torch.zeros(length, dtype=torch.long), torch.zeros(length)
    for j, i in enumerate(global_alignment(source, edit)[:length]):
        mapper[j], alphas[j] = max(i, 0), float(i >= 0)
    for j in range(len(edit), length):
        mapper[j], alphas[j] = min(len(source) + j - len(edit), length - 1), 1.0
    return mapper, alphas


class _P2PProcessor(AttentionProcessorBase):
    """Lets a ``PromptToPrompt`` edit the explicit probabilities of its layer; SDPA on steps it does not edit."""

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        owner = self.swap
        if not owner.replaces(p.is_cross, p.n_queries):
            return self.sdpa(attn, p.query, p.key, p.value, p.mask)
        probs = owner.edit(self.probabilities(attn, p.query, p.key, p.mask), p.is_cross)
        return self.apply_probabilities(attn, probs, p.value)


class PromptToPrompt(ProcessorSwap):
    """Context manager: ``with PromptToPrompt(unet, alignments, num_steps) as p2p:`` around the batched calls.

    The step index i is the swap's (0 at the first U-Net call, advancing with each new timestep); a loop
    may set ``p2p.step = i`` before each call instead. Only the layers it can edit get its processor:
    every cross-attention layer (if ⌊cross_replace_fraction·N⌋ > 0) and the self-attention layers with at
    most ``self_max_pixels`` queries (if ⌊self_replace_fraction·N⌋ > 0); all others keep their processor.

    Args:
        alignments: one ``(A, α)`` per edited branch (``token_alignment``; ``for_prompts`` builds them).
        num_steps: N, the number of sampling steps.
        cross_replace_fraction, self_replace_fraction: replace for steps i < ⌊fraction·N⌋.
        self_max_pixels: self-attention is replaced only in layers with at most this many queries.
        edit_groups: groups whose edited rows are changed (default the last: the conditional half under CFG).
        latent_size: the latent side (default ``unet.config.sample_size``); query counts of the layers follow
            from it, and a U-Net call with another latent size raises.
    """

    def __init__(self, unet: torch.nn.Module, alignments: Sequence[tuple[torch.Tensor, torch.Tensor]], num_steps: int,
                 cross_replace_fraction: float = 0.8, self_replace_fraction: float = 0.4,
                 self_max_pixels: int = 32 * 32, edit_groups: Sequence[int] = (-1,),
                 latent_size: int | Sequence[int] | None = None):
        for f in (cross_replace_fraction, self_replace_fraction):
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"replace fractions lie in [0, 1], got {f}")
        if not alignments:
            raise ValueError("Prompt-to-Prompt needs at least one edited branch")
        self.mappers = [m.long() for m, _ in alignments]
        self.alphas = [a.float() for _, a in alignments]
        self.branches = 1 + len(alignments)
        self.n_cross = int(cross_replace_fraction * num_steps + 1e-9)  # ⌊f·N⌋, robust to 0.7·10 = 7.000…1
        self.n_self = int(self_replace_fraction * num_steps + 1e-9)
        self.self_max_pixels = self_max_pixels
        self.edit_groups = tuple(edit_groups)
        hw = latent_hw_of(unet, latent_size)
        edited = [l for l in attention_layers(unet)
                  if (l.kind == "cross" and self.n_cross > 0)
                  or (l.kind == "self" and self.n_self > 0 and math.prod(l.side(hw)) <= self_max_pixels)]
        super().__init__(unet, edited, factory=_P2PProcessor, latent_size=hw, check_latent=True)

    @classmethod
    def for_prompts(cls, unet: torch.nn.Module, source_ids: torch.Tensor, edit_ids: torch.Tensor, eos_token_id: int,
                    num_steps: int, mode: AlignMode = "auto", **kwargs: Any) -> "PromptToPrompt":
        """From padded token ids: source ``(L,)`` or ``(1, L)``, edits ``(E, L)``."""
        src = real_tokens(source_ids.flatten().tolist(), eos_token_id)
        length = edit_ids.shape[-1]
        aligns = [token_alignment(src, real_tokens(row.tolist(), eos_token_id), length, mode) for row in edit_ids]
        return cls(unet, aligns, num_steps, **kwargs)

    def replaces(self, is_cross: bool, n_queries: int) -> bool:
        """Whether a layer of this kind and query count is edited at the current step."""
        if is_cross:
            return self.step < self.n_cross
        return self.step < self.n_self and n_queries <= self.self_max_pixels

    def edit(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """Edited probabilities ``(B, heads, N, M)`` with B = groups × branches (group-major)."""
        b = probs.shape[0]
        if b % self.branches:
            raise RuntimeError(f"U-Net batch {b} is not a multiple of {self.branches} branches (source + edits)")
        p = probs.reshape(b // self.branches, self.branches, *probs.shape[1:]).clone()
        for g in self.edit_groups:
            src = p[g, 0]
            for e in range(1, self.branches):
                if is_cross:
                    mapper = self.mappers[e - 1].to(p.device)
                    alpha = self.alphas[e - 1].to(p)
                    p[g, e] = src[..., mapper] * alpha + p[g, e] * (1 - alpha)
                else:
                    p[g, e] = src
        return p.reshape(probs.shape)


__all__ = ["PromptToPrompt", "token_alignment", "global_alignment", "real_tokens"]
