"""Capture attention maps from a U-Net, in the style of DAAM (``with AttentionCapture(...) as store``).

Only the layers selected by map side get a capturing processor; every other layer keeps its own
processor (diffusers' SDPA ``AttnProcessor2_0`` by default). A capturing processor computes the
attention probabilities explicitly, ``softmax(Q K^T / sqrt(d))`` through ``attn.get_attention_scores``
(Eq. 3.1, Eq. 4.4), averages them over heads at once and adds them to a running sum per map side,
so memory is one (B, N, M) tensor per side and kind whatever the number of layers and heads.

Under classifier-free guidance the U-Net batch is ``[unconditional; conditional]``; set
``store.cfg_batch = True`` (the sampling loop does) and only the conditional half is computed
explicitly and stored, the unconditional half going through SDPA.

``CaptureProcessor`` overrides only the attention step of ``processor.AttentionProcessorBase`` and
``AttentionCapture`` is a ``processor.ProcessorSwap``: on exit (also after an exception) the original
processors are put back and the hooks are removed. Gradient checkpointing recomputes the U-Net's blocks in the
backward pass, after the U-Net call returned: the processors run again but record nothing then (``recording``
is on from the U-Net's forward pre-hook to its forward hook), so every map is stored once per call; the backward
pass must run inside the context, so that the recomputation runs the same processors as the forward pass. Chapter 3's suppression/enhancement (Eq. 3.2) need no
processor of their own: they are map operations on what this captures (``maps.suppress``,
``maps.self_enhance``).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
import torch
from diffusers.models.attention_processor import Attention

from ctrlgen.attention.layers import PLACES, AttentionLayer, available_resolutions, latent_hw_of, select_layers
from ctrlgen.attention.processor import AttentionProcessorBase, ProcessorSwap, Projected

# Self-attention maps are N x N: at 64x64 a single map is 4096 x 4096 (64 MiB in float32 per image).
# Sides above this need ``allow_large_self=True``.
MAX_SELF_SIDE = 32


class AttentionStore:
    """Head-averaged attention maps of the last U-Net call (or, with ``accumulate``, of all calls).

    Maps are kept per kind ("cross", "self") and map side as a running sum over layers (and calls)
    with a count, so ``cross(16)`` is the mean over every captured 16x16 cross-attention layer.
    Shapes: cross ``(B, h, w, T)`` (T text tokens), self ``(B, h*w, h*w)`` (rows are query pixels).
    ``timesteps`` lists the timestep of every U-Net call captured since the last ``clear``.
    With ``per_layer``, ``layers[name]`` holds each layer's head-mean map ``(B, N, M)``, or with
    ``per_head`` its per-head probabilities ``(B, heads, N, M)``.
    """

    def __init__(self, latent_hw: tuple[int, int], keep_grad: bool = False, accumulate: bool = False,
                 per_layer: bool = False, per_head: bool = False):
        self.latent_hw = latent_hw
        self.keep_grad = keep_grad
        self.accumulate = accumulate
        self.per_layer = per_layer or per_head
        self.per_head = per_head
        self.cfg_batch = False  # the batch is [uncond; cond]: store the conditional half only
        self.recording = True  # False after a U-Net call returned (checkpoint recomputation in backward)
        self.calls = 0
        self.timesteps: list[int | None] = []
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
        self.timesteps.clear()

    def begin_call(self, timestep: int | None = None) -> None:
        """Start a U-Net call at ``timestep``: forget the previous call's maps unless ``accumulate``."""
        if not self.accumulate:
            self.clear()
        self.calls += 1
        self.timesteps.append(timestep)

    def _kept(self, maps: torch.Tensor) -> torch.Tensor:
        maps = maps if maps.dtype == torch.float64 else maps.float()
        return maps if self.keep_grad else maps.detach()

    def add(self, kind: str, name: str, hw: tuple[int, int], maps: torch.Tensor,
            heads: torch.Tensor | None = None) -> None:
        """Add one layer's head-mean ``maps`` ``(B, N, M)`` (and, for ``per_head``, its ``heads``)."""
        maps = self._kept(maps)
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
            self.layers[name] = self._kept(heads) if self.per_head and heads is not None else maps

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


class CaptureProcessor(AttentionProcessorBase):
    """Attention processor that computes ``softmax(QK^T/sqrt(d))`` explicitly and hands the head mean to a store.

    Overrides only the attention step of ``AttentionProcessorBase`` (norms, residual and rescale are the
    base's, i.e. ``AttnProcessor2_0``'s), so the module output equals the SDPA processor's to
    floating-point precision.
    """

    def __init__(self, store: AttentionStore, layer: AttentionLayer, swap: ProcessorSwap | None = None):
        super().__init__(layer, swap)
        self.store = store

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        lh, lw = self.store.latent_hw
        hw = (lh // self.layer.factor, lw // self.layer.factor)
        if hw[0] * hw[1] != p.n_queries:
            raise RuntimeError(f"{self.layer.name}: {p.n_queries} query pixels, expected {hw[0]}x{hw[1]} "
                               f"for latent {lh}x{lw}")
        q, k, v, b = p.query, p.key, p.value, p.batch
        if self.store.cfg_batch and b % 2 == 0 and p.mask is None:
            # [uncond; cond]: the unconditional half is never read, so it stays on fused SDPA
            half = b // 2
            probs = self.probabilities(attn, q[half:], k[half:])
            out = torch.cat([self.sdpa(attn, q[:half], k[:half], v[:half]),
                             self.apply_probabilities(attn, probs, v[half:])])
        else:
            probs = self.probabilities(attn, q, k, p.mask)
            out = self.apply_probabilities(attn, probs, v)
        if self.store.recording:
            self.store.add(self.layer.kind, self.layer.name, hw, probs.mean(dim=1), heads=probs)
        return out


class AttentionCapture(ProcessorSwap):
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
        per_head: keep every layer's per-head probabilities ``(B, heads, N, M)`` in ``store.layers``.
    The capture object is the ``ProcessorSwap`` (its ``timestep`` and ``step`` follow the U-Net calls);
    ``store.timesteps`` has the timestep of each captured call.
    """

    def __init__(self, unet: torch.nn.Module, cross_res: Iterable[int] = (16,), self_res: Iterable[int] = (),
                 places: Sequence[str] = PLACES, self_places: Sequence[str] | None = None, keep_grad: bool = False,
                 accumulate: bool = False, latent_size: int | Sequence[int] | None = None,
                 allow_large_self: bool = False, per_layer: bool = False, per_head: bool = False):
        latent_hw = latent_hw_of(unet, latent_size)
        self.cross_res, self.self_res = tuple(int(r) for r in cross_res), tuple(int(r) for r in self_res)
        big = [r for r in self.self_res if r > MAX_SELF_SIDE]
        if big and not allow_large_self:
            raise ValueError(f"self-attention maps of side {big} are {big[0]**2}x{big[0]**2} per image; "
                             f"pass allow_large_self=True if that is really wanted")
        layers = select_layers(unet, "cross", self.cross_res, places, latent_hw) + select_layers(
            unet, "self", self.self_res, places if self_places is None else self_places, latent_hw)
        for kind, wanted in (("cross", self.cross_res), ("self", self.self_res)):
            got = {l.side(latent_hw)[0] for l in layers if l.kind == kind}
            missing = set(wanted) - got
            if missing:
                raise ValueError(f"no {kind}-attention layers of side {sorted(missing)} in the chosen places; "
                                 f"this U-Net has {kind}-attention at sides "
                                 f"{available_resolutions(unet, kind, latent_hw)} for latent {latent_hw}")
        super().__init__(unet, layers, latent_size=latent_hw, check_latent=True)
        self.store = AttentionStore(latent_hw, keep_grad=keep_grad, accumulate=accumulate, per_layer=per_layer,
                                    per_head=per_head)
        self._post_handle = None

    def make_processor(self, layer: AttentionLayer) -> CaptureProcessor:
        return CaptureProcessor(self.store, layer, self)

    def on_call(self, sample: torch.Tensor | None, timestep: int | None) -> None:
        self.store.begin_call(timestep)
        self.store.recording = True

    def _post_hook(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        # the call is over: a processor running now is gradient checkpointing's recomputation in backward
        self.store.recording = False

    def __enter__(self) -> AttentionStore:  # type: ignore[override]  # DAAM style: ``as store``
        super().__enter__()
        self.store.recording = True
        self._post_handle = self.unet.register_forward_hook(self._post_hook)
        return self.store

    def restore(self) -> None:
        """Put the original processors back and remove both hooks (idempotent)."""
        super().restore()
        if self._post_handle is not None:
            self._post_handle.remove()
            self._post_handle = None
