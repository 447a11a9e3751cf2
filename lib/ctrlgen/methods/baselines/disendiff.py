"""DisenDiff (Zhang et al., CVPR 2024, "Attention calibration for disentangled text-to-image personalization").

Custom Diffusion's set-up (§3.6.3: prompt "[V1] [Class1] and [V2] [Class2]", rare-token initialisation, only
W_k/W_v, 250 steps, batch 1, lr 5e-5, AdamW (0.9, 0.999)) plus the paper's **attention calibration**, on the
cross-attention maps after cross-attention suppression (element-wise power ν, the operation §3.3.1 takes from
this paper) and min-max normalisation of each map:

* binding: each ``[V_i]`` map follows its class token's map, ``L_bind = mean_i ‖Â(V_i) − Â(Class_i)‖²``;
* separation: the concepts' maps do not overlap,
  ``L_sep = mean_{i<j} Σ_p min(Â(V_i), Â(V_j)) / Σ_p (Â(V_i) + Â(V_j))``.

L = L_rec + λ_bind·L_bind + λ_sep·L_sep (λ from the profile; the loss weights of the paper's code are not
restated in the thesis). No masks: DisenDiff separates concepts by attention alone, which is why it keeps
background in the concepts (§3.2.3).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from ctrlgen.attention.maps import normalize_minmax, suppress
from ctrlgen.methods.baselines.custom_diffusion import CustomizationResult, finetune_group, rare_token_setup
from ctrlgen.models.sd import SDComponents
from ctrlgen.models.tokens import locate_tokens
from ctrlgen.training import LossContext


@dataclass(frozen=True)
class DisenDiffConfig:
    """§3.6.3: 250 steps, batch 1, lr 5e-5, AdamW (0.9, 0.999); calibration weights and ν."""

    steps: int = 250
    lr: float = 5e-5
    batch_size: int = 1
    bind_weight: float = 1.0
    sep_weight: float = 1.0
    nu: float = 2.0
    train_tokens: bool = False
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    cross_res: tuple[int, ...] = (16,)
    seed: int = 0


def calibration_losses(maps: torch.Tensor, v_idx: torch.Tensor, c_idx: torch.Tensor, nu: float = 2.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_bind, L_sep) of one map side: ``maps`` ``(B, h, w, T)``, token positions ``v_idx``/``c_idx`` ``(B, K)``."""
    def pick(idx):
        i = idx[:, None, None, :].expand(-1, maps.shape[1], maps.shape[2], -1)
        return normalize_minmax(suppress(maps.gather(-1, i).permute(0, 3, 1, 2), nu))  # (B, K, h, w)

    v, c = pick(v_idx.to(maps.device)), pick(c_idx.to(maps.device))
    bind = ((v - c) ** 2).mean(dim=(-2, -1)).mean()
    k = v.shape[1]
    seps = [torch.minimum(v[:, i], v[:, j]).sum((-2, -1)) / (v[:, i] + v[:, j]).sum((-2, -1)).clamp_min(1e-8)
            for i, j in combinations(range(k), 2)]
    sep = torch.stack(seps).mean() if seps else bind.new_zeros(())
    return bind, sep


@dataclass
class CalibrationTerm:
    """λ_bind·L_bind + λ_sep·L_sep averaged over the captured sides (weight 1: the λ are inside)."""

    bind_weight: float = 1.0
    sep_weight: float = 1.0
    nu: float = 2.0
    name: str = "calibration"
    weight: float = 1.0
    needs_cross: bool = True
    needs_self: bool = False

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        b = ctx.batch
        parts = [calibration_losses(m, b["token_indices"], b["class_indices"], self.nu)
                 for m in ctx.store.cross_by_res().values()]
        return torch.stack([self.bind_weight * bd + self.sep_weight * sp for bd, sp in parts]).mean()


def disendiff_finetune(model: SDComponents, latent: torch.Tensor, class_names: Sequence[str],
                       config: DisenDiffConfig = DisenDiffConfig(), output_dir: str = "",
                       train_config: Mapping[str, Any] | None = None, progress: bool = False) -> CustomizationResult:
    """DisenDiff on one image's latent ``(1, C, h, w)`` holding ``class_names``; ``model`` changes in place."""
    custom = rare_token_setup(model, class_names, "DisenDiff", config.train_tokens)
    n = len(class_names)

    def positions(subset, ids):
        v = locate_tokens(model.tokenizer, ids, [custom.tokens.tokens[i] for i in subset]).positions
        c = v + 1  # "<v_i> class_i": the class word (its first BPE piece if the tokenizer splits it) follows its token
        return {"token_indices": v[:, :n], "class_indices": c[:, :n]}

    term = CalibrationTerm(config.bind_weight, config.sep_weight, config.nu)
    return finetune_group(model, latent, custom, config, [term], positions, output_dir, train_config, progress)


__all__ = ["DisenDiffConfig", "calibration_losses", "CalibrationTerm", "disendiff_finetune"]
