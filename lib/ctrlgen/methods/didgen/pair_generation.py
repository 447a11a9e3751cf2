"""Training-free lesion–mask pair generation (thesis §4.3.4, Eq. 4.7–4.11).

Given a conditioning mask M (a real training mask — as it is in the thesis; flipped/rotated/scaled when
``PairConfig.augment_masks``, this book's choice for more diverse layouts, profile ``didgen.pairs.augment``) and a prompt
``"An image of <lesion> on <skin>, ..."``, sample from the region-aware model with layout guidance

    ẑ_t ← z_t − η ∇_{z_t} (L_CA + L_SA)                                             (Eq. 4.10)

on the first ``guidance_fraction`` of the DDIM steps (thesis: 50%, η = 20), where L_CA (Eq. 4.7) is
computed on the Attend-and-Excite softmax over text tokens of the ``<lesion>`` cross-attention map,
Gaussian-smoothed, and L_SA (Eq. 4.8–4.9) on the self-attention maps — both terms of
``ctrlgen.guidance`` in its one refiner, through ``ctrlgen.sampling.text_to_image``. Then annotate the generated lesion from the
maps at the **end** of denoising (t̂ = 0 in the thesis; here the smallest timestep t = 1 — the last step's
call for SD's leading timesteps, a call on the final latent for trailing ones, ``annotation_input``):

    A_CS = (A_S)^τ · A_C,  M̂ = Otsu(A_CS), then dilation followed by erosion        (Eq. 4.11)

with τ = 4 (matrix power, as in Dataset Diffusion, ``ctrlgen.attention.cross_self_map``), A_C the
raw ``<lesion>`` map resized to the self-attention side, and A_CS upsampled (bilinear) to the image
side before Otsu (``ctrlgen.attention.otsu_mask``). The τ = 0 annotation Otsu(A_C) is always
computed beside it (NOTES-mini-feasibility.md: in a from-scratch mini model A_S is near uniform and
τ > 0 blurs the mask).

Bad input and degenerate maps — never a silent empty mask:
* a conditioning mask that is all zero or all one (L_CA divides by Σ M and Σ (1 − M)), of the wrong
  size, or not 2-D per sample raises ``ValueError`` (``validate_condition_masks``);
* an annotation map that is constant (Otsu has no threshold), or an Otsu mask that comes out empty
  or full, is a *failure*: the τ annotation falls back to the τ = 0 annotation (counted in
  ``PairResult.fallback``); if that fails too the pair is marked invalid (``PairResult.ok`` False,
  reason in ``PairResult.failure``) and ``PairResult.valid()`` leaves it out. ``counts()`` reports all.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from skimage.transform import AffineTransform, resize, warp

from ctrlgen.attention import AttentionCapture, cross_self_map, otsu_mask, resize_maps
from ctrlgen.guidance import GuidanceRefiner, LayoutGuidanceSettings
from ctrlgen.guidance.settings import FromLayout, split_layout_overrides
from ctrlgen.models.sd import SDComponents
from ctrlgen.models.tokens import locate_tokens
from ctrlgen.sampling import predict_noise, text_to_image

CONSTANT_EPS = 1e-8


# ================================================================================================ masks in
def validate_condition_masks(masks: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Conditioning masks as a float tensor ``(B, H, W)`` in {0, 1}; ValueError for unusable ones.

    Refused: not ``(H, W)`` or ``(B, H, W)`` (or ``(B, 1, H, W)``); a side other than ``size`` (the
    image side — resize real masks with ``condition_masks_from`` first); values outside [0, 1];
    an all-zero or all-one mask (Eq. 4.7 is undefined, nothing to lay out). The message names the
    offending sample indices.
    """
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"conditioning masks must be (B, H, W), got shape {tuple(m.shape)}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(m.shape[-2:]) != hw:
        raise ValueError(f"conditioning masks are {tuple(m.shape[-2:])}, the model generates {hw}: resize them "
                         "(nearest neighbour) with condition_masks_from(..., size=) first")
    if m.numel() and (m.min() < 0 or m.max() > 1):
        raise ValueError("conditioning mask values must lie in [0, 1]")
    area = m.flatten(1).mean(1)
    empty = torch.nonzero(area == 0).flatten().tolist()
    full = torch.nonzero(area == 1).flatten().tolist()
    if empty or full:
        raise ValueError(f"conditioning masks without a lesion (all zero: {empty}) or without skin (all one: {full}); "
                         "L_CA (Eq. 4.7) needs both regions")
    return (m > 0.5).float()


def augment_masks(masks: np.ndarray, rng: np.random.Generator, flip: bool = True, rotate: bool = True,
                  scale: tuple[float, float] = (0.8, 1.2), max_tries: int = 10) -> tuple[np.ndarray, int]:
    """Random geometric augmentation of boolean masks ``(N, H, W)``: flips, rotation (any angle) and
    isotropic scaling about the centre (scikit-image, nearest neighbour).

    An augmented mask that loses its lesion, fills the image, or touches more of the border than the
    original is redrawn (up to ``max_tries``; then the original is kept). Returns the masks and how
    many were kept un-augmented for that reason.
    """
    masks = np.asarray(masks, bool)
    out = np.empty_like(masks)
    kept = 0
    for i, m in enumerate(masks):
        h, w = m.shape
        border0 = m[0].sum() + m[-1].sum() + m[:, 0].sum() + m[:, -1].sum()
        for _ in range(max_tries):
            x = m
            if flip and rng.uniform() < 0.5:
                x = x[:, ::-1]
            if flip and rng.uniform() < 0.5:
                x = x[::-1]
            angle = np.radians(rng.uniform(0, 360)) if rotate else 0.0
            s = rng.uniform(*scale) if scale else 1.0
            centre = np.array([w / 2 - 0.5, h / 2 - 0.5])
            tf = (AffineTransform(translation=-centre) + AffineTransform(rotation=angle, scale=s)
                  + AffineTransform(translation=centre))
            y = warp(x.astype(np.float32), tf.inverse, order=0, preserve_range=True) > 0.5
            border = y[0].sum() + y[-1].sum() + y[:, 0].sum() + y[:, -1].sum()
            if 0 < y.mean() < 1 and border <= border0:
                out[i] = y
                break
        else:
            out[i] = m
            kept += 1
    return out, kept


def condition_masks_from(masks: np.ndarray, n: int, size: int, seed: int = 0, augment: bool = True,
                         scale: tuple[float, float] = (0.8, 1.2)) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``n`` conditioning masks drawn (with replacement once all are used) from real training masks.

    Masks are resized to ``size`` (nearest neighbour), masks that are empty or full at that size are
    skipped (counted), then augmented if ``augment`` (this book's choice; the thesis conditions on the real
    masks as they are — ``augment=False``, ``PairConfig.augment_masks``). Returns masks ``(n, size, size)`` bool, the index of
    the source mask of each, and counts ``{"skipped_unusable", "kept_unaugmented"}``.
    """
    rng = np.random.default_rng(seed)
    src = np.asarray(masks, bool)
    if src.shape[-1] != size:
        src = np.stack([resize(m.astype(np.float32), (size, size), order=0, anti_aliasing=False) > 0.5 for m in src])
    area = src.reshape(len(src), -1).mean(1)
    usable = np.flatnonzero((area > 0) & (area < 1))
    if len(usable) == 0:
        raise ValueError("no usable conditioning mask: every training mask is empty or full at this size")
    order = np.concatenate([rng.permutation(usable) for _ in range(int(np.ceil(n / len(usable))))])[:n]
    out = src[order]
    kept = 0
    if augment:
        out, kept = augment_masks(out, rng, scale=scale)
    return out, order, {"skipped_unusable": int(len(src) - len(usable)), "kept_unaugmented": int(kept)}


# ================================================================================================ annotation
def _annotate_one(a: torch.Tensor, dilate: int, erode: int) -> tuple[torch.Tensor, str]:
    if float(a.max() - a.min()) <= CONSTANT_EPS * max(1.0, float(a.abs().max())):
        return torch.zeros(a.shape, dtype=torch.bool), "constant map"
    m = otsu_mask(a, dilate, erode)
    frac = float(m.float().mean())
    if frac == 0.0:
        return m, "empty mask"
    if frac == 1.0:
        return m, "full mask"
    return m, ""


def annotate_masks(cross: torch.Tensor, self_attn: torch.Tensor | None, size: int, tau: int = 4, dilate: int = 1,
                   erode: int = 1, power: Literal["matrix", "elementwise"] = "matrix") -> dict[str, Any]:
    """Eq. (4.11) for a batch, with the τ = 0 annotation beside it and the fallback rule of the module doc.

    Args:
        cross: raw ``<lesion>`` cross-attention maps ``(B, h, w)`` at the end of denoising (``annotation_input``).
        self_attn: self-attention ``(B, N, N)`` at the end of denoising (``annotation_input``) (None: only τ = 0).
        size: image side the masks are produced at.
    Returns ``{"mask", "mask_tau0", "ok", "fallback", "failure", "failure_tau", "a_cs"}``: ``mask``
    is the τ annotation or its τ = 0 fallback, ``ok`` False where both failed.
    """
    cross = cross.detach().float()
    b = cross.shape[0]
    if self_attn is not None and tau > 0:
        side = int(round(self_attn.shape[-1] ** 0.5))
        a_c = resize_maps(cross, side) if cross.shape[-1] != side else cross
        a_cs = cross_self_map(a_c, self_attn.detach().float(), tau, power)
    else:
        a_cs = cross
    up = lambda x: resize_maps(x, size) if x.shape[-1] != size else x  # noqa: E731
    a_cs_img, a_c_img = up(a_cs), up(cross)
    masks, masks0, ok, fallback, failure, failure_tau = [], [], [], [], [], []
    for i in range(b):
        m0, why0 = _annotate_one(a_c_img[i], dilate, erode)
        if self_attn is not None and tau > 0:
            m, why = _annotate_one(a_cs_img[i], dilate, erode)
        else:
            m, why = m0, why0
        fb = bool(why) and not why0
        if fb:
            m = m0
        masks.append(m.cpu())
        masks0.append(m0.cpu())
        ok.append(not why or fb)
        fallback.append(fb)
        failure.append("" if (not why or fb) else why)
        failure_tau.append(why)
    return {"mask": torch.stack(masks), "mask_tau0": torch.stack(masks0), "ok": torch.tensor(ok),
            "fallback": torch.tensor(fallback), "failure": failure, "failure_tau": failure_tau, "a_cs": a_cs_img.cpu()}


# t̂ of Eq. (4.11): the smallest timestep SD's DDIM sampler visits (leading spacing, steps_offset 1)
ANNOTATION_TIMESTEP = 1


def annotation_input(before_last: torch.Tensor, final: torch.Tensor, t_last: int) -> tuple[torch.Tensor, int]:
    """The latent and timestep whose U-Net call the annotation of Eq. (4.11)/(5.11) reads its maps from: the end of
    denoising ("t̂ = 0", §4.3.4, §5.3.3) — the smallest timestep of the schedule, ``ANNOTATION_TIMESTEP`` = 1,
    whatever the sampler's timestep spacing.

    * SD's leading spacing (``steps_offset`` 1) ends with a step at ``t_last`` = 1: the maps are those of that last
      step's conditional call on its input latent ``before_last`` (z_1), the thesis' reading of SD.
    * Trailing spacing (the zero-terminal-SNR schedule of the mini/smoke models) ends with a step at
      ``t_last`` = T/n − 1 (39 of 25 steps, 249 of 4) on a latent that noisy; its maps are not those of the end of
      denoising. The U-Net is called instead on the ``final`` latent z_0 at t = 1.

    ``t_last`` at or below 1 (the end is already reached) keeps ``(before_last, t_last)``."""
    if int(t_last) <= ANNOTATION_TIMESTEP:
        return before_last, int(t_last)
    return final, ANNOTATION_TIMESTEP


# ================================================================================================ generator
@dataclass(frozen=True)
class PairConfig:
    """Pair-generation settings (full profile: §4.3.4 — η = 20, first 50% of 50 DDIM steps, τ = 4).

    ``layout`` holds the layout guidance of Eq. (4.10) (``ctrlgen.guidance.LayoutGuidanceSettings``, shared with
    chapter 5's ``DualBranchConfig``); its values read as before through ``eta``, ``guidance_fraction``,
    ``cross_res``, ``self_res``, ``softmax_scale``, ``grad_normalize``, ... ``use_ca``/``use_sa`` are §4.4.5's
    ablation switches on top of it."""

    num_steps: int = 50
    guidance_scale: float = 7.5
    layout: LayoutGuidanceSettings = field(default_factory=LayoutGuidanceSettings)
    tau: int = 4
    dilate: int = 1
    erode: int = 1
    use_ca: bool = True
    use_sa: bool = True
    guidance: bool = True  # False: plain sampling (the "unguided" rows), still annotated
    # conditioning masks (``condition_masks``): the thesis uses the real masks as they are (augment_masks=False);
    # flipping, rotating and scaling them (within augment_scale) is this book's choice, for more diverse layouts
    augment_masks: bool = True
    augment_scale: tuple[float, float] = (0.8, 1.2)

    # the layout settings under the names PairConfig had before it held them (read-only; set them on ``layout``)
    eta, guidance_fraction, iterations = FromLayout(), FromLayout(), FromLayout()
    cross_res, self_res, smoothing_kernel, smoothing_sigma = FromLayout(), FromLayout(), FromLayout(), FromLayout()
    softmax_scale, sa_normalize, grad_normalize = FromLayout(), FromLayout(), FromLayout()

    def __post_init__(self):
        lo, hi = self.augment_scale
        if not 0 < lo <= hi:
            raise ValueError(f"augment_scale {self.augment_scale} must be (low, high) with 0 < low <= high")

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any], **overrides: Any) -> "PairConfig":
        """``didgen.pairs`` with its layout guidance (``LayoutGuidanceSettings.from_section(cfg, "didgen.pairs")``:
        η, guidance fraction, the pairs' own token-softmax scale and step); ``overrides`` by field name, layout
        settings included (``eta=``, ``grad_normalize=``)."""
        p = cfg["didgen"]["pairs"]
        layout_over, rest = split_layout_overrides(overrides)
        kw = dict(num_steps=int(p["num_steps"]), guidance_scale=float(p["guidance_scale"]),
                  layout=LayoutGuidanceSettings.from_section(cfg, "didgen.pairs", **layout_over),
                  tau=int(p["tau"]), dilate=int(p["dilate"]), erode=int(p["erode"]), augment_masks=bool(p["augment"]),
                  augment_scale=tuple(float(v) for v in p["augment_scale"]))
        kw.update(rest)
        return cls(**kw)

    def condition_masks(self, masks: np.ndarray, n: int, size: int, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """``condition_masks_from`` with this config's switch: real masks as they are (the thesis) or augmented."""
        return condition_masks_from(masks, n, size, seed, augment=self.augment_masks, scale=self.augment_scale)


@dataclass
class PairResult:
    """A batch of generated pairs. Images ``(B, 3, H, W)`` in [0, 1]; masks ``(B, H, W)`` bool."""

    images: torch.Tensor
    masks: torch.Tensor           # Eq. (4.11) annotation with τ, or its τ = 0 fallback
    masks_tau0: torch.Tensor      # Otsu(A_C), always reported (NOTES)
    cond_masks: torch.Tensor
    ok: torch.Tensor              # False: no usable annotation (left out by valid())
    fallback: torch.Tensor        # True: the τ annotation failed and the τ = 0 one is used
    failure: list[str]
    failure_tau: list[str]
    prompts: list[str]
    cross_maps: torch.Tensor      # raw <lesion> maps at the end of denoising (B, h, w)
    a_cs: torch.Tensor            # processed map A_CS at image side (B, H, W)
    history: list[dict[str, float]] = field(default_factory=list)

    def valid(self) -> "PairResult":
        """Only the pairs with a usable annotation."""
        k = self.ok
        idx = torch.nonzero(k).flatten().tolist()
        pick = lambda x: x[k]  # noqa: E731
        return PairResult(pick(self.images), pick(self.masks), pick(self.masks_tau0), pick(self.cond_masks), pick(self.ok),
                          pick(self.fallback), [self.failure[i] for i in idx], [self.failure_tau[i] for i in idx],
                          [self.prompts[i] for i in idx], pick(self.cross_maps), pick(self.a_cs), self.history)

    def counts(self) -> dict[str, int]:
        """How many pairs, how many τ annotations failed (and why), fell back to τ = 0, or were dropped."""
        out = {"pairs": int(len(self.ok)), "ok": int(self.ok.sum()), "fallback_tau0": int(self.fallback.sum()),
               "dropped": int((~self.ok).sum())}
        for why in set(self.failure_tau) - {""}:
            out[f"tau_failed: {why}"] = self.failure_tau.count(why)
        for why in set(self.failure) - {""}:
            out[f"dropped: {why}"] = self.failure.count(why)
        return out

    @staticmethod
    def concat(parts: Sequence["PairResult"]) -> "PairResult":
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        flat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return PairResult(cat("images"), cat("masks"), cat("masks_tau0"), cat("cond_masks"), cat("ok"), cat("fallback"),
                          flat("failure"), flat("failure_tau"), flat("prompts"), cat("cross_maps"), cat("a_cs"),
                          flat("history"))


class PairGenerator:
    """Batched lesion–mask pair generation with a region-aware model (§4.3.4).

    ``model`` holds the P-Tokens (``setup_placeholders``); every prompt must contain ``<lesion>`` at
    the same position (the prefix guarantees it).
    """

    def __init__(self, model: SDComponents, config: PairConfig, lesion_token: str = "<lesion>"):
        if config.guidance and not (config.use_ca or config.use_sa):
            raise ValueError("layout guidance with neither L_CA nor L_SA: use guidance=False instead")
        self.model, self.config = model, config
        self.lesion_token = lesion_token
        self.image_size = int(model.unet.config.sample_size) * model.vae_scale_factor

    def generate(self, cond_masks: np.ndarray | torch.Tensor, prompts: Sequence[str], seed: int = 0,
                 batch_size: int = 16, progress: bool = False) -> PairResult:
        """Generate one pair per conditioning mask (``prompts``: one per mask, or one for all)."""
        masks = validate_condition_masks(cond_masks, self.image_size)
        prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
        if len(prompts) == 1:
            prompts = prompts * len(masks)
        if len(prompts) != len(masks):
            raise ValueError(f"{len(prompts)} prompts for {len(masks)} masks")
        g = torch.Generator().manual_seed(seed)
        parts = [self._batch(masks[i:i + batch_size], prompts[i:i + batch_size], g, progress)
                 for i in range(0, len(masks), batch_size)]
        return PairResult.concat(parts)

    def refiner(self, masks: torch.Tensor, token_index: int, lasts: tuple[int, ...]) -> GuidanceRefiner | None:
        """Eq. (4.10) with L_CA and L_SA for one batch (None without guidance). ``use_ca=False`` keeps L_CA at
        weight 0 (recorded, not followed) for the ablations of §4.4.5; ``use_sa=False`` drops L_SA."""
        c = self.config
        if not c.guidance:
            return None
        return c.layout.refiner(c.layout.terms(masks, token_index, lasts, with_ca=c.use_ca, with_sa=c.use_sa))

    def _batch(self, masks: torch.Tensor, prompts: list[str], g: torch.Generator, progress: bool) -> PairResult:
        c, model = self.config, self.model
        loc = locate_tokens(model.tokenizer, prompts, self.lesion_token)
        pos = loc.position(self.lesion_token)
        refiner = self.refiner(masks.to(model.device), pos, tuple(loc.ends.tolist()))
        kept: dict[str, Any] = {}

        def keep_last_input(i: int, t: int, latents: torch.Tensor) -> None:
            if i == c.num_steps - 2:
                kept["z"] = latents.detach().clone()

        out = text_to_image(model, prompts, num_steps=c.num_steps, guidance_scale=c.guidance_scale, generator=g,
                            refiner=refiner, callback=keep_last_input, progress=progress)
        # maps at the end of denoising (t̂ of Eq. 4.11, ``annotation_input``): one conditional U-Net call with capture
        sched = model.scheduler("ddim")
        z_last, t_last = annotation_input(kept.get("z", out.noise * sched.init_noise_sigma), out.latents,
                                          out.timesteps[-1])
        latent_side = int(model.unet.config.sample_size)
        self_res = [c.self_res] if c.tau > 0 else []
        with torch.no_grad(), AttentionCapture(model.unet, cross_res=[c.cross_res], self_res=self_res,
                                               latent_size=latent_side) as store:
            cond = model.encode_prompt(prompts)
            predict_noise(model.unet, sched.scale_model_input(z_last, t_last), t_last, cond, store=store)
            cross = store.cross(c.cross_res)[..., pos]
            sa = store.self_attention(c.self_res) if self_res else None
        ann = annotate_masks(cross, sa, self.image_size, c.tau, c.dilate, c.erode)
        return PairResult(out.images, ann["mask"], ann["mask_tau0"], masks.bool().cpu(), ann["ok"], ann["fallback"],
                          ann["failure"], ann["failure_tau"], prompts, cross.cpu(), ann["a_cs"],
                          list(refiner.history) if refiner is not None else [])


__all__ = ["validate_condition_masks", "augment_masks", "condition_masks_from", "annotate_masks",
           "ANNOTATION_TIMESTEP", "annotation_input", "PairConfig", "PairResult", "PairGenerator"]
