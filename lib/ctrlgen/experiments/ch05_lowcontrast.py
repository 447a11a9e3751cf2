"""Chapter 5's experiments (§5.4, §5.5): skin-tone annotation (Table 5.1; the six base models are the downstream
classifier zoo trained with the downstream harness), bias identification (Fig. 5.4 / 5.8 with tests), the dual-branch
pairs and the ControlNet / IP-Adapter / ControlNet + StyleID baselines, image quality (Table 5.2), the mitigation
tables (Tables 5.3-5.5) and the ablations of §5.5.5 (efficiency, Fig. 5.9, Fig. 5.10).

Everything trained or generated is cached by content (``ctrlgen.result_cache``): the skin-tone base models'
predictions, each segmenter's weights, the ControlNet's weights, every generated pair set and each finetuned
segmenter's predictions, keyed by settings, data and code.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel

from ctrlgen import result_cache
from ctrlgen.analysis.bias import ShiftSettings, annotate, poor_subsets, shift_table
from ctrlgen.data import load_dataset
from ctrlgen.data.attributes import FST_GROUPS
from ctrlgen.data.worlds.dermoscopy import DermWorldConfig, generate_dermoscopy
from ctrlgen.downstream.classifiers import build_classifier, classifier_weights
from ctrlgen.downstream.segmenters import build_segmenter
from ctrlgen.methods.baselines.controlnet import (
    ControlledUNet,
    ControlNetConfig,
    build_controlnet,
    conditioning_images,
    controlnet_generate,
    train_controlnet,
)
from ctrlgen.methods.baselines.ip_adapter import (
    IPAdapter,
    IPAdapterConfig,
    clip_image_embedder,
    ip_adapter_generate,
    train_ip_adapter,
    vae_image_embedder,
)
from ctrlgen.methods.dual_branch import (
    DualBranchConfig,
    DualBranchGenerator,
    QueryRecorder,
    StyleBatch,
    StyleIDInjector,
    compare_efficiency,
    invert_style,
    single_branch_generate,
    style_targets,
)
from ctrlgen.methods.dual_branch import targets as dual_branch_targets
from ctrlgen.metrics.image import fid as fid_score
from ctrlgen.models.registry import weight_path
from ctrlgen.parallel import run_all
from ctrlgen.sampling import decode_images, sample
from ctrlgen.downstream.train import (FitSettings, TaskSettings, predict_masks, predict_proba, settings,
                                      train_classifier, train_segmenter)
from ctrlgen.metrics.overlap import dice, iou
from ctrlgen.methods.skin_tone import (
    BASE_MODELS,
    DISPLAY_NAMES,
    ENSEMBLE_BASES,
    ENSEMBLES,
    FINAL_ENSEMBLE,
    ITA_METHODS,
    SkinToneAnnotator,
    fit_ensembles,
    group_index,
    ita_annotate,
    score_table,
    stack_features,
)
from ctrlgen.seeding import seed_everything

SEGMENTER_NAMES = {"attention_unet": "AttenU-Net", "dcsau_net": "DCSAU-Net", "fat_net": "FAT-Net"}
# Table 5.3 / 5.4 data sources; the generative ones need generators this book does not have yet (see ``not_run_reasons``)
BASELINES = ("ControlNet", "IP-Adapter", "ControlNet+StyleID")  # §5.5.1's generative baselines, in the tables' order
SOURCES = ("Pretrained", "Training Sample (Random)", "Training Sample (Target)", "ControlNet", "IP-Adapter",
           "ControlNet+StyleID", "Mine")


# ================================================================================================ settings
@dataclass(frozen=True)
class Ch05Config:
    """Chapter 5's settings, typed once from the profile section ``ch05``. Its trainers are the harness's
    (``downstream.<task>``, :func:`ctrlgen.downstream.settings`) with chapter 5's overrides: ``ch05.skin_tone`` over
    ``downstream.classification`` (§5.4.1), ``ch05.segmentation`` over ``downstream.segmentation`` (§5.4.2: batch 24)
    and, for the finetuning of §5.5.1, ``ch05.mitigation`` over both."""

    tone_train_images: int          # procedural stand-in for Fitzpatrick17k (80/20 train/val)
    tone_test_per_group: int        # procedural stand-in for DDI: class-balanced test set
    tone_resolution: int
    patch_size: int                 # 8-patch ITA patch side (20 px in Bevan & Atapour-Abarghouei 2022 at full size)
    tone_image_size: int            # base-model input side
    tone_fit: FitSettings           # §5.4.1: lr 1e-3, batch 64, patience 10 (early stopping on validation macro-F1)
    bias_images: int                # procedural bias set when ISIC 2018 Task 1 is absent
    max_train_images: int           # segmenter training images kept (0 = the whole training split)
    resolution: int
    segmenters: tuple[str, ...]
    segmenter_size: str
    seg_fit: FitSettings
    thresholds: tuple[float, ...]
    external_thresholds: tuple[float, ...]
    n_resamples: int
    low_contrast_threshold: float
    max_pairs: int                  # at most this many lowest-contrast targets (0 = the whole subset; thesis 569)
    finetune_fit: FitSettings
    ratios: tuple[int, ...]         # Fig. 5.10: pairs per low-contrast sample (thesis n = 1..4; DCSAU-Net only)
    seed: int

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "Ch05Config":
        c, seed, m = cfg["ch05"], int(cfg["seed"]), cfg["ch05"]["mitigation"]
        seg = TaskSettings.from_profile(cfg, "segmentation", "ch05.segmentation")
        return cls(tone_train_images=int(c["skin_tone"]["n_train_images"]),
                   tone_test_per_group=int(c["skin_tone"]["n_test_per_group"]),
                   tone_resolution=int(c["skin_tone"]["resolution"]), patch_size=int(c["skin_tone"]["patch_size"]),
                   tone_image_size=int(settings(cfg, "classification", "ch05.skin_tone")["image_size"]),
                   tone_fit=FitSettings.from_profile(cfg, "classification", "ch05.skin_tone"),
                   bias_images=int(c["bias"]["n_procedural_images"]),
                   max_train_images=int(c["bias"]["max_train_images"]),
                   resolution=int(c["bias"]["resolution"]), segmenters=seg.models, segmenter_size=seg.size,
                   seg_fit=seg.fit,
                   thresholds=tuple(float(t) for t in c["bias"]["thresholds"]),
                   external_thresholds=tuple(float(t) for t in c["bias"]["external_thresholds"]),
                   n_resamples=int(c["bias"]["n_resamples"]), low_contrast_threshold=float(m["low_contrast_threshold"]),
                   max_pairs=int(m["max_pairs"]),
                   finetune_fit=FitSettings.from_profile(cfg, "segmentation", "ch05.segmentation", "ch05.mitigation"),
                   ratios=_ratios(m["generation_ratios"]), seed=seed)

    @property
    def shift(self) -> ShiftSettings:
        return ShiftSettings(self.thresholds, self.n_resamples, self.seed)


def _ratios(values: Sequence[Any]) -> tuple[int, ...]:
    ratios = tuple(int(n) for n in values)
    if not ratios or 1 not in ratios or min(ratios) < 1:
        raise ValueError(f"ch05.mitigation.generation_ratios = {list(values)}: expected integers >= 1 including 1 "
                         "(the n = 1 set is the Mine row)")
    return ratios


def _digest(*values: Any) -> str:
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, np.ndarray):
            h.update(f"{v.dtype}{v.shape}".encode())
            h.update(np.ascontiguousarray(v).tobytes())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _source(*functions: Any) -> str:
    return _digest([inspect.getsource(f) for f in functions])


# ================================================================================================ data
@dataclass
class SegSet:
    """Images (N, H, W, 3) uint8 and masks (N, H, W) bool of one split."""

    images: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def take(self, index: np.ndarray) -> "SegSet":
        return SegSet(self.images[index], self.masks[index])


@dataclass
class BiasData:
    """Train / val / test splits of the bias-analysis dataset, where they came from, and the external set if any."""

    train: SegSet
    val: SegSet
    test: SegSet
    source: str
    external: SegSet | None
    external_note: str


def _split(images: np.ndarray, masks: np.ndarray, seed: int, fractions=(0.7, 0.1, 0.2)) -> tuple[SegSet, SegSet, SegSet]:
    order = np.random.default_rng(seed).permutation(len(images))
    a, b = int(fractions[0] * len(images)), int((fractions[0] + fractions[1]) * len(images))
    return tuple(SegSet(images[i], masks[i]) for i in (order[:a], order[a:b], order[b:]))


def bias_data(cfg: Mapping[str, Any], cc: Ch05Config) -> BiasData:
    """ISIC 2018 Task 1 at ``resolution`` px from the data root (its records' train/val/test splits), else the procedural
    dermoscopy world (``bias_images`` scenes, 70/10/20); PH2 as the external set when the data root holds it, else a
    shifted procedural set (equal skin-type weights), said in the note."""
    ds = load_dataset("isic2018_task1", cfg, resolution=cc.resolution, require_images=True)
    if ds.source != "procedural":
        parts = {}
        for split in ("train", "val", "test"):
            recs = [r for r in ds.with_images() if r.split == split and r.mask_path is not None]
            images, masks = ds.load_arrays(recs)
            parts[split] = SegSet(images, masks.astype(bool))
        train, val, test = parts["train"], parts["val"], parts["test"]
        source = f"ISIC 2018 Task 1 ({ds.source}), {len(train)}/{len(val)}/{len(test)} train/val/test at {cc.resolution} px"
    else:
        scenes = generate_dermoscopy(cc.bias_images, seed=cc.seed + 5, config=DermWorldConfig(resolution=cc.resolution))
        train, val, test = _split(scenes.images, scenes.masks, cc.seed)
        source = (f"procedural dermoscopy world ({cc.bias_images} scenes at {cc.resolution} px, 70/10/20 train/val/test): "
                  "ISIC 2018 Task 1 is not in the data root")
    if cc.max_train_images and len(train) > cc.max_train_images:  # the CPU budget: a seeded random part of the split
        keep = np.sort(np.random.default_rng([cc.seed, 7]).choice(len(train), cc.max_train_images, replace=False))
        train = train.take(keep)
        source += f"; segmenters train on {len(train)} of the training images (ch05.bias.max_train_images)"
    ph2 = load_dataset("ph2", cfg, resolution=cc.resolution, require_images=True)
    if ph2.source == "procedural":  # a shifted procedural set: equal skin-type weights, its own seed
        scenes = generate_dermoscopy(len(test), seed=cc.seed + 17,
                                     config=DermWorldConfig(resolution=cc.resolution, skin_type_weights=(1, 1, 1, 1, 1, 1)))
        external = SegSet(scenes.images, scenes.masks.astype(bool))
        note = (f"PH2 is not in the data root: {len(test)} procedural scenes with equal skin-type weights (a shifted "
                "distribution, not the training mix) stand in for the external set (thesis: HAM10000)")
    else:
        recs = [r for r in ph2.with_images() if r.mask_path is not None]
        images, masks = ph2.load_arrays(recs)
        external, note = SegSet(images, masks.astype(bool)), f"PH2 ({len(recs)} images) stands in for HAM10000"
    return BiasData(train, val, test, source, external, note)


# ================================================================================================ skin tone (Table 5.1)
@dataclass
class ToneData:
    """Procedural stand-ins for Fitzpatrick17k (train/val, ISIC-like skin-type weights) and DDI (balanced test)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    note: str


def tone_data(cc: Ch05Config) -> ToneData:
    """Scenes with known Fitzpatrick types (the world's skin ITA is a control), grouped I-II / III-IV / V-VI."""
    world = DermWorldConfig(resolution=cc.tone_resolution)
    scenes = generate_dermoscopy(cc.tone_train_images, seed=cc.seed + 11, config=world)
    y = group_index([{"I": "I-II", "II": "I-II", "III": "III-IV", "IV": "III-IV"}.get(t, "V-VI")
                     for t in scenes.truth["fitzpatrick"]])
    n_val = max(3, len(y) // 5)  # §5.4.1: 80/20 train/validation
    balanced = DermWorldConfig(resolution=cc.tone_resolution, skin_type_weights=(1, 1, 1, 1, 1, 1))
    test = generate_dermoscopy(3 * cc.tone_test_per_group, seed=cc.seed + 12, config=balanced)
    test_y = group_index([{"I": "I-II", "II": "I-II", "III": "III-IV", "IV": "III-IV"}.get(t, "V-VI")
                          for t in test.truth["fitzpatrick"]])
    note = (f"Fitzpatrick17k and DDI images are not here: the base models train on {len(y) - n_val} procedural scenes "
            f"(validation {n_val}; ISIC-like skin-type mix) and are tested on {len(test_y)} scenes with equal skin-type "
            "weights (DDI-like balance), labels from the world's skin ITA")
    return ToneData(scenes.images[n_val:], y[n_val:], scenes.images[:n_val], y[:n_val], test.images, test_y, note)


def _base_predictions(name: str, data: ToneData, extra: np.ndarray, image_size: int, fit: FitSettings,
                      weights: str | None) -> dict[str, Any]:
    seed_everything(fit.seed)
    model = build_classifier(name, 3, weights=weights, image_size=image_size)
    res = train_classifier(model, data.train_x, data.train_y, data.val_x, data.val_y, fit, val_metric="macro_f1")
    return {"val": predict_proba(res.model, data.val_x, fit.batch_size),
            "test": predict_proba(res.model, data.test_x, fit.batch_size),
            "extra": predict_proba(res.model, extra, fit.batch_size),
            "history": np.array([[h["epoch"], h["train loss"], h["validation"]] for h in res.history]),
            "best_epoch": np.array(res.best_epoch)}


def base_predictions(cfg: Mapping[str, Any], cc: Ch05Config, data: ToneData, extra: np.ndarray) -> dict[str, dict]:
    """§5.4.1: each of the six base models (the downstream classifier zoo, ImageNet weights from the profile's
    ``models.weights.imagenet`` when it names them, else from scratch) finetuned once to the three groups with the
    downstream harness (cross-entropy, early stopping on the validation macro-F1: Table 5.1's metric), cached: its
    probabilities on the validation, test and ``extra`` images (the bias-analysis images the annotator labels).
    Weights are not kept: the predictions are what the chapter uses. The six fits run ``jobs`` at a time
    (``ctrlgen.parallel``)."""
    jobs = {}
    for name in BASE_MODELS:
        weights = classifier_weights(cfg, name)
        parts = {"what": "ch05 skin-tone base model", "name": name, "fit": asdict(cc.tone_fit) | {"device": ""},
                 "image_size": cc.tone_image_size, "weights": str(weights or ""),
                 "data": _digest(data.train_x, data.train_y, data.val_x, data.test_x), "extra": _digest(extra),
                 "function": _source(_base_predictions)}
        compute = partial(_base_predictions, name, data, extra, cc.tone_image_size, cc.tone_fit,
                          str(weights) if weights else None)
        jobs[name] = partial(result_cache.cached, parts, compute, kind="numpy", cfg=cfg, code=["ctrlgen.downstream"])
    return run_all(jobs, cfg, "skin-tone base models")


@dataclass
class ToneResult:
    table: pd.DataFrame                 # Table 5.1 analogue
    per_image_correct: dict[str, np.ndarray]
    annotator: SkinToneAnnotator
    extra_groups: np.ndarray            # the annotator's groups for the bias-analysis images
    histories: dict[str, np.ndarray]


def table_5_1(cc: Ch05Config, data: ToneData, preds: Mapping[str, Mapping[str, np.ndarray]]) -> ToneResult:
    """ITA baselines, base models and the seven ensembles (fitted on validation predictions) on the balanced test set."""
    rows, correct = {}, {}
    for method in ITA_METHODS:
        _, groups = ita_annotate(method, data.test_x, cc.patch_size)
        pred = np.array([FST_GROUPS.index(g) if g in FST_GROUPS else -1 for g in groups])
        rows[method], correct[method] = ("ITA-based methods", pred), pred == data.test_y
    for name in BASE_MODELS:
        pred = preds[name]["test"].argmax(1)
        rows[DISPLAY_NAMES[name]], correct[DISPLAY_NAMES[name]] = ("Base models", pred), pred == data.test_y
    val = {n: preds[n]["val"] for n in ENSEMBLE_BASES}
    fitted = fit_ensembles(stack_features(val, ENSEMBLE_BASES), data.val_y, seed=cc.seed)
    test = stack_features({n: preds[n]["test"] for n in ENSEMBLE_BASES}, ENSEMBLE_BASES)
    for name in ENSEMBLES:
        pred = fitted[name].predict(test)
        rows[name], correct[name] = ("Ensemble models", pred), pred == data.test_y
    annotator = SkinToneAnnotator(ENSEMBLE_BASES, fitted[FINAL_ENSEMBLE])
    extra = annotator.predict({n: preds[n]["extra"] for n in ENSEMBLE_BASES})
    return ToneResult(score_table(data.test_y, rows), correct, annotator, extra,
                      {DISPLAY_NAMES[n]: preds[n]["history"] for n in BASE_MODELS})


# ================================================================================================ segmenters (§5.4.2)
def _train_segmenter(name: str, size: str, data: BiasData, fit: FitSettings) -> dict[str, Any]:
    seed_everything(fit.seed)
    res = train_segmenter(build_segmenter(name, size=size), data.train.images, data.train.masks, data.val.images,
                          data.val.masks, fit)
    return {"state": res.model.state_dict(), "history": [[h["epoch"], h["train loss"], h["validation"]] for h in res.history],
            "best_epoch": res.best_epoch, "epochs_run": res.epochs_run}


def _data_key(data: BiasData) -> str:
    return _digest(data.train.images, data.train.masks, data.val.images, data.val.masks)


def pretrained_segmenter(cfg: Mapping[str, Any], cc: Ch05Config, name: str, data: BiasData):
    """A segmenter of §5.4.2 trained on the bias set's training split (cached weights), in eval mode, and its record."""
    parts = {"what": "ch05 segmenter", "name": name, "size": cc.segmenter_size, "fit": asdict(cc.seg_fit) | {"device": ""},
             "data": _data_key(data), "function": _source(_train_segmenter)}
    stored = result_cache.cached(parts, lambda: _train_segmenter(name, cc.segmenter_size, data, cc.seg_fit), kind="torch",
                                 cfg=cfg, code=["ctrlgen.downstream"])
    model = build_segmenter(name, size=cc.segmenter_size)
    model.load_state_dict(stored["state"])
    return model.eval(), stored


def scores(model, images: np.ndarray, masks: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Per-image IoU and Dice of a segmenter's masks (logit > 0) against ``masks``."""
    pred = predict_masks(model, images, batch_size)
    return {"iou": np.asarray(iou(pred, masks)), "dice": np.asarray(dice(pred, masks)), "pred": pred}


# ================================================================================================ mitigation (§5.5)
def low_contrast_subset(images: np.ndarray, masks: np.ndarray, threshold: float, max_count: int = 0) -> np.ndarray:
    """Indices of the training images with ITA Difference < ``threshold`` (§5.5.1: 30, 569 ISIC images), lowest
    contrast first; at most ``max_count`` of them (0 = all) — the same images the dual-branch pairs take their
    style from (``dual_branch_pairs`` with ``max_pairs``; the same stand-in when none is below the threshold)."""
    subset = dual_branch_targets.low_contrast_subset(images, masks, threshold, max_count or None,
                                                     fallback=max_count or 4)
    return subset["index"].to_numpy()


def random_subset(n_total: int, size: int, seed: int) -> np.ndarray:
    """The "Training Sample (Random)" control: ``size`` training images drawn without replacement."""
    return np.sort(np.random.default_rng([seed, 55]).choice(n_total, size=min(size, n_total), replace=False))


def _finetune(name: str, size: str, state: dict, train: SegSet, val: SegSet, evals: Mapping[str, SegSet],
              fit: FitSettings) -> dict:
    seed_everything(fit.seed)
    model = build_segmenter(name, size=size)
    model.load_state_dict(state)
    res = train_segmenter(model, train.images, train.masks, val.images, val.masks, fit)
    out = {"epochs_run": np.array(res.epochs_run)}
    for prefix, part in evals.items():
        sc = scores(res.model, part.images, part.masks, fit.batch_size)
        out[f"{prefix}iou"], out[f"{prefix}dice"] = sc["iou"], sc["dice"]
    return out


def finetuned_scores(cfg: Mapping[str, Any], cc: Ch05Config, name: str, stored: dict, finetune_set: SegSet,
                     data: BiasData, test: SegSet, label: str, external: SegSet | None = None) -> dict[str, np.ndarray]:
    """Per-image test IoU/Dice (``iou``, ``dice``) of a pretrained segmenter finetuned on ``finetune_set`` (§5.5.1:
    lr 1e-4, batch 24; synthetic or real data only, no mixing), and with ``external`` also on that set (``ext_iou``,
    ``ext_dice``: Table 5.4 from the same finetuned model), cached by content."""
    if len(finetune_set) == 0:
        raise ValueError(f"{label}: the finetuning set is empty")
    evals = {"": test} | ({"ext_": external} if external is not None else {})
    parts = {"what": "ch05 finetuned segmenter", "name": name, "size": cc.segmenter_size, "label": label,
             "pretrained": _digest(*[v.numpy() for v in stored["state"].values()]),
             "fit": asdict(cc.finetune_fit) | {"device": ""}, "set": _digest(finetune_set.images, finetune_set.masks),
             "val": _digest(data.val.images), "eval": {k: _digest(v.images, v.masks) for k, v in evals.items()},
             "function": _source(_finetune, scores)}
    return result_cache.cached(parts, lambda: _finetune(name, cc.segmenter_size, stored["state"], finetune_set, data.val,
                                                        evals, cc.finetune_fit), kind="numpy", cfg=cfg,
                               code=["ctrlgen.downstream"])


def not_run_reasons() -> dict[str, str]:
    """Why a Table 5.2 / 5.3 / 5.4 data source has no row in this run (never a typed number): every source runs."""
    return {}


# ================================================================================================ dual-branch pairs (§5.5.1)
@dataclass
class DualBranchPairs:
    """Generated low-contrast pairs (only those with a usable annotation) and how they were made."""

    images: np.ndarray          # (G, H, W, 3) uint8 at the bias set's resolution
    masks: np.ndarray           # (G, H, W) bool
    style_index: np.ndarray     # the training image each pair took its style from
    requested: int
    passes: dict[str, int]
    note: str

    @property
    def set(self) -> SegSet:
        return SegSet(self.images, self.masks)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` images or bool ``(N, H, W)`` masks -> float ``(N, 3, H, W)`` / ``(N, H, W)`` in [0, 1] (figures)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x.permute(0, 3, 1, 2).float() / 255.0 if x.ndim == 4 else x.float()


def _resize(x: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == side:
        return x
    return F.interpolate(x, size=(side, side), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


def _generate_pairs(model, config: DualBranchConfig, images: np.ndarray, style_index: np.ndarray, layouts: np.ndarray,
                    prompt: str, batch: int, out_side: int) -> dict[str, Any]:
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    styles = _resize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, side, "bilinear").clamp(0, 1)
    masks = _resize(torch.from_numpy(layouts.astype(np.float32))[:, None], side, "nearest")[:, 0] > 0.5
    gen = DualBranchGenerator(model, config)
    kept_images, kept_masks, kept_index, passes = [], [], [], {}
    for start in range(0, len(style_index), batch):
        idx = style_index[start:start + batch]
        references = [invert_style(model, styles[i], prompt, config) for i in idx]  # one inversion per reference
        res = gen.generate(references, masks[start:start + batch], prompt)
        ok = res.ok.bool()
        kept_images.append(_resize(res.images[ok], out_side, "bilinear"))
        kept_masks.append(_resize(res.masks[ok].float()[:, None], out_side, "nearest")[:, 0] > 0.5)
        kept_index.append(torch.as_tensor(idx)[ok])
        for k, v in res.passes.items():
            passes[k] = passes.get(k, 0) + int(v)
    return {"images": (torch.cat(kept_images).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1),
            "masks": torch.cat(kept_masks), "style_index": torch.cat(kept_index),
            "passes": {k: torch.tensor(v) for k, v in passes.items()}}


def efficiency(cfg: Mapping[str, Any], model: Any, images: np.ndarray, masks: np.ndarray, repeats: int = 3) -> dict[str, Any]:
    """§5.5.5: denoising passes (T vs 2T, the inversion precomputed) and median wall time of the dual-branch model
    against the two-stage layout-then-StyleID pipeline at equal steps, guidance backward passes included, on one
    style reference and its mask (``ctrlgen.methods.dual_branch.compare_efficiency``). A timing: never cached."""
    config = DualBranchConfig.from_profile(cfg)
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    style = _resize(torch.from_numpy(images[:1]).permute(0, 3, 1, 2).float() / 255.0, side, "bilinear").clamp(0, 1)
    layout = _resize(torch.from_numpy(masks[:1].astype(np.float32))[:, None], side, "nearest")[:, 0] > 0.5
    prompt = str(cfg["didgen"]["prefix"])
    reference = invert_style(model, style[0], prompt, config)
    return compare_efficiency(DualBranchGenerator(model, config), reference, layout, prompt, repeats)


def dual_branch_pairs(cfg: Mapping[str, Any], cc: Ch05Config, data: BiasData, model: Any, model_key: str,
                      per_sample: int = 1, layout_guidance: bool = True) -> DualBranchPairs:
    """§5.5.1: ``per_sample`` pairs per low-contrast training image, each styled by that image and laid out by its
    augmented mask (expand/compress, flip, rotate: ``didgen.pairs`` scale), generated by Algorithm 3 on chapter 4's
    region-aware model (``model``: ``ch04_didgen.finetune(cfg, "mine", sets).model``, from chapter 4's cache, whose
    ``key`` is ``model_key``; the chapter passes it in, since one chapter's experiments never import another's) with
    the thesis prompt "An image of <lesion> on <skin>" (the profile's ``didgen.prefix``) for inversion and generation.
    ``layout_guidance=False`` is Table 5.5's ablation: L_CA and L_SA removed from Eq. (5.9) and (5.10) (λ_attn = 0,
    no layout updates after the bifurcation); the style loss stays. At most ``max_pairs`` targets (lowest contrast
    first). Stored by content."""
    config = DualBranchConfig.from_profile(cfg, **({} if layout_guidance else {"lambda_attn": 0.0,
                                                                                "layout_guidance_after": False}))
    pairs_cfg = cfg["didgen"]["pairs"]
    targets = style_targets(data.train.images, data.train.masks, cc.low_contrast_threshold, per_sample=per_sample,
                            seed=cc.seed + per_sample, augment=bool(pairs_cfg["augment"]),
                            scale=tuple(float(x) for x in pairs_cfg["augment_scale"]),
                            max_references=cc.max_pairs or None, fallback=cc.max_pairs or 4)
    prompt, batch = str(cfg["didgen"]["prefix"]), int(cfg["didgen"]["eval"]["pair_batch"])
    parts = {"what": "ch05 dual-branch pairs", "model": model_key, "config": asdict(config), "prompt": prompt,
             "styles": _digest(data.train.images[targets.style_index]), "layouts": _digest(targets.layout_masks),
             "side": cc.resolution, "function": _source(_generate_pairs, _resize)}
    out = result_cache.cached(parts, lambda: _generate_pairs(model, config, data.train.images, targets.style_index,
                                                             targets.layout_masks, prompt, batch, cc.resolution),
                              kind="torch", cfg=cfg, code=["ctrlgen.methods.dual_branch"])
    note = (f"{len(out['images'])} of {len(targets.style_index)} dual-branch pairs kept (annotation usable"
            f"{'' if layout_guidance else '; without layout guidance'}); "
            f"chapter 4's region-aware model (DermPrompt-trained: a deviation from the thesis's prefix-only model), "
            f"prompt {prompt!r}, T = {config.num_steps}, η = {config.eta:g}")
    if targets.subset.attrs.get("fallback"):
        note += (f"; no training image has ITA difference < {cc.low_contrast_threshold:g}, so the "
                 f"{len(targets.subset)} lowest-contrast ones stand in as style references")
    return DualBranchPairs(out["images"].numpy(), out["masks"].numpy().astype(bool), out["style_index"].numpy(),
                           len(targets.style_index), {k: int(v) for k, v in out["passes"].items()}, note)


# ================================================================================================ baselines (§5.5.1)
@dataclass
class BaselinePairs:
    """A baseline's images on the dual-branch model's masks (§5.5.1: the masks generated by "Mine", which avoids
    reproducing the training pairs), one per kept dual-branch pair, in the same order."""

    images: np.ndarray          # (G, H, W, 3) uint8
    masks: np.ndarray           # (G, H, W) bool: the dual-branch annotations the baseline was conditioned on
    note: str

    @property
    def set(self) -> SegSet:
        return SegSet(self.images, self.masks)


def _train_controlnet(base: Any, images: np.ndarray, masks: np.ndarray, prompt: str, config: ControlNetConfig,
                      seed: int) -> dict[str, Any]:
    side = int(base.unet.config.sample_size) * base.vae_scale_factor
    pix = (_resize(torch.from_numpy(images).permute(0, 3, 1, 2).float(), side, "bilinear").clamp(0, 255)
           .round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    lay = (_resize(torch.from_numpy(masks.astype(np.float32))[:, None], side, "nearest")[:, 0] > 0.5).numpy()
    net = train_controlnet(copy.deepcopy(base), pix, lay, prompt, config, seed=seed, progress=False)
    return {"state": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def ch05_controlnet(cfg: Mapping[str, Any], cc: Ch05Config, data: BiasData, base: Any, base_key: str):
    """§5.5.1: ControlNet trained on the bias set's training pairs (ground-truth masks) on the derm ``base`` model
    (frozen), with the profile's ``gan_baselines.controlnet`` settings and the baselines' prompt — chapter 4 part II's
    function and settings; chapter 4 stores only the images it draws, on its own data, so this chapter trains its own.
    The weights are stored by content."""
    config, prompt = ControlNetConfig.from_profile(cfg), str(cfg["didgen"]["baselines"]["prompt"])
    parts = {"what": "ch05 controlnet", "base": base_key, "config": asdict(config), "prompt": prompt,
             "data": _digest(data.train.images, data.train.masks), "seed": cc.seed,
             "function": _source(_train_controlnet, _resize)}
    stored = result_cache.cached(parts, lambda: _train_controlnet(base, data.train.images, data.train.masks, prompt,
                                                                  config, cc.seed),
                                 kind="torch", cfg=cfg, code=["ctrlgen.methods.baselines.controlnet"])
    net = build_controlnet(base, cc.seed)
    net.load_state_dict(stored["state"])
    return net.eval()


def _masks_at(masks: np.ndarray, side: int) -> np.ndarray:
    return (_resize(torch.from_numpy(masks.astype(np.float32))[:, None], side, "nearest")[:, 0] > 0.5).numpy()


def _to_uint8(images: torch.Tensor, side: int) -> np.ndarray:
    return (_resize(images.float(), side, "bilinear").clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def _controlnet_styleid(base: Any, controlnet: Any, config: DualBranchConfig, styles: torch.Tensor, masks: np.ndarray,
                        prompt: str, scale: float) -> torch.Tensor:
    """ControlNet + StyleID (§5.5.1, Chung et al. 2024) for G targets: stage 1 draws the layout image with the ControlNet
    from z_T^style (the style reference's DDIM inversion on the base model), recording the base U-Net's decoder
    self-attention queries; stage 2 is a second trajectory from z_T^style on the base U-Net whose decoder
    self-attention takes those queries (γ) and the style reference's K/V (``StyleIDInjector``): 2T passes."""
    side = int(base.unet.config.sample_size) * base.vae_scale_factor
    references = [invert_style(base, styles[i], prompt, config) for i in range(len(styles))]
    cfg_on = config.guidance_scale != 1.0
    style = StyleBatch.of(references, len(references), cfg_on)
    cond, uncond = base.encode_prompt([prompt] * len(references)), base.encode_prompt([""])
    z_T = style.z_T.to(base.device, cond.dtype).clone()
    latent = tuple(z_T.shape[-2:])
    common = dict(num_steps=config.num_steps, guidance_scale=config.guidance_scale, progress=False)
    controlled = ControlledUNet(base.unet, controlnet.to(base.device).eval(), scale)
    controlled.condition(conditioning_images(masks, side).to(base.device))
    with QueryRecorder(base.unet, config.selection, latent_size=latent) as recorder:
        sample(controlled, base.scheduler("ddim"), z_T, cond, uncond, **common)
    with StyleIDInjector(base.unet, recorder.queries, style.kv, config.selection, config.styleid_gamma,
                         config.styleid_temperature, latent_size=latent):
        styled = sample(base.unet, base.scheduler("ddim"), z_T, cond, uncond, **common)
    return decode_images(base, styled.latents).cpu()


def _baseline_images(kind: str, base: Any, controlnet: Any, config: DualBranchConfig, styles: np.ndarray,
                     masks: np.ndarray, prompt: str, batch: int, seed: int, scale: float, out_side: int,
                     ip: tuple[Any, Any, float] | None = None) -> dict[str, Any]:
    side = int(base.unet.config.sample_size) * base.vae_scale_factor
    lay = _masks_at(masks, side)
    if kind == "IP-Adapter":  # on top of the ControlNet: the mask gives the layout, the reference the image prompt
        adapter, embed, ip_scale = ip
        refs = _resize(torch.from_numpy(styles).permute(0, 3, 1, 2).float() / 255.0, side, "bilinear").clamp(0, 1)
        controlled = ControlledUNet(base.unet, controlnet.to(base.device).eval(), scale)
        out = ip_adapter_generate(base, adapter, refs, prompt, embed, controlled=controlled,
                                  masks=conditioning_images(lay, side), scale=ip_scale, num_steps=config.num_steps,
                                  guidance_scale=config.guidance_scale, seed=seed, batch_size=batch)
    elif kind == "ControlNet":
        out = controlnet_generate(base, controlnet, lay, prompt, num_steps=config.num_steps,
                                  guidance_scale=config.guidance_scale, seed=seed, batch_size=batch,
                                  conditioning_scale=scale)
    else:
        refs = _resize(torch.from_numpy(styles).permute(0, 3, 1, 2).float() / 255.0, side, "bilinear").clamp(0, 1)
        out = torch.cat([_controlnet_styleid(base, controlnet, config, refs[i:i + batch], lay[i:i + batch], prompt, scale)
                         for i in range(0, len(lay), batch)])
    return {"images": torch.from_numpy(_to_uint8(out, out_side))}


def baseline_pairs(cfg: Mapping[str, Any], cc: Ch05Config, kind: str, base: Any, base_key: str, controlnet: Any,
                   controlnet_key: str, mine: "DualBranchPairs", styles: np.ndarray,
                   ip: tuple[Any, Any, str] | None = None) -> BaselinePairs:
    """"ControlNet", "IP-Adapter" or "ControlNet+StyleID" images for the kept dual-branch pairs: each conditioned on
    that pair's generated mask (§5.5.1) and, for IP-Adapter and ControlNet+StyleID, on the same low-contrast
    reference (``styles``: the references in the pairs' order), at the dual-branch T and CFG; stored by content.
    ``ip``: ``ch05_ip_adapter``'s (adapter, embedder, note), for "IP-Adapter" only."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}: one of {', '.join(BASELINES)}")
    if kind == "IP-Adapter" and ip is None:
        raise ValueError("the IP-Adapter baseline needs ip = ch05_ip_adapter(...)")
    if len(styles) != len(mine.masks):
        raise ValueError(f"{len(styles)} style references for {len(mine.masks)} dual-branch masks")
    config = DualBranchConfig.from_profile(cfg)
    scale = float(ControlNetConfig.from_profile(cfg).conditioning_scale)
    prompt, batch = str(cfg["didgen"]["baselines"]["prompt"]), int(cfg["didgen"]["eval"]["pair_batch"])
    parts = {"what": "ch05 baseline pairs", "kind": kind, "base": base_key, "controlnet": controlnet_key,
             "config": asdict(config), "prompt": prompt, "masks": _digest(mine.masks), "styles": _digest(styles),
             "side": cc.resolution, "seed": cc.seed, "scale": scale,
             "function": _source(_baseline_images, _controlnet_styleid, _masks_at, _to_uint8)}
    ip_args = None
    if kind == "IP-Adapter":
        ip_cfg = IPAdapterConfig.from_profile(cfg)
        parts["ip_adapter"] = _digest(*[v.numpy() for v in ip[0].state_dict().values()]) + f"@{ip_cfg.scale}"
        ip_args = (ip[0], ip[1], ip_cfg.scale)
    out = result_cache.cached(parts, lambda: _baseline_images(kind, base, controlnet, config, styles, mine.masks, prompt,
                                                              batch, cc.seed, scale, cc.resolution, ip_args),
                              kind="torch", cfg=cfg, code=["ctrlgen.methods.baselines.controlnet",
                                                           "ctrlgen.methods.baselines.ip_adapter",
                                                           "ctrlgen.methods.dual_branch"])
    extra = {"ControlNet": "", "ControlNet+StyleID": ", StyleID injection of the same references (2T passes)",
             "IP-Adapter": ", the same references as image prompts (IP-Adapter on top of the ControlNet)"}[kind]
    note = (f"{kind}: {len(mine.masks)} images on the dual-branch masks, the derm base model with chapter 5's "
            f"ControlNet{extra}; prompt {prompt!r}, T = {config.num_steps}")
    return BaselinePairs(out["images"].numpy(), mine.masks.copy(), note)


def _ip_embedder(cfg: Mapping[str, Any], base: Any) -> tuple[Any, str]:
    folder = str(cfg["ch05"]["ip_adapter"]["image_encoder"])
    if folder:
        path = weight_path(cfg, folder, "transformers")
        return clip_image_embedder(str(path)), f"CLIP image encoder {path}"
    return vae_image_embedder(base.vae), "the base model's VAE encoder (latent mean pooled to 4 × 4; CLIP stand-in)"


def _train_ip(base: Any, controlnet: Any, images: np.ndarray, masks: np.ndarray, prompt: str, config: IPAdapterConfig,
              embed: Any, seed: int) -> dict[str, Any]:
    side = int(base.unet.config.sample_size) * base.vae_scale_factor
    pix = _to_uint8(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, side)
    cond = conditioning_images(_masks_at(masks, side), side)
    dim = int(embed(torch.zeros(1, 3, side, side)).shape[1])
    model = copy.deepcopy(base)
    controlled = ControlledUNet(model.unet, copy.deepcopy(controlnet).requires_grad_(False).eval())
    adapter = train_ip_adapter(model, pix, prompt, config, embed, dim, controlled=controlled, masks=cond, seed=seed)
    return {"state": {k: v.detach().cpu() for k, v in adapter.state_dict().items()}, "embed_dim": torch.tensor(dim)}


def ch05_ip_adapter(cfg: Mapping[str, Any], cc: Ch05Config, data: BiasData, base: Any, base_key: str, controlnet: Any,
                    controlnet_key: str) -> tuple[Any, Any, str]:
    """§5.5.1: the IP-Adapter baseline (``methods.baselines.ip_adapter``) trained on the bias set's training images
    (each its own image prompt) on top of chapter 5's frozen ControlNet (their masks as its condition), on the derm
    base model, with the profile's ``ch05.ip_adapter`` settings; weights stored by content. Returns (adapter, image
    embedder, note)."""
    config, prompt = IPAdapterConfig.from_profile(cfg), str(cfg["didgen"]["baselines"]["prompt"])
    embed, embed_note = _ip_embedder(cfg, base)
    parts = {"what": "ch05 ip-adapter", "base": base_key, "controlnet": controlnet_key, "config": asdict(config),
             "prompt": prompt, "encoder": str(cfg["ch05"]["ip_adapter"]["image_encoder"]),
             "data": _digest(data.train.images, data.train.masks), "seed": cc.seed,
             "function": _source(_train_ip, _ip_embedder, _masks_at, _to_uint8)}
    stored = result_cache.cached(parts, lambda: _train_ip(base, controlnet, data.train.images, data.train.masks, prompt,
                                                          config, embed, cc.seed),
                                 kind="torch", cfg=cfg, code=["ctrlgen.methods.baselines.ip_adapter",
                                                              "ctrlgen.methods.baselines.controlnet"])
    adapter = IPAdapter(base.unet, int(stored["embed_dim"]), config.tokens)
    adapter.load_state_dict(stored["state"])
    note = (f"IP-Adapter (decoupled cross-attention, {config.tokens} image tokens, λ = {config.scale:g}) trained "
            f"{config.train_steps} steps on top of the frozen ControlNet; image encoder: {embed_note}")
    return adapter.eval(), embed, note


def unet_key(model: Any) -> str:
    """A content key of a diffusion model's U-Net weights (the derm base model has no cache key of its own here)."""
    state = model.unet.state_dict()
    return _digest(*[state[k].float().cpu().numpy() for k in sorted(state)])


def controlnet_key(net: Any) -> str:
    """A content key of a ControlNet's weights."""
    state = net.state_dict()
    return _digest(*[state[k].numpy() for k in sorted(state)])


# ================================================================================================ Table 5.2 (§5.5.2)
@dataclass
class QualityFeatures:
    """What Table 5.2 measures with: FID features, the perceptual distance (LPIPS) and the DINO-style feature map."""

    fid: Any
    distance: Any
    dino: Any
    note: str


def quality_features(cfg: Mapping[str, Any], fid_features: Any, distance: Any, metric_note: str) -> QualityFeatures:
    """The profile's extractors (``metric_extractors``) plus DINO: DINOv2's CLS token from the local folder
    ``models.weights.dino`` when the profile uses pretrained models (§5.5.2), else the FID extractor's features as the
    stand-in (said in the note)."""
    w = cfg["models"]["weights"]
    if str(cfg["models"]["kind"]) != "mini" and str(w["dino"]):
        folder = weight_path(cfg, str(w["dino"]), "transformers")
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        proc = AutoImageProcessor.from_pretrained(folder, local_files_only=True)

        def dino(x: torch.Tensor) -> torch.Tensor:
            pixels = proc(images=[im.permute(1, 2, 0).numpy() for im in x.clamp(0, 1)], return_tensors="pt",
                          do_rescale=False)["pixel_values"]
            return model(pixel_values=pixels).last_hidden_state[:, 0]
        return QualityFeatures(fid_features, distance, dino, f"{metric_note}; DINO: DINOv2 CLS token ({folder})")
    return QualityFeatures(fid_features, distance, fid_features,
                           f"{metric_note}; 'DINO' is the cosine similarity of those same features (no DINOv2 offline)")


@torch.no_grad()
def image_quality(generated: Mapping[str, np.ndarray], references: np.ndarray, q: QualityFeatures) -> dict[str, Any]:
    """Table 5.2: per method, FID of its images against the low-contrast references, and per pair the LPIPS distance
    to the pair's style reference and the DINO cosine similarity to it. ``generated[method]`` is (G, H, W, 3) uint8
    in the references' order."""
    ref = to_unit(references)
    out: dict[str, Any] = {"table": {}, "lpips": {}, "dino": {}}
    for method, images in generated.items():
        if len(images) != len(references):
            raise ValueError(f"{method}: {len(images)} images for {len(references)} references")
        x = to_unit(images)
        lp = q.distance(x, ref).flatten().cpu().numpy()
        dn = F.cosine_similarity(q.dino(x).flatten(1), q.dino(ref).flatten(1), dim=1).cpu().numpy()
        fd = fid_score(ref, x, q.fid) if len(x) > 1 else float("nan")
        out["lpips"][method], out["dino"][method] = lp, dn
        out["table"][method] = {"FID ↓": fd, "LPIPS ↓": float(lp.mean()), "DINO ↑": float(dn.mean())}
    frame = pd.DataFrame.from_dict(out["table"], orient="index")
    frame.index.name = "Methods"
    out["table"] = frame
    return out


# ================================================================================================ Fig. 5.9, Fig. 5.10 (§5.5.5)
def _single_vs_dual(model: Any, config: DualBranchConfig, styles: np.ndarray, layouts: np.ndarray, prompt: str,
                    out_side: int) -> dict[str, Any]:
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    refs = _resize(torch.from_numpy(styles).permute(0, 3, 1, 2).float() / 255.0, side, "bilinear").clamp(0, 1)
    masks = torch.from_numpy(_masks_at(layouts, side))
    gen = DualBranchGenerator(model, config)
    references = [invert_style(model, refs[i], prompt, config) for i in range(len(refs))]
    dual = gen.generate(references, masks, prompt)
    single = single_branch_generate(gen, references, masks, prompt)
    return {"dual": torch.from_numpy(_to_uint8(dual.images, out_side)),
            "single": torch.from_numpy(_to_uint8(single.images, out_side))}


def single_vs_dual(cfg: Mapping[str, Any], cc: Ch05Config, model: Any, model_key: str, styles: np.ndarray,
                   layouts: np.ndarray) -> dict[str, np.ndarray]:
    """Fig. 5.9: the same style references and layouts through the dual-branch model and its single-branch variant
    (injection from the bifurcation step on, in the one trajectory); stored by content."""
    config, prompt = DualBranchConfig.from_profile(cfg), str(cfg["didgen"]["prefix"])
    parts = {"what": "ch05 single vs dual", "model": model_key, "config": asdict(config), "prompt": prompt,
             "styles": _digest(styles), "layouts": _digest(layouts), "side": cc.resolution,
             "function": _source(_single_vs_dual, _masks_at, _to_uint8)}
    out = result_cache.cached(parts, lambda: _single_vs_dual(model, config, styles, layouts, prompt, cc.resolution),
                              kind="torch", cfg=cfg, code=["ctrlgen.methods.dual_branch"])
    return {k: v.numpy() for k, v in out.items()}


def ratio_table(by_ratio: Mapping[int, Mapping[str, np.ndarray]], s06: np.ndarray) -> pd.DataFrame:
    """Fig. 5.10's numbers: per generation ratio n, DCSAU-Net's mean IoU on S_0.6 and on all test images after
    finetuning on that set. ``by_ratio[n]`` holds per-test-image ``iou``."""
    rows = {n: {"IoU (S_0.6)": float(v["iou"][s06].mean()) if s06.any() else np.nan, "IoU (All)": float(v["iou"].mean()),
                "pairs": int(v.get("pairs", 0))} for n, v in sorted(by_ratio.items())}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "n"
    return frame


def mitigation_table(per_source: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], s06: Mapping[str, np.ndarray],
                     subset_name: str = "S_{0.6}") -> pd.DataFrame:
    """Table 5.3 / 5.4 rows (segmenter, source): mean IoU and Dice on S_0.6 (fixed per model from its pretrained
    predictions) and on all images. ``per_source[model][source]`` holds per-image ``iou``/``dice``."""
    rows = {}
    for model, sources in per_source.items():
        member = s06[model]
        for source, sc in sources.items():
            rows[(SEGMENTER_NAMES.get(model, model), source)] = {
                (f"Poorly segmented samples {subset_name}", "IoU ↑"): float(sc["iou"][member].mean()) if member.any() else np.nan,
                (f"Poorly segmented samples {subset_name}", "Dice ↑"): float(sc["dice"][member].mean()) if member.any() else np.nan,
                ("All samples", "IoU ↑"): float(sc["iou"].mean()), ("All samples", "Dice ↑"): float(sc["dice"].mean())}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["Segmentation model", "Data source"])
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def table_5_4(per_source: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
              subsets: Mapping[str, Mapping[str, np.ndarray]]) -> pd.DataFrame:
    """Table 5.4 rows (segmenter, source) on the external set: mean IoU and Dice on each poorly segmented subset
    (``subsets[name][model]``, e.g. "S_{0.4}", fixed per model from its pretrained predictions on that set) and on all
    images. ``per_source[model][source]`` holds per-image ``iou``/``dice`` on the external set."""
    rows = {}
    for model, sources in per_source.items():
        for source, sc in sources.items():
            row = {}
            for name, members in subsets.items():
                m = members[model]
                for metric in ("iou", "dice"):
                    row[(f"Poorly segmented samples {name}", f"{'IoU' if metric == 'iou' else 'Dice'} ↑")] = (
                        float(sc[metric][m].mean()) if m.any() else np.nan)
            row[("All samples", "IoU ↑")], row[("All samples", "Dice ↑")] = float(sc["iou"].mean()), float(sc["dice"].mean())
            rows[(SEGMENTER_NAMES.get(model, model), source)] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["Segmentation model", "Data source"])
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def table_5_5(diversity: Mapping[str, float], iou_by_arm: Mapping[str, Mapping[str, np.ndarray]],
              s06: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Table 5.5 rows ("w/o layout guidance", "w/ layout guidance (mine)"): the masks' within-set diversity and, per
    segmenter, the mean IoU on S_0.6 and on all test images after finetuning on that arm's pairs.
    ``iou_by_arm[arm][model]``: per-test-image IoU."""
    rows = {}
    for arm, per_model in iou_by_arm.items():
        row = {("Diversity ↑", ""): float(diversity[arm])}
        for model, values in per_model.items():
            name, member = SEGMENTER_NAMES.get(model, model), s06[model]
            row[(name, "IoU (S_{0.6} ↑)")] = float(values[member].mean()) if member.any() else np.nan
            row[(name, "IoU (All ↑)")] = float(values.mean())
        rows[arm] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    frame.index.name = "Method"
    return frame


def pooled(per_model: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], sources: Sequence[str],
           members: Mapping[str, np.ndarray] | None = None, key: str = "iou") -> tuple[dict[str, np.ndarray], str]:
    """For each of ``sources``, the per-image ``key`` values of every model on its images ``members[model]`` (a
    poorly segmented subset; None: all images), concatenated in model order — paired across sources, for the claims
    that pool the three segmenters. When every model's subset is empty (tiny smoke sets), all images, and the note
    says so."""
    models = list(per_model)
    if members is not None and not any(np.asarray(members[m]).any() for m in models):
        members, note = None, "the subset is empty for every model: all images instead"
    else:
        note = "all images" if members is None else "subset images"
    pick = {m: (np.ones(len(per_model[m][sources[0]][key]), bool) if members is None else np.asarray(members[m]))
            for m in models}
    return {src: np.concatenate([np.asarray(per_model[m][src][key])[pick[m]] for m in models]) for src in sources}, note


__all__ = ["Ch05Config", "BiasData", "SegSet", "bias_data", "ToneData", "tone_data", "base_predictions", "table_5_1",
           "pretrained_segmenter", "scores", "low_contrast_subset", "random_subset", "finetuned_scores", "not_run_reasons",
           "mitigation_table", "SEGMENTER_NAMES", "SOURCES", "DualBranchPairs", "dual_branch_pairs", "to_unit", "efficiency", "table_5_5", "annotate",
           "poor_subsets", "shift_table", "BaselinePairs", "BASELINES", "ch05_controlnet", "ch05_ip_adapter", "unet_key", "controlnet_key", "baseline_pairs",
           "QualityFeatures", "quality_features", "image_quality", "single_vs_dual", "ratio_table", "table_5_4", "pooled"]
