"""Custom Diffusion (Kumari et al., CVPR 2023) as thesis §3.6.3 runs it for multi-concept customization.

* Prompt "[V1] [Class1] and [V2] [Class2]" (after the book's "a photo of" prefix), in training and inference.
* Identifier tokens initialised from **rare tokens** (the paper's "ktn", "pll", …; here the rarest whole words
  of the model's tokenizer, ``customization.rare_words``).
* Only W_k and W_v of the U-Net's cross-attention layers are optimised (PEFT, §3.6.3). The paper also
  optimises the modifier token's embedding; §3.6.3 states the U-Net parameters only, the default here;
  ``train_tokens=True`` gives the paper's variant.
* Plain (unmasked) L_rec on the one image, every step with the whole prompt; §3.6.3: 200 steps, batch 1,
  lr 5e-5, AdamW (0.9, 0.999). The paper's regularisation images (real images retrieved for the class) and its
  crop augmentation have no counterpart for a single input image here and are left out.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ctrlgen.methods.attencraft.sampling import whole_group
from ctrlgen.methods.customization import Customized, add_identifiers, rare_words, subset_batches, trainable_state
from ctrlgen.models.sd import SDComponents
from ctrlgen.training import LossTerm, TrainResult, select_trainable, train_config_from, train_diffusion


@dataclass(frozen=True)
class CustomDiffusionConfig:
    """§3.6.3: 200 steps, batch 1, lr 5e-5, AdamW (0.9, 0.999)."""

    steps: int = 200
    lr: float = 5e-5
    batch_size: int = 1
    train_tokens: bool = False
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    cross_res: tuple[int, ...] = (16,)
    seed: int = 0


@dataclass
class CustomizationResult:
    """A finetuned baseline: how to prompt it, its training history and the trained tensors."""

    custom: Customized
    train: TrainResult
    state: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def rare_token_setup(model: SDComponents, class_names: Sequence[str], method: str, trainable: bool) -> Customized:
    """``<v_i>`` initialised from rare words; prompts name the class after each token."""
    init = rare_words(model.tokenizer, len(class_names), exclude=class_names)
    tokens = add_identifiers(model, init, trainable=trainable)
    return Customized(method, tokens, tuple(class_names), with_class=True)


def finetune_group(model: SDComponents, latent: torch.Tensor, custom: Customized, config, terms: Sequence[LossTerm],
                   extra=None, output_dir: str = "", train_config: Mapping[str, Any] | None = None,
                   progress: bool = False) -> CustomizationResult:
    """Train W_k/W_v (and the tokens if ``config.train_tokens``) on the whole-group prompt with ``terms``."""
    tc = train_config_from(dict(steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                                betas=tuple(config.adam_betas), cross_res=tuple(config.cross_res), output_dir=output_dir,
                                seed=config.seed, progress=progress), train_config)
    data = subset_batches(model, latent, custom, None, whole_group(len(custom.class_names)), config.batch_size, tc.seed,
                          extra=extra)
    trainable = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion",
                                 token_ids=custom.tokens.ids if config.train_tokens else (), weight_decay=tc.weight_decay)
    result = train_diffusion(model, data, tc, trainable, list(terms))
    trainable.remove_hooks()
    return CustomizationResult(custom, result, trainable_state(trainable))


def custom_diffusion_finetune(model: SDComponents, latent: torch.Tensor, class_names: Sequence[str],
                              config: CustomDiffusionConfig = CustomDiffusionConfig(), output_dir: str = "",
                              train_config: Mapping[str, Any] | None = None, progress: bool = False) -> CustomizationResult:
    """Custom Diffusion on one image's latent ``(1, C, h, w)`` holding ``class_names``; ``model`` changes in place."""
    custom = rare_token_setup(model, class_names, "CusDiff", config.train_tokens)
    return finetune_group(model, latent, custom, config, (), None, output_dir, train_config, progress)


__all__ = ["CustomDiffusionConfig", "CustomizationResult", "rare_token_setup", "finetune_group", "custom_diffusion_finetune"]
