"""DreamBooth baseline of Table 4.1 (Ruiz et al., 2023): finetuning with prior preservation.

Instance images (the training lesions) with the instance prompt — the thesis uses
"An image of lesion on skin." for DreamBooth as for SD-finetune (§4.4.2) — and *class* images
generated beforehand by the frozen base model from a class prompt, trained together:

    L = L_rec(instance) + λ · L_rec(class)                                 (Ruiz et al., Eq. 2)

Each batch holds ``batch_size`` instance and ``batch_size`` class samples; per-sample weights 2 and
2λ in ``train_diffusion``'s mean give exactly the sum above. The whole U-Net is trained (as in the
paper's SD implementation without text-encoder training). The class prompt is this book's choice
(the thesis does not give it): profile ``didgen.baselines.dreambooth_class_prompt``.

No flips: instance and class images are drawn as they are (Ruiz et al.'s training uses none), so the
fixed prompts never disagree with the image.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ctrlgen.data.tensors import image_tensor
from ctrlgen.methods.baselines.sd_finetune import PROMPT
from ctrlgen.models.sd import SDComponents
from ctrlgen.sampling import text_to_image
from ctrlgen.training import TrainResult, select_trainable, train_config_from, train_diffusion

CLASS_PROMPT = "An image of skin."


def generate_class_images(model: SDComponents, class_prompt: str, n: int, num_steps: int, guidance_scale: float,
                          seed: int = 0, batch_size: int = 16) -> np.ndarray:
    """``n`` prior-preservation images from the *frozen* base model (DDIM, one noise stream per ``seed``), as
    training data: uint8 ``(n, H, W, 3)`` like the instance images they are trained beside."""
    if n < 1:
        raise ValueError(f"generate at least one class image (n={n})")
    x = text_to_image(model, [class_prompt] * n, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                      batch_size=batch_size).images
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def prior_batches(model: SDComponents, instance: np.ndarray, class_images: np.ndarray, instance_prompt: str,
                  class_prompt: str, batch_size: int, prior_weight: float, seed: int = 0,
                  precompute_latents: bool = False) -> Iterator[dict[str, Any]]:
    """Batches of ``batch_size`` instance + ``batch_size`` class images with weights 2 and 2λ
    (``precompute_latents``: their VAE latents, encoded once)."""
    pi, pc = image_tensor(instance), image_tensor(class_images)
    if pi.shape[1:] != pc.shape[1:]:
        raise ValueError(f"instance images {tuple(pi.shape[2:])} and class images {tuple(pc.shape[2:])} must have the "
                         "same size (generate the class images with the model being finetuned)")
    ids = torch.cat([model.tokenize([instance_prompt]).expand(batch_size, -1),
                     model.tokenize([class_prompt]).expand(batch_size, -1)])
    weights = torch.tensor([2.0] * batch_size + [2.0 * prior_weight] * batch_size)
    key = "pixel_values"
    if precompute_latents:
        pi, pc, key = model.encode_dataset(pi), model.encode_dataset(pc), "latents"
    rng = np.random.default_rng(seed)
    while True:
        a = torch.as_tensor(rng.integers(0, len(pi), batch_size))
        b = torch.as_tensor(rng.integers(0, len(pc), batch_size))
        yield {key: torch.cat([pi[a], pc[b]]), "input_ids": ids, "rec_weight": weights}


def dreambooth_finetune(model: SDComponents, images: np.ndarray, class_images: np.ndarray, steps: int,
                        batch_size: int, lr: float = 1e-5, weight_decay: float = 1e-2, prior_weight: float = 1.0,
                        instance_prompt: str = PROMPT, class_prompt: str = CLASS_PROMPT, seed: int = 0,
                        output_dir: str = "", train_config: Mapping[str, Any] | None = None,
                        progress: bool = True, precompute_latents: bool = False,
                        adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8) -> TrainResult:
    """Finetune ``model``'s U-Net in place with prior preservation (class images from ``generate_class_images``).

    AdamW with ``adam_betas``/``adam_eps`` (profile ``didgen.finetune``, §4.7.2). ``train_config``: extra
    ``TrainConfig`` fields, winning over the arguments on a key both set (``ctrlgen.training.train_config_from``)."""
    if len(class_images) == 0:
        raise ValueError("DreamBooth needs class images: generate_class_images(base model, class prompt, n, ...)")
    tc = train_config_from(dict(steps=steps, lr=lr, weight_decay=weight_decay, betas=tuple(adam_betas), eps=adam_eps,
                                output_dir=output_dir, seed=seed, progress=progress), train_config)
    trainable = select_trainable(model.unet, model.text_encoder, mode="full", weight_decay=tc.weight_decay)
    data = prior_batches(model, images, class_images, instance_prompt, class_prompt, batch_size, prior_weight, tc.seed,
                         precompute_latents)
    result = train_diffusion(model, data, tc, trainable)
    model.unet.requires_grad_(False)
    return result


__all__ = ["CLASS_PROMPT", "generate_class_images", "prior_batches", "dreambooth_finetune"]
