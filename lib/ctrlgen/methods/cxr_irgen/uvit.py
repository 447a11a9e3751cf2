"""A U-ViT backbone (Bao et al. 2023, "All are worth words") with the ``UNet2DConditionModel`` call signature.

Everything is a token: the timestep (one token), the condition (the ``encoder_hidden_states`` tokens, projected
to the width) and the latent's ``patch_size``² patches. ``depth // 2`` transformer blocks go in, one sits in the
middle, ``depth // 2`` come out; each out block first fuses its input with the output of the matching in block
(the *long skip*: ``Linear([h; skip])``, U-ViT's ``skip_linear``). The patch tokens are mapped back to pixels of
the latent and smoothed by a 3×3 convolution, as in U-ViT. ``forward(sample, timestep, encoder_hidden_states)``
returns an object with ``.sample``, so ``ctrlgen.sampling`` and ``ctrlgen.training`` drive it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


@dataclass
class UViTOutput:
    sample: torch.Tensor


class UViTBlock(nn.Module):
    """Pre-norm transformer block; with ``skip`` it first fuses ``[h; skip]`` back to the width (long skip)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, skip: bool):
        super().__init__()
        self.skip_linear = nn.Linear(2 * width, width) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(), nn.Linear(int(width * mlp_ratio), width))

    def forward(self, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            h = self.skip_linear(torch.cat([h, skip], dim=-1))
        x = self.norm1(h)
        h = h + self.attn(x, x, x, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class UViT(ModelMixin, ConfigMixin):
    """U-ViT denoiser built from its config (module doc): ε_θ(z_t, t, c), or v_θ under v-prediction (it learns the
    training loop's target, which follows the base model's scheduler)."""

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 4, out_channels: int = 4, patch_size: int = 2,
                 width: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: float = 4.0,
                 cross_attention_dim: int = 64, max_condition_tokens: int = 80):
        super().__init__()
        if depth % 2 or depth < 2:
            raise ValueError(f"U-ViT depth must be an even number >= 2 (in and out blocks pair up), got {depth}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        self.n_patches = (sample_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
        self.context_embed = nn.Linear(cross_attention_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + max_condition_tokens + self.n_patches, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.in_blocks = nn.ModuleList(UViTBlock(width, heads, mlp_ratio, False) for _ in range(depth // 2))
        self.mid_block = UViTBlock(width, heads, mlp_ratio, False)
        self.out_blocks = nn.ModuleList(UViTBlock(width, heads, mlp_ratio, True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, patch_size * patch_size * out_channels)
        self.final_layer = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    def _tokens(self, sample: torch.Tensor, timestep, context: torch.Tensor) -> torch.Tensor:
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        temb = self.time_embed(get_timestep_embedding(t, self.config.width, flip_sin_to_cos=True).to(sample.dtype))
        patches = self.patch_embed(sample).flatten(2).transpose(1, 2)
        if context.shape[1] > self.config.max_condition_tokens:
            raise ValueError(f"{context.shape[1]} condition tokens; this U-ViT takes at most {self.config.max_condition_tokens}")
        h = torch.cat([temb[:, None], self.context_embed(context), patches], dim=1)
        pos = torch.cat([self.pos_embed[:, :1 + context.shape[1]], self.pos_embed[:, -self.n_patches:]], dim=1)
        return h + pos

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **_ignored) -> UViTOutput | tuple[torch.Tensor]:
        """The prediction (ε̂ or v̂, as trained) ``(B, C, h, w)`` for latents ``sample`` at ``timestep`` under
        ``encoder_hidden_states`` ``(B, L, D)``."""
        h = self._tokens(sample, timestep, encoder_hidden_states)
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())        # long skip: the matching in block's output (last in, first out)
        patches = self.decoder_pred(self.norm(h))[:, -self.n_patches:]
        p, c, side = self.config.patch_size, self.config.out_channels, self.config.sample_size // self.config.patch_size
        x = patches.reshape(-1, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, side * p, side * p)
        out = self.final_layer(x)
        return UViTOutput(out) if return_dict else (out,)


__all__ = ["UViT", "UViTBlock", "UViTOutput"]
