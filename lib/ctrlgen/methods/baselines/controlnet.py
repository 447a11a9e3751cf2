"""ControlNet baseline of Tables 4.5–4.7 (§4.4.4; chapter 5's mask-to-image baseline): mask → lesion image.

Zhang et al. (2023), "Adding Conditional Control to Text-to-Image Diffusion Models" (thesis §2, Fig. 2.15):
a trainable copy of the U-Net's encoder and middle block (diffusers' ``ControlNetModel.from_unet``)
reads the noisy latent, the text condition and a conditioning image c_f through a small conditioning
encoder, and adds its features to the *frozen* base U-Net's skip connections through **zero
convolutions** (1×1 convolutions with weights and biases initialised to zero):

    y = F(x; Θ_locked) + Z(F(x + Z(c; Θ_z1); Θ_trainable); Θ_z2)          Eq. (2.33) (Zhang et al., Eq. 2)

so before training the residuals are exactly zero and the model is the base model. Training follows
diffusers' ``examples/controlnet/train_controlnet.py``: the conditioning image is the mask as an RGB
image in [0, 1], the base U-Net, VAE and text encoder are frozen, the loss is the diffusion MSE against the
scheduler's target (ε, or v for the v-predicting mini models: the trainer's ``get_velocity``) on the ControlNet's
parameters only (AdamW), an optional share of empty prompts
(``--proportion_empty_prompts``, profile ``prompt_dropout``). It runs through the book's one trainer,
``ctrlgen.training.train_diffusion``, on a ``ControlledUNet`` (base U-Net + ControlNet).

Why a ``ControlledUNet`` instead of diffusers' ``StableDiffusionControlNetPipeline``: the book has one
sampling loop (``ctrlgen.sampling.text_to_image``: the same schedulers, classifier-free guidance and
seeding as every other row of the tables) and one trainer; a module that looks like a U-Net to both
(``forward(sample, t, encoder_hidden_states)``, ``config``) plugs ControlNet into them without a second
loop. The conditioning images are set on it for a batch (``condition``); under classifier-free
guidance (batch ``[uncond; cond]``) they are repeated, as the diffusers pipeline does
(``torch.cat([image] * 2)``). The conditioning encoder downsamples by the VAE's factor: diffusers'
channels (16, 32, 96, 256) for SD's 8×, their first three for the mini VAE's 4×.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel
from torch import nn

from ctrlgen.data.tensors import image_tensor
from ctrlgen.methods.baselines.unet_wrapper import ConditionedUNet, shuffled_batches
from ctrlgen.models.sd import SDComponents
from ctrlgen.sampling import text_to_image
from ctrlgen.training import TrainableParams, train_config_from, train_diffusion

CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNetModel default (three stride-2 convs: SD's 8×)


@dataclass(frozen=True)
class ControlNetConfig:
    """ControlNet training (profile ``gan_baselines.controlnet``; full: the thesis's §4.7.2 diffusion settings)."""

    train_steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    prompt_dropout: float = 0.0  # train_controlnet.py --proportion_empty_prompts
    conditioning_scale: float = 1.0  # residuals × this at sampling (the pipeline's controlnet_conditioning_scale)
    checkpoint_every: int = 0

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "ControlNetConfig":
        """From the profile section ``gan_baselines.controlnet``; ``overrides`` replace fields."""
        section = cfg["gan_baselines"]["controlnet"]
        names = list(cls.__dataclass_fields__)
        unknown = sorted((set(section) | set(overrides)) - set(names))
        if unknown:
            raise ValueError(f"ControlNetConfig: unknown setting(s) {unknown}; the fields are {', '.join(names)}")
        values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(section).items()}
        return cls(**{**values, **overrides})


def build_controlnet(base_model: SDComponents, seed: int = 0) -> ControlNetModel:
    """A ControlNet copied from ``base_model``'s U-Net (``ControlNetModel.from_unet``: encoder and middle block
    weights copied, zero convolutions zero), its conditioning encoder downsampling by the VAE's factor."""
    factor = base_model.vae_scale_factor
    n = int(round(math.log2(factor))) + 1
    if 2 ** (n - 1) != factor or n > len(CONDITIONING_CHANNELS):
        raise ValueError(f"ControlNet's conditioning encoder supports VAE factors 2, 4, 8; the base model has {factor}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the conditioning encoder's random convolutions
        net = ControlNetModel.from_unet(base_model.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[:n])
    return net.to(base_model.device)


class ControlledUNet(ConditionedUNet):
    """The frozen base U-Net with ControlNet residuals added: looks like a U-Net to the sampler and trainer.

    ``condition(images)`` sets the conditioning images ``(B, 3, H, W)`` in [0, 1] of the next calls; a call
    whose batch is a multiple k of B (classifier-free guidance: k = 2) repeats them k times."""

    setter = "condition(images)"

    def __init__(self, unet: nn.Module, controlnet: ControlNetModel, conditioning_scale: float = 1.0):
        super().__init__(unet)
        self.controlnet, self.conditioning_scale = controlnet, conditioning_scale

    condition = ConditionedUNet.set_inputs  # ControlNet's name: ``condition(images)`` sets the next calls' images
    cond = property(lambda self: self.inputs, doc="The conditioning images of the next calls (None until set).")

    def unet_kwargs(self, inputs: torch.Tensor, sample: torch.Tensor, timestep,
                    encoder_hidden_states: torch.Tensor) -> dict[str, Any]:
        """The ControlNet's residuals for the skip connections and the middle block (Eq. 2.33)."""
        cond = inputs
        if sample.shape[0] != cond.shape[0]:
            if sample.shape[0] % cond.shape[0]:
                raise ValueError(f"ControlledUNet: {cond.shape[0]} conditioning images for a batch of {sample.shape[0]}")
            cond = cond.repeat(sample.shape[0] // cond.shape[0], 1, 1, 1)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=cond.to(sample), conditioning_scale=self.conditioning_scale,
                                    return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def conditioning_images(masks: np.ndarray | torch.Tensor, side: int) -> torch.Tensor:
    """Binary masks ``(N, H, W)`` as ControlNet conditioning images: float ``(N, 3, H, W)`` in {0, 1}
    (the mask in every RGB channel, train_controlnet.py's [0, 1] conditioning transform)."""
    m = torch.as_tensor(np.asarray(masks))
    if m.ndim != 3 or len(m) == 0:
        raise ValueError(f"masks: expected a non-empty (N, H, W) array of 0/1 values, got shape {tuple(m.shape)}")
    if m.shape[-2:] != (side, side):
        raise ValueError(f"masks are {tuple(m.shape[-2:])} px; the base model draws {side}×{side} px images")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("masks must be binary (bool or 0/1); threshold probabilities first")
    return m.float()[:, None].expand(-1, 3, -1, -1).contiguous()


def _pixel_side(model: SDComponents) -> int:
    return int(model.unet.config.sample_size) * model.vae_scale_factor


def controlnet_batches(controlled: ControlledUNet, pixels: torch.Tensor, cond: torch.Tensor, ids: torch.Tensor,
                       batch_size: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless shuffled batches ``{pixel_values, input_ids}``; each batch's conditioning images are set on
    ``controlled`` as it is yielded (``train_diffusion`` draws a batch right before its U-Net call)."""
    for idx in shuffled_batches(len(pixels), batch_size, seed):
        controlled.condition(cond[idx])
        yield {"pixel_values": pixels[idx], "input_ids": ids[idx]}


def train_controlnet(base_model: SDComponents, images: np.ndarray, masks: np.ndarray, prompts: Sequence[str],
                     config: ControlNetConfig, seed: int = 0, output_dir: str = "", progress: bool = True,
                     train_config: Mapping[str, Any] | None = None) -> ControlNetModel:
    """Train a ControlNet on (image, mask, prompt) triples with ``base_model`` frozen; returns the ControlNet.

    ``images``: uint8 ``(N, S, S, 3)`` at the base model's pixel side S; ``masks``: binary ``(N, S, S)``;
    ``prompts``: one per image (or one for all). L = ‖u − F_θ(z_t, t, τ(y), c_f)‖² (Eq. 4.3 with the
    ControlNet residuals; the target u is the base model's scheduler's, ε or v = √ᾱ_t ε − √(1−ᾱ_t) z_0, built by
    ``train_diffusion``) on the ControlNet's parameters only. ``train_config``: extra ``TrainConfig`` fields
    (mixed precision, checkpointing), winning over the config's. Save with ``controlnet.save_pretrained``."""
    side = _pixel_side(base_model)
    pix = image_tensor(images)
    if pix.shape[-2:] != (side, side):
        raise ValueError(f"ControlNet training images are {tuple(pix.shape[-2:])} px; the base model draws {side} px")
    cond = conditioning_images(masks, side)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = prompts * len(pix) if len(prompts) == 1 else prompts
    if not (len(pix) == len(cond) == len(prompts)):
        raise ValueError(f"ControlNet needs one mask and one prompt per image: {len(pix)} images, {len(cond)} masks, "
                         f"{len(prompts)} prompts")
    tc = train_config_from(dict(steps=config.train_steps, lr=config.lr, weight_decay=config.weight_decay,
                                betas=tuple(config.adam_betas), eps=config.adam_eps, prompt_dropout=config.prompt_dropout,
                                checkpoint_every=config.checkpoint_every, output_dir=output_dir, seed=seed,
                                progress=progress), train_config)
    controlnet = build_controlnet(base_model, seed)
    base_model.unet.requires_grad_(False)
    base_model.text_encoder.requires_grad_(False)
    controlnet.requires_grad_(True).train()
    named = {f"controlnet.{n}": p for n, p in controlnet.named_parameters()}
    trainable = TrainableParams(named, [{"params": list(named.values()), "weight_decay": tc.weight_decay}], "controlnet")
    controlled = ControlledUNet(base_model.unet, controlnet)
    data = controlnet_batches(controlled, pix, cond, base_model.tokenize(prompts), config.batch_size, tc.seed)
    train_diffusion(dataclasses.replace(base_model, unet=controlled), data, tc, trainable)
    return controlnet.requires_grad_(False).eval()


@torch.no_grad()
def controlnet_generate(base_model: SDComponents, controlnet: ControlNetModel, masks: np.ndarray | torch.Tensor,
                        prompts: str | Sequence[str], num_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                        batch_size: int = 16, conditioning_scale: float = 1.0) -> torch.Tensor:
    """One image per binary mask ``(N, S, S)`` and prompt through the book's sampler (``text_to_image``: DDIM,
    classifier-free guidance), z_T from one CPU generator seeded ``seed`` batch after batch; float32
    ``(N, 3, S, S)`` in [0, 1] on the CPU."""
    cond = conditioning_images(masks, _pixel_side(base_model))
    prompts = [prompts] * len(cond) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(cond):
        raise ValueError(f"{len(prompts)} prompts for {len(cond)} masks")
    controlled = ControlledUNet(base_model.unet, controlnet.to(base_model.device).eval(), conditioning_scale)
    model = dataclasses.replace(base_model, unet=controlled)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(cond), batch_size):
        controlled.condition(cond[start:start + batch_size])
        out.append(text_to_image(model, prompts[start:start + batch_size], num_steps=num_steps,
                                 guidance_scale=guidance_scale, generator=gen).images)
    return torch.cat(out)


__all__ = ["ControlNetConfig", "ControlledUNet", "build_controlnet", "conditioning_images", "controlnet_batches",
           "train_controlnet", "controlnet_generate", "CONDITIONING_CHANNELS"]
