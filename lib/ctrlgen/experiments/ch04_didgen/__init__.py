"""Chapter 4's experiments (§4.4.2, §4.4.5, §4.4.6): DiDGen and its baselines trained once, cached, evaluated.

The chapter calls these functions; the methods themselves live in ``ctrlgen.methods.didgen`` and
``ctrlgen.methods.baselines``. The four finetuned models and their cache are ``models`` (re-exported
here): a package of two modules only so that editing the evaluation, tables or figures below never
changes the models' code version and so never retrains them.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from ctrlgen.attention import AttentionCapture, otsu_mask, resize_maps
from ctrlgen.data import load_dataset
from ctrlgen.data.tensors import image_tensor
from ctrlgen.experiments.base_models import load_domain_data
from ctrlgen.experiments.ch04_didgen.models import MODEL_NAMES, Finetuned, base_model, finetune, models_dir
from ctrlgen.methods.didgen import CaptionCache, PairConfig, PairGenerator, PromptSampler, captioner_from_profile
from ctrlgen.metrics.image import fid, ms_ssim_between, within_set_diversity
from ctrlgen.metrics.overlap import iou
from ctrlgen.models.tokens import locate_tokens
from ctrlgen.paths import cache_root
from ctrlgen.progress import tqdm
from ctrlgen.sampling import text_to_image


# ================================================================================================ data
@dataclass
class DermSets:
    """Training images/masks (the pretraining train split) with their DermPrompts, and the real evaluation set."""

    train_images: np.ndarray            # (N, H, W, 3) uint8
    train_masks: np.ndarray             # (N, H, W) bool
    train_ids: list[str]
    captions: list[Any]                 # ctrlgen.methods.didgen.Caption per training image
    eval_images: np.ndarray             # the real test images FID / MS-SSIM are computed against
    eval_masks: np.ndarray
    eval_name: str
    eval_captions: list[Any]            # their DermPrompts (for attention maps on real images)
    source: str
    provenance: str
    fingerprint: str

    @property
    def prompts(self) -> list[str]:
        return [c.text for c in self.captions]


def derm_sets(cfg: Mapping[str, Any], tokenizer, data=None) -> DermSets:
    """The derm training split of the base models (``ctrlgen.data.domains``) captioned with the profile's DermPrompt captioner
    (cached per image), and the evaluation set: the dataset's ``test`` split (thesis: "the testing set of
    Task 1"), else the held-out images.

    ``data``: the domain's ``DomainData`` if already loaded (see ``load_base_and_sets``)."""
    data = data or load_domain_data(cfg, "derm")
    masks = data.regions.astype(bool)
    captioner = captioner_from_profile(cfg, tokenizer)
    cache = CaptionCache(cache_root(cfg) / "captions" / f"{data.dataset}-{cfg['models']['image_size']}")
    captions = captioner.caption_many(data.images, masks, data.ids, cache)
    eval_images, eval_masks, eval_name = data.heldout_images, data.heldout_regions.astype(bool), "held-out images"
    eval_ids = data.heldout_ids
    ds = load_dataset(data.dataset, cfg, resolution=int(cfg["models"]["image_size"]), require_images=True)
    test = [r for r in ds.with_images() if r.split == "test" and r.mask_path is not None]
    if len(test) >= 2:
        eval_images, m = ds.load_arrays(test)
        eval_masks, eval_name, eval_ids = m.astype(bool), f"{data.dataset} test split", [r.id for r in test]
    eval_captions = captioner.caption_many(eval_images, eval_masks, eval_ids, cache)
    fp = hashlib.sha256((data.fingerprint + "|" + "\n".join(c.text for c in captions)).encode()).hexdigest()[:16]
    return DermSets(data.images, masks, data.ids, captions, eval_images, eval_masks, eval_name, eval_captions,
                    data.source, data.provenance, fp)


def load_base_and_sets(cfg: Mapping[str, Any]):
    """The derm base model (pretrained now if the cache lacks it) and its ``DermSets``, the data read once."""
    data = load_domain_data(cfg, "derm")
    base = base_model(cfg, data=data)
    return base, derm_sets(cfg, base.tokenizer, data=data)


def pixels01(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1] (what metrics and figures take)."""
    return image_tensor(images, signed=False)


# ================================================================================================ Table 4.1
@torch.no_grad()
def sample_images(model, prompts: Sequence[str], num_steps: int, guidance_scale: float, seed: int = 0,
                  batch_size: int = 64) -> torch.Tensor:
    """Text-to-image samples ``(N, 3, H, W)`` in [0, 1], a fresh initial noise per image (seeded per batch)."""
    # a seed per batch (seed + first index), as the cached sample sets were drawn
    out = [text_to_image(model, list(prompts[i:i + batch_size]), num_steps=num_steps, guidance_scale=guidance_scale,
                         seed=seed + i).images for i in range(0, len(prompts), batch_size)]
    return torch.cat(out)


def table_4_1_prompts(cfg: Mapping[str, Any], sets: DermSets, tokenizer, n: int) -> dict[str, list[str]]:
    """The prompts of each Table 4.1 row: new DermPrompts (attribute values seen in training, recombined),
    the prefix alone, and the baselines' fixed prompt."""
    sampler = PromptSampler(sets.captions, tokenizer, prefix=str(cfg["didgen"]["prefix"]))
    new = [c.text for c in sampler.sample(n, seed=int(cfg["seed"]) + 7, mode="marginal")]
    fixed = str(cfg["didgen"]["baselines"]["prompt"])
    return {"Mine-DermPrompt": new, "Mine-prefix": [str(cfg["didgen"]["prefix"])] * n,
            "SD-Finetune": [fixed] * n, "DreamBooth": [fixed] * n}


ROW_MODEL = {"Mine-DermPrompt": "mine", "Mine-prefix": "mine", "SD-Finetune": "sd-finetune", "DreamBooth": "dreambooth"}


def quality_row(samples: torch.Tensor, real: torch.Tensor, fid_features, distance, cfg: Mapping[str, Any]) -> dict[str, float]:
    """FID and MS-SSIM against the real evaluation images, LPIPS within the generated set (Table 4.1)."""
    e, seed = cfg["didgen"]["eval"], int(cfg["seed"])
    return {"FID ↓": fid(real, samples, fid_features),
            "MS-SSIM ↑": ms_ssim_between(samples, real, 0, seed, int(e["ms_ssim_scales"]), int(e["ms_ssim_kernel"])),
            "LPIPS ↑": within_set_diversity(samples, distance, int(e["lpips_pairs"]), seed)}


# ================================================================================================ Fig. 4.7a
@torch.no_grad()
def token_maps_on_real(model, images: np.ndarray, prompts: Sequence[str], tokens: Sequence[str], t: int, res: int,
                       seed: int = 0, batch_size: int = 32) -> torch.Tensor:
    """Cross-attention maps ``(N, K, res, res)`` of ``tokens`` on noised real images at timestep ``t`` (one
    U-Net call with capture on side ``res`` only)."""
    ids_all = model.tokenize(list(prompts))
    positions = locate_tokens(model.tokenizer, list(prompts), tokens).positions  # ValueError naming a missing token
    gen = torch.Generator().manual_seed(seed)
    sched = model.noise_scheduler()
    out = []
    for i in range(0, len(images), batch_size):
        z = model.encode_images(image_tensor(images[i:i + batch_size]).to(model.device))
        noise = torch.randn(z.shape, generator=gen).to(z)
        tt = torch.full((len(z),), t, dtype=torch.long, device=z.device)
        ids = ids_all[i:i + batch_size]
        pos = positions[i:i + batch_size]
        with AttentionCapture(model.unet, cross_res=[res], self_res=[], latent_size=tuple(z.shape[-2:])) as store:
            model.unet(sched.add_noise(z, noise, tt), tt, encoder_hidden_states=model.encode_ids(ids.to(z.device)))
            maps = store.cross(res)  # (B, h, w, T)
        out.append(torch.stack([maps[b, :, :, pos[b]].permute(2, 0, 1) for b in range(len(z))]).cpu())
    return torch.cat(out)


def otsu_iou(maps: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    """IoU of ``Otsu(map)`` (bilinear-upsampled to the mask side, no morphology) against the true masks."""
    side = masks.shape[-1]
    pred = otsu_mask(resize_maps(maps.float(), side), dilate=0, erode=0)
    return iou(pred.numpy(), masks)


def blob_baseline_iou(train_masks: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """IoU of one fixed mask — the thresholded mean training mask — against each mask (what a map that
    ignores the image would score; NOTES-mini-feasibility.md reports 0.40 for ISIC at 64 px)."""

    mean = train_masks.mean(0) > 0.5 if (train_masks.mean(0) > 0.5).any() else train_masks.mean(0) >= train_masks.mean(0).max()
    return iou(np.broadcast_to(mean, masks.shape), masks)


# ================================================================================================ pairs
@dataclass
class PairRun:
    """One pair-generation condition of §4.4.5: the result and its wall time per pair."""

    label: str
    result: Any                         # PairResult
    seconds_per_pair: float


def run_pairs(model, cfg: Mapping[str, Any], cond_masks: np.ndarray, prompts: Sequence[str], label: str, seed: int,
              progress: bool = False, **overrides: Any) -> PairRun:
    """Generate pairs with ``PairConfig.from_profile(cfg, **overrides)`` (e.g. ``use_ca=False``, ``guidance=False``)."""
    gen = PairGenerator(model, PairConfig.from_profile(cfg, **overrides))
    t0 = time.perf_counter()
    res = gen.generate(cond_masks, list(prompts), seed=seed, batch_size=int(cfg["didgen"]["eval"]["pair_batch"]),
                       progress=progress)
    return PairRun(label, res, (time.perf_counter() - t0) / max(1, len(cond_masks)))


def first_pairs(run: PairRun, n: int, label: str) -> PairRun:
    """The first ``n`` pairs of a run (the masks the ablations share), same time per pair."""
    r = run.result
    res = type(r)(r.images[:n], r.masks[:n], r.masks_tau0[:n], r.cond_masks[:n], r.ok[:n], r.fallback[:n], r.failure[:n],
                  r.failure_tau[:n], r.prompts[:n], r.cross_maps[:n], r.a_cs[:n], r.history)
    return PairRun(label, res, run.seconds_per_pair)


def pair_summary(run: PairRun, segmenter=None) -> dict[str, float]:
    """Agreement and failure figures of one pair run (§4.4.5): IoU of the annotation against the conditioning
    mask (τ and τ = 0), failures, and — with a segmenter trained on real data — against the lesion drawn."""

    r = run.result
    agree = iou(r.masks.numpy(), r.cond_masks.numpy())[r.ok.numpy()]
    iou0 = iou(r.masks_tau0.numpy(), r.cond_masks.numpy())
    n = len(r.ok)
    out = {"pairs": float(n), "IoU(annotation, condition) mean": float(agree.mean()) if len(agree) else float("nan"),
           "IoU(annotation, condition) sd": float(agree.std()) if len(agree) else float("nan"),
           "IoU(τ=0 annotation, condition) mean": float(iou0.mean()),
           "τ annotation failed [%]": 100.0 * sum(bool(w) for w in r.failure_tau) / n,
           "dropped (no usable mask) [%]": 100.0 * float((~r.ok).sum()) / n,
           "seconds per pair": run.seconds_per_pair}
    if segmenter is not None:
        drawn = segmenter.predict(r.images)
        out["IoU(annotation, drawn lesion) mean"] = float(iou(r.masks.numpy(), drawn)[r.ok.numpy()].mean())
        out["IoU(condition, drawn lesion) mean"] = float(iou(r.cond_masks.numpy(), drawn).mean())
    return out


# ================================================================================================ segmenter
@dataclass
class Segmenter:
    """A small MONAI U-Net trained on the real training pairs: measures the lesion actually drawn in a
    generated image (the annotation's agreement with the image, not with the condition)."""

    net: torch.nn.Module
    history: list[float]
    heldout_iou: float = float("nan")

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Boolean masks ``(N, H, W)`` for images ``(N, 3, H, W)`` in [0, 1]."""
        self.net.eval()
        out = [self.net(images[i:i + batch_size].float() * 2 - 1)[:, 0] > 0 for i in range(0, len(images), batch_size)]
        return torch.cat(out).cpu().numpy()


def train_segmenter(images: np.ndarray, masks: np.ndarray, steps: int, batch_size: int, lr: float,
                    channels: Sequence[int], seed: int = 0, progress: bool = False) -> Segmenter:
    """MONAI ``UNet`` (2-D, strided convolutions, residual units) trained with Dice + BCE (``monai.losses.DiceCELoss``)
    and random flips."""
    torch.manual_seed(seed)
    net = UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=tuple(channels),
               strides=tuple([2] * (len(channels) - 1)), num_res_units=1)
    x = image_tensor(images)
    y = torch.from_numpy(np.asarray(masks, np.float32))[:, None]
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    net.train()
    for _ in tqdm(range(steps), disable=not progress, desc="segmenter", leave=False):
        idx = torch.as_tensor(rng.integers(0, len(x), batch_size))
        xb, yb = x[idx], y[idx]
        if rng.uniform() < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if rng.uniform() < 0.5:
            xb, yb = xb.flip(-2), yb.flip(-2)
        loss = loss_fn(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    net.eval()
    return Segmenter(net, history)


# ================================================================================================ figures
def maps_figure(images_by_model: Mapping[str, torch.Tensor], maps_by_model: Mapping[str, torch.Tensor],
                tokens: Sequence[str], n: int = 4):
    """Fig. 4.7a: per model, generated images and the cross-attention maps of each P-Token beneath them."""
    models = list(images_by_model)
    rows = len(models) * (1 + len(tokens))
    fig, axes = plt.subplots(rows, n, figsize=(1.5 * n, 1.45 * rows), squeeze=False)
    r = 0
    for m in models:
        for c in range(n):
            axes[r, c].imshow(images_by_model[m][c].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[r, 0].set_title(f"{m}: image", fontsize=8, loc="left")
        for k, tok in enumerate(tokens):
            for c in range(n):
                axes[r + 1 + k, c].imshow(maps_by_model[m][c, k].numpy(), cmap="viridis")
            axes[r + 1 + k, 0].set_title(f"{m}: A_C({tok})", fontsize=8, loc="left")
        r += 1 + len(tokens)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def pairs_figure(runs: Sequence[PairRun], n: int = 6):
    """Per condition: generated images, conditioning masks, annotated masks (Eq. 4.11) and A_CS."""
    kinds = ("image", "condition", "annotation", "A_CS")
    fig, axes = plt.subplots(len(runs) * len(kinds), n, figsize=(1.4 * n, 1.3 * len(runs) * len(kinds)), squeeze=False)
    for i, run in enumerate(runs):
        r = run.result
        for k, kind in enumerate(kinds):
            row = i * len(kinds) + k
            for c in range(min(n, len(r.ok))):
                if kind == "image":
                    axes[row, c].imshow(r.images[c].permute(1, 2, 0).clamp(0, 1).numpy())
                elif kind == "A_CS":
                    axes[row, c].imshow(r.a_cs[c].numpy(), cmap="viridis")
                else:
                    m = r.cond_masks[c] if kind == "condition" else r.masks[c]
                    axes[row, c].imshow(m.numpy(), cmap="gray", vmin=0, vmax=1)
            axes[row, 0].set_title(f"{run.label}: {kind}", fontsize=8, loc="left")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def loss_table(models: Mapping[str, Finetuned], tail: float = 0.1) -> pd.DataFrame:
    """Mean of each logged loss over the last ``tail`` of the steps, per finetuned model."""
    rows = {}
    for name, ft in models.items():
        h = pd.DataFrame(ft.history)
        k = max(1, int(len(h) * tail))
        rows[name] = {c: float(h[c].iloc[-k:].mean()) for c in h.columns if c != "step"}
        rows[name]["steps"] = int(h["step"].iloc[-1]) if len(h) else 0
        rows[name]["from cache"] = ft.cached
        rows[name]["training wall time [s]"] = round(ft.train_seconds, 1)
    return pd.DataFrame(rows).T


__all__ = ["MODEL_NAMES", "Finetuned", "finetune", "models_dir", "base_model", "DermSets", "derm_sets",
           "load_base_and_sets", "pixels01", "sample_images", "table_4_1_prompts", "ROW_MODEL", "quality_row",
           "token_maps_on_real", "otsu_iou", "blob_baseline_iou", "PairRun", "run_pairs", "first_pairs", "pair_summary",
           "Segmenter", "train_segmenter", "maps_figure", "pairs_figure", "loss_table"]
