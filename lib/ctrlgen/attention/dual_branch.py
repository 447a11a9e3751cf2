"""Chapter 5's dual-branch style injection in one batched U-Net call (§5.3.3, Algorithm 3, Fig. 5.3).

Algorithm 3, Stage II: the style reference is DDIM-inverted while ``KVRecorder`` keeps the self-attention
keys K_s^style and values V_s^style of the decoder blocks at every timestep (line 8); generation starts
from z_T^style and is refined for layout and style on the early steps (lines 10–12); at the bifurcation
step (t = T/2) the latent is duplicated into a **layout branch** and a **style branch** (line 13). From
then on both branches run in ONE U-Net call, the batch read as ``groups x [layout, style]`` rows
(``[layout; style]`` without guidance, ``[∅ layout, ∅ style, c layout, c style]`` under classifier-free
guidance, as ``sampling.predict_noise`` builds it from latents ``interleave_branches(layout, style)``).
In every injected self-attention layer the style rows compute (line 16)

    out_style = softmax(Q_s^layout (K_s^style)^T / sqrt(d)) V_s^style

with the layout rows' queries of the same call and the stored style K/V of the current timestep, while
the layout rows keep their own self-attention (line 15) and every cross-attention layer is untouched.

Which layers: the thesis stores K/V "from the U-Net decoder blocks" and injects "at each self-attention
layer", so the default is every self-attention layer of the up blocks (``KVSelection(places=("up",))``);
``selection=KVSelection(places=("up",), resolutions=(32, 64))`` keeps only the high-resolution decoder
layers (StyleID's choice for SD), or ``places=("mid", "up")`` adds the mid block.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ctrlgen.attention.kv import KVInjector, KVSelection, KVStore, interleave_branches

DECODER_SELF_ATTENTION = KVSelection(places=("up",))


class DualBranchInjector(KVInjector):
    """``KVInjector`` with the thesis's two branches (0: layout, 1: style, queries from the layout branch) that
    starts injecting at ``bifurcation_step``.

    The step is the swap's step index (0 at the first U-Net call inside the context, advancing with each
    new timestep; a loop may set ``injector.step = i``). Before the bifurcation the batch holds the single
    shared latent and every layer runs ordinary self-attention. Guidance calls on the layout branch alone
    after the bifurcation (Eq. 5.10) go inside ``with injector.paused():``.
    """

    def __init__(self, unet: torch.nn.Module, store: KVStore, bifurcation_step: int = 0,
                 selection: KVSelection = DECODER_SELF_ATTENTION, latent_size: int | Sequence[int] | None = None):
        if bifurcation_step < 0:
            raise ValueError(f"bifurcation_step is a step index >= 0, got {bifurcation_step}")
        super().__init__(unet, store, selection, branches=2, style_branch=1, query_from=0, latent_size=latent_size)
        self.bifurcation_step = int(bifurcation_step)

    def injecting(self) -> bool:
        return self.active and self.step >= self.bifurcation_step

    @staticmethod
    def bifurcate(latents: torch.Tensor) -> torch.Tensor:
        """The shared latent ``(G, C, h, w)`` as the two-branch batch ``(2G, ...)``: both branches start equal."""
        return interleave_branches(latents, latents)


__all__ = ["DECODER_SELF_ATTENTION", "DualBranchInjector"]
