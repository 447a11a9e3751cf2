"""What the report-generation baselines of thesis Tables 6.3/6.4 share: visual tokens from an image embedding,
the training loop (``fit_steps``: teacher-forced cross-entropy here, CLIP's contrastive loss in ``cxr_repair``) and
greedy decoding.

The baselines (R2Gen, M²Trans: ``r2gen``, ``m2trans``) caption an image. In the thesis they read MIMIC-CXR images
through their own CNN (R2Gen: ImageNet ResNet-101 patch features; M²Trans (Miura et al.): a DenseNet also trained
on CheXpert); here they read the same input CXR-IRGen's prior reads — the image's latent from the frozen VAE (a
generated image's z_0) — cut into patches and projected to visual tokens (``PatchTokens``), so that every report
generator of the chapter sees the same image embedding. Tokens come from the chapter's report tokenizer
(``<s> … </s>``, pad id ``pad``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PatchTokens(nn.Module):
    """``(B, C, H, W)`` image embedding → ``(B, (H/p)(W/p), d)`` visual tokens (a strided conv + positions)."""

    def __init__(self, channels: int, side: int, patch: int, d_model: int):
        super().__init__()
        if side % patch:
            raise ValueError(f"input side {side} is not a multiple of the patch size {patch}")
        self.proj = nn.Conv2d(channels, d_model, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (side // patch) ** 2, d_model))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


def causal_mask(n: int, device=None) -> torch.Tensor:
    """``(n, n)`` bool mask, True above the diagonal (future positions blocked, ``nn.MultiheadAttention``'s sense)."""
    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), 1)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """``(N, T)`` token ids ``<s> … </s>`` padded with the tokenizer's pad id."""
    return tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                     return_tensors="pt").input_ids


def fit_steps(model: nn.Module, batch_loss: Callable[[np.random.Generator], torch.Tensor], steps: int, lr: float,
              seed: int) -> list[float]:
    """The report baselines' training loop: torch and the batches' NumPy generator seeded with ``seed``, AdamW
    (no weight decay) on all of ``model``'s parameters, ``steps`` updates on ``batch_loss(rng)`` (the model's loss
    on a batch it draws from ``rng``) in train mode; the model is left in eval mode. Returns the loss per step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    history = []
    for _ in range(steps):
        loss = batch_loss(rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    model.eval()
    return history


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Token cross-entropy of ``logits`` ``(B, T, V)`` against ``targets`` ``(B, T)``, pad positions ignored
    (R2Gen's and M²Trans's training objective, the negative log-likelihood of the report)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id)


def train_captioner(model: nn.Module, inputs: torch.Tensor, ids: torch.Tensor, pad_id: int, steps: int,
                    batch_size: int, lr: float, seed: int) -> list[float]:
    """Teacher-forced cross-entropy (pad positions ignored): ``model(images, ids[:, :-1])`` predicts ``ids[:, 1:]``.
    ``fit_steps``' loop, batches drawn with replacement. Returns the loss per step."""
    if len(inputs) != len(ids) or not len(ids):
        raise ValueError(f"captioner training needs one report per image: {len(inputs)} images, {len(ids)} reports")

    def batch_loss(rng: np.random.Generator) -> torch.Tensor:
        idx = torch.as_tensor(rng.integers(0, len(ids), size=min(batch_size, len(ids))))
        x, y = inputs[idx], ids[idx]
        return caption_loss(model(x, y[:, :-1]), y[:, 1:], pad_id)

    return fit_steps(model, batch_loss, steps, lr, seed)


@torch.no_grad()
def greedy_decode(model: nn.Module, inputs: torch.Tensor, bos_id: int, eos_id: int, max_new_tokens: int,
                  batch_size: int = 64) -> list[list[int]]:
    """Greedy decoding (R2Gen's sample method with beam size 1): feed the prefix, append the arg-max, stop at EOS.
    A model with ``start(images)`` / ``next_logits(state, ids)`` is decoded incrementally (encoder run once, R2Gen's
    memory advanced one step per token); otherwise ``model(images, prefix)`` is called on the whole prefix."""
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        seq = torch.full((len(x), 1), bos_id, dtype=torch.long)
        done = torch.zeros(len(x), dtype=torch.bool)
        state = model.start(x) if hasattr(model, "start") else None
        for _ in range(max_new_tokens):
            logits = model(x, seq)[:, -1] if state is None else model.next_logits(state, seq)
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == eos_id
            if done.all():
                break
        for row in seq[:, 1:].tolist():
            out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


def write(model: nn.Module, tokenizer, inputs: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Reports for ``inputs`` by greedy decoding, as text."""
    ids = greedy_decode(model, inputs, tokenizer.bos_token_id, tokenizer.eos_token_id, max_new_tokens)
    return [" ".join(tokenizer.decode(r, skip_special_tokens=True).split()) for r in ids]


__all__ = ["PatchTokens", "causal_mask", "tokenize", "fit_steps", "caption_loss", "train_captioner", "greedy_decode",
           "write"]
