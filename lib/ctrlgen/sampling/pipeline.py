"""The one text-to-image entry point, in the shape of a diffusers pipeline's ``__call__``.

``text_to_image(model, prompts, ...)`` runs, for each batch of ``batch_size`` prompts:
1. check the inputs; 2. encode the prompts (the negative prompt once); 3. prepare z_T (drawn from
``generator`` batch after batch, or one z_T for every prompt with ``same_noise``, or given);
4. the denoising loop (``ctrlgen.sampling.loop.sample``: classifier-free guidance, an optional
refiner such as ``ctrlgen.guidance.GuidanceRefiner``, a callback, an attention store);
5. decode with the VAE; 6. post-process into the image convention below.

**Image convention at API boundaries** (every function of the book that returns generated or
edited images): float32 tensors ``(B, 3, H, W)`` with values in [0, 1], on the CPU. Inside, the VAE
reads and writes [-1, 1] (``SDComponents.encode_images``/``decode_latents``); data sets stay uint8
``(N, H, W, 3)`` arrays (``ctrlgen.data.tensors.image_tensor`` converts them). Latents stay latents:
``(B, C, h, w)``, scaled by the VAE's ``scaling_factor``, on the model's device.

Random numbers: z_T is drawn on a CPU ``torch.Generator`` (``initial_latents``), batch after batch
in prompt order, and the same generator is handed to the scheduler (DDPM draws from it; DDIM with
η = 0 does not), so a seed gives the same images on every device and for every batch split of the
prompts that keeps the batches.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ctrlgen.attention.capture import AttentionStore
from ctrlgen.models.sd import SDComponents
from ctrlgen.sampling.loop import Refiner, initial_latents, sample


@dataclass
class PipelineOutput:
    """``images``: float32 ``(B, 3, H, W)`` in [0, 1] on the CPU (None for ``output_type="latent"``);
    ``latents``: z_0 ``(B, C, h, w)`` on the model's device; ``noise``: the z_T used (before the
    scheduler's ``init_noise_sigma``); ``timesteps``: those of the denoising loop."""

    images: torch.Tensor | None
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: list[int] = field(default_factory=list)


@torch.no_grad()
def decode_images(model: SDComponents, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in the book's convention: float32 ``(B, 3, H, W)`` in [0, 1] on the CPU."""
    return ((model.decode_latents(latents).float().clamp(-1, 1) + 1) / 2).cpu()


def _check(prompts: Sequence[str], latents: torch.Tensor | None, batch_size: int, refiner: Refiner | None,
           output_type: str) -> None:
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if latents is not None and latents.shape[0] != len(prompts):
        raise ValueError(f"{latents.shape[0]} initial latents for {len(prompts)} prompts")
    if refiner is not None and batch_size < len(prompts):
        raise ValueError("a refiner holds per-sample data (masks, end positions) for one batch: call text_to_image "
                         f"once per batch, or use batch_size >= {len(prompts)}")
    if output_type not in ("pt", "latent"):
        raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")


def text_to_image(model: SDComponents, prompts: str | Sequence[str], *, num_steps: int = 50,
                  guidance_scale: float = 7.5, negative_prompt: str = "", seed: int = 0,
                  generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                  same_noise: bool = False, batch_size: int | None = None, scheduler: str = "ddim",
                  refiner: Refiner | None = None, callback: Callable[[int, int, torch.Tensor], None] | None = None,
                  store: AttentionStore | None = None, output_type: Literal["pt", "latent"] = "pt",
                  progress: bool = False, prompt_embeds: torch.Tensor | None = None,
                  negative_prompt_embeds: torch.Tensor | None = None) -> PipelineOutput:
    """Generate one image per prompt (module doc: steps, image convention, random numbers).

    Args:
        prompts: one prompt or a list.
        num_steps, guidance_scale, scheduler: sampling steps, classifier-free guidance scale s, and the
            scheduler name (ddim, pndm, ddpm; a fresh one per batch).
        seed, generator: z_T comes from ``generator`` when given (shared across calls), else from a new
            CPU generator seeded with ``seed``.
        latents: z_T ``(B, C, h, w)`` to start from instead of drawing (e.g. an inverted latent).
        same_noise: one z_T for every prompt (a row that differs only by its prompt).
        batch_size: prompts per U-Net batch (default: all at once).
        refiner: called on the latent before the U-Net on the steps it is active on (one batch only).
        callback: ``callback(i, t, z_{t-1})`` after every step (of every batch).
        store: the ``AttentionStore`` of an enclosing ``AttentionCapture`` (conditional half kept).
        output_type: "pt" (images and latents) or "latent" (no decoding).
        prompt_embeds, negative_prompt_embeds: conditions ``(B, L, D)`` / ``(1, L, D)`` given instead of
            encoding ``prompts`` / ``negative_prompt`` (as diffusers' pipelines take them; e.g. a text embedding
            combined with an image embedding, Eq. 6.1); ``prompts`` then only name the images.
    """
    # 1. check inputs
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch_size = batch_size or len(prompts)
    _check(prompts, latents, batch_size, refiner, output_type)
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    unet = model.unet
    channels, side = unet.config.in_channels, int(unet.config.sample_size)
    # 2. encode the negative (unconditional) prompt once
    if prompt_embeds is not None and len(prompt_embeds) != len(prompts):
        raise ValueError(f"{len(prompt_embeds)} prompt_embeds for {len(prompts)} prompts")
    with torch.no_grad():
        uncond = model.encode_prompt([negative_prompt]) if negative_prompt_embeds is None else negative_prompt_embeds
    if latents is None and same_noise:
        latents = initial_latents(1, channels, side, g, model.device, uncond.dtype).expand(len(prompts), -1, -1, -1).clone()
    z0s, noises, images, timesteps = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        # 2. encode the batch's prompts
        with torch.no_grad():
            cond = model.encode_prompt(chunk) if prompt_embeds is None else prompt_embeds[start:start + len(chunk)]
        # 3. prepare the initial latents z_T
        z = (latents[start:start + len(chunk)].to(model.device, cond.dtype) if latents is not None
             else initial_latents(len(chunk), channels, side, g, model.device, cond.dtype))
        # 4. denoising loop
        out = sample(unet, model.scheduler(scheduler), z, cond, uncond, num_steps=num_steps,
                     guidance_scale=guidance_scale, refine=refiner, store=store, generator=g, callback=callback,
                     progress=progress)
        z0s.append(out.latents)
        noises.append(z)
        timesteps = out.timesteps
        # 5. decode
        if output_type == "pt":
            images.append(decode_images(model, out.latents))
    # 6. post-process
    return PipelineOutput(torch.cat(images) if images else None, torch.cat(z0s), torch.cat(noises), timesteps)


__all__ = ["PipelineOutput", "decode_images", "text_to_image"]
