"""M²Trans — the Meshed-Memory Transformer (Cornia et al. 2020) as Miura et al. (2020) use it for radiology reports,
compact: a baseline of thesis Tables 6.3/6.4.

* **Memory-augmented encoder** (Cornia et al. Eq. 2): each encoder layer's self-attention attends over the visual
  tokens plus ``slots`` learned key and value vectors, ``K = [X W_k; M_k]``, ``V = [X W_v; M_v]`` (a priori
  knowledge not in the input); the outputs of all N encoder layers are kept.
* **Meshed decoder** (Eqs. 4–5): the decoder's cross-attention attends to every encoder layer's output and mixes
  them with learned gates, ``Σ_i α_i ⊙ C(X̃_i, Y)``, ``α_i = σ(W_i [Y; C(X̃_i, Y)] + b_i)``.
Trained with cross-entropy only: Miura et al.'s reinforcement-learning rewards (fact_ENTNLI and BERTScore) and their
CheXpert-trained image encoder are not reproduced (the chapter says so); greedy decoding (``captioning``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ctrlgen.methods.baselines.captioning import PatchTokens, causal_mask


class MemoryAttention(nn.Module):
    """Multi-head self-attention whose keys and values are extended by ``slots`` learned memory vectors."""

    def __init__(self, d_model: int, heads: int, slots: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        # Cornia et al. scale the memory slots by sqrt(d_k) and sqrt(m): initialise at unit variance per entry
        self.m_k = nn.Parameter(torch.randn(1, slots, d_model) / math.sqrt(d_model))
        self.m_v = nn.Parameter(torch.randn(1, slots, d_model) / math.sqrt(slots))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        # the memories enter after projection in the paper; here they join the inputs of the same projections
        k = torch.cat([x, self.m_k.expand(b, -1, -1)], 1)
        v = torch.cat([x, self.m_v.expand(b, -1, -1)], 1)
        return self.attn(x, k, v, need_weights=False)[0]


class MemoryEncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int, slots: int, dropout: float):
        super().__init__()
        self.attn = MemoryAttention(d_model, heads, slots, dropout)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d_model))
        self.n1, self.n2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.n1(x + self.drop(self.attn(x)))
        return self.n2(x + self.drop(self.ffn(x)))


class MeshedDecoderLayer(nn.Module):
    """Causal self-attention, meshed cross-attention over all encoder layers (gated sum), FFN."""

    def __init__(self, d_model: int, heads: int, ffn: int, n_encoder: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.cross = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.gates = nn.ModuleList(nn.Linear(2 * d_model, d_model) for _ in range(n_encoder))
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d_model))
        self.n1, self.n2, self.n3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, y, encoded: list[torch.Tensor], mask):
        y = self.n1(y + self.drop(self.self_attn(y, y, y, attn_mask=mask, need_weights=False)[0]))
        mixed = 0
        for gate, x in zip(self.gates, encoded):
            c = self.cross(y, x, x, need_weights=False)[0]
            mixed = mixed + torch.sigmoid(gate(torch.cat([y, c], -1))) * c
        y = self.n2(y + self.drop(mixed / math.sqrt(len(encoded))))
        return self.n3(y + self.drop(self.ffn(y)))


class M2Transformer(nn.Module):
    """``forward(images (B, C, H, W), ids (B, T)) → logits (B, T, vocab)`` (module doc)."""

    def __init__(self, vocab_size: int, channels: int, side: int, patch: int, d_model: int, layers: int, heads: int,
                 ffn: int, slots: int, max_length: int, dropout: float = 0.1):
        super().__init__()
        self.visual = PatchTokens(channels, side, patch, d_model)
        self.encoder = nn.ModuleList(MemoryEncoderLayer(d_model, heads, ffn, slots, dropout) for _ in range(layers))
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_length, d_model)
        self.decoder = nn.ModuleList(MeshedDecoderLayer(d_model, heads, ffn, layers, dropout) for _ in range(layers))
        self.head = nn.Linear(d_model, vocab_size)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, outs = self.visual(images), []
        for layer in self.encoder:
            x = layer(x)
            outs.append(x)
        return outs

    def _decode(self, ids: torch.Tensor, encoded: list[torch.Tensor]) -> torch.Tensor:
        y = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        mask = causal_mask(ids.shape[1], ids.device)
        for layer in self.decoder:
            y = layer(y, encoded, mask)
        return self.head(y)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self._decode(ids, self.encode(images))

    def start(self, images: torch.Tensor) -> dict:
        """Decoding state: every encoder layer's output, computed once (``captioning.greedy_decode``)."""
        return {"encoded": self.encode(images)}

    def next_logits(self, state: dict, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the next token after ``ids`` (``forward(images, ids)[:, -1]`` without re-encoding)."""
        return self._decode(ids, state["encoded"])[:, -1]


__all__ = ["MemoryAttention", "MemoryEncoderLayer", "MeshedDecoderLayer", "M2Transformer"]
