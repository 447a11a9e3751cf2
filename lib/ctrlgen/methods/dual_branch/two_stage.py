"""The two-stage layout-then-style baseline of §5.3.3 and benchmark 3 (a ControlNet + StyleID analogue).

Stage 1 (layout, T denoising passes): the layout image is generated from z_T^style on the region-aware
model with exactly the guidance the dual-branch model's layout branch gets (Eq. 5.9 on the steps before the
bifurcation step, Eq. 5.10 after it), so that both pipelines draw the same layout and differ only in how
style is added; its decoder self-attention queries are recorded at every step (``QueryRecorder``).
Stage 2 (style, T more passes): a second DDIM trajectory from z_T^style in which the decoder self-attention
follows StyleID (``StyleIDInjector``): content queries of stage 1 (query preservation γ), the style
reference's inverted K/V, attention temperature T. StyleID also inverts the content image; here the
content image is stage 1's own output, whose queries are already recorded, so that inversion is not needed
and the baseline pays 2T denoising passes — the thesis's count ("two forward-backward processes", T vs
2T with the style inversion precomputed). StyleID starts from AdaIN(z_T^content, z_T^style); stage 1
started from z_T^style, so that initial latent is z_T^style itself.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ctrlgen.methods.dual_branch.efficiency import UNetCalls
from ctrlgen.methods.dual_branch.generation import (
    DualBranchGenerator,
    DualBranchResult,
    StepRange,
    StyleReference,
)
from ctrlgen.methods.dual_branch.styleid import QueryRecorder, StyleIDInjector
from ctrlgen.sampling import decode_images, sample


def two_stage_generate(generator: DualBranchGenerator, references: StyleReference | Sequence[StyleReference],
                       cond_masks: np.ndarray | torch.Tensor, prompts: Sequence[str] | str) -> DualBranchResult:
    """Layout image (stage 1), then StyleID-style injection into it (stage 2): module doc. Same config, model,
    checks, annotation (at the end of stage 1's denoising) and result type as ``DualBranchGenerator.generate``."""
    c, model, unet = generator.config, generator.model, generator.model.unet
    masks, prompts, pos, lasts, style = generator.prepare(references, cond_masks, prompts)
    b = c.bifurcation_step
    with torch.no_grad():
        cond, uncond = model.encode_prompt(prompts), model.encode_prompt([""])
    z_t = style.z_T.to(model.device, cond.dtype).clone()
    joint, late = generator.refiner(masks, pos, lasts, style), generator.refiner(masks, pos, lasts)
    common = dict(num_steps=c.num_steps, guidance_scale=c.guidance_scale, progress=False)
    side = tuple(z_t.shape[-2:])
    with UNetCalls(unet) as calls:
        # stage 1: the layout image, queries recorded (the last call at each t is the CFG denoising call)
        with QueryRecorder(unet, c.selection, latent_size=side) as recorder:
            head = sample(unet, model.scheduler("ddim"), z_t, cond, uncond, refine=StepRange(joint, 0, b),
                          stop_step=b, **common)
            tail = sample(unet, model.scheduler("ddim"), head.latents, cond, uncond,
                          refine=StepRange(late, b, c.num_steps) if c.layout_guidance_after else None,
                          start_step=b, keep_trajectory=True, **common)
        # stage 2: StyleID-style injection, a second trajectory
        with StyleIDInjector(unet, recorder.queries, style.kv, c.selection, c.styleid_gamma,
                             c.styleid_temperature, latent_size=side):
            styled = sample(unet, model.scheduler("ddim"), z_t, cond, uncond, **common)
        calls.phase = "annotation"
        ann = generator.annotate(tail.trajectory[-1], tail.latents, tail.timesteps[-1], prompts, pos)
    return DualBranchResult(decode_images(model, styled.latents), decode_images(model, tail.latents), ann["mask"],
                            ann["mask_tau0"], masks.bool().cpu(), ann["ok"], ann["fallback"], ann["failure"], prompts,
                            calls.counts(), calls.rows(), [*joint.history, *late.history])


__all__ = ["two_stage_generate"]
