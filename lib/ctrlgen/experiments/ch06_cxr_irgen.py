"""Chapter 6's experiments (§6.4, §6.5): CXR-IRGen's vision and language modules trained once, cached, evaluated.

The chapter calls these functions; the method is ``ctrlgen.methods.cxr_irgen``. What runs on each profile:

* vision module — the book's ``cxr`` base model (mini/smoke: chapter 2's small LDM pretrained on the domain's
  images, NIH ChestX-ray14 when the data root has it, else the procedural MIMIC-CXR world; full: SD 1.4) is
  finetuned with and without the reference image embedding (RIE) at two lengths (the thesis's 5k and 10k steps:
  ``ch06.vision.short_steps`` / ``long_steps``, the long run continuing the short one); a U-ViT is trained the
  same way (from scratch on mini, from ``ch06.vision.uvit_weights`` on full). Every trained backbone is stored
  by content (``ctrlgen.result_cache``: base model, data, settings, seed and code).
* Table 6.1 — FID (chapter 4's extractor: ``ctrlgen.metrics.image``), PSNR and SSIM of images generated from
  the held-out labels against the real held-out images, image i generated from the label of real image i
  (the pairing for PSNR/SSIM; FID compares the sets).
* Table 6.2 — AUROC of a pathology classifier (mini: a small CNN trained here on the real training images'
  findings, ``ctrlgen.analysis.quality_bar``; full: the torchxrayvision DenseNet is not wired, see the chapter)
  separating images generated for each pathology from images generated for "No Finding"; "Original" = the
  same on the real held-out images.
* language module — stage 1 on real IU X-ray findings and the world's reports; stage 2 and the reports of
  Tables 6.3/6.5 on the world's true image–report pairs (its images through the frozen VAE); Fig. 6.5's
  BOS/EOS/mean curves on held-out IU X-ray findings.
* clinical efficacy — ``ctrlgen.metrics.chexpert_labeler`` (a CheXpert-style labeler) labels generated and reference
  reports; micro F1 over the 14 observations. ``labeler_validation`` measures the labeler on the CheXpert labeler's
  own labelled samples, IU X-ray's Problems annotations and the world's true labels.
* baselines of Tables 6.3/6.4 — compact R2Gen, M²Trans and CXR-RePaiR (``ctrlgen.methods.baselines``) trained on the
  world's training pairs from the same latents as the prior, stored by content; Table 6.4 runs every report generator
  on Table 6.2's generated images, the reference being the label each image was generated from.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from transformers import AutoTokenizer, BartForConditionalGeneration

from ctrlgen import result_cache
from ctrlgen.analysis.attribute_labels import attribute_schema
from ctrlgen.analysis.quality_bar import AttributeClassifier, predict, train_attribute_classifier
from ctrlgen.data import load_dataset
from ctrlgen.data.datasets import dataset_folder
from ctrlgen.data.readers.cxr import CHEXPERT_LABELS
from ctrlgen.data.records import DataError
from ctrlgen.experiments.base_models import default_variant, load_domain_data, pretrain_domain, variant_dir
from ctrlgen.methods.cxr_irgen import language as lm
from ctrlgen.models.registry import local_folder
from ctrlgen.methods.cxr_irgen.prompts import NO_REFERENCE, ReferencePool, branch_counts, check_label, label_prompt
from ctrlgen.methods.cxr_irgen.uvit import UViT
from ctrlgen.methods.cxr_irgen.vision import (
    CLIPImageEmbedder, Conditions, LatentProjectionEmbedder, build_conditions, finetune_backbone, generate, pixels,
    reference_embeddings, text_token_norm,
)
from ctrlgen.methods.baselines import captioning, cxr_repair
from ctrlgen.methods.baselines.m2trans import M2Transformer
from ctrlgen.methods.baselines.r2gen import R2Gen
from ctrlgen.metrics.chexpert_labeler import agreement, clinical_scores, label_report, label_reports, per_report_f1
from ctrlgen.metrics.image import fid
from ctrlgen.metrics.report import BLEU_NAMES, nlg_scores, per_report_scores
from ctrlgen.models import load_base_model
from ctrlgen.parallel import one_thread, run_all
from ctrlgen.paths import data_root
from ctrlgen.runtime import resolve_device
from ctrlgen.thesis import thesis_frame

# NIH ChestX-ray14 finding -> CheXpert observation (the book's mapping; NIH has no Lung Opacity and no -1 values;
# Infiltration, Emphysema, Fibrosis and Hernia have no CheXpert observation and are left out)
NIH_TO_CHEXPERT = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
                   "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
                   "Edema": "Edema", "Mass": "Lung Lesion", "Nodule": "Lung Lesion", "Pleural_Thickening": "Pleural Other"}
NO_FINDING = "No Finding"
# Table 6.2's pathologies: CheXpert observation -> the thesis's column
TABLE_6_2 = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Lung Opacity": "Lung opacity",
             "Pleural Effusion": "Effusion", "Pneumonia": "Pneumonia"}
# the finding names a base-model caption uses for each observation (NIH's and CheXpert's spellings)
CAPTION_NAMES = {"Atelectasis": ("atelectasis",), "Cardiomegaly": ("cardiomegaly",), "Lung Opacity": ("lung opacity",),
                 "Pleural Effusion": ("pleural effusion", "effusion"), "Pneumonia": ("pneumonia",)}
BACKBONES = {"unet": "LDM with the U-Net backbone", "uvit": "LDM with the U-ViT backbone"}
VARIANTS = tuple((b, rie, length) for b in BACKBONES for length in ("short", "long") for rie in (False, True))
METHOD_CODE = ["ctrlgen.methods.cxr_irgen.vision", "ctrlgen.methods.cxr_irgen.uvit"]
LANGUAGE_CODE = ["ctrlgen.methods.cxr_irgen.language"]


def _source(*functions: Any) -> str:
    """Hash of the source of the functions that compute a cached value (the rest of this module may change)."""
    return hashlib.sha256("".join(inspect.getsource(f) for f in functions).encode()).hexdigest()[:16]


# ================================================================================================ settings
def _weight_folder(cfg: Mapping[str, Any], source: str) -> str:
    """A weight named in the profile as ``ctrlgen models check`` resolves it (absolute as is, else under the models
    root, a hub id as ``org--name``); "" stays "" (not used on this profile)."""
    return str(local_folder(cfg, str(source))) if str(source) else ""


@dataclass(frozen=True)
class Ch06Config:
    """The profile's ``ch06`` section, typed once (thesis values in the full profile, each marked there)."""

    short_steps: int
    long_steps: int
    batch_size: int
    lr: float
    condition_dropout: float
    image_encoder: str
    clip_image_encoder: str
    uvit_width: int
    uvit_depth: int
    uvit_heads: int
    uvit_patch: int
    uvit_lr: float
    uvit_weights: str
    n_table_6_1: int
    n_per_label: int
    classifier_steps: int
    classifier_batch: int
    n_figure: int
    bart: str
    d_model: int
    layers: int
    heads: int
    ffn: int
    max_length: int
    stage1_steps: int
    stage1_batch: int
    stage1_lr: float
    eval_every: int
    n_eval_reports: int
    prior_width: int
    prior_depth: int
    prior_heads: int
    prior_steps: int
    prior_batch: int
    prior_lr: float
    prior_lambda: float
    max_new_tokens: int
    num_beams: int
    num_steps: int
    guidance_scale: float
    mixed_precision: str
    seed: int

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "Ch06Config":
        v, lang, s = cfg["ch06"]["vision"], cfg["ch06"]["language"], cfg["sampling"]
        p = lang["prior"]
        return cls(short_steps=int(v["short_steps"]), long_steps=int(v["long_steps"]), batch_size=int(v["batch_size"]),
                   lr=float(v["lr"]), condition_dropout=float(v["dropout_probability"]), image_encoder=str(v["image_encoder"]),
                   clip_image_encoder=_weight_folder(cfg, v["clip_image_encoder"]), uvit_width=int(v["uvit"]["width"]),
                   uvit_depth=int(v["uvit"]["depth"]), uvit_heads=int(v["uvit"]["heads"]),
                   uvit_patch=int(v["uvit"]["patch_size"]), uvit_lr=float(v["uvit"]["lr"]),
                   uvit_weights=str(v["uvit"]["weights"]), n_table_6_1=int(v["n_table_6_1"]),
                   n_per_label=int(v["n_per_label"]), classifier_steps=int(v["classifier_steps"]),
                   classifier_batch=int(v["classifier_batch"]), n_figure=int(v["n_figure"]), bart=_weight_folder(cfg, lang["bart"]),
                   d_model=int(lang["d_model"]), layers=int(lang["layers"]), heads=int(lang["heads"]), ffn=int(lang["ffn"]),
                   max_length=int(lang["max_length"]), stage1_steps=int(lang["stage1_steps"]),
                   stage1_batch=int(lang["stage1_batch"]), stage1_lr=float(lang["stage1_lr"]),
                   eval_every=int(lang["eval_every"]), n_eval_reports=int(lang["n_eval_reports"]),
                   prior_width=int(p["width"]), prior_depth=int(p["depth"]), prior_heads=int(p["heads"]),
                   prior_steps=int(p["steps"]), prior_batch=int(p["batch_size"]), prior_lr=float(p["lr"]),
                   prior_lambda=float(p["lambda"]), max_new_tokens=int(lang["max_new_tokens"]),
                   num_beams=int(lang["num_beams"]), num_steps=int(s["num_steps"]),
                   guidance_scale=float(s["guidance_scale"]),
                   mixed_precision=str(cfg["training"]["mixed_precision"]), seed=int(cfg["seed"]))

    def steps_of(self, length: str) -> int:
        return self.short_steps if length == "short" else self.long_steps


# ================================================================================================ vision data
def nih_to_chexpert(labels: Mapping[str, float]) -> dict[str, float | None]:
    """NIH labels (1.0 found / 0.0 not listed) as CheXpert observations: a listed finding is 1.0, everything
    else blank (NIH lists what it found, it does not negate), "No Finding" 1.0 when nothing is listed."""
    out: dict[str, float | None] = {c: None for c in CHEXPERT_LABELS}
    found = [n for n, v in labels.items() if v == 1.0]
    for name in found:
        if name in NIH_TO_CHEXPERT:
            out[NIH_TO_CHEXPERT[name]] = 1.0
    if not found:
        out[NO_FINDING] = 1.0
    return out


@dataclass
class VisionSets:
    """Training and held-out images of the ``cxr`` domain with CheXpert-style labels and their prompts."""

    train_images: np.ndarray
    train_labels: list[dict]
    test_images: np.ndarray
    test_labels: list[dict]
    captions: list[str]               # the base model's captions (the classifier's labels)
    test_captions: list[str]
    dataset: str
    provenance: str
    fingerprint: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def train_prompts(self) -> list[str]:
        return [label_prompt(l) for l in self.train_labels]


def _labels_of(dataset: str, record) -> dict:
    return nih_to_chexpert(record.labels) if dataset == "nih_chestxray14" else {c: record.labels.get(c) for c in CHEXPERT_LABELS}


def vision_sets(cfg: Mapping[str, Any], data=None) -> VisionSets:
    """The ``cxr`` domain's split (chapter 2's) with each image's label; an invalid label drops its image (counted)."""
    data = data or load_domain_data(cfg, "cxr")
    ds = load_dataset(data.dataset, cfg, resolution=int(cfg["models"]["image_size"]), require_images=True)
    by_id = {r.id: r for r in ds.records}
    counts = {"invalid label (dropped)": 0}

    def labelled(ids, images, captions):
        keep, labels = [], []
        for i, rid in enumerate(ids):
            try:
                labels.append(check_label(_labels_of(data.dataset, by_id[rid]), where=f"{data.dataset} {rid}"))
                keep.append(i)
            except ValueError:
                counts["invalid label (dropped)"] += 1
        return images[keep], labels, [captions[i] for i in keep]

    tr_im, tr_lab, caps = labelled(data.ids, data.images, data.captions)
    te_im, te_lab, te_caps = labelled(data.heldout_ids, data.heldout_images, data.heldout_captions)
    counts["no observation left (prompt is the prefix alone)"] = sum(all(v is None for v in l.values()) for l in tr_lab)
    return VisionSets(tr_im, tr_lab, te_im, te_lab, caps, te_caps, data.dataset, data.provenance, data.fingerprint, counts)


def label_summary(sets: VisionSets) -> pd.DataFrame:
    """How often each observation is 1 / 0 / −1 / blank in the training labels, and the prompt clauses used."""
    rows = {}
    for name in CHEXPERT_LABELS:
        values = [l.get(name) for l in sets.train_labels]
        rows[name] = {"1.0": sum(v == 1.0 for v in values), "0.0": sum(v == 0.0 for v in values),
                      "-1.0": sum(v == -1.0 for v in values), "blank": sum(v is None for v in values)}
    return pd.DataFrame(rows).T


# ================================================================================================ base model
def base_model(cfg: Mapping[str, Any], data=None):
    """The ``cxr`` base model (mini/smoke: chapter 2's default variant, pretrained now if the cache lacks it)."""
    if str(cfg["models"]["kind"]) == "mini":
        pretrain_domain(cfg, "cxr", default_variant(cfg, "cxr") == "selfattn", progress=False, data=data)
    return load_base_model(cfg, "cxr", device=resolve_device(cfg))


def base_key(cfg: Mapping[str, Any]) -> str:
    if str(cfg["models"]["kind"]) != "mini":
        return f"pretrained:{cfg['models']['pretrained'][cfg['models']['domains']['cxr']]}"
    return str(json.loads((variant_dir(cfg, "cxr", default_variant(cfg, "cxr")) / "pretrain.json").read_text())["key"])


def load_base_and_sets(cfg: Mapping[str, Any]):
    data = load_domain_data(cfg, "cxr")
    return base_model(cfg, data), vision_sets(cfg, data)


def image_embedder(base, ec: Ch06Config, norm: float):
    """τ_i: CLIP's image encoder (``image_encoder: clip``) or the frozen-VAE projection (mini)."""
    dim = int(base.text_encoder.config.hidden_size)
    if ec.image_encoder == "clip":
        if not ec.clip_image_encoder:
            raise ValueError("ch06.vision.image_encoder is 'clip' but ch06.vision.clip_image_encoder is empty: give the "
                             "folder of a CLIPVisionModelWithProjection (CLIP ViT-L/14, as SD 1.4's text encoder)")
        return CLIPImageEmbedder(ec.clip_image_encoder, norm)
    if ec.image_encoder == "latent_projection":
        return LatentProjectionEmbedder(base, dim, norm, seed=ec.seed)
    raise ValueError(f"ch06.vision.image_encoder is {ec.image_encoder!r}: expected clip or latent_projection")


@dataclass
class VisionContext:
    """What every vision model shares: the base model, data, pool embeddings, references and latents."""

    base: Any
    sets: VisionSets
    ec: Ch06Config
    key: str
    pool: ReferencePool
    pool_embeddings: torch.Tensor
    train_refs: list
    latents: torch.Tensor


def vision_context(cfg: Mapping[str, Any], base, sets: VisionSets, ec: Ch06Config) -> VisionContext:
    pool = ReferencePool(sets.train_labels)
    norm = text_token_norm(base, sets.train_prompts[:256])
    embeddings = image_embedder(base, ec, norm)(sets.train_images)
    refs = pool.select_many(sets.train_labels, seed=ec.seed, exclude_self=True)
    return VisionContext(base, sets, ec, base_key(cfg), pool, embeddings, refs, base.encode_dataset(sets.train_images))


def _backbone_model(ctx: VisionContext, backbone: str):
    """A copy of the base model whose ``unet`` is the U-Net (copied) or a fresh / loaded U-ViT."""
    base = ctx.base
    if backbone == "unet":
        return replace(base, unet=copy.deepcopy(base.unet))
    cond_tokens = int(base.tokenizer.model_max_length) + 1
    uvit = UViT(sample_size=int(base.unet.config.sample_size), in_channels=int(base.unet.config.in_channels),
                out_channels=int(base.unet.config.in_channels), patch_size=ctx.ec.uvit_patch, width=ctx.ec.uvit_width,
                depth=ctx.ec.uvit_depth, heads=ctx.ec.uvit_heads, cross_attention_dim=int(base.text_encoder.config.hidden_size),
                max_condition_tokens=cond_tokens)
    if ctx.ec.uvit_weights:
        uvit.load_state_dict(torch.load(ctx.ec.uvit_weights, map_location="cpu", weights_only=True))
    return replace(base, unet=uvit.to(base.device))


def _mode(backbone: str, rie: bool) -> str:
    return ("concat" if backbone == "unet" else "mean") if rie else "none"


def train_conditions(ctx: VisionContext, model, backbone: str, rie: bool) -> Conditions:
    ref = reference_embeddings(ctx.pool_embeddings, [r.index for r in ctx.train_refs]) if rie else None
    return build_conditions(model, ctx.sets.train_prompts, ref, _mode(backbone, rie))


def _train_pair(ctx: VisionContext, backbone: str, rie: bool) -> dict[str, Any]:
    """The short and the long run of one backbone/RIE variant (the long run resumes the short one's checkpoint)."""
    ec = ctx.ec
    model = _backbone_model(ctx, backbone)
    conds = train_conditions(ctx, model, backbone, rie)
    lr = ec.lr if backbone == "unet" else ec.uvit_lr
    out: dict[str, Any] = {"history": []}
    with tempfile.TemporaryDirectory() as work:
        for length in ("short", "long"):
            res = finetune_backbone(model, ctx.latents, conds, ec.steps_of(length), ec.batch_size, lr,
                                    dropout=ec.condition_dropout, seed=ec.seed, output_dir=work,
                                    train_config={"checkpoint_every": ec.short_steps, "keep_checkpoints": 1,
                                                  "mixed_precision": ec.mixed_precision})
            out["history"] += [h["loss"] for h in res.history]
            out[length] = {k: v.detach().cpu().clone() for k, v in model.unet.state_dict().items()}
    return out


def trained_backbones(cfg: Mapping[str, Any], ctx: VisionContext, backbone: str, rie: bool) -> tuple[dict[str, Any], str]:
    """``{"short": state_dict, "long": state_dict, "history": losses}`` of one variant, stored by content, and its key."""
    ec = ctx.ec
    parts = {"what": "ch06 vision module", "backbone": backbone, "rie": rie, "base": ctx.key, "data": ctx.sets.fingerprint,
             "steps": [ec.short_steps, ec.long_steps], "batch": ec.batch_size, "lr": ec.lr if backbone == "unet" else ec.uvit_lr,
             "dropout": ec.condition_dropout, "precision": ec.mixed_precision, "encoder": [ec.image_encoder, ec.clip_image_encoder], "seed": ec.seed,
             "uvit": [ec.uvit_width, ec.uvit_depth, ec.uvit_heads, ec.uvit_patch, ec.uvit_weights] if backbone == "uvit" else None,
             "function": _source(_train_pair, _backbone_model, train_conditions, vision_context)}
    trained = result_cache.cached(parts, lambda: _train_pair(ctx, backbone, rie), kind="torch", cfg=cfg, code=METHOD_CODE)
    return trained, result_cache.key_of(parts, METHOD_CODE)


def load_variant(ctx: VisionContext, backbone: str, state: Mapping[str, torch.Tensor]):
    model = _backbone_model(ctx, backbone)
    model.unet.load_state_dict(state)
    model.unet.to(ctx.base.device).eval().requires_grad_(False)
    return model


# ================================================================================================ sampling
def eval_conditions(ctx: VisionContext, model, labels: Sequence[Mapping], backbone: str, rie: bool, seed: int
                    ) -> tuple[Conditions, list]:
    """Conditions for generating from ``labels``: their prompts and references drawn from the training pool."""
    refs = ctx.pool.select_many(labels, seed=seed)
    ref = reference_embeddings(ctx.pool_embeddings, [r.index for r in refs]) if rie else None
    return build_conditions(model, [label_prompt(l) for l in labels], ref, _mode(backbone, rie)), refs


def _generate(ctx: VisionContext, model, labels, backbone: str, rie: bool, seed: int) -> dict[str, torch.Tensor]:
    conds, _ = eval_conditions(ctx, model, labels, backbone, rie, seed)
    images, latents = generate(model, [label_prompt(l) for l in labels], conds, ctx.ec.num_steps, ctx.ec.guidance_scale, seed)
    return {"images": images, "latents": latents}


def cached_generation(cfg: Mapping[str, Any], ctx: VisionContext, name: str, model, model_key: str, labels: Sequence[Mapping],
                      backbone: str, rie: bool, seed: int) -> dict[str, torch.Tensor]:
    """Generated images and their z_0, stored by content (model, labels, sampling settings, seed, code)."""
    parts = {"what": "ch06 samples", "name": name, "model": model_key,
             "labels": hashlib.sha256(json.dumps([sorted((k, v) for k, v in l.items() if v is not None) for l in labels]).encode()).hexdigest(),
             "steps": ctx.ec.num_steps, "scale": ctx.ec.guidance_scale, "seed": seed,
             "function": _source(_generate, eval_conditions)}
    return result_cache.cached(parts, lambda: _generate(ctx, model, labels, backbone, rie, seed), kind="torch", cfg=cfg,
                               code=METHOD_CODE + ["ctrlgen.sampling"])


@dataclass
class VisionModels:
    """The vanilla base model and the eight finetuned variants, with their cache keys and loss histories."""

    models: dict[tuple, Any]
    keys: dict[tuple, str]
    histories: dict[tuple, list[float]]


def vision_jobs(cfg: Mapping[str, Any], ctx: VisionContext) -> dict[tuple, Any]:
    """The four vision variants' trainings as ``parallel.run_all`` jobs, keyed (backbone, rie); the U-Nets first
    (the longer jobs: scheduling them first keeps both cores busy to the end)."""
    return {(b, rie): partial(trained_backbones, cfg, ctx, b, rie) for b in BACKBONES for rie in (False, True)}


def _vision_models(ctx: VisionContext, variants: Mapping[tuple, tuple[dict[str, Any], str]]) -> VisionModels:
    """``VisionModels`` from the ``vision_jobs`` results ``{(backbone, rie): (trained states, key)}``."""
    models, keys, hist = {("vanilla", False, ""): ctx.base}, {("vanilla", False, ""): ctx.key}, {}
    for (backbone, rie), (trained, key) in variants.items():
        for length in ("short", "long"):
            k = (backbone, rie, length)
            models[k] = load_variant(ctx, backbone, trained[length])
            keys[k] = f"{key}-{length}"
        hist[(backbone, rie)] = trained["history"]
    return VisionModels(models, keys, hist)


def row_name(ec: Ch06Config, backbone: str, rie: bool, length: str, table: str = "6.1") -> tuple[str, str]:
    """The thesis's row of a variant ("5k" = the short run, "10k" = the long run; steps in the chapter text)."""
    steps = "5k steps" if length == "short" else "10k steps"
    if table == "6.2":
        return "Proposed approach (U-Net backbone)", f"{steps} {'w/' if rie else 'no'} RIE"
    return BACKBONES[backbone], f"{steps} {'with' if rie else 'without'} RIE"


def loss_figure(vm: VisionModels, ec: Ch06Config):
    fig, ax = plt.subplots(figsize=(7, 3))
    for (backbone, rie), losses in vm.histories.items():
        w = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(smooth, label=f"{backbone} {'with' if rie else 'without'} RIE")
    ax.axvline(ec.short_steps, color="k", ls=":", lw=1)
    ax.set_xlabel("step (dotted: the short run ends)")
    ax.set_ylabel("L_LDM (moving mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ================================================================================================ Table 6.1
def psnr_ssim(generated: torch.Tensor, real: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair PSNR (dB) and SSIM (torchmetrics, data range 1) of images ``(N, 3, H, W)`` in [0, 1]."""
    psnr = peak_signal_noise_ratio(generated, real, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(generated, real, data_range=1.0, reduction="none")
    return psnr.numpy(), ssim.numpy()


@dataclass
class Table61:
    table: pd.DataFrame
    samples: dict[str, torch.Tensor]
    real: torch.Tensor
    per_image: dict[tuple, dict[str, np.ndarray]]


def table_6_1_jobs(cfg: Mapping[str, Any], ctx: VisionContext, vm: VisionModels) -> dict[tuple, Any]:
    """Each model's images for the first ``n_table_6_1`` held-out labels, as ``parallel.run_all`` jobs."""
    labels = ctx.sets.test_labels[:min(ctx.ec.n_table_6_1, len(ctx.sets.test_labels))]
    return {k: partial(cached_generation, cfg, ctx, "table 6.1", model, vm.keys[k], labels,
                       "unet" if k[0] == "vanilla" else k[0], k[1], ctx.ec.seed) for k, model in vm.models.items()}


def table_6_1(cfg: Mapping[str, Any], ctx: VisionContext, vm: VisionModels, extractor) -> Table61:
    """FID / PSNR / SSIM of each model's images generated from the held-out labels (module doc)."""
    n = min(ctx.ec.n_table_6_1, len(ctx.sets.test_labels))
    labels, real = ctx.sets.test_labels[:n], pixels(ctx.sets.test_images[:n])
    rows, samples, per = {}, {}, {}
    generated = run_all(table_6_1_jobs(cfg, ctx, vm), cfg, "table 6.1 samples")
    for k in vm.models:
        backbone, rie, length = k
        name = ("Baseline", "Vanilla LDM") if backbone == "vanilla" else row_name(ctx.ec, backbone, rie, length)
        gen = generated[k]["images"]
        psnr, ssim = psnr_ssim(gen, real)
        rows[name] = {"FID↓": fid(real, gen, extractor), "PSNR↑": float(psnr.mean()), "SSIM↑": float(ssim.mean())}
        samples[" / ".join(name)] = gen
        per[k] = {"psnr": psnr, "ssim": ssim}
    table = pd.DataFrame(rows).T
    table.index = pd.MultiIndex.from_tuples(table.index, names=["Group", "Model"])
    return Table61(table, samples, real, per)


# ================================================================================================ Table 6.2
def pathology_classifier(cfg: Mapping[str, Any], sets: VisionSets, ec: Ch06Config) -> AttributeClassifier:
    """A small CNN trained on the real training images' findings (their base-model captions), stored by content."""
    schema = attribute_schema("cxr", sets.captions + sets.test_captions)

    def train() -> dict[str, torch.Tensor]:
        return train_attribute_classifier(sets.train_images, schema.encode(sets.captions), schema, steps=ec.classifier_steps,
                                          batch_size=ec.classifier_batch, seed=ec.seed).state_dict()

    parts = {"what": "ch06 pathology classifier", "data": sets.fingerprint, "steps": ec.classifier_steps,
             "batch": ec.classifier_batch, "seed": ec.seed}
    classifier = AttributeClassifier(schema)
    classifier.load_state_dict(result_cache.cached(parts, train, kind="torch", cfg=cfg,
                                                   code=["ctrlgen.analysis.quality_bar", "ctrlgen.analysis.attribute_labels"]))
    return classifier.eval()


def pathology_scores(classifier: AttributeClassifier, images) -> dict[str, np.ndarray]:
    """Probability of each Table 6.2 pathology per image (NaN where the classifier has no such finding)."""
    probs = predict(classifier, images)["findings"]
    values = list(classifier.schema["findings"].values)
    out = {}
    for obs, names in CAPTION_NAMES.items():
        col = next((values.index(n) for n in names if n in values), None)
        out[obs] = probs[:, col] if col is not None else np.full(len(probs), np.nan)
    return out


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    if len(pos) == 0 or len(neg) == 0 or np.isnan(pos).any() or np.isnan(neg).any():
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def auroc_row(scores_by_label: Mapping[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """AUROC per pathology: images of that pathology (its score) against the No Finding images (same score)."""
    neg = scores_by_label[NO_FINDING]
    row = {TABLE_6_2[obs]: _auroc(scores_by_label[obs][obs], neg[obs]) for obs in TABLE_6_2}
    finite = [v for v in row.values() if not math.isnan(v)]
    row["Mean"] = float(np.mean(finite)) if finite else float("nan")
    return row


def table_6_2_jobs(cfg: Mapping[str, Any], ctx: VisionContext, vm: VisionModels) -> dict[tuple, Any]:
    """The U-Net models' images per label (the thesis evaluates clinical efficacy on the U-Net backbone only), as
    ``parallel.run_all`` jobs."""
    return {k: partial(generated_for_table_6_2, cfg, ctx, vm, k) for k in vm.models if k[0] != "uvit"}


def table_6_2(cfg: Mapping[str, Any], ctx: VisionContext, vm: VisionModels, classifier) -> pd.DataFrame:
    """Table 6.2 analogue: the Original row on real held-out images, then vanilla and the four U-Net variants."""
    rows = {}
    test = ctx.sets.test_labels
    real = {obs: [i for i, l in enumerate(test) if l.get(obs) == 1.0] for obs in (*TABLE_6_2, NO_FINDING)}
    real_scores = pathology_scores(classifier, ctx.sets.test_images)
    rows[("Baseline", "Original")] = auroc_row({obs: {k: v[idx] for k, v in real_scores.items()} for obs, idx in real.items()})
    generated = run_all(table_6_2_jobs(cfg, ctx, vm), cfg, "table 6.2 samples")
    unet = list(generated)
    for k in unet:
        backbone, rie, length = k
        observations, n = (*TABLE_6_2, NO_FINDING), ctx.ec.n_per_label
        gen = generated[k]   # n images per label, one sampling call
        scores = pathology_scores(classifier, gen["images"])
        by_label = {obs: {o: v[j * n:(j + 1) * n] for o, v in scores.items()} for j, obs in enumerate(observations)}
        name = ("Baseline", "Vanilla LDM") if backbone == "vanilla" else row_name(ctx.ec, backbone, rie, length, "6.2")
        rows[name] = auroc_row(by_label)
    table = pd.DataFrame(rows).T
    table.index = pd.MultiIndex.from_tuples(table.index, names=["Group", "Source"])
    return table


def rie_effect(t61: pd.DataFrame) -> pd.DataFrame:
    """With RIE minus without RIE, per backbone and length, in this run and in the thesis's Table 6.1 (§6.4.3, §7.2:
    averaging the embeddings into the U-ViT's tokens improves FID but lowers PSNR and SSIM)."""
    thesis = thesis_frame("6.1")
    rows = {}
    for group in BACKBONES.values():
        for steps in ("5k steps", "10k steps"):
            w, wo = (group, f"{steps} with RIE"), (group, f"{steps} without RIE")
            for col in ("FID↓", "PSNR↑", "SSIM↑"):
                rows.setdefault((group, steps), {})[(col, "thesis")] = thesis.at[w, col] - thesis.at[wo, col]
                rows[(group, steps)][(col, "this run")] = (t61.at[w, col] - t61.at[wo, col]) if w in t61.index else float("nan")
    out = pd.DataFrame(rows).T
    out.index.names = ["Backbone", "Length"]
    return out


def real_pathology_counts(sets: VisionSets) -> dict[str, int]:
    return {obs: sum(l.get(obs) == 1.0 for l in sets.test_labels) for obs in (*TABLE_6_2, NO_FINDING)}


# ================================================================================================ language data
@dataclass
class ReportSets:
    """Reports for stage 1 (IU X-ray + the world) and the world's image–report pairs for stage 2."""

    stage1_f: list[str]
    stage1_fi: list[str]
    eval_iu: list[str]                        # held-out IU X-ray findings (Fig. 6.5)
    pair_images_train: np.ndarray
    pair_images_test: np.ndarray
    pair_f_train: list[str]
    pair_f_test: list[str]
    pair_fi_train: list[str]
    pair_fi_test: list[str]
    pair_labels_test: list[dict]
    iu_source: str
    world_source: str
    counts: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""


def _clean_all(texts: Sequence[str], counts: dict[str, int], what: str) -> list[str]:
    out = []
    for t in texts:
        clean, why = lm.usable_report(t)
        if why:
            counts[f"{what}: {why} (dropped)"] = counts.get(f"{what}: {why} (dropped)", 0) + 1
        else:
            out.append(clean)
    return out


def report_sets(cfg: Mapping[str, Any]) -> ReportSets:
    """IU X-ray findings (real when the data root has them) and the CXR world's image–report pairs (procedural)."""
    counts: dict[str, int] = {}
    try:
        iu = load_dataset("iu_xray", cfg, source="real", resolution=0)
        iu_train = _clean_all([r.text for r in iu.records if r.split not in ("val", "test")], counts, "IU X-ray")
        iu_eval = _clean_all([r.text for r in iu.records if r.split in ("val", "test")], counts, "IU X-ray held-out")
        iu_source = iu.provenance
    except DataError as err:
        iu_train, iu_eval, iu_source = [], [], f"IU X-ray not used: {str(err).splitlines()[0]}"
    size = int(cfg["models"]["image_size"])
    world = load_dataset("mimic_cxr", cfg, source="procedural", resolution=size)
    recs = world.with_images()
    f_all = [r.meta["sections"].get("FINDINGS", "") for r in recs]
    i_all = [r.meta["sections"].get("IMPRESSION", "") for r in recs]
    usable = [i for i, f in enumerate(f_all) if not lm.usable_report(f)[1]]
    counts["world: empty findings (pair dropped)"] = len(recs) - len(usable)
    test = [i for i in usable if recs[i].split == "test"] or usable[-max(1, len(usable) // 10):]
    train = [i for i in usable if i not in set(test)]
    images, _ = world.load_arrays([recs[i] for i in range(len(recs))])
    f = [lm.clean_report(t) for t in f_all]
    fi = [lm.join_findings_impression(a, b) for a, b in zip(f_all, i_all)]
    iu_eval = iu_eval or [f[i] for i in test]
    fp = hashlib.sha256(json.dumps([iu_train, iu_eval, f, fi]).encode()).hexdigest()[:16]
    return ReportSets(iu_train + [f[i] for i in train], iu_train + [fi[i] for i in train], iu_eval,
                      images[train], images[test], [f[i] for i in train], [f[i] for i in test], [fi[i] for i in train],
                      [fi[i] for i in test], [{c: recs[i].labels.get(c) for c in CHEXPERT_LABELS} for i in test],
                      iu_source, world.provenance, counts, fp)


# ================================================================================================ language models
def report_tokenizer(ec: Ch06Config, texts: Sequence[str]):
    """bart-base's tokenizer from ``ch06.language.bart`` (full), else a word-level one built from ``texts``."""
    if ec.bart:
        return AutoTokenizer.from_pretrained(_bart_folder(ec), local_files_only=True, model_max_length=ec.max_length)
    return lm.build_report_tokenizer(texts, ec.max_length)


def _bart_folder(ec: Ch06Config) -> Path:
    folder = Path(ec.bart).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"ch06.language.bart is {ec.bart!r}: expected a local facebook/bart-base folder "
                                "(config.json, model weights, tokenizer files)")
    return folder


def _bart(ec: Ch06Config, tokenizer):
    """bart-base from its folder (full), else a small BART from scratch (mini, smoke)."""
    if ec.bart:
        return BartForConditionalGeneration.from_pretrained(_bart_folder(ec), local_files_only=True)
    return lm.small_bart(tokenizer, ec.d_model, ec.layers, ec.heads, ec.ffn, ec.max_length, seed=ec.seed)


def _stage1(ec: Ch06Config, texts: list[str], eval_texts: list[str], how: str) -> dict[str, Any]:
    tok = report_tokenizer(ec, texts)
    model = _bart(ec, tok)

    def evaluate(m) -> dict[str, float]:
        hyp = lm.decode_embeddings(m, tok, lm.encode_reports(m, tok, eval_texts, how), ec.max_new_tokens, ec.num_beams)
        return nlg_scores(hyp, eval_texts)

    res = lm.train_stage1(model, tok, texts, ec.stage1_steps, ec.stage1_batch, ec.stage1_lr, how, ec.seed, evaluate, ec.eval_every)
    return {"state": model.state_dict(), "history": [h["loss"] for h in res.history],
            "curve": [[c["step"], *[c[n] for n in (*BLEU_NAMES, "ROUGE-L")]] for c in res.curve]}


@dataclass
class Stage1:
    model: Any
    tokenizer: Any
    history: list[float]
    curve: pd.DataFrame
    how: str


def stage1(cfg: Mapping[str, Any], ec: Ch06Config, rs: ReportSets, variant: str, how: str = "mean") -> Stage1:
    """Stage-1 BART for ``variant`` "F" or "F+I" with representative embedding ``how``, stored by content."""
    texts = rs.stage1_f if variant == "F" else rs.stage1_fi
    eval_texts = rs.eval_iu[:ec.n_eval_reports]
    parts = {"what": "ch06 stage 1", "variant": variant, "how": how, "data": rs.fingerprint, "seed": ec.seed,
             "bart": [ec.bart, ec.d_model, ec.layers, ec.heads, ec.ffn, ec.max_length],
             "train": [ec.stage1_steps, ec.stage1_batch, ec.stage1_lr, ec.eval_every, ec.n_eval_reports, ec.max_new_tokens,
                       ec.num_beams], "function": _source(_stage1, _bart, report_tokenizer)}
    out = result_cache.cached(parts, lambda: _stage1(ec, texts, eval_texts, how), kind="torch", cfg=cfg,
                              code=LANGUAGE_CODE + ["ctrlgen.metrics.report"])
    tok = report_tokenizer(ec, texts)
    model = _bart(ec, tok)
    model.load_state_dict(out["state"])
    model.eval()
    curve = pd.DataFrame(out["curve"], columns=["step", *BLEU_NAMES, "ROUGE-L"]).set_index("step")
    return Stage1(model, tok, out["history"], curve, how)


def prior_inputs(base, images: np.ndarray, raw: bool) -> torch.Tensor:
    """The prior's input: the frozen VAE's latent (the image embedding), or raw pixels in [-1, 1]."""
    return pixels(images) * 2 - 1 if raw else base.encode_dataset(images)


def _prior(ec: Ch06Config, inputs: torch.Tensor, targets: torch.Tensor, kind: str, raw: bool) -> dict[str, Any]:
    prior = _prior_module(ec, inputs, targets.shape[1], raw)
    history = lm.train_prior(prior, inputs, targets, ec.prior_steps, ec.prior_batch, ec.prior_lr, kind, ec.prior_lambda, ec.seed)
    return {"state": prior.state_dict(), "history": [h["loss"] for h in history]}


def _prior_module(ec: Ch06Config, inputs: torch.Tensor, out_dim: int, raw: bool) -> lm.PriorViT:
    side = inputs.shape[-1]
    patch = max(1, side // 8)   # 64 tokens for a 16x16 latent and for 64x64 pixels alike (the book's choice)
    torch.manual_seed(ec.seed)
    return lm.PriorViT(inputs.shape[1], side, patch, out_dim, ec.prior_width, ec.prior_depth, ec.prior_heads)


@dataclass
class Prior:
    module: lm.PriorViT
    history: list[float]
    raw: bool


def prior(cfg: Mapping[str, Any], ec: Ch06Config, base_k: str, rs: ReportSets, variant: str, inputs: torch.Tensor,
          targets: torch.Tensor, kind: str = "mse+cos", raw: bool = False) -> Prior:
    """Stage-2 prior for ``variant`` trained with loss ``kind`` from ``inputs`` (``prior_inputs``: latents or raw
    pixels of the training pairs) to ``targets`` (stage 1's representative embeddings of their reports), stored by
    content. The caller computes both once for every prior that shares them (``prior_jobs``)."""
    parts = {"what": "ch06 prior", "variant": variant, "kind": kind, "raw": raw, "base": base_k, "data": rs.fingerprint,
             "stage1": hashlib.sha256(targets.numpy().tobytes()).hexdigest()[:16], "seed": ec.seed,
             "prior": [ec.prior_width, ec.prior_depth, ec.prior_heads, ec.prior_steps, ec.prior_batch, ec.prior_lr, ec.prior_lambda],
             "function": _source(_prior, _prior_module, prior_inputs)}
    out = result_cache.cached(parts, lambda: _prior(ec, inputs, targets, kind, raw), kind="torch", cfg=cfg, code=LANGUAGE_CODE)
    module = _prior_module(ec, inputs, targets.shape[1], raw)
    module.load_state_dict(out["state"])
    return Prior(module.eval(), out["history"], raw)


@dataclass
class LanguageModels:
    """Stage 1 of the F reports per representative embedding ("mean", "bos", "eos"), of the F+I reports, the
    priors of Table 6.5 ("F", "F+I", "raw image", "MSE only", "cosine only") and the baselines of Tables 6.3–6.4
    (``BASELINE_ROWS``)."""

    stage1: dict[str, Stage1]
    stage1_fi: Stage1
    priors: dict[str, Prior]
    baselines: dict[str, Baseline]


def stage1_jobs(cfg: Mapping[str, Any], ec: Ch06Config, rs: ReportSets) -> dict[tuple, Any]:
    """The four stage-1 BARTs (F with each representative embedding, F+I with the mean) as ``parallel.run_all`` jobs."""
    return ({("F", how): partial(stage1, cfg, ec, rs, "F", how) for how in ("mean", "bos", "eos")}
            | {("F+I", "mean"): partial(stage1, cfg, ec, rs, "F+I", "mean")})


def pair_inputs(cfg: Mapping[str, Any], base, rs: ReportSets) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pairs' latents and raw pixels (``prior_inputs``), encoded once for every prior and baseline — a
    job's work before its cache lookup would run twice (worker, then caller) — on one thread as the jobs themselves,
    so that what they train on does not depend on the machine's cores."""
    with one_thread(resolve_device(cfg) == "cpu"):
        return tuple(prior_inputs(base, rs.pair_images_train, raw) for raw in (False, True))


def prior_jobs(cfg: Mapping[str, Any], ec: Ch06Config, base_k: str, rs: ReportSets, stages: Mapping[tuple, Stage1],
               inputs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """The five priors of Table 6.5 ("F", "F+I", "raw image", "MSE only", "cosine only") as ``parallel.run_all`` jobs;
    ``stages`` from ``stage1_jobs``, ``inputs`` from ``pair_inputs``. The report embeddings are encoded here once."""
    f, fi = stages["F", "mean"], stages["F+I", "mean"]
    latents, pixels_in = inputs
    with one_thread(resolve_device(cfg) == "cpu"):
        targets_f = lm.encode_reports(f.model, f.tokenizer, rs.pair_f_train, f.how)
        targets_fi = lm.encode_reports(fi.model, fi.tokenizer, rs.pair_fi_train, fi.how)
    f_prior = partial(prior, cfg, ec, base_k, rs, "F", targets=targets_f)
    return {"F": partial(f_prior, latents), "F+I": partial(prior, cfg, ec, base_k, rs, "F+I", latents, targets_fi),
            "raw image": partial(f_prior, pixels_in, raw=True), "MSE only": partial(f_prior, latents, kind="mse"),
            "cosine only": partial(f_prior, latents, kind="cos")}


def baseline_jobs(cfg: Mapping[str, Any], ec: Ch06Config, cc: "ClinicalConfig", base_k: str, rs: ReportSets,
                  latents: torch.Tensor) -> dict[tuple, Any]:
    """The report baselines of Tables 6.3–6.4 as ``parallel.run_all`` jobs, keyed ("baseline", name)."""
    return {("baseline", name): partial(baseline, cfg, ec, cc, base_k, rs, name, latents) for name in BASELINE_ROWS}


def _language_models(stages: Mapping[tuple, Stage1], priors: dict[str, Prior], baselines: dict[str, Baseline]
                     ) -> LanguageModels:
    return LanguageModels({how: stages["F", how] for how in ("mean", "bos", "eos")}, stages["F+I", "mean"], priors,
                          baselines)


def train_all(cfg: Mapping[str, Any], ctx: VisionContext, rs: ReportSets, cc: "ClinicalConfig"
              ) -> tuple[VisionModels, LanguageModels]:
    """Every trained model and generated image set of the chapter, in two waves of independent jobs
    (``parallel.run_all``), so that both cores stay busy: (1) the vision variants, the stage-1 BARTs, the Table 6.2
    classifier and the report baselines — none needs another; (2) the priors (they need stage 1) and the Table 6.1 /
    6.2 images (they need the vision variants). Each wave is ordered longest job first (measured on mini: a U-Net
    variant ~3.4 core-minutes, a BART ~3.1, a prior ~2.4, the classifier ~2.5, a U-ViT ~1.5, an image set ~1).
    Returns the vision models (the vanilla model and every variant at both lengths) and the language models; the classifier
    and the image sets stay in the cache for the sections that read them (``pathology_classifier``, ``table_6_1``,
    ``table_6_2``). Each job runs on one thread, so the numbers do not depend on the machine's cores."""
    ec = ctx.ec
    inputs = pair_inputs(cfg, ctx.base, rs)
    vision, stage = vision_jobs(cfg, ctx), stage1_jobs(cfg, ec, rs)
    unets = {("vision", k): j for k, j in vision.items() if k[0] == "unet"}
    others = {("vision", k): j for k, j in vision.items() if k[0] != "unet"}
    first = run_all({**unets, **{("stage 1", k): j for k, j in stage.items()},
                     "classifier": partial(pathology_classifier, cfg, ctx.sets, ec), **others,
                     **baseline_jobs(cfg, ec, cc, ctx.key, rs, inputs[0])}, cfg, "models (wave 1 of 2)")
    vm = _vision_models(ctx, {k: first["vision", k] for k in vision})
    stages = {k: first["stage 1", k] for k in stage}
    priors = prior_jobs(cfg, ec, ctx.key, rs, stages, inputs)
    second = run_all({**{("prior", k): j for k, j in priors.items()},
                      **{("table 6.2", k): j for k, j in table_6_2_jobs(cfg, ctx, vm).items()},
                      **{("table 6.1", k): j for k, j in table_6_1_jobs(cfg, ctx, vm).items()}},
                     cfg, "priors and images (wave 2 of 2)")
    return vm, _language_models(stages, {k: second["prior", k] for k in priors},
                                {name: first["baseline", name] for name in BASELINE_ROWS})


def reports_for(ec: Ch06Config, s1: Stage1, pr: Prior, base, images: np.ndarray | None = None,
                latents: torch.Tensor | None = None) -> list[str]:
    """Reports for real images (through the VAE) or for generated z_0 ``latents``."""
    inputs = latents if latents is not None else prior_inputs(base, images, pr.raw)
    return lm.write_reports(pr.module, s1.model, s1.tokenizer, inputs, ec.max_new_tokens, ec.num_beams)


def report_row(hyp: Sequence[str], ref: Sequence[str], ref_labels: Sequence[Mapping], f1_column: str = "F1 score↑",
               arrows: str = "↑", uncertain: str = "negative") -> dict[str, Any]:
    """BLEU-1..4 and ROUGE-L against ``ref``; clinical F1 (micro, ``chexpert_labeler.clinical_scores``) of the
    hypotheses' labels against ``ref_labels`` (the labeler's labels of the reference reports)."""
    row = {f"{k}{arrows}": v for k, v in nlg_scores(hyp, ref).items()}
    row[f1_column] = clinical_scores(label_reports(hyp), ref_labels, uncertain)["F1"]
    return row


def frame(rows: Mapping[tuple, Mapping], names=("Group", "Model")) -> pd.DataFrame:
    table = pd.DataFrame(rows).T
    table.index = pd.MultiIndex.from_tuples(table.index, names=list(names))
    return table


def fig_6_5(curves: Mapping[str, pd.DataFrame]):
    """Fig. 6.5 analogue: BLEU-1..4 and ROUGE-L of reconstructed held-out reports during stage-1 training."""
    metrics = (*BLEU_NAMES, "ROUGE-L")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 2.6))
    for ax, m in zip(axes, metrics):
        for how, curve in curves.items():
            ax.plot(curve.index, curve[m], marker="o", ms=3, label=how)
        ax.set_title(m)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def pairs_figure(images: torch.Tensor, reports: Sequence[str], prompts: Sequence[str], width: int = 46):
    """Generated images beside their generated reports (and the prompt they came from)."""
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.2 * n), gridspec_kw={"width_ratios": [1, 3]}, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i].permute(1, 2, 0).numpy())
        axes[i, 0].axis("off")
        wrapped = "\n".join(reports[i][j:j + width * 2] for j in range(0, len(reports[i]), width * 2))
        axes[i, 1].text(0, 0.5, f"prompt: {prompts[i]}\nreport: {wrapped}", fontsize=7, va="center", wrap=True)
        axes[i, 1].axis("off")
    fig.tight_layout()
    return fig


def reconstruction_scores(ec: Ch06Config, s1: Stage1, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-report scores of stage 1 rebuilding ``texts`` from their own representative embeddings (Fig. 6.5's units)."""
    emb = lm.encode_reports(s1.model, s1.tokenizer, texts, s1.how)
    return per_report_scores(lm.decode_embeddings(s1.model, s1.tokenizer, emb, ec.max_new_tokens, ec.num_beams), texts)


def prompt_lengths(base, prompts: Sequence[str]) -> dict[str, int]:
    """Token counts of the prompts under the base model's tokenizer, and how many exceed its length (truncated
    by the text encoder: the last observations of a long label are lost; the mini tokenizer splits words it was
    not built with, such as "without" and "unclear", into pieces)."""
    limit = int(base.tokenizer.model_max_length)
    lengths = [len(ids) for ids in base.tokenizer(list(prompts), truncation=False).input_ids]
    return {"max tokens": max(lengths), "token limit": limit, "prompts truncated": sum(n > limit for n in lengths)}


def reference_counts(ctx: VisionContext) -> dict[str, int]:
    counts = branch_counts(ctx.train_refs)
    return {f"training labels: {k}": v for k, v in counts.items()}


# ================================================================================================ clinical efficacy
# IU X-ray's "Problems" terms (its MeSH-based annotation) -> CheXpert observation: the book's mapping, used only to
# measure the labeler; terms with no observation (Calcinosis, Thoracic Vertebrae, ...) are left out
IU_PROBLEMS = {"normal": NO_FINDING, "Cardiomegaly": "Cardiomegaly", "Pulmonary Atelectasis": "Atelectasis",
               "Atelectasis": "Atelectasis", "Pleural Effusion": "Pleural Effusion", "Opacity": "Lung Opacity",
               "Airspace Disease": "Lung Opacity", "Infiltrate": "Lung Opacity", "Pulmonary Edema": "Edema",
               "Edema": "Edema", "Pulmonary Congestion": "Edema", "Consolidation": "Consolidation",
               "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Nodule": "Lung Lesion", "Mass": "Lung Lesion",
               "Fractures, Bone": "Fracture", "Catheters, Indwelling": "Support Devices",
               "Implanted Medical Device": "Support Devices", "Medical Device": "Support Devices",
               "Tube, Inserted": "Support Devices"}


@dataclass(frozen=True)
class ClinicalConfig:
    """``ch06.clinical`` and ``ch06.baselines`` of the profile (sizes the book's: the thesis reran public code)."""

    uncertain: str
    n_iu_validation: int
    d_model: int
    layers: int
    heads: int
    ffn: int
    slots: int
    patch_size: int
    steps: int
    batch_size: int
    lr: float
    clip_width: int
    clip_dim: int
    clip_steps: int

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "ClinicalConfig":
        c, b = cfg["ch06"]["clinical"], cfg["ch06"]["baselines"]
        return cls(uncertain=str(c["uncertain"]), n_iu_validation=int(c["n_iu_validation"]), d_model=int(b["d_model"]),
                   layers=int(b["layers"]), heads=int(b["heads"]), ffn=int(b["ffn"]), slots=int(b["slots"]),
                   patch_size=int(b["patch_size"]), steps=int(b["steps"]), batch_size=int(b["batch_size"]),
                   lr=float(b["lr"]), clip_width=int(b["clip_width"]), clip_dim=int(b["clip_dim"]),
                   clip_steps=int(b["clip_steps"]))


def iu_problem_labels(reports: pd.DataFrame) -> tuple[list[str], list[dict]]:
    """Findings + impression and the observations the "Problems" annotation names (1.0) for each IU X-ray report
    (``indiana_reports.csv`` rows) with a text and an annotation."""
    texts, truth = [], []
    for r in reports.to_dict("records"):
        text = " ".join(str(r[k]) for k in ("findings", "impression") if isinstance(r.get(k), str))
        if not text.strip() or not isinstance(r.get("Problems"), str):
            continue
        texts.append(text)
        truth.append({IU_PROBLEMS[t.strip()]: 1.0 for t in r["Problems"].split(";") if t.strip() in IU_PROBLEMS})
    return texts, truth


def _agreement_frame(a: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(a).T[list(columns)]


def _blank_nan(value: Any) -> float | None:
    # the world's label table stores a blank as NaN; the labeler's blank is None
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def labeler_validation(cfg: Mapping[str, Any], cc: ClinicalConfig) -> dict[str, Any]:
    """The labeler against known labels: the CheXpert labeler's own labelled sample reports (exact, per report),
    IU X-ray's Problems annotations (P/R/F1 of 1.0 per observation; the annotation has no negatives) and the
    world's true labels of its procedural reports (exact agreement and P/R/F1). A source the data root lacks is
    said, not faked."""
    out: dict[str, Any] = {"notes": []}
    golden = data_root(cfg) / "cxr" / "chexpert_labeler" / "labeled_reports.csv"
    if golden.is_file():
        table = pd.read_csv(golden)
        rows = {}
        for i, r in table.iterrows():
            want = {o: None if pd.isna(r[o]) else float(r[o]) for o in CHEXPERT_LABELS}
            got = label_report(str(r["Reports"]))
            rows[f"sample report {i + 1}"] = {"observations equal": sum(got[o] == want[o] for o in CHEXPERT_LABELS),
                                              "of": len(CHEXPERT_LABELS), "exact": got == want}
        out["golden"] = pd.DataFrame(rows).T
    else:
        out["notes"].append(f"the labeler's labelled sample reports are not at {golden}")
    iu = dataset_folder("iu_xray", cfg) / "indiana_reports.csv"
    if iu.is_file():
        reports = pd.read_csv(iu)
        reports = reports.head(cc.n_iu_validation) if cc.n_iu_validation else reports
        texts, truth = iu_problem_labels(reports)
        observations = list(dict.fromkeys(IU_PROBLEMS.values()))
        out["iu"] = _agreement_frame(agreement(label_reports(texts), truth, observations),
                                     ("precision", "recall", "F1", "support"))
        out["notes"].append(f"IU X-ray: {len(texts)} reports with findings/impression and a Problems annotation")
    else:
        out["notes"].append(f"IU X-ray's annotated reports are not at {iu}")
    world = load_dataset("mimic_cxr", cfg, source="procedural", resolution=int(cfg["models"]["image_size"]))
    recs = world.records
    truth = [{c: _blank_nan(r.labels.get(c)) for c in CHEXPERT_LABELS} for r in recs]
    texts = [" ".join(r.meta["sections"].get(k, "") for k in ("FINDINGS", "IMPRESSION")) for r in recs]
    out["world"] = _agreement_frame(agreement(label_reports(texts), truth),
                                    ("exact", "precision", "recall", "F1", "support"))
    return out


# ================================================================================================ baselines
BASELINE_ROWS = {"CXR-RePaiR": ("Baseline", "CXR-RePaiR (report retrieval, this book)"),
                 "R2Gen": ("Baseline", "R2Gen (Chen et al., 2020)"),
                 "M²Trans": ("Baseline", "M²Trans (Miura et al., 2020)")}
BASELINE_CODE = ["ctrlgen.methods.baselines.captioning", "ctrlgen.methods.baselines.r2gen",
                 "ctrlgen.methods.baselines.m2trans", "ctrlgen.methods.baselines.cxr_repair"]


def _baseline_module(name: str, cc: ClinicalConfig, vocab: int, pad_id: int, inputs: torch.Tensor, max_length: int):
    torch.manual_seed(0)
    channels, side = int(inputs.shape[1]), int(inputs.shape[-1])
    patch = cc.patch_size if side % cc.patch_size == 0 else 1
    if name == "CXR-RePaiR":
        return cxr_repair.SmallCLIP(vocab, pad_id, channels, side, patch, cc.clip_width, cc.clip_dim)
    kind = {"R2Gen": R2Gen, "M²Trans": M2Transformer}[name]
    return kind(vocab, channels, side, patch, cc.d_model, cc.layers, cc.heads, cc.ffn, cc.slots, max_length + 1)


def _train_baseline(name: str, cc: ClinicalConfig, ec: Ch06Config, tok, inputs: torch.Tensor, texts: list[str]):
    ids = captioning.tokenize(tok, texts, ec.max_length)
    model = _baseline_module(name, cc, len(tok), tok.pad_token_id, inputs, ec.max_length)
    if name == "CXR-RePaiR":
        history = cxr_repair.train_clip(model, inputs, ids, cc.clip_steps, cc.batch_size, cc.lr, ec.seed)
    else:
        history = captioning.train_captioner(model, inputs, ids, tok.pad_token_id, cc.steps, cc.batch_size, cc.lr,
                                             ec.seed)
    return {"state": model.state_dict(), "history": history}


@dataclass
class Baseline:
    """A trained report-generation baseline with its tokenizer; ``write`` gives reports for image embeddings."""

    name: str
    module: Any
    tokenizer: Any
    corpus: list[str]
    history: list[float]
    max_new_tokens: int

    def write(self, inputs: torch.Tensor) -> list[str]:
        if self.name == "CXR-RePaiR":
            ids = captioning.tokenize(self.tokenizer, self.corpus, 10_000)
            return cxr_repair.retrieve(self.module, inputs, ids, self.corpus)
        return captioning.write(self.module, self.tokenizer, inputs, self.max_new_tokens)


def baseline(cfg: Mapping[str, Any], ec: Ch06Config, cc: ClinicalConfig, base_k: str, rs: ReportSets,
             name: str, inputs: torch.Tensor) -> Baseline:
    """Baseline ``name`` trained on the world's training pairs (findings; their latents ``inputs``, as CXR-IRGen's
    prior), stored by content. The report vocabulary is the word-level one of stage 1 (F); on full, bart-base's."""
    tok = report_tokenizer(ec, rs.stage1_f)
    parts = {"what": "ch06 baseline", "name": name, "base": base_k, "data": rs.fingerprint, "seed": ec.seed,
             "settings": [cc.d_model, cc.layers, cc.heads, cc.ffn, cc.slots, cc.patch_size, cc.steps, cc.batch_size,
                          cc.lr, cc.clip_width, cc.clip_dim, cc.clip_steps, ec.max_length, ec.bart],
             "function": _source(_train_baseline, _baseline_module)}
    out = result_cache.cached(parts, lambda: _train_baseline(name, cc, ec, tok, inputs, rs.pair_f_train), kind="torch",
                              cfg=cfg, code=BASELINE_CODE)
    module = _baseline_module(name, cc, len(tok), tok.pad_token_id, inputs, ec.max_length)
    module.load_state_dict(out["state"])
    return Baseline(name, module.eval(), tok, list(rs.pair_f_train), out["history"], ec.max_new_tokens)


def reference_labels(texts: Sequence[str]) -> list[dict]:
    """The labeler's labels of reference reports (the thesis applies the CheXpert labeler to both sides)."""
    return label_reports(texts)


def table_6_4_labels(ctx: VisionContext) -> list[dict]:
    """The labels Table 6.2's images were generated from (``n_per_label`` per pathology and No Finding)."""
    return [{obs: 1.0} for obs in (*TABLE_6_2, NO_FINDING) for _ in range(ctx.ec.n_per_label)]


def generated_for_table_6_2(cfg: Mapping[str, Any], ctx: VisionContext, vm: VisionModels, k: tuple
                            ) -> dict[str, torch.Tensor]:
    """Table 6.2's generated images of U-Net variant ``k`` (stored by content; Table 6.4 reuses them, as the thesis)."""
    return cached_generation(cfg, ctx, "table 6.2", vm.models[k], vm.keys[k], table_6_4_labels(ctx), "unet", k[1],
                             ctx.ec.seed + 1000)


def table_6_4(cfg: Mapping[str, Any], ctx: VisionContext, vm: VisionModels, writers: Mapping[tuple, Any],
              uncertain: str = "negative") -> tuple[pd.DataFrame, dict]:
    """Table 6.4 analogue: clinical F1 of each report generator on the four U-Net variants' generated images, the
    reference being the label each image was generated from. ``writers``: row -> callable(latents) -> reports.
    Returns the table and the per-report F1 (row, column) -> array, for the claims."""
    labels = [{o: l.get(o) for o in CHEXPERT_LABELS} for l in table_6_4_labels(ctx)]
    rows: dict[tuple, dict] = {}
    per: dict[tuple, np.ndarray] = {}
    for rie in (False, True):
        for length in ("short", "long"):
            k = ("unet", rie, length)
            column = row_name(ctx.ec, "unet", rie, length)[1]
            latents = generated_for_table_6_2(cfg, ctx, vm, k)["latents"]
            for row, write in writers.items():
                generated = label_reports(write(latents))
                rows.setdefault(row, {})[column] = clinical_scores(generated, labels, uncertain)["F1"]
                per[(row, column)] = per_report_f1(generated, labels, uncertain)
    return frame(rows), per

__all__ = ["NIH_TO_CHEXPERT", "TABLE_6_2", "BACKBONES", "VARIANTS", "NO_REFERENCE", "Ch06Config", "nih_to_chexpert",
           "VisionSets", "vision_sets", "label_summary", "base_model", "base_key", "load_base_and_sets", "image_embedder",
           "VisionContext", "vision_context", "trained_backbones", "load_variant", "eval_conditions", "cached_generation",
           "VisionModels", "row_name", "loss_figure", "psnr_ssim", "Table61", "table_6_1",
           "pathology_classifier", "pathology_scores", "auroc_row", "table_6_2", "rie_effect", "real_pathology_counts", "ReportSets",
           "report_sets", "Stage1", "stage1", "prior_inputs", "Prior", "prior", "reports_for", "report_row", "frame",
           "fig_6_5", "pairs_figure", "reconstruction_scores", "prompt_lengths", "reference_counts", "per_report_scores",
           "IU_PROBLEMS", "ClinicalConfig", "iu_problem_labels", "labeler_validation", "BASELINE_ROWS", "Baseline", "baseline",
           "reference_labels", "table_6_4_labels", "LanguageModels", "stage1_jobs", "pair_inputs", "prior_jobs", "baseline_jobs",
           "vision_jobs", "table_6_1_jobs", "table_6_2_jobs", "train_all", "generated_for_table_6_2", "table_6_4", "per_report_f1"]
