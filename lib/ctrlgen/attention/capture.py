"""Capture attention maps from a U-Net, in the style of DAAM (``with AttentionCapture(...) as store``).

Only the layers selected by map side get a capturing processor; every other layer keeps its own
processor (diffusers' SDPA ``AttnProcessor2_0`` by default). A capturing processor computes the
attention probabilities explicitly, ``softmax(Q K^T / sqrt(d))`` through ``attn.get_attention_scores``
(Eq. 3.1, Eq. 4.4), averages them over heads at once and adds them to a running sum per map side,
so memory is one (B, N, M) tensor per side and kind whatever the number of layers and heads.

Under classifier-free guidance the U-Net batch is ``[unconditional; conditional]``; set
``store.cfg_batch = True`` (the sampling loop does) and only the conditional half is computed
explicitly and stored, the unconditional half going through SDPA.

On exit (also after an exception) the original processors are put back and the hook is removed.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ctrlgen.attention.layers import PLACES, AttentionLayer, available_resolutions, latent_hw_of, select_layers

# Self-attention maps are N x N: at 64x64 a single map is 4096 x 4096 (64 MiB in float32 per image).
# Sides above this need ``allow_large_self=True``.
MAX_SELF_SIDE = 32


class AttentionStore:
    """Head-averaged attention maps of the last U-Net call (or, with ``accumulate``, of all calls).

    Maps are kept per kind ("cross", "self") and map side as a running sum over layers (and calls)
    with a count, so ``cross(16)`` is the mean over every captured 16x16 cross-attention layer.
    Shapes: cross ``(B, h, w, T)`` (T text tokens), self ``(B, h*w, h*w)`` (rows are query pixels).
    """

    def __init__(self, latent_hw: tuple[int, int], keep_grad: bool = False, accumulate: bool = False,
                 per_layer: bool = False):
        self.latent_hw = latent_hw
        self.keep_grad = keep_grad
        self.accumulate = accumulate
        self.per_layer = per_layer
        self.cfg_batch = False  # the batch is [uncond; cond]: store the conditional half only
        self.calls = 0
        self._sums: dict[tuple[str, int], torch.Tensor] = {}
        self._counts: dict[tuple[str, int], int] = {}
        self._sides: dict[tuple[str, int], tuple[int, int]] = {}
        self.layers: dict[str, torch.Tensor] = {}

    # -- filled by the processors ----------------------------------------------------------
    def clear(self) -> None:
        """Forget every stored map (called before each U-Net call unless ``accumulate``)."""
        self._sums.clear()
        self._counts.clear()
        self.layers.clear()

    def _begin_call(self) -> None:
        if not self.accumulate:
            self.clear()
        self.calls += 1

    def add(self, kind: str, name: str, hw: tuple[int, int], maps: torch.Tensor) -> None:
        maps = maps if maps.dtype == torch.float64 else maps.float()
        if not self.keep_grad:
            maps = maps.detach()
        key = (kind, hw[0])
        if key in self._sums and self._sums[key].shape != maps.shape:
            raise RuntimeError(
                f"{kind}-attention maps of side {hw[0]} changed shape within one store "
                f"({tuple(self._sums[key].shape)} vs {tuple(maps.shape)}); clear the store between batches"
            )
        self._sums[key] = maps if key not in self._sums else self._sums[key] + maps
        self._counts[key] = self._counts.get(key, 0) + 1
        self._sides[key] = hw
        if self.per_layer:
            self.layers[name] = maps

    # -- read by methods -------------------------------------------------------------------
    def resolutions(self, kind: str) -> list[int]:
        """Map sides holding maps of ``kind``, largest first."""
        return sorted((r for k, r in self._sums if k == kind), reverse=True)

    def _get(self, kind: str, res: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
        have = self.resolutions(kind)
        if not have:
            raise KeyError(f"no {kind}-attention maps captured (was the U-Net called inside the context?)")
        if res is None:
            if len(have) > 1:
                raise KeyError(f"{kind}-attention maps at several sides {have}: say which with res=")
            res = have[0]
        if (kind, res) not in self._sums:
            raise KeyError(f"no {kind}-attention maps of side {res}; captured sides: {have}")
        key = (kind, res)
        return self._sums[key] / self._counts[key], self._sides[key]

    def cross(self, res: int | None = None) -> torch.Tensor:
        """Layer-mean cross-attention maps ``A_C`` of side ``res``: ``(B, h, w, T)``, each pixel's row sums to 1 over T."""
        maps, (h, w) = self._get("cross", res)
        return maps.reshape(maps.shape[0], h, w, maps.shape[-1])

    def self_attention(self, res: int | None = None) -> torch.Tensor:
        """Layer-mean self-attention maps ``A_S`` of side ``res``: ``(B, h*w, h*w)``, rows sum to 1."""
        return self._get("self", res)[0]

    def cross_by_res(self) -> dict[int, torch.Tensor]:
        """``{side: (B, h, w, T)}`` for every captured cross-attention side."""
        return {r: self.cross(r) for r in self.resolutions("cross")}

    def self_by_res(self) -> dict[int, torch.Tensor]:
        """``{side: (B, h*w, h*w)}`` for every captured self-attention side."""
        return {r: self.self_attention(r) for r in self.resolutions("self")}

    def count(self, kind: str, res: int) -> int:
        """How many layer maps (times calls) were averaged into ``kind`` at side ``res``."""
        return self._counts.get((kind, res), 0)


def _sdpa(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None) -> torch.Tensor:
    b = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    q = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    k = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    v = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, key.shape[1], b).view(b, attn.heads, -1, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=attn.scale)
    return out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)


def _explicit(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and head-averaged probabilities ``(B, N, M)``, computed explicitly."""
    b, n = query.shape[:2]
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, key.shape[1], b)
    q, k, v = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
    probs = attn.get_attention_scores(q, k, mask)  # (B*heads, N, M)
    out = attn.batch_to_head_dim(torch.bmm(probs, v))
    return out, probs.view(b, attn.heads, n, -1).mean(dim=1)


class CaptureProcessor:
    """Attention processor that computes ``softmax(QK^T/sqrt(d))`` explicitly and hands the head mean to a store.

    Follows diffusers' ``AttnProcessor`` step by step (group/spatial norms, residual, rescale) so the
    module output equals the SDPA processor's to floating-point precision.
    """

    def __init__(self, store: AttentionStore, layer: AttentionLayer):
        self.store = store
        self.layer = layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if attn.norm_q is not None or attn.norm_k is not None:
            raise TypeError(f"{self.layer.name}: attention with q/k normalisation layers is not supported by the "
                            "capturing processor (Stable Diffusion 1.x/2.x and the mini models have none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)

        b, n = query.shape[:2]
        lh, lw = self.store.latent_hw
        hw = (lh // self.layer.factor, lw // self.layer.factor)
        if hw[0] * hw[1] != n:
            raise RuntimeError(f"{self.layer.name}: {n} query pixels, expected {hw[0]}x{hw[1]} for latent {lh}x{lw}")
        if self.store.cfg_batch and b % 2 == 0 and attention_mask is None:
            half = b // 2
            out_u = _sdpa(attn, query[:half], key[:half], value[:half], None)
            out_c, maps = _explicit(attn, query[half:], key[half:], value[half:], None)
            out = torch.cat([out_u, out_c])
        else:
            out, maps = _explicit(attn, query, key, value, attention_mask)
        self.store.add(self.layer.kind, self.layer.name, hw, maps)

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionCapture:
    """Context manager that captures head-averaged attention maps of chosen layers.

    ``with AttentionCapture(unet, cross_res=(16,), self_res=(32,)) as store: unet(...)`` leaves
    ``store.cross(16)`` (B, 16, 16, T) and ``store.self_attention(32)`` (B, 1024, 1024) — the
    thesis's A_C and A_S (Eq. 3.1, Eq. 4.4) for a 64x64 latent (§3.4.1, §4.3.4).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (PEFT-wrapped or not).
        cross_res, self_res: map sides to capture (empty: none of that kind).
        places: which of "down", "mid", "up" blocks to capture from (``self_places`` overrides it for self-attention).
        keep_grad: keep the autograd graph of the maps (guidance losses, attention-alignment training losses).
        accumulate: sum maps over several U-Net calls instead of keeping the last call only.
        latent_size: latent side (int or (h, w)); defaults to ``unet.config.sample_size``.
        allow_large_self: permit self-attention sides above 32 (a 64x64 map is 4096x4096 per image).
        per_layer: also keep every layer's own map in ``store.layers`` (diagnostics).
    """

    def __init__(self, unet: torch.nn.Module, cross_res: Iterable[int] = (16,), self_res: Iterable[int] = (),
                 places: Sequence[str] = PLACES, self_places: Sequence[str] | None = None, keep_grad: bool = False,
                 accumulate: bool = False, latent_size: int | Sequence[int] | None = None,
                 allow_large_self: bool = False, per_layer: bool = False):
        self.unet = unet
        self.latent_hw = latent_hw_of(unet, latent_size)
        self.cross_res, self.self_res = tuple(int(r) for r in cross_res), tuple(int(r) for r in self_res)
        big = [r for r in self.self_res if r > MAX_SELF_SIDE]
        if big and not allow_large_self:
            raise ValueError(f"self-attention maps of side {big} are {big[0]**2}x{big[0]**2} per image; "
                             f"pass allow_large_self=True if that is really wanted")
        self.layers = select_layers(unet, "cross", self.cross_res, places, self.latent_hw) + select_layers(
            unet, "self", self.self_res, places if self_places is None else self_places, self.latent_hw)
        for kind, wanted in (("cross", self.cross_res), ("self", self.self_res)):
            got = {l.side(self.latent_hw)[0] for l in self.layers if l.kind == kind}
            missing = set(wanted) - got
            if missing:
                raise ValueError(f"no {kind}-attention layers of side {sorted(missing)} in the chosen places; "
                                 f"this U-Net has {kind}-attention at sides "
                                 f"{available_resolutions(unet, kind, self.latent_hw)} for latent {self.latent_hw}")
        self.store = AttentionStore(self.latent_hw, keep_grad=keep_grad, accumulate=accumulate, per_layer=per_layer)
        self._saved: list[tuple[Attention, Any]] = []
        self._hook = None

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None and tuple(sample.shape[-2:]) != self.latent_hw:
            raise RuntimeError(f"AttentionCapture was set up for a {self.latent_hw} latent but the U-Net got "
                               f"{tuple(sample.shape[-2:])}: pass latent_size=")
        self.store._begin_call()

    def __enter__(self) -> AttentionStore:
        try:
            for layer in self.layers:
                self._saved.append((layer.module, layer.module.processor))
                layer.module.set_processor(CaptureProcessor(self.store, layer))
            self._hook = self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        return self.store

    def _restore(self) -> None:
        for module, processor in reversed(self._saved):
            module.set_processor(processor)
        self._saved.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __exit__(self, *exc: Any) -> None:
        self._restore()

