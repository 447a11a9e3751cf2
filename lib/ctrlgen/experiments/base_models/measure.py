"""What is measured and stored with each pretrained base model (``pretrain.json``): sample quality against the
held-out images, held-out training loss (ε or v, the model's own target), and the self-attention affinity of the true regions."""
from __future__ import annotations

import time
from typing import Any

import torch

from ctrlgen.analysis.quality import sample_distance
from ctrlgen.analysis.self_attention import affinity_table, summarize_affinity
from ctrlgen.data.domains import DomainData
from ctrlgen.data.tensors import image_tensor
from ctrlgen.models import diffusion_target
from ctrlgen.sampling import text_to_image


def generate(model, prompts: list[str], steps: int, guidance: float = 3.0, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """Text-to-image samples ``(N, 3, H, W)`` in [0, 1] (float32, CPU) with DDIM and classifier-free guidance:
    ``ctrlgen.sampling.text_to_image`` with the chapter-2 defaults (one noise stream per ``seed``)."""
    return text_to_image(model, prompts, num_steps=steps, guidance_scale=guidance, seed=seed, batch_size=batch).images


@torch.no_grad()
def heldout_noise_error(model, data: DomainData, timesteps=(250, 500, 750), seed: int = 0) -> dict[str, float]:
    """The held-out training loss L_rec (Eq. 4.3) at fixed timesteps and a fixed noise draw.

    ‖target − U-Net(z_t, t, y)‖² with the model's own target: ε for ε-prediction, v = √ᾱ_t ε − √(1−ᾱ_t) z_0
    for v-prediction (the mini models' zero-terminal-SNR schedule), as the training loop computes it.
    """
    x = image_tensor(data.heldout_images)
    z = model.encode_images(x)
    ids = model.tokenize(data.heldout_captions)
    emb = model.encode_ids(ids)
    sched = model.noise_scheduler()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        noise = torch.randn(z.shape, generator=gen)
        tt = torch.full((len(z),), t, dtype=torch.long)
        pred = model.unet(sched.add_noise(z, noise, tt), tt, encoder_hidden_states=emb).sample
        target = diffusion_target(sched, z, noise, tt)
        out[f"heldout loss t={t}"] = float(((pred - target) ** 2).mean())
    return out


def affinity_for(cfg, model, data: DomainData, places=("down", "mid", "up")):
    """``analysis.affinity_table`` of a model on the domain's held-out images (None without regions)."""
    if not data.has_regions:
        return None
    with torch.no_grad():
        z = model.encode_images(image_tensor(data.heldout_images))
    side = z.shape[-1]
    return affinity_table(model, z, model.tokenize(data.heldout_captions), torch.from_numpy(data.heldout_regions),
                          t=int(cfg["pretrain"]["measure"]["timestep"]), res=(side,), places=places, seed=int(cfg["seed"]))


def measure_model(cfg, model, data: DomainData, variant: str, progress: bool = False) -> dict[str, Any]:
    """Quality and structure figures stored with a pretrained model (``pretrain.json``)."""
    m = cfg["pretrain"]["measure"]
    seed = int(cfg["seed"])
    n = int(m["n_samples"])
    prompts = [data.heldout_captions[i % len(data.heldout_captions)] for i in range(n)]
    t0 = time.perf_counter()
    samples = generate(model, prompts, int(m["sample_steps"]), float(cfg["sampling"]["guidance_scale"]), seed=seed)
    sample_seconds = (time.perf_counter() - t0) / max(n, 1)
    # float (N, H, W, 3) in [0, 1]: what sample_distance reads as is (a tensor it would take as [-1, 1])
    dist = sample_distance(samples.permute(0, 2, 3, 1).numpy(), data.heldout_images, data.images,
                           int(m["feature_side"]), seed)
    out: dict[str, Any] = {f"SW1 {k}": v for k, v in dist.items()}
    out["seconds per sample"] = sample_seconds
    out.update(heldout_noise_error(model, data, seed=seed))
    table = affinity_for(cfg, model, data)
    if table is not None:
        out.update(summarize_affinity(table))
    return out


__all__ = ["generate", "heldout_noise_error", "affinity_for", "measure_model"]
