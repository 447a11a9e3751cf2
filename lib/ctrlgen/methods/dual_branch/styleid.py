"""StyleID-style style injection for the two-stage baseline of §5.3.3 (Chung et al., CVPR 2024, analogue).

The two-stage pipeline the thesis compares against first generates a *layout image* (stage 1), then
stylises it with a second, separate denoising pass (stage 2). StyleID's stage 2 keeps the content's
self-attention queries and swaps in the style's keys and values in the decoder layers:

    Q̃ = γ · Q^content + (1 − γ) · Q^stylised,    out = softmax(T · Q̃ (K^style)^T / sqrt(d)) V^style

(query preservation γ = 0.75 and attention temperature T = 1.5 are StyleID's defaults). ``QueryRecorder``
keeps the queries Q^content of the layout trajectory (stage 1) at every timestep, and ``StyleIDInjector``
applies the formula above in stage 2 with the K/V stored by the style reference's DDIM inversion
(``attention.KVRecorder``). Both are ``ProcessorSwap``s of ``AttentionProcessorBase`` subclasses that
override only the attention step, like every processor of the book.

With γ = 1 and T = 1 the stage-2 attention is exactly the dual-branch model's style branch
(layout queries, style K/V, Fig. 5.3) computed in a separate call: the tests use it as the by-hand
reference for the batched two-branch step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

from ctrlgen.attention import AttentionProcessorBase, KVSelection, KVStore, ProcessorSwap, Projected
from ctrlgen.attention.layers import AttentionLayer

STYLEID_GAMMA = 0.75        # StyleID's query preservation γ
STYLEID_TEMPERATURE = 1.5   # StyleID's attention temperature T


@dataclass
class QueryStore:
    """``{timestep: {layer name: Q}}`` with Q ``(B, N, C)`` before the head split (the last call at t wins)."""

    data: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def put(self, t: int, name: str, query: torch.Tensor) -> None:
        self.data.setdefault(int(t), {})[name] = query.detach()

    def get(self, t: int, name: str) -> torch.Tensor:
        try:
            return self.data[int(t)][name]
        except KeyError:
            raise KeyError(f"no recorded queries for timestep {t} at {name}; recorded timesteps: "
                           f"{sorted(self.data)[:8]}") from None


class QueryRecordProcessor(AttentionProcessorBase):
    """Ordinary self-attention (SDPA) that keeps the queries of the call under its timestep."""

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        self.swap.queries.put(self.swap.timestep, self.layer.name, p.query)
        return self.sdpa(attn, p.query, p.key, p.value, p.mask)


class StyleIDProcessor(AttentionProcessorBase):
    """softmax(T · Q̃ K_style^T / sqrt(d)) V_style with Q̃ = γ Q_content + (1 − γ) Q (module doc)."""

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        s = self.swap
        q_content = s.queries.get(s.timestep, self.layer.name).to(p.query)
        if q_content.shape != p.query.shape:
            raise RuntimeError(f"{self.name}: recorded content queries {tuple(q_content.shape)} do not match this "
                               f"call's {tuple(p.query.shape)} (same batch, prompts and CFG in both stages)")
        ks, vs = s.kv.get(s.timestep, self.layer.name, p.query.device, p.query.dtype)
        if ks.shape[0] not in (1, p.batch):
            raise RuntimeError(f"stored style keys have batch {ks.shape[0]}; expected 1 or {p.batch}")
        ks, vs = ks.expand(p.batch, -1, -1), vs.expand(p.batch, -1, -1)
        q = s.gamma * q_content + (1.0 - s.gamma) * p.query
        return self.sdpa(attn, s.temperature * q, ks, vs)  # temperature scales the logits Q K^T


class QueryRecorder(ProcessorSwap):
    """Record the self-attention queries of the selected layers at every U-Net call, keyed by its timestep."""

    def __init__(self, unet: torch.nn.Module, selection: KVSelection, queries: QueryStore | None = None,
                 latent_size: int | Sequence[int] | None = None):
        layers = selection.layers(unet, latent_size)
        if not layers:
            raise ValueError(f"no self-attention layers match {selection}")
        super().__init__(unet, layers, latent_size=latent_size)
        self.queries = queries if queries is not None else QueryStore()

    def make_processor(self, layer: AttentionLayer) -> QueryRecordProcessor:
        return QueryRecordProcessor(layer, self)


class StyleIDInjector(ProcessorSwap):
    """Stage 2 of the two-stage baseline: content queries (``QueryRecorder``) with style K/V (``KVRecorder``).

    Args:
        queries: the content trajectory's queries per timestep (same batch layout as the stage-2 calls).
        kv: the style reference's keys and values per timestep (batch 1 or the call's batch).
        gamma: query preservation γ (1: the content's queries only); temperature: T scaling the logits.
    """

    def __init__(self, unet: torch.nn.Module, queries: QueryStore, kv: KVStore, selection: KVSelection,
                 gamma: float = STYLEID_GAMMA, temperature: float = STYLEID_TEMPERATURE,
                 latent_size: int | Sequence[int] | None = None):
        if not 0.0 <= gamma <= 1.0 or temperature <= 0:
            raise ValueError(f"need 0 <= gamma <= 1 and temperature > 0, got gamma={gamma}, temperature={temperature}")
        layers = selection.layers(unet, latent_size)
        if not layers:
            raise ValueError(f"no self-attention layers match {selection}")
        super().__init__(unet, layers, latent_size=latent_size)
        self.queries, self.kv, self.gamma, self.temperature = queries, kv, float(gamma), float(temperature)

    def make_processor(self, layer: AttentionLayer) -> StyleIDProcessor:
        return StyleIDProcessor(layer, self)


__all__ = ["QueryStore", "QueryRecorder", "QueryRecordProcessor", "StyleIDInjector", "StyleIDProcessor",
           "STYLEID_GAMMA", "STYLEID_TEMPERATURE"]
