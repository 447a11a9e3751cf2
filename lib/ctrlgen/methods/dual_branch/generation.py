"""Dual-branch controllable generation (thesis §5.3.3, Algorithm 3 Stage II–III, Eq. 5.8–5.11).

1. **Style reference inversion** (``invert_style``, Algorithm 3 line 8): DDIM inversion of the style image
   x_style with its prompt (``ctrlgen.inversion.ddim_invert``) stores z_t^style for every timestep t of a
   T-step DDIM sampler, and the decoder self-attention keys K_s^style and values V_s^style of every step
   (``attention.KVRecorder`` on the layers of ``attention.kv_places``).
2. **Joint refinement** (lines 9–12): generation starts from z_T^style; on the steps before the
   bifurcation step B = round(bifurcation_fraction · T) (thesis: T/2) the latent is refined by
   ẑ_t ← z_t − η ∇[λ_attn (L_CA + L_SA) + λ_style L_style] (Eq. 5.9, L_style of Eq. 5.8 against z_t^style).
3. **Bifurcation** (lines 13–17): at step B the latent becomes a layout branch and a style branch
   (``attention.DualBranchInjector.bifurcate``); every later step is ONE batched U-Net call over
   ``groups x [layout, style]`` rows, in which the style rows' decoder self-attention uses the layout rows'
   queries with the stored style K/V (Fig. 5.3), and the layout rows alone are refined by Eq. (5.10)
   (λ_attn (L_CA + L_SA), under ``injector.paused()``; ``layout_guidance_after``).
4. **Mask annotation** (lines 18–20): Eq. (4.11)/(5.11) on the layout branch's maps at the end of denoising
   (t = 1: the last step's call for SD's leading timesteps, the final latent for trailing ones;
   ``didgen.annotation_input``), as chapter 4 does it (``didgen.annotate_masks``: A_CS = (A_S)^τ · A_C, Otsu,
   τ = 0 fallback).

Both denoising phases are ``ctrlgen.sampling.sample`` (the second resumes with ``start_step=B`` on the
bifurcated batch after the first stopped with ``stop_step=B``); guidance is ``GuidanceRefiner`` with the
existing terms. Output: the stylised image, the mask, and the layout image.

Choices the thesis leaves open (stated in the profile): η, T, the inversion prompt (the reference's own
region-aware prompt) and its CFG scale (1), which decoder layers receive the style K/V
(``dual_branch.kv_resolutions``, empty = every decoder side), and that Eq. (5.10) acts on every step after B.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctrlgen.attention import (
    AttentionCapture,
    DualBranchInjector,
    KVRecorder,
    KVSelection,
    KVStore,
    interleave_branches,
    split_branches,
)
from ctrlgen.guidance import GuidanceRefiner, LayoutGuidanceSettings, StyleTerm
from ctrlgen.guidance.settings import FromLayout, split_layout_overrides
from ctrlgen.inversion import InversionOutput, ddim_invert
from ctrlgen.methods.didgen.pair_generation import annotate_masks, annotation_input, validate_condition_masks
from ctrlgen.methods.dual_branch.efficiency import UNetCalls
from ctrlgen.models.sd import SDComponents
from ctrlgen.models.tokens import locate_tokens
from ctrlgen.sampling import decode_images, predict_noise, sample


# ================================================================================================ config
@dataclass(frozen=True)
class DualBranchConfig:
    """Settings of Algorithm 3 (full profile: §5.3.3 — λ_attn = 1, λ_style = 50, bifurcation at T/2, τ = 4)."""

    num_steps: int = 50                   # T, shared by the inversion and the generation
    guidance_scale: float = 7.5           # classifier-free guidance of the generation
    inversion_guidance_scale: float = 1.0  # DDIM inversion without CFG
    # η, λ_attn (both λ_CA and λ_SA), attention sides, token softmax, step normalisation of Eq. (5.9)–(5.10): chapter
    # 4's layout guidance (``LayoutGuidanceSettings``); its own steps are chosen here (fraction 1, ``StepRange``)
    layout: LayoutGuidanceSettings = field(default_factory=lambda: LayoutGuidanceSettings(fraction=1.0))
    lambda_style: float = 50.0
    bifurcation_fraction: float = 0.5     # B = round(fraction · T)
    layout_guidance_after: bool = True    # Eq. (5.10) on the layout branch after B
    inject_style: bool = True             # False: the style branch runs ordinary self-attention (ablation, tests)
    kv_places: tuple[str, ...] = ("up",)  # decoder blocks (§5.3.3)
    kv_resolutions: tuple[int, ...] = ()  # decoder sides receiving style K/V (empty: every side)
    tau: int = 4
    dilate: int = 1
    erode: int = 1
    styleid_gamma: float = 0.75           # two-stage baseline: StyleID query preservation γ
    styleid_temperature: float = 1.5      # two-stage baseline: StyleID attention temperature T

    # the layout settings under the names DualBranchConfig had before it held them (read-only; set them on ``layout``)
    eta, iterations, cross_res, self_res = FromLayout(), FromLayout(), FromLayout(), FromLayout()
    smoothing_kernel, smoothing_sigma, softmax_scale = FromLayout(), FromLayout(), FromLayout()
    sa_normalize, grad_normalize = FromLayout(), FromLayout()

    @property
    def lambda_attn(self) -> float:
        """λ_attn of Eq. (5.9)–(5.10): the common weight of L_CA and L_SA."""
        if self.layout.lambda_ca != self.layout.lambda_sa:
            raise ValueError(f"λ_CA = {self.layout.lambda_ca} and λ_SA = {self.layout.lambda_sa} differ: "
                             "there is no single λ_attn, read layout.lambda_ca / layout.lambda_sa")
        return self.layout.lambda_ca

    def __post_init__(self) -> None:
        if self.num_steps < 2:
            raise ValueError(f"num_steps must be at least 2 (one step before and one after the bifurcation), "
                             f"got {self.num_steps}")
        if not 0 < self.bifurcation_step < self.num_steps:
            raise ValueError(f"bifurcation_fraction {self.bifurcation_fraction} of {self.num_steps} steps gives step "
                             f"{self.bifurcation_step}; it must fall strictly between 0 and {self.num_steps}")

    @property
    def bifurcation_step(self) -> int:
        """B: the index of the first two-branch step (thesis: t = T/2)."""
        return int(round(self.bifurcation_fraction * self.num_steps))

    @property
    def selection(self) -> KVSelection:
        """The self-attention layers that record and receive style K/V."""
        return KVSelection(places=tuple(self.kv_places), resolutions=tuple(self.kv_resolutions))

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "DualBranchConfig":
        """The profile's ``dual_branch`` section, T = ``sampling.inversion_steps``, K/V places
        ``attention.kv_places``, τ/dilate/erode of chapter 4's annotation (``didgen.pairs``), and the layout guidance
        ``LayoutGuidanceSettings.from_section(cfg, "dual_branch")`` (η and λ_attn of ``dual_branch``, attention sides
        and smoothing of ``attention``, chapter 4's token softmax and step: Eq. 5.5-5.7 = Eq. 4.7-4.9) at fraction 1
        (the steps are Algorithm 3's). ``overrides`` by field name, layout settings included (``lambda_attn=``)."""
        d, a, p = cfg["dual_branch"], cfg["attention"], cfg["didgen"]["pairs"]
        layout_over, rest = split_layout_overrides(overrides)
        kw = dict(num_steps=int(cfg["sampling"]["inversion_steps"]), guidance_scale=float(d["guidance_scale"]),
                  inversion_guidance_scale=float(d["inversion_guidance_scale"]),
                  layout=LayoutGuidanceSettings.from_section(cfg, "dual_branch", **{"fraction": 1.0, **layout_over}),
                  lambda_style=float(d["lambda_style"]),
                  bifurcation_fraction=float(d["bifurcation_fraction"]),
                  layout_guidance_after=bool(d["layout_guidance_after"]),
                  kv_places=tuple(str(x) for x in a["kv_places"]),
                  kv_resolutions=tuple(int(x) for x in d["kv_resolutions"]),
                  tau=int(p["tau"]), dilate=int(p["dilate"]), erode=int(p["erode"]),
                  styleid_gamma=float(d["styleid_gamma"]), styleid_temperature=float(d["styleid_temperature"]))
        kw.update(rest)
        return cls(**kw)


# ================================================================================================ inversion
@dataclass
class StyleReference:
    """An inverted style reference: z_t^style for every t, and the decoder self-attention K/V per step."""

    image: torch.Tensor          # (1, 3, H, W) in [0, 1] on the CPU
    prompt: str
    inversion: InversionOutput

    @property
    def kv(self) -> KVStore:
        return self.inversion.kv

    @property
    def final(self) -> torch.Tensor:
        """z_T^style: the starting latent of the generation (Algorithm 3 line 9)."""
        return self.inversion.final

    @property
    def timesteps(self) -> list[int]:
        return list(self.inversion.timesteps)

    def kv_count(self) -> int:
        """Stored (K, V) pairs: steps × selected layers."""
        return sum(len(layers) for layers in self.kv.data.values())


def style_image_tensor(image: np.ndarray | torch.Tensor, side: int) -> torch.Tensor:
    """A style image as ``(1, 3, side, side)`` float in [0, 1]; uint8 ``(H, W, 3)`` arrays are converted.
    ValueError naming the shape when it is not one RGB image of the model's side."""
    x = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.ndim == 3 and x.shape[-1] == 3 and x.shape[0] != 3:
        x = x.permute(2, 0, 1)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"a style reference is one RGB image (H, W, 3) or (3, H, W), got shape {tuple(image.shape)}")
    if tuple(x.shape[-2:]) != (side, side):
        raise ValueError(f"the style image is {tuple(x.shape[-2:])} but the model and the layout masks are "
                         f"({side}, {side}): resize the style image first")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("style image values must lie in [0, 1] (float) or [0, 255] (uint8)")
    return x.float()


@torch.no_grad()
def invert_style(model: SDComponents, image: np.ndarray | torch.Tensor, prompt: str,
                 config: DualBranchConfig) -> StyleReference:
    """Algorithm 3 line 8: DDIM-invert the style image with ``prompt`` over T = ``config.num_steps`` steps,
    keeping z_t^style and the selected decoder self-attention K/V of every step.

    Raises ValueError if the inversion does not stay finite (a reference that fails inversion)."""
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    x = style_image_tensor(image, side)
    z0 = model.encode_images(x * 2 - 1)
    cond, uncond = model.encode_prompt([prompt]), model.encode_prompt([""])
    # under CFG the inversion's U-Net batch is [uncond; cond]: keep the conditional row's K/V only
    rows = slice(1, 2) if config.inversion_guidance_scale != 1.0 else slice(None)
    recorder = KVRecorder(model.unet, config.selection, rows=rows, latent_size=tuple(z0.shape[-2:]))
    out = ddim_invert(model.unet, model.scheduler_config, z0, cond, num_steps=config.num_steps, uncond=uncond,
                      guidance_scale=config.inversion_guidance_scale, record_kv=recorder, progress=False)
    bad = [t for t, z in zip([0, *out.timesteps], out.latents) if not torch.isfinite(z).all()]
    if bad or any(not (torch.isfinite(k).all() and torch.isfinite(v).all())
                  for layers in out.kv.data.values() for k, v in layers.values()):
        raise ValueError(f"DDIM inversion of the style reference ({prompt!r}) produced NaN/inf latents or keys "
                         f"(first non-finite latent at timestep {bad[0] if bad else '-'}): "
                         "check the image and the model")
    return StyleReference(x.cpu(), prompt, out)


# ================================================================================================ result
@dataclass
class DualBranchResult:
    """Generated pairs: ``images`` (stylised) and ``layout_images`` ``(G, 3, H, W)`` in [0, 1]; ``masks``
    ``(G, H, W)`` bool (Eq. 4.11/5.11, τ = 0 fallback as in chapter 4); ``passes``: U-Net calls by kind
    (``denoising``: the trajectory's calls, ``guidance``: gradient calls, ``annotation``), ``rows``: their
    batch rows."""

    images: torch.Tensor
    layout_images: torch.Tensor
    masks: torch.Tensor
    masks_tau0: torch.Tensor
    cond_masks: torch.Tensor
    ok: torch.Tensor
    fallback: torch.Tensor
    failure: list[str]
    prompts: list[str]
    passes: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # batch rows per kind of pass
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.masks.shape[-2:] != self.images.shape[-2:] or len(self.masks) != len(self.images):
            raise ValueError(f"masks {tuple(self.masks.shape)} do not match images {tuple(self.images.shape)}")

    def valid(self) -> "DualBranchResult":
        """Only the pairs with a usable annotation."""
        k, idx = self.ok, torch.nonzero(self.ok).flatten().tolist()
        return DualBranchResult(self.images[k], self.layout_images[k], self.masks[k], self.masks_tau0[k],
                                self.cond_masks[k], self.ok[k], self.fallback[k], [self.failure[i] for i in idx],
                                [self.prompts[i] for i in idx], dict(self.passes), dict(self.rows), self.history)


# ================================================================================================ refiners
@dataclass
class StepRange:
    """A refiner active on the steps ``start <= i < stop`` only (the inner refiner's own fraction is not used)."""

    inner: GuidanceRefiner
    start: int
    stop: int

    def active(self, step_index: int, num_steps: int) -> bool:
        return self.start <= step_index < self.stop

    def __call__(self, unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor | int,
                 encoder_hidden_states: torch.Tensor, step_index: int) -> torch.Tensor:
        return self.inner(unet, latents, t, encoder_hidden_states, step_index)


@dataclass
class LayoutBranchRefiner(StepRange):
    """Eq. (5.10) on the layout rows of a ``groups x [layout, style]`` batch, with injection paused; the style
    rows pass unchanged."""

    injector: DualBranchInjector | None = None

    def __call__(self, unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor | int,
                 encoder_hidden_states: torch.Tensor, step_index: int) -> torch.Tensor:
        layout, style = split_branches(latents)
        cond = split_branches(encoder_hidden_states)[0]
        if self.injector is None:
            return interleave_branches(self.inner(unet, layout, t, cond, step_index), style)
        with self.injector.paused():
            layout = self.inner(unet, layout, t, cond, step_index)
        return interleave_branches(layout, style)


# ================================================================================================ generator
def check_reference(reference: StyleReference, model: SDComponents, config: DualBranchConfig) -> None:
    """The reference was inverted over the sampler's timesteps and recorded K/V for every step."""
    sched = model.scheduler("ddim")
    sched.set_timesteps(config.num_steps)
    want = sorted(int(t) for t in sched.timesteps)
    if sorted(reference.timesteps) != want:
        raise ValueError(f"the style reference was inverted over {len(reference.timesteps)} steps "
                         f"({sorted(reference.timesteps)[:4]}...), the generation uses {config.num_steps} "
                         f"({want[:4]}...): invert it with the same DualBranchConfig")
    if reference.kv is None or reference.kv.timesteps != want:
        raise ValueError("the style reference holds no self-attention keys/values for every step: use invert_style")


@dataclass
class StyleBatch:
    """The style side of one batch of G targets: z_T^style ``(G, C, h, w)``, z_t^style per timestep, and the
    style K/V with one row (one reference for all) or one row per U-Net group (``[uncond targets; cond targets]``
    under classifier-free guidance, the targets otherwise), as ``KVInjectProcessor`` reads them."""

    z_T: torch.Tensor
    latents: dict[int, torch.Tensor]
    kv: KVStore

    @classmethod
    def of(cls, references: Sequence[StyleReference], targets: int, cfg: bool) -> "StyleBatch":
        """One reference for every target, or one per target (``len(references) == targets``)."""
        if len(references) == 1:
            r = references[0]
            return cls(r.final.expand(targets, -1, -1, -1), {t: z.expand(targets, -1, -1, -1)
                                                              for t, z in r.inversion.by_timestep.items()}, r.kv)
        if len(references) != targets:
            raise ValueError(f"{len(references)} style references for {targets} layout masks (give one, or one each)")
        cat = lambda xs: torch.cat(xs)  # noqa: E731
        latents = {t: cat([r.inversion.by_timestep[t] for r in references]) for t in references[0].timesteps}
        kv = KVStore()
        for t, layers in references[0].kv.data.items():
            for name in layers:
                k = cat([r.kv.data[t][name][0] for r in references])
                v = cat([r.kv.data[t][name][1] for r in references])
                kv.put(t, name, cat([k, k]) if cfg else k, cat([v, v]) if cfg else v)
        return cls(cat([r.final for r in references]), latents, kv)


class DualBranchGenerator:
    """Algorithm 3, Stage II–III on a region-aware model holding the P-Tokens (module doc).

    ``generate(references, masks, prompts)`` makes one pair per layout mask, with one style reference for all
    masks or one per mask (batched: each target's result does not depend on the others in its batch).
    """

    def __init__(self, model: SDComponents, config: DualBranchConfig, lesion_token: str = "<lesion>"):
        self.model, self.config, self.lesion_token = model, config, lesion_token
        self.image_size = int(model.unet.config.sample_size) * model.vae_scale_factor

    # -- pieces the two-stage baseline shares ----------------------------------------------------------
    def prepare(self, references: StyleReference | Sequence[StyleReference], cond_masks: np.ndarray | torch.Tensor,
                prompts: Sequence[str] | str) -> tuple[torch.Tensor, list[str], int, tuple[int, ...], StyleBatch]:
        """Checked masks ``(G, H, W)``, one prompt per mask, the ``<lesion>`` position and end positions, and
        the batch's style side."""
        refs = [references] if isinstance(references, StyleReference) else list(references)
        for reference in refs:
            if tuple(reference.image.shape[-2:]) != (self.image_size, self.image_size):
                raise ValueError(f"style image {tuple(reference.image.shape[-2:])} and layout masks "
                                 f"({self.image_size}, {self.image_size}) differ in size")
            check_reference(reference, self.model, self.config)
        masks = validate_condition_masks(cond_masks, self.image_size)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1:
            prompts = prompts * len(masks)
        if len(prompts) != len(masks):
            raise ValueError(f"{len(prompts)} prompts for {len(masks)} layout masks")
        loc = locate_tokens(self.model.tokenizer, prompts, self.lesion_token)
        style = StyleBatch.of(refs, len(masks), cfg=self.config.guidance_scale != 1.0)
        return masks, prompts, loc.position(self.lesion_token), tuple(int(e) for e in loc.ends), style

    def refiner(self, masks: torch.Tensor, pos: int, lasts: tuple[int, ...],
                style: StyleBatch | None = None) -> GuidanceRefiner:
        """Eq. (5.9) with a style batch (λ_attn (L_CA + L_SA) + λ_style L_style), Eq. (5.10) without one."""
        c = self.config
        terms = c.layout.terms(masks.to(self.model.device), pos, lasts)
        if style is not None and c.lambda_style:
            terms.append(StyleTerm(style.latents, weight=c.lambda_style))
        return c.layout.refiner(terms, fraction=1.0)  # the steps are the caller's (StepRange)

    def annotate(self, before_last: torch.Tensor, final: torch.Tensor, t_last: int, prompts: list[str],
                 pos: int) -> dict[str, Any]:
        """Eq. (4.11)/(5.11) from the maps of one conditional call on the layout latent at the end of denoising
        (t = 0 in the thesis): ``didgen.annotation_input`` of the latent before the last step ``before_last``, the
        final latent ``final`` and the last sampled timestep ``t_last`` — the last step's call at t = 1 for SD's
        leading timesteps, the final latent at t = 1 for trailing ones."""
        c = self.config
        z_last, t_last = annotation_input(before_last, final, t_last)
        self_res = [c.self_res] if c.tau > 0 else []
        with torch.no_grad(), AttentionCapture(self.model.unet, cross_res=[c.cross_res], self_res=self_res,
                                               latent_size=tuple(z_last.shape[-2:])) as store:
            cond = self.model.encode_prompt(prompts)
            sched = self.model.scheduler("ddim")
            predict_noise(self.model.unet, sched.scale_model_input(z_last, t_last), t_last, cond, store=store)
            cross = store.cross(c.cross_res)[..., pos]
            sa = store.self_attention(c.self_res) if self_res else None
        return annotate_masks(cross, sa, self.image_size, c.tau, c.dilate, c.erode)

    # -- Algorithm 3 --------------------------------------------------------------------------------------
    def generate(self, references: StyleReference | Sequence[StyleReference], cond_masks: np.ndarray | torch.Tensor,
                 prompts: Sequence[str] | str) -> DualBranchResult:
        """One stylised image, layout image and annotated mask per layout mask (module doc, steps 2–4)."""
        c, model, unet = self.config, self.model, self.model.unet
        masks, prompts, pos, lasts, style = self.prepare(references, cond_masks, prompts)
        b = c.bifurcation_step
        with torch.no_grad():
            cond, uncond = model.encode_prompt(prompts), model.encode_prompt([""])
        z_t = style.z_T.to(model.device, cond.dtype).clone()
        joint = self.refiner(masks, pos, lasts, style)
        common = dict(num_steps=c.num_steps, guidance_scale=c.guidance_scale, progress=False)
        with UNetCalls(unet) as calls:
            # lines 10–12: joint layout + style refinement (Eq. 5.9) on the shared latent
            shared = sample(unet, model.scheduler("ddim"), z_t, cond, uncond, refine=StepRange(joint, 0, b),
                            stop_step=b, **common)
            # lines 13–17: both branches in one batched call per step
            layout_guide = self.refiner(masks, pos, lasts)
            with DualBranchInjector(unet, style.kv, 0, c.selection, tuple(z_t.shape[-2:])) as injector:
                injector.active = c.inject_style
                late = (LayoutBranchRefiner(layout_guide, b, c.num_steps, injector) if c.layout_guidance_after
                        else None)
                out = sample(unet, model.scheduler("ddim"), DualBranchInjector.bifurcate(shared.latents),
                             interleave_branches(cond, cond), uncond, refine=late, start_step=b,
                             keep_trajectory=True, **common)
            layout_z0, style_z0 = split_branches(out.latents)
            calls.phase = "annotation"
            ann = self.annotate(split_branches(out.trajectory[-1])[0], layout_z0, out.timesteps[-1], prompts, pos)
        history = [*joint.history, *layout_guide.history]
        return DualBranchResult(decode_images(model, style_z0), decode_images(model, layout_z0), ann["mask"],
                                ann["mask_tau0"], masks.bool().cpu(), ann["ok"], ann["fallback"], ann["failure"],
                                prompts, calls.counts(), calls.rows(), history)


__all__ = ["DualBranchConfig", "StyleReference", "DualBranchResult", "DualBranchGenerator", "StepRange",
           "LayoutBranchRefiner", "StyleBatch", "invert_style", "style_image_tensor", "check_reference"]
