"""Region-aware finetuning of SD (thesis §4.3.3, Eq. 4.3–4.6).

Prompt: ``"An image of <lesion> on <skin>"`` + DermPrompt. ``<lesion>`` and ``<skin>`` are
placeholder tokens (P-Tokens) added to the vocabulary, initialised from the embeddings of "lesion"
and "skin" and **frozen** (the text encoder is not trained at all). The U-Net is finetuned on

    L = L_rec + α · L_attn,   L_attn = ½ Σ_{i∈{l,s}} ‖A_C(v_i, z_t) − M_i‖²          (Eq. 4.5, 4.6)

with ``M_l`` the lesion mask, ``M_s = 1 − M_l``, and ``A_C`` the head- and layer-mean cross-attention
maps of the P-Tokens at the sides ``attention.train_cross_res`` of the profile (16x16 in the full
profile as in the thesis; the mini profile uses every cross-attention side, 16 and 8, each map
layer-averaged per side and the loss averaged over sides). Masks are area-pooled to each side.

Normalisation (it sets the meaning of α): ‖·‖² is a **mean over pixels**, not a sum
(``ctrlgen.training.losses.attention_alignment_loss``), so L_attn is in [0, 1] whatever the map
side; the ½ Σ over the two tokens is their mean. NOTES-mini-feasibility.md measured that a pixel
sum swamps L_rec at α = 0.1 on a 16x16 latent. L_rec is the mean squared error over latent
channels and pixels (Eq. 4.3). The thesis does not say which normalisation it used.

The loop is ``ctrlgen.training.train_diffusion`` with ``AttentionAlignmentTerm(weight=α)``.

Horizontal flips (pixel batches only; precomputed latents are not flipped): image and masks are
mirrored together and the prompt **with them** — a flipped sample is trained with
``ctrlgen.training.mirror_sides(prompt)`` ("on the left" <-> "on the right", "in the upper left" <->
"in the upper right"), so that the DermPrompt's position words stay true of the image (this book's
choice over not flipping: the flip doubles the layouts the model sees, and the words follow it).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctrlgen.data.tensors import image_tensor
from ctrlgen.models import PlaceholderTokens, add_placeholder_tokens
from ctrlgen.models.sd import SDComponents
from ctrlgen.models.tokens import locate_tokens
from ctrlgen.training import (
    AttentionAlignmentTerm,
    TrainResult,
    flip_where,
    mirrored_ids,
    pick_where,
    random_flips,
    select_trainable,
    train_config_from,
    train_diffusion,
)

PLACEHOLDERS = ("<lesion>", "<skin>")
INIT_WORDS = ("lesion", "skin")


def setup_placeholders(model: SDComponents, tokens: Sequence[str] = PLACEHOLDERS, init_words: Sequence[str] = INIT_WORDS,
                       keep_existing: bool = True) -> PlaceholderTokens:
    """Add the P-Tokens (frozen) to ``model``'s tokenizer and text encoder, initialised from ``init_words``.

    ``keep_existing``: a token the tokenizer already has (the mini base models are pretrained with
    ``<lesion>``/``<skin>`` as words of their own) keeps its trained embedding instead of being
    re-initialised — re-initialising would throw away what pretraining learned for it. A new token
    is always initialised from its word (``ctrlgen.models.add_placeholder_tokens``).
    """
    vocab = model.tokenizer.get_vocab()
    new = [(t, w) for t, w in zip(tokens, init_words) if not (keep_existing and t in vocab)]
    if new:
        add_placeholder_tokens(model.tokenizer, model.text_encoder, [t for t, _ in new], [w for _, w in new], trainable=False)
    ids = tuple(int(model.tokenizer.convert_tokens_to_ids(t)) for t in tokens)
    return PlaceholderTokens(tuple(tokens), ids, tuple(init_words), trainable=False)


def token_indices(model: SDComponents, input_ids: torch.Tensor, tokens: PlaceholderTokens) -> torch.Tensor:
    """``(B, K)`` first position of each P-Token in each tokenised prompt (``ctrlgen.models.tokens.locate_tokens``:
    ValueError naming the token and the prompt if one is missing, e.g. truncated)."""
    return locate_tokens(model.tokenizer, input_ids, tokens.tokens).positions


def region_aware_batches(model: SDComponents, images: np.ndarray, masks: np.ndarray, prompts: Sequence[str],
                         tokens: PlaceholderTokens, batch_size: int, seed: int = 0, latents: torch.Tensor | None = None,
                         hflip: bool = True) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches for ``train_diffusion``: pixels (or precomputed ``latents``), ids, P-Token
    positions and their masks ``[M_l, 1 − M_l]`` (Eq. 4.5). ``hflip`` (pixels only) flips image, mask and the
    prompt's side words together (module docstring); ``batch["flipped"]`` says which samples were flipped."""
    n = len(images)
    if not (len(masks) == len(prompts) == n):
        raise ValueError("images, masks and prompts must have the same length")
    ids, ids_mirrored = mirrored_ids(model.tokenize, prompts)
    pos, pos_mirrored = token_indices(model, ids, tokens), token_indices(model, ids_mirrored, tokens)
    m = torch.from_numpy(np.asarray(masks, bool)).float()[:, None]
    pix = image_tensor(images) if latents is None else None
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = torch.as_tensor(order[start:start + batch_size])
            flip = random_flips(rng, len(idx)) if latents is None and hflip else torch.zeros(len(idx), dtype=torch.bool)
            mask = flip_where(flip, m[idx])
            batch = {"input_ids": pick_where(flip, ids[idx], ids_mirrored[idx]),
                     "token_indices": pick_where(flip, pos[idx], pos_mirrored[idx]), "flipped": flip}
            if latents is None:
                batch["pixel_values"] = flip_where(flip, pix[idx])
            else:
                batch["latents"] = latents[idx]
            batch["mask"] = mask
            batch["token_masks"] = torch.cat([mask, 1 - mask], 1)
            yield batch


@dataclass(frozen=True)
class RegionAwareConfig:
    """Finetuning settings (full profile: §4.7.2 — 20k steps, batch 4, lr 1e-5, AdamW (0.9, 0.999), wd 1e-2; α = 0.1).

    ``adam_betas``/``adam_eps``: profile ``didgen.finetune.adam_betas`` (§4.7.2) and ``adam_eps`` (PyTorch's default).
    """

    steps: int
    batch_size: int
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    alpha: float = 0.1
    cross_res: tuple[int, ...] = (16,)
    warmup_steps: int = 0
    precompute_latents: bool = False  # encode every image once (distribution mean) instead of sampling each step
    seed: int = 0

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "RegionAwareConfig":
        f = cfg["didgen"]["finetune"]
        kw = dict(steps=int(f["steps"]), batch_size=int(f["batch_size"]), lr=float(f["lr"]),
                  weight_decay=float(f["weight_decay"]), adam_betas=tuple(float(b) for b in f["adam_betas"]),
                  adam_eps=float(f["adam_eps"]), alpha=float(f["alpha"]),
                  cross_res=tuple(int(r) for r in cfg["attention"]["train_cross_res"]),
                  warmup_steps=int(f["warmup_steps"]), precompute_latents=bool(f["precompute_latents"]),
                  seed=int(cfg["seed"]))
        kw.update(overrides)
        return cls(**kw)


def region_aware_finetune(model: SDComponents, images: np.ndarray, masks: np.ndarray, prompts: Sequence[str],
                          config: RegionAwareConfig, output_dir: str = "", train_config: Mapping[str, Any] | None = None,
                          tokens: PlaceholderTokens | None = None, progress: bool = True) -> tuple[TrainResult, PlaceholderTokens]:
    """Finetune the whole U-Net of ``model`` in place with L_rec + α L_attn (α = 0: plain finetuning, the ablation).

    ``prompts`` must contain both P-Tokens (build them with ``compose_prompt``). ``train_config``
    passes extra ``TrainConfig`` fields (mixed precision, checkpointing); on a key that ``config`` also sets,
    ``train_config`` wins (``ctrlgen.training.train_config_from``). Returns the training result
    (per-step ``loss``, ``rec``, ``attn``) and the P-Tokens.
    """
    tokens = tokens or setup_placeholders(model)
    lat = model.encode_dataset(images) if config.precompute_latents else None
    tc = train_config_from(dict(steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                                betas=config.adam_betas, eps=config.adam_eps, warmup_steps=config.warmup_steps,
                                cross_res=config.cross_res, output_dir=output_dir, seed=config.seed, progress=progress),
                           train_config)
    data = region_aware_batches(model, images, masks, prompts, tokens, config.batch_size, tc.seed, lat)
    trainable = select_trainable(model.unet, model.text_encoder, mode="full", weight_decay=tc.weight_decay)
    terms = [AttentionAlignmentTerm(weight=config.alpha)] if config.alpha > 0 else []
    result = train_diffusion(model, data, tc, trainable, terms)
    model.unet.requires_grad_(False)
    return result, tokens


__all__ = ["PLACEHOLDERS", "INIT_WORDS", "setup_placeholders", "token_indices", "region_aware_batches",
           "RegionAwareConfig", "region_aware_finetune"]
