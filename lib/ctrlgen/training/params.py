"""Which parameters a training run updates (§3.4.1, §4.3.3, §4.7.2, chapter 2 pretraining).

Modes for the U-Net: ``full`` (every weight: domain finetuning, pretraining), ``lora`` (peft
LoRA adapters on ``to_q``/``to_k``/``to_v``/``to_out.0``), ``custom_diffusion`` (only ``W_k`` and
``W_v`` of the cross-attention layers, Kumari et al. 2023, as AttenCraft trains), ``none``.
Independently: the whole text encoder (pretraining from scratch) and/or only the embedding rows of
given token ids (textual inversion; other rows get a zero gradient and no weight decay, so they do
not move at all).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Mode = Literal["full", "lora", "custom_diffusion", "none"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class TrainableParams:
    """Named trainable parameters and optimizer groups; ``named`` is what checkpoints save."""

    named: dict[str, torch.nn.Parameter]
    groups: list[dict]
    description: str
    hooks: list = field(default_factory=list)

    def count(self) -> int:
        return sum(p.numel() for p in self.named.values())

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def select_trainable(unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None, mode: Mode = "full",
                     lora_rank: int = 4, lora_alpha: float | None = None, token_ids: Sequence[int] = (),
                     train_text_encoder: bool = False, weight_decay: float = 1e-2) -> TrainableParams:
    """Freeze everything, then unfreeze what ``mode`` and the flags select; return the parameters by name."""
    for m in (unet, text_encoder):
        if m is not None:
            m.requires_grad_(False)
    named: dict[str, torch.nn.Parameter] = {}
    if mode == "full":
        unet.requires_grad_(True)
        named.update({f"unet.{n}": p for n, p in unet.named_parameters()})
    elif mode == "lora":
        from peft import LoraConfig  # heavy (~1 s) and needed only by the LoRA mode

        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, init_lora_weights="gaussian",
                         target_modules=LORA_TARGETS)
        unet.add_adapter(cfg)
        named.update({f"unet.{n}": p for n, p in unet.named_parameters() if "lora_" in n})
        for p in named.values():
            p.requires_grad_(True)
    elif mode == "custom_diffusion":
        for n, p in unet.named_parameters():
            if ".attn2.to_k." in n or ".attn2.to_v." in n:
                p.requires_grad_(True)
                named[f"unet.{n}"] = p
    elif mode != "none":
        raise ValueError(f"unknown mode {mode!r}: full, lora, custom_diffusion or none")
    groups = [{"params": list(named.values()), "weight_decay": weight_decay}] if named else []
    hooks = []
    te_named: dict[str, torch.nn.Parameter] = {}
    if text_encoder is not None and train_text_encoder:
        text_encoder.requires_grad_(True)
        te_named = {f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()}
        groups.append({"params": list(te_named.values()), "weight_decay": weight_decay})
    elif text_encoder is not None and token_ids:
        emb = text_encoder.get_input_embeddings().weight
        emb.requires_grad_(True)
        keep = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
        keep[list(token_ids)] = 1
        hooks.append(emb.register_hook(lambda g, keep=keep: g * keep.to(g)))
        name = next(n for n, p in text_encoder.named_parameters() if p is emb)
        te_named = {f"text_encoder.{name}": emb}
        groups.append({"params": [emb], "weight_decay": 0.0})
    named.update(te_named)
    parts = [f"unet:{mode}"]
    if train_text_encoder:
        parts.append("text encoder")
    elif token_ids:
        parts.append(f"token embeddings {list(token_ids)}")
    return TrainableParams(named, groups, ", ".join(parts), hooks)
