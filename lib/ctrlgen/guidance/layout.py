"""Layout guidance: refine the latent by gradient descent on attention losses (Eq. 4.10, Eq. 5.9).

``LayoutGuidance`` is a *refiner* for ``ctrlgen.sampling.sample``: called with the U-Net, the
current latent z_t, the timestep and the conditional text embedding, it runs the U-Net once on
the conditional prompt with attention capture (maps keep their graph), computes

    L = λ_attn (L_CA + L_SA) + λ_style L_style

and returns ``ẑ_t = z_t − η ∇_{z_t} L`` (repeated ``iterations`` times), L per sample: a sample's
update does not depend on the batch it is generated in. The sampling loop applies it
on the first fraction of the steps (the thesis: 50%, η = 20; λ_attn = 1, λ_style = 50 in §5.3.3).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from ctrlgen.attention.capture import AttentionCapture, AttentionStore
from ctrlgen.attention.maps import gaussian_smooth, resize_maps, text_token_softmax
from ctrlgen.guidance.losses import cross_attention_layout_loss, self_attention_layout_loss, style_loss


@dataclass
class LayoutGuidance:
    """Refiner implementing Eq. (4.10) (and Eq. 5.9 with a style term).

    Args:
        mask: layout mask ``(B, H, W)`` or ``(H, W)`` at any resolution, values in [0, 1]; area-pooled
            to each attention side.
        token_index: position of the P-Token (``<lesion>``) in the tokenised prompt.
        last: position of the end token (Attend-and-Excite softmax over tokens 1..last-1).
        cross_res, self_res: attention sides for L_CA and L_SA (``self_res=0`` drops L_SA).
        eta: guidance step η (thesis 20).
        lambda_attn, lambda_style: weights of Eq. (5.9); ``style_latents`` maps a timestep to z_t^style.
        sa_normalize: normaliser of L_SA (see ``self_attention_layout_loss``).
    After each call ``history`` holds the losses of that step (for plots and tests).
    """

    mask: torch.Tensor
    token_index: int
    last: int
    cross_res: int = 16
    self_res: int = 32
    eta: float = 20.0
    iterations: int = 1
    lambda_attn: float = 1.0
    lambda_style: float = 0.0
    style_latents: Mapping[int, torch.Tensor] | Callable[[int], torch.Tensor] | None = None
    smoothing_kernel: int = 3
    smoothing_sigma: float = 0.5
    softmax_scale: float = 100.0
    sa_normalize: Literal["background", "queries"] = "background"
    places: tuple[str, ...] = ("down", "mid", "up")
    history: list[dict[str, float]] = field(default_factory=list)

    def _mask_at(self, side: int, like: torch.Tensor) -> torch.Tensor:
        m = self.mask if self.mask.ndim == 3 else self.mask[None]
        return resize_maps(m.to(like.device, torch.float32), side, mode="area")

    def losses(self, store: AttentionStore, latents: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
        """The individual terms from captured maps: ``{"ca": L_CA, "sa": L_SA, "style": L_style}``."""
        out: dict[str, torch.Tensor] = {}
        cross = text_token_softmax(store.cross(self.cross_res), self.last, self.softmax_scale)[..., self.token_index]
        cross = gaussian_smooth(cross, self.smoothing_kernel, self.smoothing_sigma)
        out["ca"] = cross_attention_layout_loss(cross, self._mask_at(self.cross_res, cross))
        if self.self_res:
            sa = store.self_attention(self.self_res)
            out["sa"] = self_attention_layout_loss(sa, self._mask_at(self.self_res, sa), self.sa_normalize)
        if self.lambda_style and self.style_latents is not None:
            ref = self.style_latents(t) if callable(self.style_latents) else self.style_latents[int(t)]
            out["style"] = style_loss(latents, ref.to(latents))
        return out

    def total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        attn = terms["ca"] + terms.get("sa", 0.0)
        return self.lambda_attn * attn + self.lambda_style * terms.get("style", 0.0)

    def __call__(self, unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor | int,
                 encoder_hidden_states: torch.Tensor, step_index: int) -> torch.Tensor:
        z = latents.detach()
        hw = tuple(z.shape[-2:])
        for _ in range(self.iterations):
            z = z.requires_grad_(True)
            with torch.enable_grad(), AttentionCapture(unet, cross_res=[self.cross_res],
                                                       self_res=[self.self_res] if self.self_res else [],
                                                       places=self.places, keep_grad=True, latent_size=hw) as store:
                unet(z, t, encoder_hidden_states=encoder_hidden_states)
                terms = self.losses(store, z, int(t))
                loss = self.total(terms)
                # the terms are batch means: differentiate their sum over the batch so that each sample
                # takes the step η of its own loss whatever the batch size (a mean shrinks it by 1/B)
                grad = torch.autograd.grad(loss * z.shape[0], z)[0]
            self.history.append({"step": step_index, "t": int(t), "loss": float(loss.detach()),
                                 **{k: float(v.detach()) for k, v in terms.items()}})
            z = (z - self.eta * grad).detach()
        return z
