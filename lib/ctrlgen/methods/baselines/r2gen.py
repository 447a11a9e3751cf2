"""R2Gen (Chen et al. 2020, "Generating Radiology Reports via Memory-driven Transformer"), compact: a baseline of
thesis Tables 6.3/6.4.

* Encoder: a transformer encoder over the visual tokens (``captioning.PatchTokens``).
* **Relational memory** (RM, Chen et al. §2.2): a matrix of ``slots`` rows updated once per generated token.
  Step t: ``Z = MHA(Q = M W_q, K = [M; y] W_k, V = [M; y] W_v)``, ``M̃ = MLP(Z + M) + Z + M``, and gates
  ``G_f = σ(y W_f + tanh(M) U_f)``, ``G_i = σ(y W_i + tanh(M) U_i)``: ``M_t = G_f ⊙ M_{t−1} + G_i ⊙ tanh(M̃)``
  (y: the previous token's embedding, broadcast over slots).
* **Memory-driven conditional layer norm** (MCLN, §2.3): every layer norm of the decoder scales and shifts by
  ``γ + MLP_γ(m_t)``, ``β + MLP_β(m_t)``, ``m_t`` the flattened memory of step t.
* Decoder: transformer decoder layers (causal self-attention, cross-attention to the encoder, FFN) whose three
  layer norms are MCLNs. Trained with cross-entropy; greedy decoding (``captioning``).
Sizes are the profile's (R2Gen: d = 512, 3 layers, 8 heads, 3 memory slots).
"""
from __future__ import annotations

import torch
from torch import nn

from ctrlgen.methods.baselines.captioning import PatchTokens, causal_mask


class RelationalMemory(nn.Module):
    """R2Gen's relational memory: ``forward(tokens (B, T, d)) → memories (B, T, slots·d)``, one per step."""

    def __init__(self, d_model: int, slots: int, heads: int):
        super().__init__()
        self.slots, self.d = slots, d_model
        self.init = nn.Parameter(torch.eye(slots, d_model) if slots <= d_model else torch.randn(slots, d_model) * 0.02)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.w_gates = nn.Linear(d_model, 2 * d_model)           # y W_f, y W_i
        self.u_gates = nn.Linear(d_model, 2 * d_model, bias=False)  # tanh(M) U_f, tanh(M) U_i

    def step(self, memory: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One update ``M_{t−1}, y_{t−1} → M_t`` (module doc)."""
        kv = torch.cat([memory, y[:, None]], 1)
        z = self.attn(memory, kv, kv, need_weights=False)[0]
        proposal = self.mlp(z + memory) + z + memory
        gates = self.w_gates(y)[:, None] + self.u_gates(torch.tanh(memory))
        forget, inp = torch.sigmoid(gates).chunk(2, -1)
        return forget * memory + inp * torch.tanh(proposal)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.init[None].expand(tokens.shape[0], -1, -1)
        out = []
        for t in range(tokens.shape[1]):
            memory = self.step(memory, tokens[:, t])
            out.append(memory.flatten(1))
        return torch.stack(out, 1)


class MCLN(nn.Module):
    """Memory-driven conditional layer norm: LayerNorm with γ, β shifted by MLPs of the memory (Chen et al. §2.3)."""

    def __init__(self, d_model: int, memory_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.gamma, self.beta = nn.Parameter(torch.ones(d_model)), nn.Parameter(torch.zeros(d_model))
        self.d_gamma = nn.Sequential(nn.Linear(memory_dim, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.d_beta = nn.Sequential(nn.Linear(memory_dim, d_model), nn.ReLU(), nn.Linear(d_model, d_model))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (self.gamma + self.d_gamma(memory)) + self.beta + self.d_beta(memory)


class MemoryDecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer with MCLN in place of its three layer norms."""

    def __init__(self, d_model: int, heads: int, ffn: int, memory_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d_model))
        self.norms = nn.ModuleList(MCLN(d_model, memory_dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, y, encoded, memory, mask):
        h = self.norms[0](y, memory)
        y = y + self.drop(self.self_attn(h, h, h, attn_mask=mask, need_weights=False)[0])
        h = self.norms[1](y, memory)
        y = y + self.drop(self.cross_attn(h, encoded, encoded, need_weights=False)[0])
        return y + self.drop(self.ffn(self.norms[2](y, memory)))


class R2Gen(nn.Module):
    """``forward(images (B, C, H, W), ids (B, T)) → logits (B, T, vocab)`` (module doc)."""

    def __init__(self, vocab_size: int, channels: int, side: int, patch: int, d_model: int, layers: int, heads: int,
                 ffn: int, slots: int, max_length: int, dropout: float = 0.1):
        super().__init__()
        self.visual = PatchTokens(channels, side, patch, d_model)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, heads, ffn, dropout, batch_first=True,
                                                                        norm_first=True), layers,
                                             enable_nested_tensor=False)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_length, d_model)
        self.memory = RelationalMemory(d_model, slots, heads)
        self.layers = nn.ModuleList(MemoryDecoderLayer(d_model, heads, ffn, slots * d_model, dropout)
                                    for _ in range(layers))
        self.final = MCLN(d_model, slots * d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def _decode(self, ids: torch.Tensor, encoded: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        mask = causal_mask(ids.shape[1], ids.device)
        for layer in self.layers:
            y = layer(y, encoded, memory, mask)
        return self.head(self.final(y, memory))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self._decode(ids, self.encoder(self.visual(images)), self.memory(self.embed(ids)))

    def start(self, images: torch.Tensor) -> dict:
        """Decoding state: the encoded image and the memory before the first token (``captioning.greedy_decode``)."""
        b = images.shape[0]
        return {"encoded": self.encoder(self.visual(images)), "memory": self.memory.init[None].expand(b, -1, -1),
                "memories": []}

    def next_logits(self, state: dict, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the next token after ``ids``, advancing the relational memory by one step only (the memory of
        a prefix does not change when a token is appended), equal to ``forward(images, ids)[:, -1]``."""
        state["memory"] = self.memory.step(state["memory"], self.embed(ids[:, -1]))
        state["memories"].append(state["memory"].flatten(1))
        return self._decode(ids, state["encoded"], torch.stack(state["memories"], 1))[:, -1]


__all__ = ["RelationalMemory", "MCLN", "MemoryDecoderLayer", "R2Gen"]
