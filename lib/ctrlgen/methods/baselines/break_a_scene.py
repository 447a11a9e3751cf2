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

``ti_steps = 0`` skips stage 1 (the preliminary experiment of §3.6.2: "the first textual inversion phase is
disabled"); ``init_words`` overrides the class-name initialisation (the P/G patterns of Table 3.4);
``snapshot_every`` with ``on_snapshot`` looks at the model every so many stage-2 steps (Fig. 3.4a: CLIP-I every 100
steps): stage 2 then trains in chunks through the training loop's checkpoint/resume, which restores the weights,
optimizer, random numbers and place in the data, so the run is the same as one uninterrupted run.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrlgen.methods.attencraft.sampling import union_sampler
from ctrlgen.methods.baselines.custom_diffusion import CustomizationResult
from ctrlgen.methods.customization import Customized, add_identifiers, subset_batches, trainable_state
from ctrlgen.models.sd import SDComponents
from ctrlgen.training import (AttentionAlignmentTerm, TrainResult, select_trainable, train_config_from,
                              train_diffusion)

# called with (stage-2 step, the model in its state after that many steps, how to prompt it); must not train it
Snapshot = Callable[[int, SDComponents, Customized], None]


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
                           progress: bool = False, snapshot_every: int = 0,
                           on_snapshot: Snapshot | None = None) -> CustomizationResult:
    """Both stages on one image's latent ``(1, C, h, w)`` with its concept ``masks`` ``(N, H, W)``; ``model`` in place.

    The history holds stage 1's steps then stage 2's (``extra["stage_steps"]``). With ``on_snapshot`` and
    ``snapshot_every`` > 0, ``on_snapshot(k, model, custom)`` is called at stage-2 step 0 and every
    ``snapshot_every`` steps (and at the last), the model in eval mode (module doc); stage 2 then checkpoints in a
    temporary folder, not in ``output_dir``."""
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
    stage_two = partial(_stage_two, model, latent, custom, masks, config, progress=progress)
    if on_snapshot is not None and snapshot_every > 0:
        r2, both = _in_chunks(model, custom, stage_two, config.steps, snapshot_every, on_snapshot, train_config)
    else:
        r2, both = stage_two(config.steps, out(2), train_config)
    r2.history = history + [{**h, "step": h["step"] + config.ti_steps} for h in r2.history]
    r2.seconds += seconds
    model.text_encoder.requires_grad_(False)
    return CustomizationResult(custom, r2, trainable_state(both), {"stage_steps": [config.ti_steps, config.steps]})


def _stage_two(model, latent, custom: Customized, masks, config: BreakASceneConfig, steps: int, output_dir: str,
               train_config, progress: bool):
    """Stage 2 up to ``steps`` (resuming from ``output_dir``'s newest checkpoint when it holds one)."""
    data = subset_batches(model, latent, custom, masks, union_sampler(len(custom.class_names)), config.batch_size,
                          config.seed + 1)
    both = select_trainable(model.unet, model.text_encoder, mode="custom_diffusion", train_text_encoder=True,
                            weight_decay=config.weight_decay)
    return _stage(model, data, config, steps, config.lr, both, output_dir, train_config, progress), both


def _in_chunks(model, custom: Customized, stage_two, steps: int, every: int, on_snapshot: Snapshot,
               train_config) -> tuple[TrainResult, Any]:
    """Stage 2 as chunks of ``every`` steps, each resuming from the previous chunk's checkpoint, with ``on_snapshot``
    before the first chunk and after each. The checkpoints live in a fresh temporary folder: a caller's folder could
    hold a later checkpoint of another run, which resuming would silently jump to."""
    with tempfile.TemporaryDirectory(prefix="bas-chunks-") as folder:
        tc = {**dict(train_config or {}), "output_dir": folder, "checkpoint_every": every, "resume": True}
        on_snapshot(0, model, custom)
        history, seconds, result, both = [], 0.0, None, None
        for k in [*range(every, steps, every), steps] if steps > 0 else []:
            result, both = stage_two(k, folder, tc)
            history += result.history
            seconds += result.seconds
            on_snapshot(k, model, custom)
        if result is None:  # zero steps: the untrained selection, as the one-run path returns it
            result, both = stage_two(0, folder, tc)
    return TrainResult(result.steps, history, None, seconds), both  # (the checkpoints went with the folder)


__all__ = ["BreakASceneConfig", "Snapshot", "break_a_scene_finetune"]
