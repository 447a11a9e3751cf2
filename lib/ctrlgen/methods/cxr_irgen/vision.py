"""The vision module of CXR-IRGen (§6.3.1, Eq. 6.1): text embedding + reference image embedding (RIE).

ε_θ(z_t, t, τ_t(y_t), τ_i(y_i)) (Eq. 6.1) conditions the backbone on the prompt's text embedding τ_t(y_t)
``(B, L, D)`` and the reference image's embedding τ_i(y_i) ``(B, D)``, combined by ``combine_embeddings``:

* ``concat`` (the U-Net backbone) — the image embedding becomes one extra token: ``(B, L + 1, D)``;
* ``mean`` (the U-ViT backbone) — every text token is averaged with it: ``(t_l + e) / 2``, ``(B, L, D)``;
* ``none`` — the text embedding alone (the "without RIE" rows).

The unconditional branch of classifier-free guidance is the same combination of the empty prompt with a zero
image embedding (the book's choice: the thesis does not say), which is also what a condition dropped during
finetuning becomes. The combined condition reaches the backbone through ``encoder_hidden_states``: the
training batches carry it (``ctrlgen.training.train_diffusion``) and ``ctrlgen.sampling.text_to_image`` takes it
as ``prompt_embeds`` — no second loop.

τ_i: CLIP's image encoder (``CLIPImageEmbedder``, full profile, a local folder) or, on the mini profiles, the
frozen domain VAE's latent, flattened and sent through a fixed seeded Gaussian projection to
``D`` (``LatentProjectionEmbedder``: a frozen encoder, as the thesis's is). Both are rescaled so that the image
embedding's norm equals the mean norm of a text token (the book's choice, so that neither part drowns the other).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ctrlgen.data.tensors import image_tensor
from ctrlgen.models.sd import SDComponents
from ctrlgen.sampling import text_to_image
from ctrlgen.training import TrainResult, select_trainable, train_config_from, train_diffusion

Combine = Literal["concat", "mean", "none"]
COMBINE_OF_BACKBONE = {"unet": "concat", "uvit": "mean"}


def combine_embeddings(text: torch.Tensor, image: torch.Tensor | None, mode: Combine) -> torch.Tensor:
    """Eq. (6.1)'s condition: ``text`` ``(B, L, D)`` with ``image`` ``(B, D)`` concatenated as one token
    (``concat``, U-Net), averaged into every token (``mean``, U-ViT), or left out (``none``)."""
    if mode == "none":
        return text
    if image is None:
        raise ValueError(f"combine mode {mode!r} needs an image embedding")
    if image.dim() != 2 or image.shape[0] != text.shape[0] or image.shape[1] != text.shape[2]:
        raise ValueError(f"image embedding {tuple(image.shape)} does not fit text embedding {tuple(text.shape)}: "
                         "expected (B, D) with the text's B and D")
    img = image.to(text)[:, None, :]
    if mode == "concat":
        return torch.cat([text, img], dim=1)
    if mode == "mean":
        return (text + img) / 2
    raise ValueError(f"unknown combine mode {mode!r}: concat, mean or none")


def _rescale(e: torch.Tensor, norm: float) -> torch.Tensor:
    return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-8) * norm


class LatentProjectionEmbedder:
    """Mini τ_i: the frozen VAE's latent, flattened, times a fixed seeded Gaussian matrix
    ``(C·h·w, D) / √(C·h·w)``, rescaled to ``norm`` (module doc)."""

    def __init__(self, model: SDComponents, dim: int, norm: float, seed: int = 0):
        self.model, self.dim, self.norm, self.seed = model, int(dim), float(norm), int(seed)
        self._proj: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """``images`` uint8 ``(N, H, W, 3)`` -> ``(N, D)`` on the CPU."""
        z = self.model.encode_dataset(images).flatten(1).float()
        if self._proj is None:
            g = torch.Generator().manual_seed(self.seed)
            self._proj = torch.randn(z.shape[1], self.dim, generator=g) / z.shape[1] ** 0.5
        return _rescale(z @ self._proj, self.norm)


class CLIPImageEmbedder:
    """Full τ_i: ``CLIPVisionModelWithProjection`` from a local folder (``image_embeds``), rescaled to ``norm``."""

    def __init__(self, folder: str | Path, norm: float, device: str = "cpu"):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP image encoder folder {folder} not found: expected a transformers "
                                    "CLIPVisionModelWithProjection folder (config.json, weights, preprocessor_config.json)")
        self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.norm, self.device = float(norm), device

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            pix = self.processor(images=list(images[i:i + batch_size]), return_tensors="pt").pixel_values
            out.append(self.encoder(pixel_values=pix.to(self.device)).image_embeds.cpu())
        return _rescale(torch.cat(out), self.norm)


@torch.no_grad()
def text_token_norm(model: SDComponents, prompts: Sequence[str]) -> float:
    """Mean norm of the text encoder's output tokens over ``prompts`` (the scale image embeddings are given)."""
    return float(model.encode_prompt(list(prompts)).norm(dim=-1).mean())


@dataclass
class Conditions:
    """Combined conditions of a set of images: ``cond`` ``(N, L', D)`` and the unconditional ``uncond`` ``(1, L', D)``."""

    cond: torch.Tensor
    uncond: torch.Tensor
    mode: str


@torch.no_grad()
def build_conditions(model: SDComponents, prompts: Sequence[str], ref_embeddings: torch.Tensor | None,
                     mode: Combine, batch_size: int = 256) -> Conditions:
    """Eq. (6.1) conditions for ``prompts`` with their references' embeddings ``(N, D)`` (a zero row for a
    label without reference), and the unconditional one (empty prompt, zero image embedding)."""
    text = torch.cat([model.encode_prompt(list(prompts[i:i + batch_size])).cpu() for i in range(0, len(prompts), batch_size)])
    empty = model.encode_prompt([""]).cpu()
    if mode == "none":
        return Conditions(text, empty, mode)
    if ref_embeddings is None or len(ref_embeddings) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts need as many reference embeddings, got "
                         f"{None if ref_embeddings is None else len(ref_embeddings)}")
    return Conditions(combine_embeddings(text, ref_embeddings, mode),
                      combine_embeddings(empty, torch.zeros(1, text.shape[-1]), mode), mode)


def reference_embeddings(pool_embeddings: torch.Tensor, indices: Sequence[int | None]) -> torch.Tensor:
    """Row ``indices[i]`` of the pool's embeddings, a zero row where there is no reference (None)."""
    out = torch.zeros(len(indices), pool_embeddings.shape[1])
    for i, j in enumerate(indices):
        if j is not None:
            out[i] = pool_embeddings[j]
    return out


def condition_batches(latents: torch.Tensor, conds: Conditions, batch_size: int, dropout: float,
                      seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches ``{"latents", "encoder_hidden_states"}``; with probability ``dropout`` a sample's
    condition is the unconditional one (text and image dropped together, for classifier-free guidance)."""
    rng = np.random.default_rng(seed)
    n = len(latents)
    while True:
        order = rng.permutation(n)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            idx = torch.as_tensor(order[start:start + batch_size])
            cond = conds.cond[idx].clone()
            drop = torch.as_tensor(rng.random(len(idx)) < dropout)
            cond[drop] = conds.uncond[0].to(cond)
            yield {"latents": latents[idx], "encoder_hidden_states": cond}


def finetune_backbone(model: SDComponents, latents: torch.Tensor, conds: Conditions, steps: int, batch_size: int,
                      lr: float, dropout: float = 0.1, seed: int = 0, output_dir: str = "",
                      train_config: Mapping[str, Any] | None = None, progress: bool = False) -> TrainResult:
    """Train ``model.unet`` (the U-Net or a ``UViT``) in place with L_LDM of Eq. (6.1) on the combined
    conditions; text and image encoders stay frozen (the embeddings are computed once). With ``output_dir``
    and a checkpoint there, a call with more ``steps`` continues the same run (the 5k → 10k rows)."""
    tc = train_config_from(dict(steps=steps, lr=lr, output_dir=output_dir, seed=seed, progress=progress), train_config)
    trainable = select_trainable(model.unet, model.text_encoder, mode="full", weight_decay=tc.weight_decay)
    result = train_diffusion(model, condition_batches(latents, conds, batch_size, dropout, seed), tc, trainable)
    model.unet.requires_grad_(False)
    return result


@torch.no_grad()
def generate(model: SDComponents, prompts: Sequence[str], conds: Conditions, num_steps: int, guidance_scale: float,
             seed: int = 0, batch_size: int = 64):
    """Images (and z_0, the "image embedding produced by the denoising backbone") for ``prompts`` under their
    combined conditions, through the one entry point ``text_to_image`` (``prompt_embeds``)."""
    images, latents = [], []
    for i in range(0, len(prompts), batch_size):
        out = text_to_image(model, list(prompts[i:i + batch_size]), num_steps=num_steps, guidance_scale=guidance_scale,
                            seed=seed + i, prompt_embeds=conds.cond[i:i + batch_size].to(model.device),
                            negative_prompt_embeds=conds.uncond.to(model.device))
        images.append(out.images)
        latents.append(out.latents.cpu())
    return torch.cat(images), torch.cat(latents)


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1]."""
    return image_tensor(images, signed=False)


__all__ = ["Combine", "COMBINE_OF_BACKBONE", "combine_embeddings", "LatentProjectionEmbedder", "CLIPImageEmbedder",
           "text_token_norm", "Conditions", "build_conditions", "reference_embeddings", "condition_batches",
           "finetune_backbone", "generate", "pixels"]
