"""Stage II of AttenCraft: feature-retaining training (Algorithm 1, lines 9–20; Eq. 3.6–3.8).

Each step draws a concept subset s (``SubsetSampler``: ω and the adaptive ratios), prompts
"a photo of <v_i> and <v_j>" for it, and trains only W_k, W_v of the cross-attention layers (§3.4.1, after
Kumari et al. 2023); the identifier tokens keep their class-name initialisation (``train_tokens`` trains
them too — a variant, labelled as its own). The loss is Eq. (3.8)::

    L = L_rec + α·L_attn   if |s| = 1        L = L_attn   if |s| > 1

with L_rec the masked reconstruction loss of Eq. (3.6) on the union mask M_s and L_attn Eq. (3.7), the mean
over the subset's tokens of ``‖A_C(v_i, z_t) − M_i‖²`` (pixel means, ``training.losses``) at the sides
``cross_res`` (the thesis does not state the side of L_attn; chapter 4 uses 16x16; here the profile's
``attention.train_cross_res``). ``rec_on_groups`` back-propagates L_rec for |s| > 1 too (Table 3.2's
"w/ L_rec" ablation). The loop is ``ctrlgen.training.train_diffusion``: ``rec_weight`` per sample switches
L_rec, ``FeatureRetainingTerm`` weights L_attn per sample.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctrlgen.methods.attencraft.masks import MaskSettings, StageOne, stage_one
from ctrlgen.methods.attencraft.sampling import RatioMode, SubsetSampler, sampling_ratios
from ctrlgen.methods.customization import Customized, add_identifiers, subset_batches, trainable_state
from ctrlgen.models.sd import SDComponents
from ctrlgen.training import LossContext, TrainResult, attention_alignment_loss, select_trainable, train_config_from, train_diffusion


@dataclass
class FeatureRetainingTerm:
    """The L_attn part of Eq. (3.8) per sample: ``α·L_attn`` when |s| = 1, ``L_attn`` when |s| > 1 (weight 1).

    Reads ``subset_size`` ``(B,)`` and the alignment keys (``token_indices``, ``token_masks``, ``token_valid``).
    """

    alpha: float = 0.01
    name: str = "attn"
    weight: float = 1.0
    needs_cross: bool = True
    needs_self: bool = False

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        b = ctx.batch
        maps = ctx.store.cross_by_res()
        per_sample = []
        for i in range(len(b["subset_size"])):
            one = {side: m[i:i + 1] for side, m in maps.items()}
            valid = b["token_valid"][i:i + 1] if "token_valid" in b else None
            loss = attention_alignment_loss(one, b["token_indices"][i:i + 1], b["token_masks"][i:i + 1], valid)
            per_sample.append(loss * (self.alpha if int(b["subset_size"][i]) == 1 else 1.0))
        return torch.stack(per_sample).mean()


@dataclass(frozen=True)
class AttenCraftConfig:
    """Stage II settings (§3.4.1: lr 1e-4, 300 steps, batch 1, AdamW (0.9, 0.999), α = 0.01, ω = 0.3)."""

    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 1
    alpha: float = 0.01
    omega: float = 0.3
    ratio_mode: RatioMode = "adaptive"
    rec_on_groups: bool = False
    train_tokens: bool = False
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    cross_res: tuple[int, ...] = (16,)
    masks: MaskSettings = field(default_factory=MaskSettings)
    seed: int = 0


@dataclass
class AttenCraftResult:
    """The finetuned model's prompting, Stage I's output, the ratios, the training history and trained tensors."""

    custom: Customized
    stage: StageOne
    ratios: np.ndarray
    train: TrainResult
    state: dict[str, torch.Tensor]
    subsets: list[int] = field(default_factory=list)


def prepare(model: SDComponents, latent: torch.Tensor, class_names: Sequence[str], config: AttenCraftConfig,
            true_masks: torch.Tensor | None = None) -> tuple[Customized, StageOne, np.ndarray]:
    """Tokens from class names (§3.4.1), Stage I (masks, scores) and the ratios (Eq. 3.5)."""
    tokens = add_identifiers(model, class_names, trainable=config.train_tokens)
    custom = Customized("AttenCraft", tokens, tuple(class_names), with_class=False)
    stage = stage_one(model, latent, custom.prompt(range(len(class_names))), tokens.tokens, config.masks,
                      seed=config.seed, masks=true_masks)
    return custom, stage, sampling_ratios(stage.scores, config.ratio_mode)


def attencraft_finetune(model: SDComponents, image_latent: torch.Tensor, class_names: Sequence[str],
                        config: AttenCraftConfig, true_masks: torch.Tensor | None = None, output_dir: str = "",
                        train_config: Mapping[str, Any] | None = None, progress: bool = False) -> AttenCraftResult:
    """Algorithm 1 on one image's latent ``(1, C, h, w)``: Stage I then Stage II, ``model`` changed in place.

    ``true_masks`` replaces Stage I's masks (an oracle variant); the scores then use them too.
    """
    custom, stage, ratios = prepare(model, image_latent, class_names, config, true_masks)
    sampler = SubsetSampler(ratios, config.omega)
    tc = train_config_from(dict(steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                                betas=tuple(config.adam_betas), cross_res=tuple(config.cross_res), masked_rec=True,
                                output_dir=output_dir, seed=config.seed, progress=progress), train_config)
    data = subset_batches(model, image_latent, custom, stage.masks.numpy(), sampler, config.batch_size, tc.seed,
                          rec_on_groups=config.rec_on_groups)
    token_ids = custom.tokens.ids if config.train_tokens else ()
    trainable = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion", token_ids=token_ids,
                                 weight_decay=tc.weight_decay)
    result = train_diffusion(model, data, tc, trainable, [FeatureRetainingTerm(alpha=config.alpha)])
    trainable.remove_hooks()
    return AttenCraftResult(custom, stage, ratios, result, trainable_state(trainable))


__all__ = ["FeatureRetainingTerm", "AttenCraftConfig", "AttenCraftResult", "prepare", "attencraft_finetune"]
