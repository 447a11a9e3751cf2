"""Self-attention key/value recording and injection (style injection, §5.3.3 and Fig. 5.3).

During DDIM inversion of the style reference, ``KVRecorder`` stores the self-attention keys
``K_s^style`` and values ``V_s^style`` of the chosen layers (the thesis: the U-Net decoder blocks)
for every timestep. During generation, ``KVInjector`` lets a *style branch* attend with the *layout
branch's* queries to the stored style keys and values:

    out_style = softmax(Q_layout K_style^T / sqrt(d)) V_style

while the layout branch keeps its ordinary self-attention. Both branches share one U-Net call:
the batch is read as ``groups x branches`` rows, ``[g0 b0, g0 b1, g1 b0, g1 b1, ...]`` — with
classifier-free guidance, groups are (unconditional, conditional) and branches are (layout, style).

The timestep of each U-Net call is read from the call itself (the forward pre-hook of
``processor.ProcessorSwap``), so the loops that drive the U-Net need not know about recording or
injection. Both processors override only the attention step of ``processor.AttentionProcessorBase``;
chapter 5's dual-branch generation (bifurcation at T/2) is ``dual_branch.DualBranchInjector``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

from ctrlgen.attention.layers import AttentionLayer, attention_layers, latent_hw_of
from ctrlgen.attention.processor import AttentionProcessorBase, ProcessorSwap, Projected


@dataclass(frozen=True)
class KVSelection:
    """Which self-attention layers are recorded / injected: places and map sides (empty: every side)."""

    places: tuple[str, ...] = ("up",)
    resolutions: tuple[int, ...] = ()

    def layers(self, unet: torch.nn.Module, latent_size: int | Sequence[int] | None = None) -> list[AttentionLayer]:
        hw = latent_hw_of(unet, latent_size)
        return [l for l in attention_layers(unet) if l.kind == "self" and l.place in self.places
                and (not self.resolutions or l.side(hw)[0] in self.resolutions)]


@dataclass
class KVStore:
    """``{timestep: {layer name: (K, V)}}`` with K and V of shape ``(B, N, C)`` (before the head split)."""

    offload: bool = False  # keep recorded tensors on the CPU (GPU memory bounded; copied back on use)
    data: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def put(self, t: int, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        key, value = key.detach(), value.detach()
        if self.offload:
            key, value = key.to("cpu", non_blocking=True), value.to("cpu", non_blocking=True)
        self.data.setdefault(int(t), {})[name] = (key, value)

    def get(self, t: int, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            k, v = self.data[int(t)][name]
        except KeyError:
            raise KeyError(f"no recorded keys/values for timestep {t} at {name}; recorded timesteps: "
                           f"{sorted(self.data)[:8]}{'...' if len(self.data) > 8 else ''}") from None
        return k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)

    @property
    def timesteps(self) -> list[int]:
        return sorted(self.data)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for layer in self.data.values() for k, v in layer.values())


class KVRecordProcessor(AttentionProcessorBase):
    """Self-attention as usual (SDPA), keeping K and V of the swap's ``rows`` under the current timestep."""

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        rec = self.swap
        rec.store.put(rec.timestep, self.layer.name, p.key[rec.rows], p.value[rec.rows])
        return self.sdpa(attn, p.query, p.key, p.value, p.mask)


class KVInjectProcessor(AttentionProcessorBase):
    """Self-attention of a ``groups x branches`` batch where the style branch attends to stored K/V (Fig. 5.3):

        out_style = softmax(Q_src K_style^T / sqrt(d)) V_style,   Q_src the ``query_from`` branch's queries,

    every other branch keeps its own self-attention; K/V are those stored for the current timestep.
    """

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        o = self.swap
        if not o.injecting():
            return self.sdpa(attn, p.query, p.key, p.value, p.mask)
        b, n, _ = p.query.shape
        if b % o.branches:
            raise RuntimeError(f"{self.name}: batch {b} is not a multiple of {o.branches} branches")
        g = b // o.branches
        qg, kg, vg = (t.view(g, o.branches, t.shape[1], -1) for t in (p.query, p.key, p.value))
        ks, vs = o.store.get(o.timestep, self.layer.name, p.query.device, p.query.dtype)  # (Bs, N, C)
        if ks.shape[0] not in (1, g):
            raise RuntimeError(f"stored keys have batch {ks.shape[0]}; expected 1 or {g} (one per group)")
        ks, vs = ks.expand(g, -1, -1), vs.expand(g, -1, -1)
        outs = []
        for br in range(o.branches):
            if br == o.style_branch:
                src = br if o.query_from is None else o.query_from
                outs.append(self.sdpa(attn, qg[:, src], ks, vs))
            else:
                outs.append(self.sdpa(attn, qg[:, br], kg[:, br], vg[:, br]))
        return torch.stack(outs, dim=1).reshape(b, n, -1)


class _KVSwap(ProcessorSwap):
    """Swap on the self-attention layers of a ``KVSelection``; the timestep comes from the swap's hook."""

    def __init__(self, unet: torch.nn.Module, selection: KVSelection, latent_size: int | Sequence[int] | None):
        layers = selection.layers(unet, latent_size)
        if not layers:
            raise ValueError(f"no self-attention layers match {selection}")
        super().__init__(unet, layers, latent_size=latent_size)


class KVRecorder(_KVSwap):
    """Record self-attention K/V of the selected layers at every U-Net call, keyed by its timestep.

    ``rows`` picks the batch rows to keep (default all; e.g. ``slice(1, 2)`` for the conditional
    half of a batch-1 CFG call). ``with KVRecorder(unet) as rec: ...; rec.store``.
    """

    def __init__(self, unet: torch.nn.Module, selection: KVSelection = KVSelection(), store: KVStore | None = None,
                 rows: slice = slice(None), latent_size: int | Sequence[int] | None = None):
        super().__init__(unet, selection, latent_size)
        self.store = store if store is not None else KVStore()
        self.rows = rows

    def make_processor(self, layer: AttentionLayer) -> KVRecordProcessor:
        return KVRecordProcessor(layer, self)


class KVInjector(_KVSwap):
    """Inject stored style K/V into the style branch of a batched U-Net call (§5.3.3, Fig. 5.3).

    Args:
        store: keys/values recorded by ``KVRecorder`` (batch 1, or one row per group).
        selection: the self-attention layers that inject (default: every decoder layer, the thesis's
            "U-Net decoder blocks"; ``KVSelection(resolutions=...)`` narrows it).
        branches: branches per group in the batch (2: layout, style).
        style_branch: the branch that attends to the stored keys/values.
        query_from: the branch whose queries the style branch uses (thesis: the layout branch, 0);
            ``None`` uses the style branch's own queries.
    Set ``injector.active = False`` to run every branch with ordinary self-attention.
    """

    def __init__(self, unet: torch.nn.Module, store: KVStore, selection: KVSelection = KVSelection(),
                 branches: int = 2, style_branch: int = 1, query_from: int | None = 0,
                 latent_size: int | Sequence[int] | None = None):
        super().__init__(unet, selection, latent_size)
        if not 0 <= style_branch < branches or (query_from is not None and not 0 <= query_from < branches):
            raise ValueError("style_branch and query_from must be branch indices")
        self.store, self.branches, self.style_branch, self.query_from = store, branches, style_branch, query_from
        self.active = True

    def injecting(self) -> bool:
        """Whether the current U-Net call injects (``active``; subclasses add conditions on the step)."""
        return self.active

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ordinary self-attention inside the block (e.g. guidance calls on the layout branch alone)."""
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    def make_processor(self, layer: AttentionLayer) -> KVInjectProcessor:
        return KVInjectProcessor(layer, self)


def interleave_branches(*branches: torch.Tensor) -> torch.Tensor:
    """Stack per-branch batches ``(G, ...)`` into the ``groups x branches`` batch ``(G*len(branches), ...)``."""
    return torch.stack(branches, dim=1).reshape(-1, *branches[0].shape[1:])


def split_branches(batch: torch.Tensor, branches: int = 2) -> list[torch.Tensor]:
    """Inverse of ``interleave_branches``."""
    g = batch.shape[0] // branches
    view = batch.reshape(g, branches, *batch.shape[1:])
    return [view[:, i] for i in range(branches)]
