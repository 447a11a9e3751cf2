"""SD-finetune baseline of Table 4.1 (§4.4.2): the whole U-Net finetuned with L_rec only on one fixed
prompt, "An image of lesion on skin." — no placeholder tokens, no DermPrompt, no attention loss.
Same data, steps, batch, lr and optimizer as the region-aware model (§4.7.2), through
``ctrlgen.training.train_diffusion``. Pixel batches are flipped horizontally as the region-aware
finetuning's are, the prompt's side words with them (``ctrlgen.training.mirror_sides``; the thesis's
fixed prompt has none, so it never changes)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ctrlgen.data.tensors import image_tensor
from ctrlgen.models.sd import SDComponents
from ctrlgen.training import (
    TrainResult,
    flip_where,
    mirrored_ids,
    pick_where,
    random_flips,
    select_trainable,
    train_config_from,
    train_diffusion,
)

PROMPT = "An image of lesion on skin."


def fixed_prompt_batches(model: SDComponents, images: np.ndarray, prompt: str, batch_size: int, seed: int = 0,
                         hflip: bool = True, precompute_latents: bool = False) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches of ``images`` (uint8 ``(N, H, W, 3)``) all with one ``prompt``.

    ``precompute_latents``: yield the VAE latents encoded once (no flips), as the region-aware
    finetuning does with ``precompute_latents`` — the same data for both; otherwise pixels (the loop samples
    a latent per step, the SD convention)."""
    pix = image_tensor(images)
    lat = model.encode_dataset(pix) if precompute_latents else None
    ids, ids_mirrored = mirrored_ids(model.tokenize, [prompt])
    rng = np.random.default_rng(seed)
    n = len(pix)
    while True:
        order = rng.permutation(n)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            idx = torch.as_tensor(order[start:start + batch_size])
            if lat is not None:
                yield {"latents": lat[idx], "input_ids": ids.expand(len(idx), -1)}
                continue
            flip = random_flips(rng, len(idx)) if hflip else torch.zeros(len(idx), dtype=torch.bool)
            yield {"pixel_values": flip_where(flip, pix[idx]), "flipped": flip,
                   "input_ids": pick_where(flip, ids.expand(len(idx), -1), ids_mirrored.expand(len(idx), -1))}


def sd_finetune(model: SDComponents, images: np.ndarray, steps: int, batch_size: int, lr: float = 1e-5,
                weight_decay: float = 1e-2, prompt: str = PROMPT, seed: int = 0, output_dir: str = "",
                train_config: Mapping[str, Any] | None = None, progress: bool = True,
                precompute_latents: bool = False, adam_betas: tuple[float, float] = (0.9, 0.999),
                adam_eps: float = 1e-8) -> TrainResult:
    """Finetune ``model``'s U-Net in place on ``images`` with ``prompt`` (L_rec, Eq. 4.3).

    AdamW with ``adam_betas``/``adam_eps`` (profile ``didgen.finetune``, §4.7.2). ``train_config``: extra
    ``TrainConfig`` fields, winning over the arguments on a key both set (``ctrlgen.training.train_config_from``)."""
    tc = train_config_from(dict(steps=steps, lr=lr, weight_decay=weight_decay, betas=tuple(adam_betas), eps=adam_eps,
                                output_dir=output_dir, seed=seed, progress=progress), train_config)
    trainable = select_trainable(model.unet, model.text_encoder, mode="full", weight_decay=tc.weight_decay)
    data = fixed_prompt_batches(model, images, prompt, batch_size, tc.seed, precompute_latents=precompute_latents)
    result = train_diffusion(model, data, tc, trainable)
    model.unet.requires_grad_(False)
    return result


__all__ = ["PROMPT", "fixed_prompt_batches", "sd_finetune"]
