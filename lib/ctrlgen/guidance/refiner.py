"""The one latent refiner: gradient descent on any weighted list of guidance terms (Eq. 4.10, Eq. 5.9).

``GuidanceRefiner`` is a refiner for ``ctrlgen.sampling.sample``: called with the U-Net, the current
latent z_t, the timestep and the conditional text embedding, it runs the U-Net once on the
conditional prompt with attention capture on exactly the sides its terms read (maps keep their
graph; no U-Net call when no term reads maps), and returns

    ẑ_t = z_t − η ∇_{z_t} Σ_k w_k L_k(z_t)                                     (Eq. 4.10 / 5.9)

repeated ``iterations`` times, on the steps ``i < round(fraction · num_steps)`` (thesis: 50%,
η = 20). Each L_k is per sample and the gradient is taken of their sum over the batch, so a sample's
step does not depend on the batch it is generated in. Terms of weight 0 are evaluated and recorded
but take no part in the step (ablations). A refiner without terms is the identity.

``normalize`` chooses what η multiplies: ``"none"`` (default) the raw gradient, as Eq. (4.10) writes
it; ``"max"`` the gradient divided, per sample, by its largest absolute entry (ZestGuide, Couairon et
al. 2023: ∇/‖∇‖_∞), so that η is the largest change of any latent entry. The raw step's size is set by
how strongly the model's attention depends on z_t: η = 20 was tuned on Stable Diffusion, whose
cross-attention is token-selective; a small model with near-uniform token attention has a latent
gradient of L_CA orders of magnitude smaller (§4.3.4 on the mini derm model: ‖∇L_CA‖ ≈ 1e-3 for
‖z_t‖ ≈ 32, so η = 30 moves z_t by 0.1% per step and changes nothing), and "max" makes the step
independent of that scale.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ctrlgen.attention.capture import AttentionCapture
from ctrlgen.guidance.terms import GuidanceContext, GuidanceTerm, sides


@dataclass
class GuidanceRefiner:
    """Eq. (4.10) on ``terms`` (see module doc). After each call ``history`` holds one record per
    iteration: ``step``, ``t``, ``loss`` (Σ w_k · batch mean of L_k), each term's batch mean by name,
    ``grad_norm`` (batch mean of the per-sample L2 norm of the followed gradient ∇Σ w_k L_k) and
    ``step_norm`` (batch mean of ‖ẑ_t − z_t‖, the change the step made)."""

    terms: Sequence[GuidanceTerm] = ()
    eta: float = 20.0
    fraction: float = 0.5
    iterations: int = 1
    places: tuple[str, ...] = ("down", "mid", "up")
    normalize: Literal["none", "max"] = "none"
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"guidance terms need distinct names, got {names}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {self.fraction}")
        if self.normalize not in ("none", "max"):
            raise ValueError(f"normalize must be 'none' (Eq. 4.10's raw gradient) or 'max' (ZestGuide's ∇/‖∇‖_∞), "
                             f"got {self.normalize!r}")

    def active(self, step_index: int, num_steps: int) -> bool:
        """Whether step ``step_index`` of ``num_steps`` is refined (the first ``fraction`` of the steps)."""
        return step_index < round(self.fraction * num_steps)

    def losses(self, unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor | int,
               encoder_hidden_states: torch.Tensor, step_index: int = 0) -> dict[str, torch.Tensor]:
        """Every term's per-sample loss ``(B,)`` at ``latents`` (differentiable w.r.t. ``latents``)."""
        cross, self_ = sides(self.terms)
        if not cross and not self_:
            return {term.name: term(GuidanceContext(None, latents, int(t), step_index)) for term in self.terms}
        with AttentionCapture(unet, cross_res=cross, self_res=self_, places=self.places, keep_grad=True,
                              latent_size=tuple(latents.shape[-2:])) as store:
            unet(latents, t, encoder_hidden_states=encoder_hidden_states)
            ctx = GuidanceContext(store, latents, int(t), step_index)
            return {term.name: term(ctx) for term in self.terms}

    def __call__(self, unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor | int,
                 encoder_hidden_states: torch.Tensor, step_index: int) -> torch.Tensor:
        z = latents.detach()
        if not self.terms:
            return z
        for _ in range(self.iterations):
            z = z.requires_grad_(True)
            with torch.enable_grad():
                values = self.losses(unet, z, t, encoder_hidden_states, step_index)
                active = [term.weight * values[term.name] for term in self.terms if term.weight]
                # Σ over the batch of per-sample losses: each sample takes the step η of its own loss
                grad = torch.autograd.grad(sum(active).sum(), z)[0] if active else torch.zeros_like(z)
            means = {name: float(v.detach().mean()) for name, v in values.items()}  # one device sync per term
            step = self.eta * self.direction(grad)
            self.history.append({"step": step_index, "t": int(t),
                                 "loss": float(sum(term.weight * means[term.name] for term in self.terms)), **means,
                                 "grad_norm": float(grad.flatten(1).norm(dim=1).mean()),
                                 "step_norm": float(step.flatten(1).norm(dim=1).mean())})
            z = (z - step).detach()
        return z

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """What η multiplies: the gradient itself (``normalize="none"``, Eq. 4.10) or, per sample, the gradient
        over its largest absolute entry (``"max"``, ZestGuide); a zero gradient stays zero."""
        if self.normalize == "none":
            return grad
        peak = grad.flatten(1).abs().amax(1).clamp_min(torch.finfo(grad.dtype).tiny)
        return grad / peak.reshape(-1, *([1] * (grad.ndim - 1)))


__all__ = ["GuidanceRefiner"]
