"""CXR-RePaiR (Endo et al. 2021, "Retrieval-Based Chest X-Ray Report Generation Using a Pre-trained Contrastive
Language-Image Model"), compact: the retrieval baseline of thesis Table 6.3.

CXR-RePaiR embeds the test image and every report (or sentence) of a training corpus with a CLIP model trained
contrastively on MIMIC-CXR image–report pairs, and returns the corpus text(s) of highest cosine similarity.
Here: a small CLIP — an image tower (visual tokens of the image embedding, mean-pooled, projected) and a text
tower (a bag of word embeddings, mean over the report's tokens, projected) — trained with CLIP's symmetric
InfoNCE loss (learned temperature) on the training pairs; retrieval is over the training reports (report-level
corpus, k = 1; Endo et al.'s CXR-RePaiR-2/3 join k sentences and -Select chooses sentences, neither run here).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrlgen.methods.baselines.captioning import PatchTokens, fit_steps


class SmallCLIP(nn.Module):
    """Image and text towers into one ``dim``-wide space; ``logit_scale`` as CLIP (init log(1/0.07))."""

    def __init__(self, vocab_size: int, pad_id: int, channels: int, side: int, patch: int, width: int, dim: int):
        super().__init__()
        self.visual = PatchTokens(channels, side, patch, width)
        self.image_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.words = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.text_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.pad_id = pad_id
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.visual(images).mean(1)), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).float()[..., None]
        pooled = (self.words(ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return F.normalize(self.text_proj(pooled), dim=-1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's image–text similarity matrix (pairs on the diagonal)."""
    logits = logit_scale.exp().clamp(max=100) * image @ text.T
    target = torch.arange(len(image))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_clip(model: SmallCLIP, inputs: torch.Tensor, ids: torch.Tensor, steps: int, batch_size: int, lr: float,
               seed: int) -> list[float]:
    """Contrastive training on image–report pairs (``clip_loss``; distinct indices per batch, so that every other
    pair of the batch is a negative) in ``captioning.fit_steps``' loop. Returns the loss per step."""
    if len(inputs) != len(ids) or len(ids) < 2:
        raise ValueError(f"contrastive training needs >= 2 image–report pairs, one report per image: "
                         f"{len(inputs)} images, {len(ids)} reports")

    def batch_loss(rng: np.random.Generator) -> torch.Tensor:
        idx = torch.as_tensor(rng.choice(len(ids), size=min(batch_size, len(ids)), replace=False))
        return clip_loss(model.encode_image(inputs[idx]), model.encode_text(ids[idx]), model.logit_scale)

    return fit_steps(model, batch_loss, steps, lr, seed)


@torch.no_grad()
def retrieve(model: SmallCLIP, inputs: torch.Tensor, corpus_ids: torch.Tensor, corpus: Sequence[str]) -> list[str]:
    """For each image, the corpus report of highest cosine similarity (CXR-RePaiR at report level, k = 1)."""
    if len(corpus_ids) != len(corpus) or not len(corpus):
        raise ValueError(f"retrieval corpus: {len(corpus)} reports, {len(corpus_ids)} token rows")
    model.eval()
    best = (model.encode_image(inputs) @ model.encode_text(corpus_ids).T).argmax(1)
    return [corpus[i] for i in best.tolist()]


__all__ = ["SmallCLIP", "clip_loss", "train_clip", "retrieve"]
