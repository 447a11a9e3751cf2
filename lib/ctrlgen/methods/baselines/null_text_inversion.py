"""Null-text inversion (Mokady et al., 2023), for editing real dermoscopic images (§4.4.6, Fig. 4.10).

1. DDIM inversion of the image's latent z*_0 with its prompt C at guidance scale 1
   (``ctrlgen.inversion.ddim_invert``): the pivot trajectory z*_0 … z*_T.
2. From z̄_T = z*_T, for each sampling step i (t: T → 1): starting from the previous step's embedding,
   optimise the unconditional ("null-text") embedding ∅_t with Adam for ``inner_steps`` iterations on
   ‖z*_{t−1} − DDIM(z̄_t, t; ε_∅t + w (ε_C − ε_∅t))‖², at learning rate ``lr·(1 − i/lr_decay_steps)``,
   stopping early once the loss is below ``early_stop + early_stop_slope·i``; then z̄_{t−1} = that step
   with the optimised ∅_t. Guidance scale w = 7.5 as in the paper. The settings are ``NullTextConfig``,
   defaults those of the authors' code (google/prompt-to-prompt ``null_text_w_ptp.ipynb``:
   ``Adam(lr=1e-2 * (1. - i / 100.))``, ``num_inner_steps=10``, ``early_stop_epsilon=1e-5``,
   ``loss_item < epsilon + i * 2e-5``).
3. Sampling from z*_T with the per-step ∅_t and the prompt C reconstructs the image; with an edited
   prompt (e.g. a benign lesion's prompt changed to melanoma-like colours) it edits it.
4. Edits use Prompt-to-Prompt attention control (Hertz et al., 2022), as Mokady et al. combine it
   with the inversion (``sample_edits`` with ``ctrlgen.attention.prompt_to_prompt.PromptToPrompt``):
   the reconstruction and the edited branches share one batched U-Net call per step, and the edited
   branches take the source's cross-attention maps for the first ``cross_replace_fraction`` of the
   steps (word swap for prompts of equal token count, refinement alignment otherwise) and its
   self-attention maps for the first ``self_replace_fraction`` (``NullTextConfig``: 0.8 / 0.5, the
   notebook's edits: ``cross_replace_steps = {'default_': .8}``, ``self_replace_steps = .5``). ``p2p=False``
   re-samples with the edited prompt only.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ctrlgen.attention.prompt_to_prompt import AlignMode, PromptToPrompt
from ctrlgen.inversion import ddim_invert
from ctrlgen.models import make_scheduler
from ctrlgen.models.sd import SDComponents
from ctrlgen.sampling import decode_images, predict_noise


@dataclass(frozen=True)
class NullTextConfig:
    """Null-text inversion and Prompt-to-Prompt editing settings (module docstring; profile ``didgen.eval.edit_*``)."""

    inner_steps: int = 10
    lr: float = 1e-2
    lr_decay_steps: int = 100
    early_stop: float = 1e-5
    early_stop_slope: float = 2e-5
    cross_replace_fraction: float = 0.8
    self_replace_fraction: float = 0.5

    def __post_init__(self):
        if self.inner_steps < 1 or self.lr_decay_steps < 1 or self.lr <= 0:
            raise ValueError(f"null-text inversion needs inner_steps >= 1, lr_decay_steps >= 1 and lr > 0: {self}")

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "NullTextConfig":
        """From ``didgen.eval.edit_inner_steps``, ``edit_lr``, ... ; ``overrides`` replace fields."""
        e = cfg["didgen"]["eval"]
        kw = dict(inner_steps=int(e["edit_inner_steps"]), lr=float(e["edit_lr"]),
                  lr_decay_steps=int(e["edit_lr_decay_steps"]), early_stop=float(e["edit_early_stop"]),
                  early_stop_slope=float(e["edit_early_stop_slope"]),
                  cross_replace_fraction=float(e["edit_cross_replace_fraction"]),
                  self_replace_fraction=float(e["edit_self_replace_fraction"]))
        return cls(**{**kw, **overrides})

    def lr_at(self, i: int) -> float:
        """Adam's learning rate at sampling step ``i`` (0-based): lr·(1 − i/lr_decay_steps), floored at 0."""
        return self.lr * max(0.0, 1.0 - i / self.lr_decay_steps)


@dataclass
class NullTextInversion:
    """Result: the pivot z*_T, the per-step null embeddings (in sampling order) and the optimisation losses."""

    z_T: torch.Tensor
    null_embeddings: list[torch.Tensor]
    timesteps: list[int]
    cond: torch.Tensor
    losses: list[float] = field(default_factory=list)


def null_text_invert(unet: torch.nn.Module, scheduler_config: Mapping[str, Any], latents: torch.Tensor,
                     cond: torch.Tensor, uncond: torch.Tensor, num_steps: int = 50, guidance_scale: float = 7.5,
                     config: NullTextConfig = NullTextConfig(), progress: bool = False) -> NullTextInversion:
    """Invert clean latents ``(B, C, h, w)`` (all with the same ``cond`` batch ``(B, L, D)``) as above, with the
    inner loop of ``config`` (its replace fractions are not used here)."""
    inv = ddim_invert(unet, scheduler_config, latents, cond, num_steps=num_steps, progress=progress)
    pivots = inv.latents[::-1]  # z*_T, ..., z*_0 in sampling order
    sched = make_scheduler("ddim", dict(scheduler_config))
    sched.set_timesteps(num_steps, device=latents.device)
    timesteps = [int(t) for t in sched.timesteps]
    if timesteps != inv.timesteps[::-1]:
        raise RuntimeError("DDIM sampler and inverse scheduler visit different timesteps")
    null = uncond.detach().clone().expand(cond.shape[0], -1, -1).contiguous()
    z = pivots[0].detach()
    nulls, losses = [], []
    for i, t in enumerate(timesteps):
        target = pivots[i + 1].detach()
        with torch.no_grad():
            eps_c = unet(z, t, encoder_hidden_states=cond).sample
        null = null.detach().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=config.lr_at(i))
        loss_v = float("nan")
        for _ in range(config.inner_steps):
            eps_u = unet(z, t, encoder_hidden_states=null).sample
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            prev = sched.step(eps, t, z).prev_sample
            loss = F.mse_loss(prev, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
            if loss_v < config.early_stop + config.early_stop_slope * i:
                break
        null = null.detach()
        nulls.append(null.clone())
        losses.append(loss_v)
        with torch.no_grad():
            eps_u = unet(z, t, encoder_hidden_states=null).sample
            z = sched.step(eps_u + guidance_scale * (eps_c - eps_u), t, z).prev_sample
    return NullTextInversion(pivots[0], nulls, timesteps, cond.detach(), losses)


@torch.no_grad()
def sample_with_nulls(unet: torch.nn.Module, scheduler_config: Mapping[str, Any], inversion: NullTextInversion,
                      cond: torch.Tensor | None = None, guidance_scale: float = 7.5) -> torch.Tensor:
    """DDIM sampling from z*_T with the per-step null embeddings: ``cond=None`` reconstructs, an edited
    prompt's embedding edits. Returns z_0."""
    sched = make_scheduler("ddim", dict(scheduler_config))
    sched.set_timesteps(len(inversion.timesteps), device=inversion.z_T.device)
    c = inversion.cond if cond is None else cond
    z = inversion.z_T
    for t, null in zip(sched.timesteps, inversion.null_embeddings):
        eps = predict_noise(unet, z, t, c, null, guidance_scale)
        z = sched.step(eps, t, z).prev_sample
    return z


@torch.no_grad()
def sample_plain(unet: torch.nn.Module, scheduler_config: Mapping[str, Any], z_T: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor, num_steps: int, guidance_scale: float = 7.5) -> torch.Tensor:
    """The same sampler with one fixed null embedding (what plain DDIM inversion gives under CFG)."""
    sched = make_scheduler("ddim", dict(scheduler_config))
    sched.set_timesteps(num_steps, device=z_T.device)
    z = z_T
    for t in sched.timesteps:
        z = sched.step(predict_noise(unet, z, t, cond, uncond, guidance_scale), t, z).prev_sample
    return z


@torch.no_grad()
def sample_edits(unet: torch.nn.Module, scheduler_config: Mapping[str, Any], inversion: NullTextInversion,
                 edit_cond: torch.Tensor, guidance_scale: float = 7.5,
                 controller: PromptToPrompt | None = None) -> torch.Tensor:
    """The source branch (reconstruction) and ``E`` edited branches ``edit_cond`` ``(E, L, D)`` sampled from z*_T
    with the per-step null embeddings in ONE batched U-Net call per step (``[∅ rows; prompt rows]``).

    A ``controller`` (an entered ``PromptToPrompt``) is told the step index before each call. Returns z_0
    ``(1 + E, C, h, w)``, row 0 the reconstruction. Needs a single-image inversion."""
    if inversion.z_T.shape[0] != 1:
        raise ValueError("sample_edits edits one image: the inversion must have batch 1")
    sched = make_scheduler("ddim", dict(scheduler_config))
    sched.set_timesteps(len(inversion.timesteps), device=inversion.z_T.device)
    cond = torch.cat([inversion.cond, edit_cond.to(inversion.cond)])
    z = inversion.z_T.expand(cond.shape[0], -1, -1, -1).clone()
    for i, (t, null) in enumerate(zip(sched.timesteps, inversion.null_embeddings)):
        if controller is not None:
            controller.step = i
        eps = predict_noise(unet, z, t, cond, null, guidance_scale)
        z = sched.step(eps, t, z).prev_sample
    return z


def edit_image(model: SDComponents, image: torch.Tensor, prompt: str, edited_prompts: Sequence[str],
               num_steps: int = 50, guidance_scale: float = 7.5, config: NullTextConfig = NullTextConfig(),
               p2p: bool = True, alignment: AlignMode = "auto") -> tuple[torch.Tensor, NullTextInversion]:
    """Edit one real image ``(1, 3, H, W)`` in [-1, 1] of ``model``: null-text inversion with ``prompt``, then
    one sample per edited prompt — with Prompt-to-Prompt control (module docstring, step 4; its layers sized for
    this image's latent) unless ``p2p=False``. Returns images ``(1 + E, 3, H, W)`` in [0, 1]: the reconstruction
    first, then the edits."""
    with torch.no_grad():
        z0 = model.encode_images(image)
        cond, uncond = model.encode_prompt([prompt]), model.encode_prompt([""])
        edits = model.encode_prompt(list(edited_prompts)) if edited_prompts else None
    inv = null_text_invert(model.unet, model.scheduler_config, z0, cond, uncond, num_steps, guidance_scale, config)
    if edits is not None and p2p:
        ctrl = PromptToPrompt.for_prompts(model.unet, model.tokenize([prompt]), model.tokenize(list(edited_prompts)),
                                          model.tokenizer.eos_token_id, num_steps, alignment,
                                          cross_replace_fraction=config.cross_replace_fraction,
                                          self_replace_fraction=config.self_replace_fraction,
                                          latent_size=tuple(z0.shape[-2:]))
        with ctrl:
            z = sample_edits(model.unet, model.scheduler_config, inv, edits, guidance_scale, ctrl)
    else:
        outs = [sample_with_nulls(model.unet, model.scheduler_config, inv, None, guidance_scale)]
        for k in range(0 if edits is None else len(edits)):
            outs.append(sample_with_nulls(model.unet, model.scheduler_config, inv, edits[k:k + 1], guidance_scale))
        z = torch.cat(outs)
    return decode_images(model, z), inv


__all__ = ["NullTextConfig", "NullTextInversion", "null_text_invert", "sample_with_nulls", "sample_plain", "sample_edits", "edit_image"]
