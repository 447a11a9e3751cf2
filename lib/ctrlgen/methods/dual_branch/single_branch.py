"""The single-branch ablation of §5.5.5 (Fig. 5.9): layout and style in ONE trajectory, no bifurcation.

The same steps as the dual-branch model (``generation``) up to the step where style injection starts; from
then on the one latent keeps its layout guidance (Eq. 5.10) and its decoder self-attention attends with its
OWN queries to the stored style K/V (``attention.KVInjector`` with one branch, ``query_from=None``), so
the layout the guidance draws and the style injection act on the same features — what the bifurcation is
there to avoid. The thesis does not say when injection starts in this variant: ``inject_from`` (a step
index, default the bifurcation step T/2) is the book's choice. The mask is annotated from the same
trajectory's end of denoising (Eq. 4.11/5.11, ``didgen.annotation_input``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ctrlgen.attention import KVInjector
from ctrlgen.methods.dual_branch.efficiency import UNetCalls
from ctrlgen.methods.dual_branch.generation import (
    DualBranchGenerator,
    DualBranchResult,
    StepRange,
    StyleReference,
)
from ctrlgen.sampling import decode_images, sample


class _PausedRefiner(StepRange):
    """A step-range refiner whose U-Net calls run with the injector paused (guidance reads plain attention)."""

    def __init__(self, inner, start: int, stop: int, injector: KVInjector):
        super().__init__(inner, start, stop)
        self.injector = injector

    def __call__(self, unet, latents, t, encoder_hidden_states, step_index):
        with self.injector.paused():
            return self.inner(unet, latents, t, encoder_hidden_states, step_index)


def single_branch_generate(generator: DualBranchGenerator, references: StyleReference | Sequence[StyleReference],
                           cond_masks: np.ndarray | torch.Tensor, prompts: Sequence[str] | str,
                           inject_from: int | None = None) -> DualBranchResult:
    """One trajectory: Eq. (5.9) before ``inject_from`` (default: the bifurcation step), then Eq. (5.10) with
    the latent's own queries attending to the style K/V (module doc). ``layout_images`` holds the same images
    (there is no separate layout branch)."""
    c, model, unet = generator.config, generator.model, generator.model.unet
    s = c.bifurcation_step if inject_from is None else int(inject_from)
    if not 0 <= s < c.num_steps:
        raise ValueError(f"inject_from must be a step index in [0, {c.num_steps}), got {s}")
    masks, prompts, pos, lasts, style = generator.prepare(references, cond_masks, prompts)
    b = c.bifurcation_step
    with torch.no_grad():
        cond, uncond = model.encode_prompt(prompts), model.encode_prompt([""])
    z_t = style.z_T.to(model.device, cond.dtype).clone()
    joint, late = generator.refiner(masks, pos, lasts, style), generator.refiner(masks, pos, lasts)
    common = dict(num_steps=c.num_steps, guidance_scale=c.guidance_scale, progress=False)

    def refine(start: int, stop: int, injector: KVInjector | None):
        """Eq. (5.9) before b, Eq. (5.10) from b on (if ``layout_guidance_after``), within [start, stop)."""
        parts = [(joint, max(start, 0), min(stop, b)),
                 (late, max(start, b), stop if c.layout_guidance_after else max(start, b))]
        parts = [(r, lo, hi) for r, lo, hi in parts if lo < hi]
        if injector is not None:
            return [_PausedRefiner(r, lo, hi, injector) for r, lo, hi in parts]
        return [StepRange(r, lo, hi) for r, lo, hi in parts]

    with UNetCalls(unet) as calls:
        z = sample(unet, model.scheduler("ddim"), z_t, cond, uncond, refine=_Chain(refine(0, s, None)), stop_step=s,
                   **common).latents
        with KVInjector(unet, style.kv, c.selection, branches=1, style_branch=0, query_from=None,
                        latent_size=tuple(z_t.shape[-2:])) as injector:
            injector.active = c.inject_style
            out = sample(unet, model.scheduler("ddim"), z, cond, uncond,
                         refine=_Chain(refine(s, c.num_steps, injector)), start_step=s, keep_trajectory=True, **common)
        calls.phase = "annotation"
        ann = generator.annotate(out.trajectory[-1], out.latents, out.timesteps[-1], prompts, pos)
    images = decode_images(model, out.latents)
    return DualBranchResult(images, images.clone(), ann["mask"], ann["mask_tau0"], masks.bool().cpu(), ann["ok"],
                            ann["fallback"], ann["failure"], prompts, calls.counts(), calls.rows(),
                            [*joint.history, *late.history])


class _Chain:
    """Step-range refiners with disjoint ranges as one refiner (the one active on a step refines it)."""

    def __init__(self, parts: Sequence[StepRange]):
        self.parts = list(parts)

    def active(self, step_index: int, num_steps: int) -> bool:
        return any(p.active(step_index, num_steps) for p in self.parts)

    def __call__(self, unet, latents, t, encoder_hidden_states, step_index):
        part = next(p for p in self.parts if p.active(step_index, 0))
        return part(unet, latents, t, encoder_hidden_states, step_index)


__all__ = ["single_branch_generate"]
