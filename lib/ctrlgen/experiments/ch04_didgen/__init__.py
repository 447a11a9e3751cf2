"""Chapter 4's experiments (§4.4.2, §4.4.5, §4.4.6): DiDGen and its baselines trained once, cached, evaluated.

The chapter calls these functions; the methods themselves live in ``ctrlgen.methods.didgen`` and
``ctrlgen.methods.baselines``. The four finetuned models and their cache are ``models`` (re-exported
here): a package of two modules only so that editing the evaluation, tables or figures below never
changes the models' code version and so never retrains them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from ctrlgen import result_cache
from ctrlgen.attention import AttentionCapture, otsu_mask, resize_maps
from ctrlgen.data import load_dataset
from ctrlgen.data.tensors import image_tensor
from ctrlgen.experiments.base_models import load_domain_data
from ctrlgen.experiments.ch04_didgen.models import MODEL_NAMES, Finetuned, base_model, finetune, models_dir
from ctrlgen.methods.baselines.boxdiff import BoxDiffConfig, box_masks
from ctrlgen.methods.baselines.null_text_inversion import NullTextConfig
from ctrlgen.methods.didgen import (
    AttributeCaptioner,
    CaptionCache,
    PairConfig,
    PairGenerator,
    PairResult,
    PromptSampler,
    captioner_from_profile,
)
from ctrlgen.methods.didgen import further_control
from ctrlgen.metrics.image import fid, mask_set_diversity, ms_ssim_between, within_set_diversity
from ctrlgen.metrics.overlap import iou
from ctrlgen.thesis import Direction, direction_table, in_text, thesis_frame
from ctrlgen import figures
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


# ================================================================================================ settings
@dataclass(frozen=True)
class EvalConfig:
    """Chapter 4's evaluation settings, typed once from the profile (``didgen.eval``, ``sampling``, the prompt
    pool of ``didgen.dermprompt.n_new_prompts``, the prefix and the baselines' prompt, ``seed``) so that the
    chapter passes one object instead of casting profile values."""

    n_samples: int
    eval_size: int                      # §4.7.2: samples and real images resized to this side for the metrics
    ms_ssim_scales: int
    ms_ssim_kernel: int
    lpips_pairs: int
    pair_batch: int
    n_pairs: int
    n_ablation_pairs: int
    attention_timestep: int
    n_figure: int
    segmenter_steps: int
    segmenter_batch: int
    segmenter_lr: float
    segmenter_channels: tuple[int, ...]
    n_new_prompts: int                  # §4.3.2: the pool of new DermPrompts every sampled row draws from
    num_steps: int                      # text-to-image sampling (Table 4.1, Fig. 4.7a, 4.8, 4.10)
    guidance_scale: float
    cross_res: int                      # side of the <lesion> maps read (attention.cross_res[0])
    prefix: str
    baseline_prompt: str
    seed: int

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "EvalConfig":
        e, d, s = cfg["didgen"]["eval"], cfg["didgen"], cfg["sampling"]
        return cls(n_samples=int(e["n_samples"]), eval_size=int(e["eval_size"]), ms_ssim_scales=int(e["ms_ssim_scales"]),
                   ms_ssim_kernel=int(e["ms_ssim_kernel"]), lpips_pairs=int(e["lpips_pairs"]), pair_batch=int(e["pair_batch"]),
                   n_pairs=int(d["pairs"]["n_pairs"]), n_ablation_pairs=int(e["n_ablation_pairs"]),
                   attention_timestep=int(e["attention_timestep"]), n_figure=int(e["n_figure"]),
                   segmenter_steps=int(e["segmenter_steps"]), segmenter_batch=int(e["segmenter_batch"]),
                   segmenter_lr=float(e["segmenter_lr"]), segmenter_channels=tuple(int(c) for c in e["segmenter_channels"]),
                   n_new_prompts=int(d["dermprompt"]["n_new_prompts"]), num_steps=int(s["num_steps"]),
                   guidance_scale=float(s["guidance_scale"]), cross_res=int(cfg["attention"]["cross_res"][0]),
                   prefix=str(d["prefix"]), baseline_prompt=str(d["baselines"]["prompt"]), seed=int(cfg["seed"]))

    @property
    def n_figure_maps(self) -> int:
        """Images per model in Fig. 4.7a (half a figure row, at least one)."""
        return self.n_figure // 2 or 1


def _digest(*values: Any) -> str:
    """SHA-256 of texts and arrays (a cache key part for prompts and masks, which are too long to key verbatim)."""
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, (np.ndarray, torch.Tensor)):
            a = np.ascontiguousarray(v.numpy() if isinstance(v, torch.Tensor) else v)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(v, sort_keys=True).encode())
    return h.hexdigest()


def _source(*functions: Any) -> str:
    """Hash of the source of the functions that compute a cached value (the rest of this module may change freely)."""
    return _digest([inspect.getsource(f) for f in functions])


# ================================================================================================ Table 4.1
@torch.no_grad()
def sample_images(model, prompts: Sequence[str], num_steps: int, guidance_scale: float, seed: int = 0,
                  batch_size: int = 64) -> torch.Tensor:
    """Text-to-image samples ``(N, 3, H, W)`` in [0, 1], a fresh initial noise per image (seeded per batch)."""
    # a seed per batch (seed + first index), as the cached sample sets were drawn
    out = [text_to_image(model, list(prompts[i:i + batch_size]), num_steps=num_steps, guidance_scale=guidance_scale,
                         seed=seed + i).images for i in range(0, len(prompts), batch_size)]
    return torch.cat(out)


def cached_samples(ft: Finetuned, prompts: Sequence[str], ec: EvalConfig, cfg: Mapping[str, Any],
                   seed: int | None = None) -> torch.Tensor:
    """``sample_images`` of a finetuned model, stored by content (``ctrlgen.result_cache``): keyed by the model's cache
    key, the prompts, the sampling settings, the seed, the data and the sampling code."""
    seed = ec.seed if seed is None else seed
    parts = {"what": "ch04 samples", "model": ft.key, "prompts": _digest(list(prompts)), "num_steps": ec.num_steps,
             "guidance_scale": ec.guidance_scale, "seed": seed, "data": result_cache.data_fingerprint(cfg),
             "function": _source(sample_images)}
    return result_cache.cached(parts, lambda: sample_images(ft.model, prompts, ec.num_steps, ec.guidance_scale, seed=seed),
                               kind="torch", cfg=cfg, code=["ctrlgen.sampling"])


def new_prompts(sets: DermSets, tokenizer, ec: EvalConfig) -> list[str]:
    """The pool of ``n_new_prompts`` new DermPrompts (§4.3.2: attribute values seen in training, recombined — the
    offline stand-in for the thesis's LLM-written prompts). Every row that samples with new prompts draws from it
    in order, cycling when it needs more (the sampler's draws are sequential: a larger pool starts the same)."""
    sampler = PromptSampler(sets.captions, tokenizer, prefix=ec.prefix)
    return [c.text for c in sampler.sample(ec.n_new_prompts, seed=ec.seed + 7, mode="marginal")]


def _cycle(pool: Sequence[str], n: int) -> list[str]:
    return [pool[i % len(pool)] for i in range(n)]


def table_4_1_prompts(ec: EvalConfig, pool: Sequence[str], n: int | None = None) -> dict[str, list[str]]:
    """The prompts of each Table 4.1 row: new DermPrompts from ``pool`` (``new_prompts``), the prefix alone, and
    the baselines' fixed prompt; ``n`` per row (default ``n_samples``)."""
    n = ec.n_samples if n is None else n
    return {"Mine-DermPrompt": _cycle(pool, n), "Mine-prefix": [ec.prefix] * n,
            "SD-Finetune": [ec.baseline_prompt] * n, "DreamBooth": [ec.baseline_prompt] * n}


ROW_MODEL = {"Mine-DermPrompt": "mine", "Mine-prefix": "mine", "SD-Finetune": "sd-finetune", "DreamBooth": "dreambooth"}


def eval_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] at ``size`` × ``size`` for evaluation (§4.7.2: 256 × 256): bilinear with
    antialiasing, clamped to [0, 1]; unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def quality_row(samples: torch.Tensor, real: torch.Tensor, fid_features, distance, ec: EvalConfig) -> dict[str, float]:
    """FID and MS-SSIM against the real evaluation images, LPIPS within the generated set (Table 4.1), all on
    images resized to ``ec.eval_size``."""
    samples, real = eval_resize(samples, ec.eval_size), eval_resize(real, ec.eval_size)
    return {"FID ↓": fid(real, samples, fid_features),
            "MS-SSIM ↑": ms_ssim_between(samples, real, 0, ec.seed, ec.ms_ssim_scales, ec.ms_ssim_kernel),
            "LPIPS ↑": within_set_diversity(samples, distance, ec.lpips_pairs, ec.seed)}


@dataclass
class Table41:
    """Table 4.1 of this run: the table, each row's prompts and samples, the real evaluation images and the
    real-data floor."""

    table: pd.DataFrame
    prompts: dict[str, list[str]]
    samples: dict[str, torch.Tensor]
    real: torch.Tensor
    reference: dict[str, float]


def table_4_1(models: Mapping[str, Finetuned], sets: DermSets, prompts: Mapping[str, Sequence[str]], ec: EvalConfig,
              fid_features, distance, cfg: Mapping[str, Any]) -> Table41:
    """Generate (or load) each row's samples and measure them; the same metrics on real training images give the
    floor this data allows."""
    real = pixels01(sets.eval_images)
    samples = {row: cached_samples(models[ROW_MODEL[row]], row_prompts, ec, cfg) for row, row_prompts in prompts.items()}
    table = pd.DataFrame({row: quality_row(s, real, fid_features, distance, ec) for row, s in samples.items()}).T
    table.index.name = "Methods"
    reference = quality_row(pixels01(sets.train_images[: len(real)]), real, fid_features, distance, ec)
    return Table41(table, {row: list(p) for row, p in prompts.items()}, samples, real, reference)


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


IOU_COLUMN = "IoU(Otsu(A_C(<lesion>)), true mask) mean"
TOKENS = ("<lesion>", "<skin>")


@dataclass
class RegionAblation:
    """Fig. 4.7a measured: per model the IoU of each real evaluation image's Otsu-thresholded ``<lesion>`` map with
    its true mask (``per_image``, paired across models by image) and the table of means."""

    table: pd.DataFrame
    per_image: dict[str, np.ndarray]


def region_ablation(models: Mapping[str, Any], sets: DermSets, ec: EvalConfig) -> RegionAblation:
    """``models``: label -> SDComponents. Maps on noised real evaluation images with their own DermPrompts at
    ``attention_timestep``; the fixed blob (thresholded mean training mask) is the floor of an image-blind map."""
    prompts = [c.text for c in sets.eval_captions]
    per_image = {}
    for name, model in models.items():
        maps = token_maps_on_real(model, sets.eval_images, prompts, TOKENS, ec.attention_timestep, ec.cross_res, seed=ec.seed)
        per_image[name] = otsu_iou(maps[:, 0], sets.eval_masks)
    per_image["fixed blob (no image)"] = blob_baseline_iou(sets.train_masks, sets.eval_masks)
    table = pd.DataFrame({name: {IOU_COLUMN: float(v.mean()), "sd": float(v.std())} for name, v in per_image.items()}).T
    return RegionAblation(table, per_image)


def figure_4_7a(models: Mapping[str, Finetuned], prompts: Sequence[str], ec: EvalConfig, cfg: Mapping[str, Any]):
    """Fig. 4.7a: samples of ``mine`` and ``mine-noregion`` for the same prompts and their P-Token maps."""
    images, maps = {}, {}
    for name in ("mine", "mine-noregion"):
        images[name] = cached_samples(models[name], prompts, ec, cfg)
        uint8 = (images[name].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        maps[name] = token_maps_on_real(models[name].model, uint8, prompts, TOKENS, ec.attention_timestep, ec.cross_res,
                                        seed=ec.seed)
    return maps_figure(images, maps, TOKENS, n=len(prompts))


# ================================================================================================ pairs
@dataclass
class PairRun:
    """One pair-generation condition of §4.4.5: the result and its wall time per pair."""

    label: str
    result: Any                         # PairResult
    seconds_per_pair: float


def _generate_pairs(model, config: PairConfig, cond_masks: np.ndarray, prompts: Sequence[str], seed: int,
                    batch_size: int, progress: bool = False) -> dict[str, Any]:
    gen = PairGenerator(model, config)
    t0 = time.perf_counter()
    res = gen.generate(cond_masks, list(prompts), seed=seed, batch_size=batch_size, progress=progress)
    out = {f.name: getattr(res, f.name) for f in fields(res)}
    out["seconds"] = time.perf_counter() - t0
    return out


def run_pairs(ft: Finetuned, config: PairConfig, cond_masks: np.ndarray, prompts: Sequence[str], label: str,
              ec: EvalConfig, cfg: Mapping[str, Any], progress: bool = False) -> PairRun:
    """Pairs of the finetuned model ``ft`` with ``config`` (e.g. ``replace(config, use_ca=False)``), stored by content:
    keyed by the model's cache key, every ``PairConfig`` field, the conditioning masks and prompts, the seed and
    batch, the data and the pair-generation code. ``seconds_per_pair`` is the time of the run that computed them."""
    parts = {"what": "ch04 pairs", "model": ft.key, "config": asdict(config), "masks": _digest(np.asarray(cond_masks)),
             "prompts": _digest(list(prompts)), "seed": ec.seed, "batch": ec.pair_batch,
             "data": result_cache.data_fingerprint(cfg), "function": _source(_generate_pairs)}
    stored = result_cache.cached(parts, lambda: _generate_pairs(ft.model, config, cond_masks, prompts, ec.seed,
                                                                ec.pair_batch, progress),
                                 kind="torch", cfg=cfg, code=["ctrlgen.methods.didgen.pair_generation"])
    seconds = float(stored.pop("seconds"))
    return PairRun(label, PairResult(**stored), seconds / max(1, len(cond_masks)))


ABLATIONS = {"w/o CA guidance (L_SA only)": {"use_ca": False}, "w/o SA guidance (L_CA only)": {"use_sa": False},
             "unguided": {"guidance": False}}
GUIDED = "guided (L_CA + L_SA)"


def pair_runs(ft: Finetuned, config: PairConfig, cond_masks: np.ndarray, prompts: Sequence[str], ec: EvalConfig,
              cfg: Mapping[str, Any]) -> dict[str, PairRun]:
    """§4.4.5: the guided run on every mask, and the three ablations (``ABLATIONS``) on the first ``n_ablation_pairs``
    masks with the same prompts and seed."""
    n = ec.n_ablation_pairs
    runs = {GUIDED: run_pairs(ft, config, cond_masks, prompts, GUIDED, ec, cfg)}
    for label, change in ABLATIONS.items():
        runs[label] = run_pairs(ft, replace(config, **change), cond_masks[:n], prompts[:n], label, ec, cfg)
    return runs


def pair_iou(run: PairRun) -> np.ndarray:
    """Per pair: IoU(annotated mask, conditioning mask), every pair in order (a dropped pair's annotation is empty:
    IoU 0 with a non-empty condition) — the paired unit of the guidance claim."""
    return iou(run.result.masks.numpy(), run.result.cond_masks.numpy())


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
           "dropped (no usable mask) [%]": 100.0 * float((~r.ok).sum()) / n}
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


def _segmenter_net(channels: Sequence[int]) -> torch.nn.Module:
    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=tuple(channels),
                strides=tuple([2] * (len(channels) - 1)), num_res_units=1)


def train_segmenter(images: np.ndarray, masks: np.ndarray, steps: int, batch_size: int, lr: float,
                    channels: Sequence[int], seed: int = 0, progress: bool = False) -> Segmenter:
    """MONAI ``UNet`` (2-D, strided convolutions, residual units) trained with Dice + BCE (``monai.losses.DiceCELoss``)
    and random flips."""
    torch.manual_seed(seed)
    net = _segmenter_net(channels)
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


def evaluation_segmenter(sets: DermSets, ec: EvalConfig, cfg: Mapping[str, Any]) -> Segmenter:
    """``train_segmenter`` on the real training pairs, stored by content as its ``state_dict`` and loss history: keyed
    by the training data, the segmenter settings, the seed and the training code."""
    parts = {"what": "ch04 segmenter", "data": sets.fingerprint, "files": result_cache.data_fingerprint(cfg),
             "steps": ec.segmenter_steps, "batch": ec.segmenter_batch, "lr": ec.segmenter_lr,
             "channels": list(ec.segmenter_channels), "seed": ec.seed, "function": _source(_segmenter_net, train_segmenter)}

    def train() -> dict[str, Any]:
        seg = train_segmenter(sets.train_images, sets.train_masks, ec.segmenter_steps, ec.segmenter_batch,
                              ec.segmenter_lr, ec.segmenter_channels, seed=ec.seed)
        return {"state_dict": seg.net.state_dict(), "history": seg.history}

    stored = result_cache.cached(parts, train, kind="torch", cfg=cfg, code=["ctrlgen.data.tensors"])
    net = _segmenter_net(ec.segmenter_channels)
    net.load_state_dict(stored["state_dict"])
    net.eval()
    return Segmenter(net, list(stored["history"]))


def agreement_table(runs: Mapping[str, PairRun], segmenter: Segmenter) -> pd.DataFrame:
    """``pair_summary`` of every run, the thesis's IoU(annotation, condition) (§4.4.4) beside the guided run."""
    table = pd.DataFrame({label: pair_summary(r, segmenter) for label, r in runs.items()}).T
    table.insert(0, "thesis IoU(annotation, condition)", [in_text("didgen.pair_iou").value] + [""] * (len(table) - 1))
    return table


def guidance_effect_lines(head_summary: Mapping[str, float], agreement: pd.DataFrame) -> list[str]:
    """Does layout guidance move the drawn lesion onto its condition, and does each term act on its own? On the
    same first masks: IoU(condition, drawn lesion) and IoU(annotation, condition) of the guided run, each
    single-term ablation and unguided sampling, and how far the L_CA-only run is from the unguided one (the
    largest difference over the agreement table's metrics; 0 would mean the L_CA term is not applied)."""
    drawn, annotated = "IoU(condition, drawn lesion) mean", "IoU(annotation, condition) mean"
    rows = {"guided (first masks)": head_summary, **{k: agreement.loc[k] for k in ABLATIONS}}
    lines = [f"{name}: drawn lesion vs condition IoU {float(r[drawn]):.3f}; annotation vs condition IoU "
             f"{float(r[annotated]):.3f}" for name, r in rows.items()]
    metrics = [c for c in agreement.columns if c.endswith("mean")]
    ca_only, unguided = agreement.loc["w/o SA guidance (L_CA only)", metrics], agreement.loc["unguided", metrics]
    gap = float((ca_only.astype(float) - unguided.astype(float)).abs().max())
    lines.append(f"L_CA only vs unguided: largest difference over {len(metrics)} metrics {gap:.3f}")
    gain = float(head_summary[drawn]) - float(agreement.loc["unguided", drawn])
    lines.append(f"guidance moves the drawn lesion towards its condition by {gain:+.3f} IoU "
                 f"({'it follows the mask better' if gain > 0 else 'no better than unguided'})")
    return lines


def mask_diversity(cond_masks: np.ndarray, runs: Mapping[str, PairRun], head: PairRun, distance,
                   ec: EvalConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 4.7's LPIPS row (diversity of the annotated masks, w/ vs w/o cross-attention guidance, on the same
    first masks) and the shape-diversity table beside it (LPIPS-form and mean 1 − IoU, conditioning masks too)."""
    sets = {"conditioning masks": torch.from_numpy(np.asarray(cond_masks[:ec.n_ablation_pairs])),
            "w/ guidance (Mine)": head.result.masks,
            "w/o CA guidance (L_SA only)": runs["w/o CA guidance (L_SA only)"].result.masks,
            "unguided": runs["unguided"].result.masks}
    shape = pd.DataFrame({name: {"LPIPS-form ↑": within_set_diversity(m.float(), distance, ec.lpips_pairs, ec.seed),
                                 "1 − IoU ↑": mask_set_diversity(m, ec.lpips_pairs, ec.seed)}
                          for name, m in sets.items()}).T
    row = {"w/o guidance": shape.at["w/o CA guidance (L_SA only)", "LPIPS-form ↑"],
           "w/ guidance (Mine)": shape.at["w/ guidance (Mine)", "LPIPS-form ↑"]}
    t47 = pd.DataFrame([row], index=pd.MultiIndex.from_tuples([("LPIPS ↑", "")], names=["Metrics", "Segmentation models"]))
    return t47, shape


def speed_table(runs: Mapping[str, PairRun]) -> pd.DataFrame:
    """Pairs per minute of the guided pipeline and of unguided sampling, and their time ratio (wall clock: a timing)."""
    g, u = runs[GUIDED].seconds_per_pair, runs["unguided"].seconds_per_pair
    return pd.DataFrame({"pairs per minute": {"guided": 60 / g, "unguided": 60 / u},
                         "time ratio vs unguided": {"guided": g / u, "unguided": 1.0}})


# ================================================================================================ training seeds
REPLICATED = ("mine", "sd-finetune", "dreambooth")  # the models behind Table 4.1 and Table 4.7's LPIPS row


def seed_replicates(cfg: Mapping[str, Any], sets: DermSets, ec: EvalConfig, n_seeds: int, t41: Table41,
                    t47: pd.DataFrame, pairs: PairConfig, cond_masks: np.ndarray, pair_prompts: Sequence[str],
                    fid_features, distance) -> pd.DataFrame:
    """Per training seed (``claims.seeds``): Table 4.1's FID and LPIPS of every row and Table 4.7's mask-set LPIPS
    w/ and w/o cross-attention guidance — the units of the ledger's per-seed claims. The profile's seed is this
    chapter's main run (``t41``, ``t47``); each further seed ``seed + k`` finetunes the three models again (cached in
    their own folders), samples with that seed and regenerates the first ``n_ablation_pairs`` pairs on the same
    conditioning masks and prompts. Rows: seeds; columns: ``(metric, row)``."""
    def row(table: pd.DataFrame, mask_table: pd.DataFrame) -> dict[tuple[str, str], float]:
        out = {(m, r): float(table.at[r, m]) for m in ("FID ↓", "LPIPS ↑") for r in table.index}
        out |= {("mask LPIPS ↑", c): float(mask_table.iloc[0][c]) for c in mask_table.columns}
        return out

    rows = {ec.seed: row(t41.table, t47)}
    n = ec.n_ablation_pairs
    for k in range(1, n_seeds):
        seed = ec.seed + k
        eck = replace(ec, seed=seed)
        models = {name: finetune(cfg, name, sets, seed=seed) for name in REPLICATED}
        table = table_4_1(models, sets, t41.prompts, eck, fid_features, distance, cfg).table
        runs = {GUIDED: run_pairs(models["mine"], pairs, cond_masks[:n], pair_prompts[:n], GUIDED, eck, cfg),
                "w/o CA guidance (L_SA only)": run_pairs(models["mine"], replace(pairs, use_ca=False), cond_masks[:n],
                                                         pair_prompts[:n], "w/o CA guidance (L_SA only)", eck, cfg),
                "unguided": run_pairs(models["mine"], replace(pairs, guidance=False), cond_masks[:n], pair_prompts[:n],
                                      "unguided", eck, cfg)}
        mask_table, _ = mask_diversity(cond_masks, runs, runs[GUIDED], distance, eck)
        rows[seed] = row(table, mask_table)
    frame = pd.DataFrame(rows).T
    frame.index.name = "training seed"
    return frame


# ================================================================================================ §4.4.6
CUSTOMISED = {"skin_colour": ("very light", "intermediate", "dark"), "lesion_colour": ("black", "brown", "red", "blue-grey"),
              "marks": ((), ("a dark frame",), ("purple ink marks",))}
BOXES = ((0.1, 0.1, 0.55, 0.55), (0.45, 0.45, 0.9, 0.9), (0.1, 0.5, 0.9, 0.85), (0.3, 0.05, 0.7, 0.95))


def customisation_figure(model, sets: DermSets, ec: EvalConfig):
    """Fig. 4.8: one base DermPrompt and one initial noise, one attribute changed per row (``CUSTOMISED``)."""
    grid = {}
    for attribute, values in CUSTOMISED.items():
        vals, _, imgs = further_control.customise(model, sets.captions[0].attributes, attribute, values,
                                                  num_steps=ec.num_steps, guidance_scale=ec.guidance_scale, seed=ec.seed)
        label = " | ".join(", ".join(v) if isinstance(v, tuple) else str(v) or "none" for v in vals)
        grid[f"{attribute}: {label}"] = imgs
    return figures.image_grid_figure(grid, n=4, title="Fig. 4.8 analogue: text-guided attribute customisation")


@dataclass
class BoxResult:
    images: torch.Tensor
    boxes: tuple[tuple[float, float, float, float], ...]
    inside: list[float]                 # per sample: share of the segmented lesion inside its box

    @property
    def share_inside(self) -> float:
        """Mean share of the segmented lesion inside its box over the samples."""
        return float(np.mean(self.inside))


def box_guidance(model, pool: Sequence[str], pairs: PairConfig, box: BoxDiffConfig, segmenter: Segmenter,
                 ec: EvalConfig) -> BoxResult:
    """Fig. 4.9: BoxDiff's constraints on the ``<lesion>`` map (``box``: P and L), the pair pipeline's steps, scale, η
    and fraction; the segmenter says how much of the drawn lesion lies inside its box."""
    prompts = list(pool[: len(BOXES)]) if len(pool) >= len(BOXES) else [ec.prefix] * len(BOXES)
    layout = pairs.layout  # the pair pipeline's token smoothing and step rule (mini: ∇/‖∇‖∞ on an unsharpened softmax)
    smoothing = {"softmax_scale": layout.softmax_scale, "kernel": layout.smoothing_kernel, "sigma": layout.smoothing_sigma}
    images, _ = further_control.box_guided_generate(model, prompts, BOXES, pairs.num_steps, pairs.guidance_scale,
                                                    pairs.eta, pairs.guidance_fraction, ec.cross_res, seed=ec.seed, box=box,
                                                    smoothing=smoothing, normalize=layout.grad_normalize)
    segmented = segmenter.predict(images)
    side = segmented.shape[-1]
    inside = [float((m & (box_masks([b], side)[0].numpy() > 0.5)).sum() / max(1, m.sum())) for m, b in zip(segmented, BOXES)]
    return BoxResult(images, BOXES, inside)


@dataclass
class EditResult:
    prompt: str
    edited_prompts: list[str]
    targets: list[str]
    original: torch.Tensor              # (1, 3, H, W)
    edits: torch.Tensor                 # (1 + E, 3, H, W): the reconstruction, then the edits
    reconstruction_mse: float

    @property
    def panel(self) -> torch.Tensor:
        """Original, reconstruction and edits in one batch (one figure row)."""
        return torch.cat([self.original, self.edits])


def edit_example(model, sets: DermSets, config: NullTextConfig, ec: EvalConfig, k: int = 0) -> EditResult:
    """Fig. 4.10: null-text inversion of evaluation image ``k`` with its DermPrompt, then its lesion colour changed
    towards melanoma-like colours with Prompt-to-Prompt control (``config``: the inversion and P2P settings)."""
    captioner = AttributeCaptioner(model.tokenizer, prefix=ec.prefix)
    caption = captioner.caption(sets.eval_images[k], sets.eval_masks[k])
    targets = [c for c in ("black", "blue-grey", "dark brown") if c != caption.attributes.lesion_colour][:2]
    edited = [p for _, p in further_control.customisation_prompts(caption.attributes, "lesion_colour", targets,
                                                                   model.tokenizer, ec.prefix)]
    edits, _ = further_control.edit_real_image(model, sets.eval_images[k], caption.text, edited, ec.num_steps, config=config)
    original = pixels01(sets.eval_images[k: k + 1])
    return EditResult(caption.text, edited, targets, original, edits, float(((edits[0] - original[0]) ** 2).mean()))


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
    """Mean of each logged loss over the last ``tail`` of the steps, per finetuned model (reproducible numbers only:
    wall time and cache state are in ``training_timings``)."""
    rows = {}
    for name, ft in models.items():
        h = pd.DataFrame(ft.history)
        k = max(1, int(len(h) * tail))
        rows[name] = {c: float(h[c].iloc[-k:].mean()) for c in h.columns if c != "step"}
        rows[name]["steps"] = int(h["step"].iloc[-1]) if len(h) else 0
    return pd.DataFrame(rows).T


def training_timings(models: Mapping[str, Finetuned]) -> pd.DataFrame:
    """Per finetuned model: whether it came from the cache and the wall time of the run that trained it."""
    return pd.DataFrame({name: {"from cache": ft.cached, "training wall time [s]": round(ft.train_seconds, 1)}
                         for name, ft in models.items()}).T


def loss_figure(models: Mapping[str, Finetuned]):
    """Running means of L_rec (Eq. 4.3) for every model and of L_attn (Eq. 4.5) where it was trained."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 3))
    for name, ft in models.items():
        h = pd.DataFrame(ft.history)
        k = max(1, len(h) // 20)
        ax[0].plot(h["step"], h["rec"].rolling(k, min_periods=1).mean(), label=name)
        if "attn" in h:
            ax[1].plot(h["step"], h["attn"].rolling(k, min_periods=1).mean(), label=name)
    ax[0].set(title="L_rec (Eq. 4.3), running mean", xlabel="step")
    ax[1].set(title="L_attn (Eq. 4.5) of the region-aware model", xlabel="step")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def dermprompt_summary(sets: DermSets, n: int = 6) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """§4.3.2: the first ``n`` training captions, the most frequent values of each attribute with their share, and
    the counts the chapter records (captions, longest in tokens, attributes dropped to fit, captions by source)."""
    examples = pd.DataFrame({"id": sets.train_ids[:n], "DermPrompt": [c.text for c in sets.captions[:n]],
                             "tokens": [c.n_tokens for c in sets.captions[:n]]}).set_index("id")
    attrs = pd.DataFrame([c.attributes.to_dict() for c in sets.captions])
    attrs["marks"] = attrs["marks"].map(lambda m: ", ".join(m) if len(m) else "none")
    attrs["hair"] = attrs["hair"].map({True: "hair", False: "no hair"})
    shares = {col: attrs[col].value_counts(normalize=True).round(3).head(6) for col in
              ["size", "shape", "lesion_colour", "position", "skin_colour", "hair", "marks"]}
    frequent = pd.DataFrame({k: [f"{i} ({v:.0%})" for i, v in vc.items()] + [""] * (6 - len(vc))
                             for k, vc in shares.items()}).T
    counts = {"count": len(sets.captions), "max tokens": max(c.n_tokens for c in sets.captions),
              "with an attribute dropped to fit": sum(bool(c.dropped) for c in sets.captions),
              "by source": {k: int(v) for k, v in pd.Series([c.source for c in sets.captions]).value_counts().items()}}
    return examples, frequent, counts


def directions(t41: pd.DataFrame, region: pd.DataFrame, head_summary: Mapping[str, float], agreement: pd.DataFrame,
               t47: pd.DataFrame) -> pd.DataFrame:
    """This run's direction beside the thesis's for every comparison the chapter measured."""
    th41, th47 = thesis_frame("4.1"), thesis_frame("4.7")
    rows = [Direction(f"{metric}: Mine-DermPrompt vs {other}", t41.at["Mine-DermPrompt", metric], t41.at[other, metric],
                      metric.endswith("↑"), th41.at["Mine-DermPrompt", metric], th41.at[other, metric])
            for metric in t41.columns for other in ("Mine-prefix", "SD-Finetune", "DreamBooth")]
    rows += [
        Direction("<lesion> map vs true mask, IoU ↑: mine vs mine-noregion", region.at["mine", IOU_COLUMN],
                  region.at["mine-noregion", IOU_COLUMN], True, thesis_claim="Fig. 4.7a, no number"),
        Direction("IoU(annotation, condition) ↑: guided vs unguided", head_summary["IoU(annotation, condition) mean"],
                  agreement.at["unguided", "IoU(annotation, condition) mean"], True, thesis_claim="§4.3.4, no number"),
        Direction("mask diversity, LPIPS ↑: w/ vs w/o CA guidance", t47.iloc[0]["w/ guidance (Mine)"],
                  t47.iloc[0]["w/o guidance"], True, th47.loc[("LPIPS ↑", ""), "w/ guidance (Mine)"],
                  th47.loc[("LPIPS ↑", ""), "w/o guidance"]),
    ]
    return direction_table(rows)


__all__ = ["MODEL_NAMES", "guidance_effect_lines", "Finetuned", "finetune", "models_dir", "base_model", "DermSets", "derm_sets",
           "load_base_and_sets", "pixels01", "EvalConfig", "sample_images", "cached_samples", "new_prompts",
           "table_4_1_prompts", "ROW_MODEL", "eval_resize", "quality_row", "Table41", "table_4_1", "token_maps_on_real",
           "otsu_iou", "blob_baseline_iou", "IOU_COLUMN", "TOKENS", "RegionAblation", "region_ablation", "figure_4_7a",
           "REPLICATED", "seed_replicates",
           "PairRun", "run_pairs", "ABLATIONS", "GUIDED", "pair_runs", "pair_iou", "first_pairs", "pair_summary",
           "Segmenter", "train_segmenter", "evaluation_segmenter", "agreement_table",
           "mask_diversity", "speed_table", "CUSTOMISED", "BOXES", "customisation_figure", "BoxResult", "box_guidance",
           "EditResult", "edit_example", "maps_figure", "pairs_figure", "loss_table", "training_timings", "loss_figure",
           "dermprompt_summary", "directions"]
