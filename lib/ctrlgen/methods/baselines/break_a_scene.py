"""Break-a-Scene (Avrahami et al., SIGGRAPH Asia 2023) as thesis §3.6.3 runs it (PEFT variant of Textual Localization).

* Prompt "[V1] and [V2]" (after the book's "a photo of" prefix); tokens initialised from the class names.
* **Union sampling**: each step a random number k of concepts, then a random subset of that size.
* Losses: the masked diffusion loss on the union of the subset's masks (Eq. 3.6's form) plus the
  cross-attention loss ``λ_attn·mean_i ‖A_C(v_i) − M_i‖²`` (the paper's λ_attn = 0.01).
* **Two stages**: (1) only the token embeddings, lr 5e-4 for 400 steps (textual inversion); (2) the text
  encoder and W_k/W_v of the cross-attention layers, lr 5e-5 for 200 steps (§3.6.3: the paper trains the whole
  U-Net like DreamBooth; the thesis adapts it to PEFT for a fair comparison). Batch 1, AdamW (0.9, 0.999).
* Masks: Grounding DINO + SAM in the thesis; here the masks are given by the caller (the scenes world's true
  masks in mini; a segmenter's in full).

``ti_steps = 0`` skips stage 1 (the preliminary experiment of §3.6.2); ``init_words`` overrides the class-name
initialisation (the P/G patterns of Table 3.4).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrlgen.methods.attencraft.sampling import union_sampler
from ctrlgen.methods.baselines.custom_diffusion import CustomizationResult
from ctrlgen.methods.customization import Customized, add_identifiers, subset_batches, trainable_state
from ctrlgen.models.sd import SDComponents
from ctrlgen.training import AttentionAlignmentTerm, select_trainable, train_config_from, train_diffusion


@dataclass(frozen=True)
class BreakASceneConfig:
    """§3.6.3: stage 1 lr 5e-4 × 400 steps (embeddings), stage 2 lr 5e-5 × 200 steps (text encoder + W_k/W_v)."""

    ti_steps: int = 400
    ti_lr: float = 5e-4
    steps: int = 200
    lr: float = 5e-5
    attn_weight: float = 0.01
    batch_size: int = 1
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    cross_res: tuple[int, ...] = (16,)
    seed: int = 0


def _stage(model, data, config, steps: int, lr: float, trainable, output_dir: str, train_config, progress: bool):
    tc = train_config_from(dict(steps=steps, lr=lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas),
                                cross_res=tuple(config.cross_res), masked_rec=True, output_dir=output_dir,
                                seed=config.seed, progress=progress), train_config)
    result = train_diffusion(model, data, tc, trainable, [AttentionAlignmentTerm(weight=config.attn_weight)])
    trainable.remove_hooks()
    return result


def break_a_scene_finetune(model: SDComponents, latent: torch.Tensor, class_names: Sequence[str], masks: np.ndarray,
                           config: BreakASceneConfig = BreakASceneConfig(), init_words: Sequence[str] | None = None,
                           output_dir: str = "", train_config: Mapping[str, Any] | None = None,
                           progress: bool = False) -> CustomizationResult:
    """Both stages on one image's latent ``(1, C, h, w)`` with its concept ``masks`` ``(N, H, W)``; ``model`` in place.

    The history holds stage 1's steps then stage 2's (``extra["stage_steps"]``)."""
    tokens = add_identifiers(model, list(init_words or class_names), trainable=True)
    custom = Customized("BAS", tokens, tuple(class_names), with_class=False)
    n = len(class_names)
    history, seconds = [], 0.0
    out = lambda k: str(Path(output_dir) / f"stage{k}") if output_dir else ""  # noqa: E731
    if config.ti_steps > 0:
        data = subset_batches(model, latent, custom, masks, union_sampler(n), config.batch_size, config.seed)
        ti = select_trainable(model.unet, model.text_encoder, mode="none", token_ids=tokens.ids, weight_decay=0.0)
        r1 = _stage(model, data, config, config.ti_steps, config.ti_lr, ti, out(1), train_config, progress)
        history += r1.history
        seconds += r1.seconds
    data = subset_batches(model, latent, custom, masks, union_sampler(n), config.batch_size, config.seed + 1)
    both = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion", train_text_encoder=True,
                            weight_decay=config.weight_decay)
    r2 = _stage(model, data, config, config.steps, config.lr, both, out(2), train_config, progress)
    r2.history = history + [{**h, "step": h["step"] + config.ti_steps} for h in r2.history]
    r2.seconds += seconds
    model.text_encoder.requires_grad_(False)
    return CustomizationResult(custom, r2, trainable_state(both), {"stage_steps": [config.ti_steps, config.steps]})


__all__ = ["BreakASceneConfig", "break_a_scene_finetune"]
