"""The book's own small SD-architecture models (mini and smoke profiles).

Stable Diffusion's U-Net and text encoder classes — ``UNet2DConditionModel`` with CrossAttn down/up blocks
at every level, ``CLIPTextModel`` — at the sizes of ``models.mini`` in the profile (calibrated in
NOTES-mini-feasibility.md: 64x64 images, f = 4, 16x16x4 latents, a 4 M-parameter U-Net with cross-attention
at 16x16 and 8x8). Weights are random: ``ctrlgen pretrain`` trains them.

The VAE is diffusers' ``AutoencoderTiny`` (the TAESD architecture, Bohan 2023: a small drop-in for SD's VAE,
plain conv blocks without normalization layers), not a scaled-down ``AutoencoderKL``: at the mini widths
(32 channels, 32 GroupNorm groups) every GroupNorm of ``AutoencoderKL`` normalizes single channels or pairs and
erases per-image channel levels, and the trained VAE could not return an image's mean redness (issue 12,
chapter 2: round-trip colour-mean slope 0.0 on derm training images; 0.9–1.0 with ``AutoencoderTiny``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ctrlgen.models.sd import SDComponents


def mini_vae(spec: Mapping[str, Any]) -> AutoencoderTiny:
    """``AutoencoderTiny`` with one level per ``block_out_channels`` entry (f = 2^(levels − 1)) and
    ``blocks_per_level`` TAESD blocks at every level but the outermost (TAESD: 3; the outermost has 1)."""
    ch = tuple(int(c) for c in spec["block_out_channels"])
    n = int(spec["blocks_per_level"])
    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=int(spec["latent_channels"]),
        encoder_block_out_channels=ch, decoder_block_out_channels=ch[::-1],
        num_encoder_blocks=(1,) + (n,) * (len(ch) - 1), num_decoder_blocks=(n,) * (len(ch) - 1) + (1,),
        scaling_factor=1.0,
    )


def mini_unet(spec: Mapping[str, Any], latent_size: int, cross_attention_dim: int, latent_channels: int = 4) -> UNet2DConditionModel:
    ch = list(spec["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(ch), up_block_types=("CrossAttnUpBlock2D",) * len(ch),
        block_out_channels=tuple(ch), layers_per_block=int(spec["layers_per_block"]),
        transformer_layers_per_block=int(spec["transformer_layers_per_block"]),
        attention_head_dim=int(spec["attention_heads"]),  # diffusers' name for the number of heads
        cross_attention_dim=cross_attention_dim, norm_num_groups=int(spec["norm_num_groups"]),
    )


def mini_text_encoder(spec: Mapping[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=int(spec["hidden_size"]), intermediate_size=int(spec["intermediate_size"]),
        num_hidden_layers=int(spec["num_hidden_layers"]), num_attention_heads=int(spec["num_attention_heads"]),
        max_position_embeddings=int(spec["max_length"]), hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(cfg)


def build_mini_components(cfg: Mapping[str, Any], tokenizer: CLIPTokenizer, seed: int | None = None,
                          name: str = "mini") -> SDComponents:
    """Random-weight mini VAE, U-Net and text encoder from ``cfg.models`` (a profile or its ``models`` section).

    The tokenizer's ``model_max_length`` is set to ``models.mini.text_encoder.max_length``; the
    U-Net's ``cross_attention_dim`` is the text encoder width.
    """
    models = cfg["models"] if "models" in cfg else cfg
    mini = models["mini"]
    if seed is None:
        seed = int(cfg.get("seed", 0)) if hasattr(cfg, "get") else 0
    torch.manual_seed(seed)
    image_size = int(models["image_size"])
    tokenizer.model_max_length = int(mini["text_encoder"]["max_length"])
    vae = mini_vae(mini["vae"])
    factor = 2 ** (len(mini["vae"]["block_out_channels"]) - 1)
    te = mini_text_encoder(mini["text_encoder"], tokenizer)
    unet = mini_unet(mini["unet"], image_size // factor, int(mini["text_encoder"]["hidden_size"]),
                     int(mini["vae"]["latent_channels"]))
    sched = {k: mini["scheduler"][k] for k in mini["scheduler"]}
    return SDComponents(vae, unet, te, tokenizer, sched, name=name)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
