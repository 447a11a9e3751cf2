"""Training the mini VAE (chapter 2 pretraining): MSE + 0.5·L1 (+ 1e-6·KL for an ``AutoencoderKL``; the mini
``AutoencoderTiny`` is deterministic, as TAESD), then the latent scaling factor.

With ``output_dir`` and ``checkpoint_every`` the run writes atomic checkpoints (``ctrlgen.training.checkpoint``:
weights, optimizer, RNG state, loss history) and a re-run with the same config resumes from the newest one,
continuing the same batch stream (the data iterable must restart deterministically, as ``ctrlgen.data.batches.Batches`` does).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderTiny

from ctrlgen.models.sd import encode_latents
from ctrlgen.progress import tqdm

from ctrlgen.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ctrlgen.training.losses import vae_loss
from ctrlgen.training.loop import _cycle


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int
    lr: float = 1e-3
    l1_weight: float = 0.5
    kl_weight: float = 1e-6
    max_grad_norm: float = 1.0
    seed: int = 0
    progress: bool = True
    output_dir: str = ""        # checkpoints go here; "" = none
    checkpoint_every: int = 0
    keep_checkpoints: int = 2


@dataclass
class VAETrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    scaling_factor: float = 1.0
    resumed_from: int = 0


def train_vae(vae: torch.nn.Module, data: Iterable[dict[str, Any]], config: VAETrainConfig,
              device: str | torch.device = "cpu", scale_batches: int = 8) -> VAETrainResult:
    """Train an ``AutoencoderKL`` or ``AutoencoderTiny`` on batches with ``pixel_values`` (B, 3, H, W) in [-1, 1].

    Afterwards sets ``vae.config.scaling_factor`` to 1 / std of the latent means over
    ``scale_batches`` batches (the SD convention that makes latents unit-variance).
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    run_dir = Path(config.output_dir) if config.output_dir else None
    history: list[dict[str, float]] = []
    start = 0
    if run_dir is not None and (ckpt := latest_checkpoint(run_dir)) is not None:
        tensors, state, _ = load_checkpoint(ckpt)
        vae.load_state_dict(tensors)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["gen_rng"])
        history, start = list(state["history"]), int(state["step"])
    stream = _cycle(data)
    for _ in range(start):  # the batches the interrupted run already used
        next(stream)
    for step in tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not config.progress,
                     desc="VAE", leave=False):
        x = next(stream)["pixel_values"].to(device)
        z, kl = _training_latents(vae, x, gen if x.device.type == "cpu" else None)
        recon = vae.decode(z).sample
        loss = vae_loss(recon, x, kl, config.l1_weight, config.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
        opt.step()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        done = step + 1
        if run_dir is not None and config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
            state = {"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "gen_rng": gen.get_state(),
                     "history": history}
            save_checkpoint(run_dir, done, dict(vae.state_dict()), state, keep=config.keep_checkpoints)
    vae.eval().requires_grad_(False)
    scale = latent_scaling_factor(vae, data, scale_batches, device)
    vae.register_to_config(scaling_factor=scale)
    return VAETrainResult(config.steps, history, scale, start)


def _training_latents(vae: torch.nn.Module, x: torch.Tensor, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A posterior draw and its KL for an ``AutoencoderKL``; the latents and a zero KL for an ``AutoencoderTiny``."""
    if isinstance(vae, AutoencoderTiny):
        return vae.encode(x).latents, torch.zeros((), device=x.device)
    dist = vae.encode(x).latent_dist
    return dist.sample(gen), dist.kl()


@torch.no_grad()
def latent_scaling_factor(vae: torch.nn.Module, data: Iterable[dict[str, Any]], batches: int = 8,
                          device: str | torch.device = "cpu") -> float:
    """1 / std of the VAE's latent means over a few batches."""
    zs = []
    for i, batch in enumerate(data):
        if i >= batches:
            break
        zs.append(encode_latents(vae, batch["pixel_values"].to(device)).flatten())
    if not zs:
        raise ValueError("no batches to estimate the latent scale from")
    return float(1.0 / torch.cat(zs).std().clamp_min(1e-6))
