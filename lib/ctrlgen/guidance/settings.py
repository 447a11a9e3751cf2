"""The layout-guidance settings chapters 4 and 5 share (Eq. 4.7–4.10; Eq. 5.5–5.7, 5.9–5.10).

``LayoutGuidanceSettings`` holds what the step ẑ_t = z_t − η ∇_{z_t} (λ_CA L_CA + λ_SA L_SA) — Eq. (4.10) with
λ = 1, Eq. (5.9)–(5.10) with λ_attn — needs besides the layout mask and the token positions: η, the weights, the share of the steps it acts on,
the attention sides and L_CA's token softmax and smoothing, L_SA's normalisation, and what η multiplies.
``from_section`` reads them from a profile: η (and, where the section has them, ``guidance_fraction`` and
``lambda_attn``) from the method's own section, the attention sides and smoothing from ``attention``, and the
token-softmax scale and the step normalisation from chapter 4's ``didgen.pairs`` — chapter 5's layout
guidance is chapter 4's (Eq. 5.5–5.7 are Eq. 4.7–4.9). ``terms`` and ``refiner`` build the guidance of one
batch, so that every method that lays out a token this way builds its ``GuidanceRefiner`` the same way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from ctrlgen.guidance.layout import layout_terms
from ctrlgen.guidance.refiner import GuidanceRefiner
from ctrlgen.guidance.terms import GuidanceTerm

# names a method's config historically took for these settings -> the settings' own names
ALIASES = {"guidance_fraction": "fraction"}


@dataclass(frozen=True)
class LayoutGuidanceSettings:
    """Eq. (4.10)'s layout guidance (module doc). Full profile: §4.3.4 — η = 20 on the first 50% of the steps,
    λ = 1, L_CA on the ×100 Attend-and-Excite token softmax, the raw gradient.

    ``lambda_ca = 0`` keeps L_CA evaluated and recorded but out of the step (an ablation, §4.4.5); L_SA is left out
    altogether with ``self_res = 0`` (no self-attention is captured then)."""

    eta: float = 20.0
    fraction: float = 0.5               # the first round(fraction · T) steps are guided (1: every step given)
    iterations: int = 1
    lambda_ca: float = 1.0              # λ of L_CA (Eq. 5.9's λ_attn)
    lambda_sa: float = 1.0              # λ of L_SA (Eq. 5.9's λ_attn)
    cross_res: int = 16
    self_res: int = 32                  # 0: no L_SA
    smoothing_kernel: int = 3
    smoothing_sigma: float = 0.5
    # ×100 is Attend-and-Excite's scale for SD, whose per-token attention values are ~0.01–0.05; a region-aware model
    # trained to put its raw <skin> map near 1 - M (Eq. 4.5) has <skin> at ~0.4 everywhere and <lesion> at ~0.06, and
    # ×100 saturates the token softmax on <skin>: the <lesion> column is ~1e-15 everywhere, L_CA ≡ 1, ∇L_CA ≈ 3e-15
    # (measured, mini derm model after 150 region-aware steps) — L_CA-only guidance then equals no guidance
    softmax_scale: float = 100.0
    sa_normalize: Literal["background", "queries"] = "background"
    # what η multiplies (GuidanceRefiner.normalize): "none" = the raw gradient of Eq. (4.10) with the thesis η = 20
    # (tuned on SD 2.1); "max" = ∇/‖∇‖_∞ per sample, η then being the largest latent change per step, which a small
    # model needs (its near-uniform token attention gives ‖∇L_CA‖ ≈ 1e-3: the raw step changes nothing)
    grad_normalize: Literal["none", "max"] = "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"layout guidance fraction must lie in [0, 1], got {self.fraction}")
        if self.grad_normalize not in ("none", "max"):
            raise ValueError(f"grad_normalize must be 'none' or 'max', got {self.grad_normalize!r}")

    @classmethod
    def names(cls) -> set[str]:
        """Every name ``from_section``/``with_overrides`` take: the fields, the aliases and ``lambda_attn``."""
        return {f.name for f in fields(cls)} | set(ALIASES) | {"lambda_attn"}

    @classmethod
    def from_section(cls, cfg: Mapping[str, Any], section: str, **overrides: Any) -> "LayoutGuidanceSettings":
        """The settings of the profile section ``section`` (dotted, e.g. ``"didgen.pairs"`` or ``"dual_branch"``):
        ``eta``, ``guidance_fraction`` (default 1: the method chooses its steps) and ``lambda_attn`` (default 1, both
        λ) from the section; ``attention.cross_res[0]``, ``self_res[0]``, ``smoothing_kernel``, ``smoothing_sigma``;
        ``didgen.pairs.softmax_scale`` and ``grad_normalize``. ``overrides`` by field name (or alias) win."""
        s: Any = cfg
        for part in section.split("."):
            s = s[part]
        a, p = cfg["attention"], cfg["didgen"]["pairs"]
        lam = float(s["lambda_attn"]) if "lambda_attn" in s else 1.0
        base = cls(eta=float(s["eta"]), fraction=float(s["guidance_fraction"]) if "guidance_fraction" in s else 1.0,
                   lambda_ca=lam, lambda_sa=lam, cross_res=int(a["cross_res"][0]), self_res=int(a["self_res"][0]),
                   smoothing_kernel=int(a["smoothing_kernel"]), smoothing_sigma=float(a["smoothing_sigma"]),
                   softmax_scale=float(p["softmax_scale"]), grad_normalize=str(p["grad_normalize"]))
        return base.with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> "LayoutGuidanceSettings":
        """A copy with fields replaced by name; aliases (``guidance_fraction``) are accepted and ``lambda_attn`` sets
        both weights (Eq. 5.9). An unknown name raises ValueError naming it."""
        unknown = set(overrides) - self.names()
        if unknown:
            raise ValueError(f"unknown layout-guidance settings {sorted(unknown)}; known: {sorted(self.names())}")
        kw = {ALIASES.get(k, k): v for k, v in overrides.items() if k != "lambda_attn"}
        if "lambda_attn" in overrides:
            kw.setdefault("lambda_ca", overrides["lambda_attn"])
            kw.setdefault("lambda_sa", overrides["lambda_attn"])
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{**values, **kw})

    def terms(self, mask: torch.Tensor, token_index: int, last: int | tuple[int, ...], with_ca: bool = True,
              with_sa: bool = True) -> list[GuidanceTerm]:
        """λ_CA L_CA (Eq. 4.7) and λ_SA L_SA (Eq. 4.8–4.9) of ``mask`` ``(B, H, W)`` for the token at ``token_index``
        (end positions ``last``). ``with_ca=False`` keeps L_CA at weight 0 (recorded, not followed);
        ``with_sa=False`` (or ``self_res = 0``) leaves L_SA out."""
        terms = layout_terms(mask, token_index, last, self.cross_res, self.self_res if with_sa else 0, 1.0,
                             self.smoothing_kernel, self.smoothing_sigma, self.softmax_scale, self.sa_normalize)
        terms[0].weight = self.lambda_ca if with_ca else 0.0
        for term in terms[1:]:
            term.weight = self.lambda_sa
        return terms

    def refiner(self, terms: Sequence[GuidanceTerm], fraction: float | None = None) -> GuidanceRefiner:
        """The ``GuidanceRefiner`` of Eq. (4.10) on ``terms`` (those of ``terms()``, possibly with more, e.g. the style
        term of Eq. 5.9), with this η, step normalisation, iterations and ``fraction`` (default: the settings')."""
        return GuidanceRefiner(list(terms), eta=self.eta, fraction=self.fraction if fraction is None else fraction,
                               iterations=self.iterations, normalize=self.grad_normalize)


class FromLayout:
    """A read-only attribute of a method config that reads its ``layout`` settings (``config.eta`` is
    ``config.layout.eta``; ``guidance_fraction`` reads ``fraction``): the names the configs had before they held one
    ``LayoutGuidanceSettings``, kept for the modules that read them."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = ALIASES.get(name, name)

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.layout, self.name)


def split_layout_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``overrides`` of a method config's ``from_profile`` split into those of its layout settings (by the names
    ``LayoutGuidanceSettings.names()``) and the rest."""
    names = LayoutGuidanceSettings.names()
    return ({k: v for k, v in overrides.items() if k in names}, {k: v for k, v in overrides.items() if k not in names})


__all__ = ["LayoutGuidanceSettings", "FromLayout", "split_layout_overrides"]
