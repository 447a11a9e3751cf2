"""The denoising loop over diffusers schedulers with classifier-free guidance.

``sample`` runs DDIM, PNDM or DDPM (any diffusers scheduler with ``set_timesteps``/``step``),
applies classifier-free guidance ``o = o_u + s (o_c − o_u)`` to the U-Net output o (ε under ε-prediction,
v under v-prediction: guidance is linear in either, and the scheduler's ``step`` reads ``prediction_type``)
in one batched U-Net call, and calls an
optional *refiner* (``ctrlgen.guidance.GuidanceRefiner``) on the latent before the U-Net call of the
steps it is active on (Eq. 4.10: "only in the first 50% of the timesteps").

``text_to_image`` (``ctrlgen.sampling.pipeline``) is the one text-to-image entry point built on it:
prompts in, images out, in the image convention stated there (float32 ``(B, 3, H, W)`` in [0, 1] on the CPU).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from ctrlgen.progress import tqdm

from ctrlgen.attention.capture import AttentionStore


class Refiner(Protocol):
    """Refines z_t before the denoising step: ``refiner(unet, z_t, t, cond_embeddings, step_index) -> ẑ_t``,
    on the steps where ``refiner.active(step_index, num_steps)``."""

    def active(self, step_index: int, num_steps: int) -> bool: ...

    def __call__(self, unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor | int,
                 encoder_hidden_states: torch.Tensor, step_index: int) -> torch.Tensor: ...


@dataclass
class SampleOutput:
    """Final latents, the timesteps used, and (if asked) z_t before every step."""

    latents: torch.Tensor
    timesteps: list[int]
    trajectory: list[torch.Tensor] = field(default_factory=list)


def _step_kwargs(scheduler, generator: torch.Generator | None, eta: float) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kw = {}
    if "generator" in params:
        kw["generator"] = generator
    if "eta" in params:
        kw["eta"] = eta
    return kw


def predict_model_output(unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor,
                         uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, scheduler=None,
                         store: AttentionStore | None = None) -> torch.Tensor:
    """The U-Net's output at (z_t, t) — ε̂ for an ε-prediction model, v̂ for a v-prediction one (the mini models'
    zero-terminal-SNR schedule) — with classifier-free guidance (Ho & Salimans, 2022;
    ``o_u + s (o_c − o_u)``) when ``uncond`` is given and ``guidance_scale != 1``.

    Hand it to the scheduler (``scheduler.step(out, t, z).prev_sample``; ``.pred_original_sample`` for x̂_0):
    never read it as ε by hand. The batch sent to the U-Net is ``[unconditional; conditional]``; a capture
    ``store`` is told so, and keeps the conditional half only.
    """
    cfg = uncond is not None and guidance_scale != 1.0
    x = torch.cat([latents, latents]) if cfg else latents
    if scheduler is not None:
        x = scheduler.scale_model_input(x, t)
    if cfg:
        emb = torch.cat([uncond.expand(cond.shape[0], -1, -1).to(cond), cond])
    else:
        emb = cond
    if store is not None:
        store.cfg_batch = cfg
    out = unet(x, t, encoder_hidden_states=emb).sample
    if cfg:
        out_u, out_c = out.chunk(2)
        out = out_u + guidance_scale * (out_c - out_u)
    return out


predict_noise = predict_model_output  # the historical name (it returns ε only for ε-prediction models)


def sample(unet: torch.nn.Module, scheduler, latents: torch.Tensor, cond: torch.Tensor,
           uncond: torch.Tensor | None = None, *, num_steps: int = 50, guidance_scale: float = 7.5,
           refine: Refiner | None = None, store: AttentionStore | None = None,
           generator: torch.Generator | None = None, eta: float = 0.0, keep_trajectory: bool = False,
           callback: Callable[[int, int, torch.Tensor], None] | None = None, start_step: int = 0,
           progress: bool = True, stop_step: int | None = None) -> SampleOutput:
    """Denoise ``latents`` (z_T, unit-variance noise or an inverted latent) into z_0.

    Args:
        unet, scheduler: the model and a fresh diffusers scheduler (``SDComponents.scheduler("ddim")``).
        cond, uncond: text embeddings ``(B, L, D)`` and the empty prompt's ``(1, L, D)``.
        guidance_scale: classifier-free guidance scale s (1: no guidance, ``uncond`` unused).
        refine: called before the U-Net on the steps where ``refine.active(i, num_steps)``.
        store: an ``AttentionStore`` of an enclosing ``AttentionCapture`` (kept to the conditional half).
        start_step: skip the first steps (start from an intermediate latent at that step's timestep).
        stop_step: run only the steps ``i < stop_step`` and return z at ``timesteps[stop_step]`` (default: all);
            a later ``sample(..., start_step=stop_step)`` continues, e.g. on a bifurcated batch (§5.3.3).
        callback: ``callback(i, t, z_{t-1})`` after every step.
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
    timesteps = scheduler.timesteps
    if start_step == 0:
        latents = latents * scheduler.init_noise_sigma
    n = len(timesteps)
    refined = [refine is not None and refine.active(i, n) for i in range(n)]  # the refiner owns its step fraction
    kw = _step_kwargs(scheduler, generator, eta)
    trajectory: list[torch.Tensor] = []
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling", leave=False)):
        if i < start_step:
            continue
        if stop_step is not None and i >= stop_step:
            break
        if refined[i]:
            latents = refine(unet, latents, t, cond, i)
        if keep_trajectory:
            trajectory.append(latents.detach().clone())
        with torch.no_grad():
            out = predict_model_output(unet, latents, t, cond, uncond, guidance_scale, scheduler, store)
        latents = scheduler.step(out, t, latents, **kw).prev_sample
        if callback is not None:
            callback(i, int(t), latents)
    return SampleOutput(latents, [int(t) for t in timesteps], trajectory)


def initial_latents(batch: int, channels: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit Gaussian z_T ``(batch, channels, h, w)`` drawn on the CPU generator (same numbers on every device)."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, channels, h, w, generator=generator, dtype=torch.float32).to(device, dtype)


__all__ = ["Refiner", "SampleOutput", "sample", "predict_model_output", "predict_noise", "initial_latents"]
