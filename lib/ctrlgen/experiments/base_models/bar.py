"""The quality bar a base model must pass before a chapter generates with it (issue 12, chapter 2).

Four criteria (``ctrlgen.analysis.quality_bar`` implements each; this module feeds them a pretrained
model and its domain's held-out data):

1. **distance** — samples' distance to the held-out images at most halfway between the real-vs-real
   floor and the per-pixel-Gaussian ceiling, for the sliced W1 of chapter 2 and for an FID-style
   distance on the domain VAE's encoder features (chapter 4's mini FID);
2. **prompt fidelity** — an attribute classifier trained on the domain's real (or world) training
   images recognises the attributes the held-out captions prompt (derm: lesion size and contrast; scenes:
   object count, shapes, colours; cxr: findings) in samples generated from those captions: at least
   70% of its chance-corrected score on the real held-out images;
3. **VAE** — the same classifier on VAE round trips of the held-out images loses at most 5% of its score;
4. **affinity** — the ``selfattn`` variant's self-attention affinity ratio stays at least
   ``min_affinity`` (NOTES-mini-feasibility.md: 1.31 after 300 steps with the auxiliary loss, 1.0 = none).

Beside them, for the scenes domain, an informational row per word kind (status "info", no threshold): the
cross-attention localization ratio of shape and colour words on the objects they name
(``measure_words.word_localization``; 1.0 = none), the property chapter 3's Stage I masks rely on.

Measurements are cached by content (``ctrlgen.result_cache``): the classifier per domain (its data
fingerprint and settings), the bar per model (its cache key), so a rebuild of chapter 2 re-measures only
a model that changed, and measuring never retrains a model (this file is not part of the models' key).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctrlgen import result_cache
from ctrlgen.analysis.attribute_labels import attribute_schema
from ctrlgen.analysis.quality import psnr, sample_distance
from ctrlgen.analysis.quality_bar import (AttributeClassifier, affinity_criterion, bar_table, distance_criterion,
                                          gaussian_ceiling_images, info_rows, prompt_fidelity_criterion, score,
                                          train_attribute_classifier, vae_criterion)
from ctrlgen.data.caption_labels import with_complete_captions
from ctrlgen.data.domains import DomainData
from ctrlgen.data.tensors import image_tensor
from ctrlgen.experiments.base_models.measure import affinity_for, generate
from ctrlgen.experiments.base_models.measure_words import KINDS, word_localization
from ctrlgen.metrics.image import VAEEncoderFeatures, fid
from ctrlgen.sampling import decode_images

CODE = ("ctrlgen.experiments.base_models.bar", "ctrlgen.data.caption_labels", "ctrlgen.analysis.quality_bar", "ctrlgen.analysis.attribute_labels",
        "ctrlgen.experiments.base_models.measure_words", "ctrlgen.analysis.cross_attention")
LOCALIZATION = "cross-attention localization (info)"


@dataclass(frozen=True)
class BarSettings:
    """``pretrain.quality_bar`` of the profile."""

    classifier_steps: int
    classifier_batch: int
    class_metric: str
    min_count: int
    n_samples: int
    sample_steps: int
    distance_fraction: float
    fidelity_threshold: float
    vae_threshold: float
    min_affinity: float
    feature_grid: int

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "BarSettings":
        b = cfg["pretrain"]["quality_bar"]
        return cls(**{name: b[name] for name in cls.__dataclass_fields__})


def domain_classifier(cfg: Mapping[str, Any], data: DomainData, settings: BarSettings) -> AttributeClassifier:
    """The domain's attribute classifier, trained on its training images and caption labels (cached; the
    labels from complete captions, ``data.caption_labels``)."""
    data = with_complete_captions(cfg, data)
    schema = attribute_schema(data.domain, data.captions + data.heldout_captions)
    seed = int(cfg["seed"])

    def train() -> dict[str, torch.Tensor]:
        model = train_attribute_classifier(data.images, schema.encode(data.captions), schema,
                                           steps=settings.classifier_steps, batch_size=settings.classifier_batch,
                                           seed=seed)
        return model.state_dict()

    parts = {"what": "attribute classifier", "domain": data.domain, "data": data.fingerprint, "seed": seed,
             "steps": settings.classifier_steps, "batch": settings.classifier_batch}
    state = result_cache.cached(parts, train, kind="torch", cfg=cfg, code=CODE)
    classifier = AttributeClassifier(schema)
    classifier.load_state_dict(state)
    return classifier.eval()


@torch.no_grad()
def _round_trips(model, images: np.ndarray) -> torch.Tensor:
    """VAE encode (the posterior mean for an AutoencoderKL) and decode of held-out images, in the book's [0, 1]
    convention."""
    return decode_images(model, model.encode_images(image_tensor(images)))


def _fid_triple(model, samples: torch.Tensor, data: DomainData, grid: int, seed: int) -> tuple[float, float, float]:
    """FID-style distance on the domain VAE's encoder features: samples, floor (training images), ceiling
    (per-pixel Gaussian images), each against the held-out images, with equal set sizes."""
    features = VAEEncoderFeatures(model.vae, grid)
    held = image_tensor(data.heldout_images, signed=False)
    n = len(samples)
    rng = np.random.default_rng(seed)
    floor_set = image_tensor(data.images[rng.choice(len(data.images), size=min(n, len(data.images)), replace=False)],
                             signed=False)
    ceiling_set = image_tensor(gaussian_ceiling_images(data.images, n=n, seed=seed), signed=False)
    return (fid(held, samples, features), fid(held, floor_set, features), fid(held, ceiling_set, features))


def measure_bar(cfg: Mapping[str, Any], model, data: DomainData, variant: str, settings: BarSettings,
                classifier: AttributeClassifier) -> pd.DataFrame:
    """The four criteria for one pretrained model (one row per criterion and quantity), and the scenes
    domain's word-localization info rows."""
    seed = int(cfg["seed"])
    data = with_complete_captions(cfg, data)  # prompts and labels name every attribute
    n = min(settings.n_samples, len(data.heldout_captions))
    captions, held = data.heldout_captions[:n], data.heldout_images[:n]
    labels = classifier.schema.encode(captions)
    samples = generate(model, list(captions), settings.sample_steps, float(cfg["sampling"]["guidance_scale"]), seed=seed)
    real = score(classifier, held, labels, settings.class_metric, settings.min_count)
    tables = [
        distance_criterion(sample_distance(samples.permute(0, 2, 3, 1).numpy(), held, data.images,
                                           int(cfg["pretrain"]["measure"]["feature_side"]), seed),
                           metric="SW1", fraction=settings.distance_fraction),
        distance_criterion(_fid_triple(model, samples, data, settings.feature_grid, seed), metric="FID (VAE features)",
                           fraction=settings.distance_fraction),
        prompt_fidelity_criterion(score(classifier, samples, labels, settings.class_metric, settings.min_count)["score"],
                                  real["score"], real["chance"], threshold=settings.fidelity_threshold),
    ]
    trips = _round_trips(model, held)
    tables.append(vae_criterion(score(classifier, trips, labels, settings.class_metric, settings.min_count)["score"],
                                real["score"], psnr_db=float(np.mean(psnr(held, trips.permute(0, 2, 3, 1).numpy()))),
                                threshold=settings.vae_threshold, chance=real["chance"]))
    if variant == "selfattn" and data.has_regions:
        affinity = affinity_for(cfg, model, data)
        down = affinity[(affinity["place"] == "down") & (affinity["head"] == "mean")]["affinity_ratio"].mean()
        tables.append(affinity_criterion(float(down), settings.min_affinity, quantity="affinity ratio (down-block head mean)"))
    localization = word_localization(cfg, model, data)
    if localization is not None:
        tables.append(localization_rows(localization))
    return bar_table(*tables)


def localization_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The info rows of a ``word_localization`` table: one per word kind ("shape words", "colour words"),
    the mean localization ratio over the kind's tokens, its median and token count beside it."""
    rows = table[table["word"] == "all"].set_index("kind")
    kinds = {f"{k} words": rows.loc[k] for k in KINDS if k in rows.index}
    return info_rows(LOCALIZATION, {q: float(r["localization_ratio"]) for q, r in kinds.items()},
                     note="word's map mass inside its object / the object's area share (1 = none)",
                     median={q: float(r["median"]) for q, r in kinds.items()},
                     n_tokens={q: int(r["n_tokens"]) for q, r in kinds.items()})


def model_bar(cfg: Mapping[str, Any], model, model_key: str, data: DomainData, variant: str) -> pd.DataFrame:
    """``measure_bar`` cached by the model's cache key, the bar settings and this code."""
    settings = BarSettings.from_profile(cfg)
    parts = {"what": "quality bar", "model": model_key, "variant": variant, "domain": data.domain,
             "data": data.fingerprint, "settings": settings.__dict__, "seed": int(cfg["seed"]),
             "guidance": float(cfg["sampling"]["guidance_scale"]), "feature_side": int(cfg["pretrain"]["measure"]["feature_side"]),
             # what word_localization reads (the scenes info rows)
             "localization": {"t_max": int(cfg["ch03"]["attencraft"]["t_max"]), "cross_res": list(cfg["attention"]["cross_res"]),
                              "places": list(cfg["attention"]["places"])}}

    def compute() -> list[dict[str, Any]]:
        classifier = domain_classifier(cfg, data, settings)
        table = measure_bar(cfg, model, data, variant, settings, classifier)
        return json.loads(table.to_json(orient="records"))  # plain JSON: NaN -> null, numpy scalars -> numbers

    return pd.DataFrame(result_cache.cached(parts, compute, kind="json", cfg=cfg, code=CODE))


__all__ = ["BarSettings", "LOCALIZATION", "domain_classifier", "localization_rows", "measure_bar", "model_bar"]
