"""DDIM inversion (DESIGN.md §3 layer 5; §5.3.3 "Style Reference Inversion and Initialization").

Runs the deterministic DDIM update backwards with diffusers' ``DDIMInverseScheduler``, from the
clean latent z_0 of a real image to z_T, returning the latent trajectory
``z_0, z_{t_1}, …, z_{t_N} = z_T`` and, with a ``KVRecorder``, the self-attention keys and values
of every step keyed by the same timesteps a DDIM sampler with as many steps will visit.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMInverseScheduler
from ctrlgen.progress import tqdm

from ctrlgen.attention.kv import KVRecorder, KVSelection, KVStore
from ctrlgen.models import schedule_kwargs
from ctrlgen.sampling import predict_model_output


@dataclass
class InversionOutput:
    """``latents[0]`` is z_0; ``latents[i + 1]`` is the latent at noise level ``timesteps[i]`` (ascending)."""

    latents: list[torch.Tensor]
    timesteps: list[int]
    kv: KVStore | None = None
    by_timestep: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def final(self) -> torch.Tensor:
        """z_T: the starting latent of a DDIM sampler over the same timesteps."""
        return self.latents[-1]

    def at(self, t: int) -> torch.Tensor:
        """z_t^style: the inverted latent at noise level t (a timestep the sampler visits)."""
        return self.by_timestep[int(t)]


def inverse_scheduler(config: Mapping[str, Any]) -> DDIMInverseScheduler:
    """``DDIMInverseScheduler`` on a model's noise schedule, matching ``make_scheduler("ddim", ...)``."""
    return DDIMInverseScheduler(**schedule_kwargs(config), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@torch.no_grad()
def ddim_invert(unet: torch.nn.Module, scheduler_config: Mapping[str, Any], latents: torch.Tensor, cond: torch.Tensor,
                num_steps: int = 50, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                record_kv: KVSelection | KVRecorder | None = None, progress: bool = True) -> InversionOutput:
    """Invert clean latents z_0 ``(B, C, h, w)`` to z_T with deterministic DDIM (η = 0).

    Args:
        scheduler_config: the model's noise schedule (``SDComponents.scheduler_config``).
        cond: text embedding of the image's prompt (the thesis inverts with it, guidance scale 1).
        record_kv: a ``KVSelection`` (or a prepared ``KVRecorder``) to store self-attention K/V per step.
    Returns the trajectory; ``ctrlgen.sampling.sample(..., latents=out.final)`` with a DDIM scheduler
    of ``num_steps`` steps and the same prompt approximately reconstructs z_0. Under a zero-terminal-SNR schedule
    (ᾱ_T = 0, trailing timesteps) the last step lands on t = T = 999 and z_T is the predicted noise itself.
    """
    sched = inverse_scheduler(scheduler_config)
    sched.set_timesteps(num_steps, device=latents.device)
    recorder = record_kv if isinstance(record_kv, KVRecorder) else (
        KVRecorder(unet, record_kv, latent_size=tuple(latents.shape[-2:])) if record_kv is not None else None)
    z = latents
    traj, ts = [z.clone()], []
    with recorder if recorder is not None else nullcontext():
        for t in tqdm(sched.timesteps, disable=not progress, desc="DDIM inversion", leave=False):
            # ε̂ or v̂: DDIMInverseScheduler.step reads prediction_type (v under the zero-terminal-SNR schedule)
            out = predict_model_output(unet, z, t, cond, uncond, guidance_scale)
            z = sched.step(out, t, z).prev_sample
            traj.append(z.clone())
            ts.append(int(t))
    return InversionOutput(traj, ts, recorder.store if recorder is not None else None,
                           {t: traj[i + 1] for i, t in enumerate(ts)})


__all__ = ["InversionOutput", "ddim_invert", "inverse_scheduler"]
