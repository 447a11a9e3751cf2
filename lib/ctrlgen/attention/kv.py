"""Self-attention key/value recording and injection (style injection, §5.3.3 and Fig. 5.3).

During DDIM inversion of the style reference, ``KVRecorder`` stores the self-attention keys
``K_s^style`` and values ``V_s^style`` of the chosen layers (the thesis: the U-Net decoder blocks)
for every timestep. During generation, ``KVInjector`` lets a *style branch* attend with the *layout
branch's* queries to the stored style keys and values:

    out_style = softmax(Q_layout K_style^T / sqrt(d)) V_style

while the layout branch keeps its ordinary self-attention. Both branches share one U-Net call:
the batch is read as ``groups x branches`` rows, ``[g0 b0, g0 b1, g1 b0, g1 b1, ...]`` — with
classifier-free guidance, groups are (unconditional, conditional) and branches are (layout, style).

The timestep of each U-Net call is read from the call itself (a forward pre-hook), so the loops
that drive the U-Net need not know about recording or injection.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ctrlgen.attention.layers import AttentionLayer, attention_layers, latent_hw_of


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


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, hd = q.shape[0], k.shape[-1] // attn.heads
    split = lambda x: x.view(x.shape[0], -1, attn.heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scale)
    return out.transpose(1, 2).reshape(b, -1, attn.heads * hd).to(q.dtype)


def _finish(attn: Attention, out: torch.Tensor, residual: torch.Tensor, shape4: tuple | None) -> torch.Tensor:
    out = attn.to_out[1](attn.to_out[0](out))
    if shape4 is not None:
        out = out.transpose(-1, -2).reshape(*shape4)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _prepare(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None):
    residual, shape4 = hidden_states, None
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        shape4 = tuple(hidden_states.shape)
        b, c, h, w = shape4
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape4


class _TimestepHook:
    """Forward pre-hook that remembers the timestep of the current U-Net call."""

    def __init__(self) -> None:
        self.t: int | None = None

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.t = int(torch.as_tensor(t).flatten()[0].item())


class _RecordProcessor:
    def __init__(self, owner: "KVRecorder", layer: AttentionLayer):
        self.owner, self.layer = owner, layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *a: Any, **kw: Any):
        x, residual, shape4 = _prepare(attn, hidden_states, temb)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        rows = self.owner.rows
        self.owner.store.put(self.owner.hook.t, self.layer.name, k[rows], v[rows])
        return _finish(attn, _attend(attn, q, k, v), residual, shape4)


class _InjectProcessor:
    def __init__(self, owner: "KVInjector", layer: AttentionLayer):
        self.owner, self.layer = owner, layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *a: Any, **kw: Any):
        o = self.owner
        x, residual, shape4 = _prepare(attn, hidden_states, temb)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        if not o.active:
            return _finish(attn, _attend(attn, q, k, v), residual, shape4)
        b, n, c = q.shape
        if b % o.branches:
            raise RuntimeError(f"batch {b} is not a multiple of {o.branches} branches")
        g = b // o.branches
        qg, kg, vg = (t.view(g, o.branches, n, -1) for t in (q, k, v))
        ks, vs = o.store.get(o.hook.t, self.layer.name, q.device, q.dtype)  # (Bs, N, C)
        if ks.shape[0] not in (1, g):
            raise RuntimeError(f"stored keys have batch {ks.shape[0]}; expected 1 or {g} (one per group)")
        ks, vs = ks.expand(g, -1, -1), vs.expand(g, -1, -1)
        outs = []
        for br in range(o.branches):
            if br == o.style_branch:
                src = br if o.query_from is None else o.query_from
                outs.append(_attend(attn, qg[:, src], ks, vs))
            else:
                outs.append(_attend(attn, qg[:, br], kg[:, br], vg[:, br]))
        out = torch.stack(outs, dim=1).reshape(b, n, -1)
        return _finish(attn, out, residual, shape4)


class _ProcessorSwap:
    """Shared enter/exit: set processors on layers, add a timestep hook, restore everything on exit."""

    def _make(self, layer: AttentionLayer) -> Any:
        """The processor for ``layer``; each subclass (recorder, injector) defines its own."""
        raise TypeError(f"{type(self).__name__} must define _make")  # only subclasses are instantiated

    def __init__(self, unet: torch.nn.Module, selection: KVSelection, latent_size: int | Sequence[int] | None):
        self.unet = unet
        self.layers = selection.layers(unet, latent_size)
        if not self.layers:
            raise ValueError(f"no self-attention layers match {selection}")
        self.hook = _TimestepHook()
        self._saved: list[tuple[Attention, Any]] = []
        self._handle = None

    def __enter__(self):
        try:
            for layer in self.layers:
                self._saved.append((layer.module, layer.module.processor))
                layer.module.set_processor(self._make(layer))
            self._handle = self.unet.register_forward_pre_hook(self.hook, with_kwargs=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, processor in reversed(self._saved):
            module.set_processor(processor)
        self._saved.clear()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class KVRecorder(_ProcessorSwap):
    """Record self-attention K/V of the selected layers at every U-Net call, keyed by its timestep.

    ``rows`` picks the batch rows to keep (default all; e.g. ``slice(1, 2)`` for the conditional
    half of a batch-1 CFG call). ``with KVRecorder(unet) as rec: ...; rec.store``.
    """

    def __init__(self, unet: torch.nn.Module, selection: KVSelection = KVSelection(), store: KVStore | None = None,
                 rows: slice = slice(None), latent_size: int | Sequence[int] | None = None):
        super().__init__(unet, selection, latent_size)
        self.store = store if store is not None else KVStore()
        self.rows = rows

    def _make(self, layer: AttentionLayer) -> Any:
        return _RecordProcessor(self, layer)


class KVInjector(_ProcessorSwap):
    """Inject stored style K/V into the style branch of a batched U-Net call (Fig. 5.3).

    Args:
        store: keys/values recorded by ``KVRecorder`` (batch 1, or one row per group).
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

    def _make(self, layer: AttentionLayer) -> Any:
        return _InjectProcessor(self, layer)


def interleave_branches(*branches: torch.Tensor) -> torch.Tensor:
    """Stack per-branch batches ``(G, ...)`` into the ``groups x branches`` batch ``(G*len(branches), ...)``."""
    return torch.stack(branches, dim=1).reshape(-1, *branches[0].shape[1:])


def split_branches(batch: torch.Tensor, branches: int = 2) -> list[torch.Tensor]:
    """Inverse of ``interleave_branches``."""
    g = batch.shape[0] // branches
    view = batch.reshape(g, branches, *batch.shape[1:])
    return [view[:, i] for i in range(branches)]
