"""One attention-processor base and one swap context manager: the attention extension point (DESIGN.md §3).

diffusers routes every ``Attention`` module through a *processor* (``attn.processor(attn, hidden_states,
...)``); its default ``AttnProcessor2_0`` does, in order: (1) **prepare** — spatial/group norm, flatten
a 4-D map to ``(B, N, C)``, project Q, K, V (Q/K norms per head where present); (2) **attend** —
``softmax(Q K^T / sqrt(d)) V`` per head (Eq. 3.1, Eq. 4.4), fused in ``scaled_dot_product_attention``;
(3) **finish** — output projection, dropout, back to 4-D, residual, rescale. ``AttentionProcessorBase``
does exactly these three steps with public helpers and no behaviour of its own, so a thesis method
overrides only step (2) (or a part of it):

* ``CaptureProcessor`` (``capture.py``): explicit probabilities (``probabilities``), head mean stored;
* ``KVRecordProcessor`` / ``KVInjectProcessor`` (``kv.py``): keep K, V / attend to stored K, V (§5.3.3);
* Prompt-to-Prompt's processor (``prompt_to_prompt.py``): edits the probabilities (Hertz et al., 2022).

``ProcessorSwap`` is the DAAM ``ObjectHooker`` idea on diffusers' processor slot: on entry it installs a
processor on each *selected* layer only (``layers.select_layers`` picks them from the U-Net's structure,
so every other layer keeps its own processor, SDPA by default) and registers a forward pre-hook on the
U-Net that reads the timestep of each call; on exit — also after an exception — it puts the original
processors back (the same objects) and removes the hook. Processors read ``swap.timestep`` and
``swap.step`` for the current call.

Chapter 3 (AttenCraft, §3.3.1–3.3.2) needs no processor of its own: cross-attention suppression,
self-attention enhancement and delta masking (Eq. 3.2–3.3) and the attention score (Eq. 3.4) act on
captured maps (``maps.suppress``, ``maps.self_enhance``, ``maps.delta_mask``, ``maps.attention_score``),
so its Stage I is an ``AttentionCapture(unet, cross_res=(16,), self_res=(32,))`` around one U-Net call
per timestep of 𝕋, and Stage II's L_attn (Eq. 3.7) reads the same capture with ``keep_grad=True``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ctrlgen.attention.layers import AttentionLayer, latent_hw_of


@dataclass
class Projected:
    """What ``prepare`` hands to ``attend``: Q ``(B, N, C)``, K and V ``(B, M, C)`` before the head split,
    plus what ``finish`` needs to undo the preparation (the residual and the 4-D shape, if any)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    residual: torch.Tensor
    shape4: tuple[int, int, int, int] | None
    mask: torch.Tensor | None  # the attention mask as the module got it (helpers prepare it per head)
    is_cross: bool

    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def n_queries(self) -> int:
        return self.query.shape[1]


class AttentionProcessorBase:
    """A diffusers attention processor made of overridable steps; unchanged it equals ``AttnProcessor2_0``.

    ``__call__`` = ``finish(attend(prepare(...)))``. Subclasses override ``attend(attn, p)`` (returning the
    merged-head output ``(B, N, C)``) and use the static helpers ``sdpa``, ``probabilities``,
    ``apply_probabilities``, ``split_heads``, ``merge_heads``. ``layer`` and ``swap`` are set by the
    ``ProcessorSwap`` that installed the processor (``None`` when used by hand).
    """

    def __init__(self, layer: AttentionLayer | None = None, swap: "ProcessorSwap | None" = None):
        self.layer = layer
        self.swap = swap

    @property
    def name(self) -> str:
        return self.layer.name if self.layer is not None else type(self).__name__

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        p = self.prepare(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.finish(attn, self.attend(attn, p), p)

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        """Step (2): the attention output ``(B, N, C)``; the base uses fused SDPA like ``AttnProcessor2_0``."""
        return self.sdpa(attn, p.query, p.key, p.value, p.mask)

    # -- step (1) ---------------------------------------------------------------------------------
    @staticmethod
    def prepare(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> Projected:
        """Norms, flattening and the Q/K/V projections of ``AttnProcessor2_0``, heads left merged."""
        residual, shape4 = hidden_states, None
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            shape4 = tuple(hidden_states.shape)
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        # diffusers normalises per head; a per-head norm commutes with the merge, so heads stay merged here
        split, merge = AttentionProcessorBase.split_heads, AttentionProcessorBase.merge_heads
        if attn.norm_q is not None:
            query = merge(attn, attn.norm_q(split(attn, query)))
        if attn.norm_k is not None:
            key = merge(attn, attn.norm_k(split(attn, key)))
        return Projected(query, key, value, residual, shape4, attention_mask, encoder_hidden_states is not None)

    # -- step (2) helpers -------------------------------------------------------------------------
    @staticmethod
    def split_heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, heads*d)`` → ``(B, heads, N, d)``."""
        return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    @staticmethod
    def merge_heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """``(B, heads, N, d)`` → ``(B, N, heads*d)``."""
        return x.transpose(1, 2).reshape(x.shape[0], -1, x.shape[1] * x.shape[-1])

    @staticmethod
    def sdpa(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fused ``softmax(Q K^T · scale) V`` per head (``F.scaled_dot_product_attention``), heads merged."""
        b = query.shape[0]
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, key.shape[1], b)
            mask = mask.view(b, attn.heads, -1, mask.shape[-1])
        split = AttentionProcessorBase.split_heads
        out = F.scaled_dot_product_attention(split(attn, query), split(attn, key), split(attn, value), attn_mask=mask,
                                             dropout_p=0.0, is_causal=False, scale=attn.scale)
        return AttentionProcessorBase.merge_heads(attn, out).to(query.dtype)

    @staticmethod
    def probabilities(attn: Attention, query: torch.Tensor, key: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """Explicit attention probabilities ``softmax(Q K^T / sqrt(d))`` (Eq. 3.1) ``(B, heads, N, M)``,
        through ``attn.get_attention_scores`` (its scale, mask and upcasting)."""
        b, n = query.shape[:2]
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, key.shape[1], b)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), mask)
        return probs.view(b, attn.heads, n, -1)

    @staticmethod
    def apply_probabilities(attn: Attention, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``P V`` for probabilities ``(B, heads, N, M)`` and values ``(B, M, C)``: ``(B, N, C)``."""
        b, h, n, m = probs.shape
        out = torch.bmm(probs.reshape(b * h, n, m), attn.head_to_batch_dim(value))
        return attn.batch_to_head_dim(out)

    # -- step (3) ---------------------------------------------------------------------------------
    @staticmethod
    def finish(attn: Attention, out: torch.Tensor, p: Projected) -> torch.Tensor:
        """Output projection, dropout, back to the input layout, residual and rescale (``AttnProcessor2_0``)."""
        out = attn.to_out[1](attn.to_out[0](out))
        if p.shape4 is not None:
            out = out.transpose(-1, -2).reshape(*p.shape4)
        if attn.residual_connection:
            out = out + p.residual
        return out / attn.rescale_output_factor


def call_timestep(args: tuple, kwargs: dict) -> int | None:
    """The timestep of a ``UNet2DConditionModel.forward(sample, timestep, ...)`` call (first element if batched)."""
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    return None if t is None else int(torch.as_tensor(t).flatten()[0].item())


class ProcessorSwap:
    """Context manager: processors on the selected layers, timestep/step tracking, restoration on exit.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (PEFT-wrapped or not).
        layers: the layers to swap (``layers.select_layers`` / ``attention_layers``); no other layer is touched.
        factory: ``factory(layer, swap) -> processor``; subclasses override ``make_processor`` instead.
        latent_size: the latent side the layers were chosen for (int or (h, w); default ``unet.config.sample_size``).
        check_latent: raise if the U-Net is called with another latent size (layer sides would be wrong).

    While entered, ``timestep`` is the timestep of the current (latest) U-Net call and ``step`` the index of
    the current denoising step: it starts at 0 and advances whenever a call brings a new timestep (so
    guidance calls at the same t stay in one step). A loop that knows its step index may assign
    ``swap.step = i`` instead; from then on the hook no longer advances it. ``calls`` counts U-Net calls.
    Nested swaps on the same layer: the inner one wins and puts the outer one's processor back on exit.
    """

    def __init__(self, unet: torch.nn.Module, layers: Sequence[AttentionLayer],
                 factory: Callable[[AttentionLayer, "ProcessorSwap"], Any] | None = None,
                 latent_size: int | Sequence[int] | None = None, check_latent: bool = False):
        self.unet = unet
        self.layers = list(layers)
        self.latent_hw = latent_hw_of(unet, latent_size)
        self.check_latent = check_latent
        self._factory = factory
        self.timestep: int | None = None
        self.calls = 0
        self._step = 0
        self._pinned = False
        self._saved: list[tuple[Attention, Any]] = []
        self._handle = None

    # -- what subclasses change -------------------------------------------------------------------
    def make_processor(self, layer: AttentionLayer) -> Any:
        """The processor installed on ``layer`` (default: the ``factory`` given to the constructor)."""
        if self._factory is None:
            raise TypeError(f"{type(self).__name__}: pass factory= or override make_processor")
        return self._factory(layer, self)

    def on_call(self, sample: torch.Tensor | None, timestep: int | None) -> None:
        """Called before every U-Net call, after ``timestep``/``step`` are updated (override to reset state)."""

    # -- step tracking ----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step, self._pinned = int(value), True

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if self.check_latent and sample is not None and tuple(sample.shape[-2:]) != self.latent_hw:
            raise RuntimeError(f"{type(self).__name__} was set up for a {self.latent_hw} latent but the U-Net got "
                               f"{tuple(sample.shape[-2:])}: pass latent_size=")
        t = call_timestep(args, kwargs)
        if not self._pinned and self.calls > 0 and t != self.timestep:
            self._step += 1
        self.timestep = t
        self.calls += 1
        self.on_call(sample, t)

    # -- enter / exit -----------------------------------------------------------------------------
    def __enter__(self) -> "ProcessorSwap":
        self.timestep, self.calls, self._step, self._pinned = None, 0, 0, False
        try:
            for layer in self.layers:
                self._saved.append((layer.module, layer.module.processor))
                layer.module.set_processor(self.make_processor(layer))
            self._handle = self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Put the original processors back and remove the hook (idempotent)."""
        for module, processor in reversed(self._saved):
            module.set_processor(processor)
        self._saved.clear()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __exit__(self, *exc: Any) -> None:
        self.restore()


__all__ = ["AttentionProcessorBase", "ProcessorSwap", "Projected", "call_timestep"]
