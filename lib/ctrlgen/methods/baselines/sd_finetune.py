"""SD-finetune baseline of Table 4.1 (§4.4.2): the whole U-Net finetuned with L_rec only on one fixed
prompt, "An image of lesion on skin." — no placeholder tokens, no DermPrompt, no attention loss.
Same data, steps, batch, lr and optimizer as the region-aware model (§4.7.2), through
``ctrlgen.training.train_diffusion``."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ctrlgen.data.tensors import image_tensor
from ctrlgen.models.sd import SDComponents
from ctrlgen.training import TrainConfig, TrainResult, select_trainable, train_diffusion

PROMPT = "An image of lesion on skin."


def fixed_prompt_batches(model: SDComponents, images: np.ndarray, prompt: str, batch_size: int, seed: int = 0,
                         hflip: bool = True, precompute_latents: bool = False) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches of ``images`` (uint8 ``(N, H, W, 3)``) all with one ``prompt``.

    ``precompute_latents``: yield the posterior-mean latents encoded once (no flips), as the region-aware
    finetuning does with ``precompute_latents`` — the same data for both; otherwise pixels (the loop samples
    a latent per step, the SD convention)."""
    pix = image_tensor(images)
    lat = model.encode_dataset(pix) if precompute_latents else None
    ids = model.tokenize([prompt])
    rng = np.random.default_rng(seed)
    n = len(pix)
    while True:
        order = rng.permutation(n)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            idx = torch.as_tensor(order[start:start + batch_size])
            if lat is not None:
                yield {"latents": lat[idx], "input_ids": ids.expand(len(idx), -1)}
                continue
            x = pix[idx]
            if hflip:
                flip = torch.as_tensor(rng.uniform(size=len(idx)) < 0.5)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield {"pixel_values": x, "input_ids": ids.expand(len(idx), -1)}


def sd_finetune(model: SDComponents, images: np.ndarray, steps: int, batch_size: int, lr: float = 1e-5,
                weight_decay: float = 1e-2, prompt: str = PROMPT, seed: int = 0, output_dir: str = "",
                train_config: Mapping[str, Any] | None = None, progress: bool = True,
                precompute_latents: bool = False) -> TrainResult:
    """Finetune ``model``'s U-Net in place on ``images`` with ``prompt`` (L_rec, Eq. 4.3)."""
    trainable = select_trainable(model.unet, model.text_encoder, mode="full", weight_decay=weight_decay)
    tc = TrainConfig(steps=steps, lr=lr, weight_decay=weight_decay, output_dir=output_dir, seed=seed,
                     progress=progress, **dict(train_config or {}))
    data = fixed_prompt_batches(model, images, prompt, batch_size, seed, precompute_latents=precompute_latents)
    result = train_diffusion(model, data, tc, trainable)
    model.unet.requires_grad_(False)
    return result


__all__ = ["PROMPT", "fixed_prompt_batches", "sd_finetune"]
