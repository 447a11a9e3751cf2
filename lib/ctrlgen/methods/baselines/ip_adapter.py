"""IP-Adapter baseline of Tables 5.2–5.4 (§5.5.1): an image prompt through decoupled cross-attention.

Ye et al. (2023), "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models":
a frozen image encoder's global embedding is projected to N image-prompt tokens c_i (their ``ImageProjModel``:
a linear layer to N × d tokens and a LayerNorm), and every cross-attention layer of the frozen U-Net gets a
second, image-only attention with its own key and value projections W'_k, W'_v:

    Z_new = Attention(Q, K_t, V_t) + λ · Attention(Q, c_i W'_k, c_i W'_v)          (Ye et al., Eq. 5)

Only the projection and the W'_k, W'_v are trained, with the ordinary diffusion loss (Eq. 4.3; its target ε or v
from the base model's scheduler, built by ``train_diffusion``) on (image, text)
pairs whose image prompt is the training image itself; W'_k, W'_v start as copies of the text W_k, W_v (the
reference ``tutorial_train.py``). Under classifier-free guidance the unconditional half gets the tokens of a zero
embedding (the reference pipeline's ``uncond_image_prompt_embeds``). The thesis's IP-Adapter "learns from both mask
and image inputs": here it is trained and sampled on top of a frozen ControlNet (``ControlledUNet``) when one is
given, so the mask fixes the layout and the image prompt the style.

The image encoder is a callable ``images in [0, 1] -> (B, E)``: the paper's CLIP image encoder where a profile
provides one (:func:`clip_image_embedder`, a local folder); on the mini models, the base model's own VAE encoder
(:func:`vae_image_embedder`: the latent mean pooled to a small grid) — a stand-in the chapter states.

The decoupled attention is an ``AttentionProcessorBase`` subclass installed with a ``ProcessorSwap`` on the
cross-attention layers (the book's one extension point); the trainer is ``ctrlgen.training.train_diffusion`` and
the sampler ``ctrlgen.sampling.text_to_image``, through a module that looks like a U-Net (``ImagePromptedUNet``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ctrlgen.attention import AttentionProcessorBase, ProcessorSwap, Projected
from ctrlgen.attention.layers import AttentionLayer, attention_layers
from ctrlgen.data.tensors import image_tensor
from ctrlgen.methods.baselines.unet_wrapper import ConditionedUNet, shuffled_batches
from ctrlgen.models.sd import SDComponents, encode_latents
from ctrlgen.sampling import text_to_image
from ctrlgen.training import TrainableParams, train_config_from, train_diffusion

Embedder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class IPAdapterConfig:
    """IP-Adapter training and sampling (profile ``ch05.ip_adapter``; Ye et al.: AdamW lr 1e-4, weight decay 1e-2,
    4 image tokens, λ = 1 at inference)."""

    train_steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-2
    tokens: int = 4
    scale: float = 1.0

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "IPAdapterConfig":
        s = cfg["ch05"]["ip_adapter"]
        return cls(train_steps=int(s["train_steps"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                   weight_decay=float(s["weight_decay"]), tokens=int(s["tokens"]), scale=float(s["scale"]))


class IPAdapter(nn.Module):
    """The trainable parts: the image projection (N tokens, LayerNorm) and W'_k, W'_v of every cross-attention layer
    of ``unet`` (copies of its W_k, W_v at construction)."""

    def __init__(self, unet: nn.Module, embed_dim: int, tokens: int = 4):
        super().__init__()
        if tokens < 1 or embed_dim < 1:
            raise ValueError(f"IP-Adapter needs tokens >= 1 and embed_dim >= 1, got {tokens}, {embed_dim}")
        self.layers: list[AttentionLayer] = [layer for layer in attention_layers(unet) if layer.kind == "cross"]
        if not self.layers:
            raise ValueError("the U-Net has no cross-attention layer to adapt")
        self.tokens, self.dim = tokens, int(unet.config.cross_attention_dim)
        self.proj = nn.Linear(embed_dim, tokens * self.dim)
        self.norm = nn.LayerNorm(self.dim)
        self.to_k_ip, self.to_v_ip = nn.ModuleDict(), nn.ModuleDict()
        for layer in self.layers:
            attn = layer.module
            for target, source in ((self.to_k_ip, attn.to_k), (self.to_v_ip, attn.to_v)):
                lin = nn.Linear(source.in_features, source.out_features, bias=False)
                lin.weight.data.copy_(source.weight.data)
                target[self.key(layer.name)] = lin
        self.to(next(unet.parameters()).device)

    @staticmethod
    def key(name: str) -> str:
        return name.replace(".", "__")  # ModuleDict keys cannot hold dots

    def image_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """c_i ``(B, N, d)`` from image embeddings ``(B, E)``."""
        return self.norm(self.proj(embeds).view(len(embeds), self.tokens, self.dim))


class IPAttnProcessor(AttentionProcessorBase):
    """Decoupled cross-attention (Eq. 5 of Ye et al.): text attention + λ · attention over the image tokens."""

    def attend(self, attn: Attention, p: Projected) -> torch.Tensor:
        out = self.sdpa(attn, p.query, p.key, p.value, p.mask)
        s = self.swap
        if not p.is_cross or s.tokens is None or s.scale == 0:
            return out
        tokens = s.tokens_for(p.batch).to(p.query)
        k = self.swap.adapter.to_k_ip[IPAdapter.key(self.layer.name)](tokens)
        v = self.swap.adapter.to_v_ip[IPAdapter.key(self.layer.name)](tokens)
        return out + s.scale * self.sdpa(attn, p.query, k, v)


class IPAdapterSwap(ProcessorSwap):
    """Installs ``IPAttnProcessor`` on the adapter's cross-attention layers. ``set_embeds(e)`` sets the image prompt
    of the next calls: a call of batch B gets the tokens of ``e``; a call of batch 2B (classifier-free guidance,
    ``[uncond; cond]``) gets the zero embedding's tokens on its first half."""

    def __init__(self, unet: nn.Module, adapter: IPAdapter, scale: float = 1.0):
        super().__init__(unet, adapter.layers)
        self.adapter, self.scale = adapter, float(scale)
        self.tokens: torch.Tensor | None = None
        self.uncond: torch.Tensor | None = None

    def make_processor(self, layer: AttentionLayer) -> IPAttnProcessor:
        return IPAttnProcessor(layer, self)

    def set_embeds(self, embeds: torch.Tensor) -> None:
        self.tokens = self.adapter.image_tokens(embeds)
        self.uncond = self.adapter.image_tokens(torch.zeros_like(embeds))

    def tokens_for(self, batch: int) -> torch.Tensor:
        n = self.tokens.shape[0]
        if batch == n:
            return self.tokens
        if batch == 2 * n:
            return torch.cat([self.uncond, self.tokens])
        raise RuntimeError(f"IP-Adapter: image prompts for a batch of {n}, the U-Net got {batch}")


class ImagePromptedUNet(ConditionedUNet):
    """``unet`` (a U-Net or a ``ControlledUNet``) whose calls carry the image prompt set by ``prompt(images)``: the
    embeddings are projected inside ``forward`` so that the projection trains; the swap must be entered."""

    setter = "prompt(images)"

    def __init__(self, unet: nn.Module, adapter: IPAdapter, swap: IPAdapterSwap, embed: Embedder):
        super().__init__(unet)
        self.adapter, self.swap, self.embed = adapter, swap, embed

    # ``prompt(images)``: image prompts ``(B, 3, H, W)`` in [0, 1] of the next calls (ControlNet masks: set on ``unet``)
    prompt = ConditionedUNet.set_inputs
    images = property(lambda self: self.inputs, doc="The image prompts of the next calls (None until set).")

    def unet_kwargs(self, inputs: torch.Tensor, sample: torch.Tensor, timestep,
                    encoder_hidden_states: torch.Tensor) -> dict[str, Any]:
        """Sets the image tokens c_i on the swap's processors (Ye et al., Eq. 5); no extra U-Net arguments."""
        with torch.no_grad():
            embeds = self.embed(inputs.to(sample.device)).float()
        self.swap.set_embeds(embeds.to(sample.dtype))
        return {}


def vae_image_embedder(vae: nn.Module, grid: int = 4) -> Embedder:
    """Image embeddings from a (frozen) VAE encoder: the latent (mean), average-pooled to ``grid`` × ``grid``,
    flattened — the mini stand-in for IP-Adapter's CLIP image encoder."""
    def embed(images: torch.Tensor) -> torch.Tensor:
        z = encode_latents(vae, images.to(next(vae.parameters()).device) * 2 - 1)
        return F.adaptive_avg_pool2d(z, grid).flatten(1)
    return embed


def clip_image_embedder(folder: str) -> Embedder:
    """IP-Adapter's image encoder: ``CLIPVisionModelWithProjection`` ``image_embeds`` from a local folder."""
    model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True).eval()
    proc = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)

    def embed(images: torch.Tensor) -> torch.Tensor:
        pixels = proc(images=[im.permute(1, 2, 0).cpu().numpy() for im in images.clamp(0, 1)], return_tensors="pt",
                      do_rescale=False)["pixel_values"]
        return model(pixel_values=pixels).image_embeds
    return embed


def _batches(wrapper: ImagePromptedUNet, controlled: Any, pixels: torch.Tensor, cond: torch.Tensor | None,
             ids: torch.Tensor, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    for idx in shuffled_batches(len(pixels), batch_size, seed):
        wrapper.prompt((pixels[idx] + 1) / 2)  # the training image is its own image prompt
        if cond is not None:
            controlled.condition(cond[idx])
        yield {"pixel_values": pixels[idx], "input_ids": ids[idx]}


def train_ip_adapter(base_model: SDComponents, images: np.ndarray, prompts: Sequence[str] | str, config: IPAdapterConfig,
                     embed: Embedder, embed_dim: int, controlled: Any = None, masks: torch.Tensor | None = None,
                     seed: int = 0, progress: bool = False) -> IPAdapter:
    """Train an IP-Adapter on uint8 images ``(N, S, S, 3)`` with their prompts, the base model frozen; with a frozen
    ``controlled`` (``ControlledUNet``) and its conditioning images ``masks`` ``(N, 3, S, S)``, on top of it.
    Loss: Eq. (4.3) with the decoupled cross-attention (target ε or v: the base model's scheduler's); trained: the projection and W'_k, W'_v."""
    pix = image_tensor(images)
    side = int(base_model.unet.config.sample_size) * base_model.vae_scale_factor
    if pix.shape[-2:] != (side, side):
        raise ValueError(f"IP-Adapter training images are {tuple(pix.shape[-2:])} px; the base model draws {side} px")
    prompts = [prompts] * len(pix) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(pix) or (masks is not None and len(masks) != len(pix)):
        raise ValueError(f"IP-Adapter needs one prompt (and mask) per image: {len(pix)} images, {len(prompts)} prompts")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        adapter = IPAdapter(base_model.unet, embed_dim, config.tokens)
    base_model.unet.requires_grad_(False)
    base_model.text_encoder.requires_grad_(False)
    adapter.requires_grad_(True).train()
    named = {f"ip_adapter.{n}": p for n, p in adapter.named_parameters()}
    trainable = TrainableParams(named, [{"params": list(named.values()), "weight_decay": config.weight_decay}], "ip_adapter")
    tc = train_config_from(dict(steps=config.train_steps, lr=config.lr, weight_decay=config.weight_decay, seed=seed,
                                progress=progress), None)
    with IPAdapterSwap(base_model.unet, adapter, config.scale) as swap:
        wrapper = ImagePromptedUNet(controlled if controlled is not None else base_model.unet, adapter, swap, embed)
        data = _batches(wrapper, controlled, pix, masks, base_model.tokenize(prompts), config.batch_size, seed)
        train_diffusion(dataclasses.replace(base_model, unet=wrapper), data, tc, trainable)
    return adapter.requires_grad_(False).eval()


@torch.no_grad()
def ip_adapter_generate(base_model: SDComponents, adapter: IPAdapter, style_images: torch.Tensor, prompt: str,
                        embed: Embedder, controlled: Any = None, masks: torch.Tensor | None = None, scale: float = 1.0,
                        num_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                        batch_size: int = 16) -> torch.Tensor:
    """One image per image prompt ``(N, 3, S, S)`` in [0, 1] (and ControlNet conditioning image when ``controlled``
    is given) through ``text_to_image``; float32 ``(N, 3, S, S)`` in [0, 1] on the CPU."""
    if masks is not None and len(masks) != len(style_images):
        raise ValueError(f"{len(masks)} masks for {len(style_images)} image prompts")
    gen = torch.Generator().manual_seed(seed)
    out = []
    with IPAdapterSwap(base_model.unet, adapter.eval(), scale) as swap:
        wrapper = ImagePromptedUNet(controlled if controlled is not None else base_model.unet, adapter, swap, embed)
        model = dataclasses.replace(base_model, unet=wrapper)
        for start in range(0, len(style_images), batch_size):
            wrapper.prompt(style_images[start:start + batch_size])
            if masks is not None:
                controlled.condition(masks[start:start + batch_size])
            n = len(style_images[start:start + batch_size])
            out.append(text_to_image(model, [prompt] * n, num_steps=num_steps, guidance_scale=guidance_scale,
                                     generator=gen).images.cpu())
    return torch.cat(out)


__all__ = ["IPAdapterConfig", "IPAdapter", "IPAttnProcessor", "IPAdapterSwap", "ImagePromptedUNet",
           "vae_image_embedder", "clip_image_embedder", "train_ip_adapter", "ip_adapter_generate"]
