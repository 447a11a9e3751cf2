"""The image domains the book's base models are pretrained on (chapter 2), as data: images, captions, regions.

For one domain (``derm``, ``scenes``, ``cxr``) ``load_domain_data`` reads the first dataset of the profile's
``pretrain.domains[domain]`` found under the data root (else the procedural world), splits it, resizes it to
``models.image_size`` and captions it:

* derm — ISIC 2018 Task 1 images; prompt ``an image of a {small|medium|large} {dark|faint} <lesion> on <skin>``
  with size from the mask-area tertiles of the training images and tone from the lesion–skin contrast
  (ITA difference, ``ctrlgen.data.attributes``; "faint" below ``data.attributes.low_contrast_threshold``,
  the thesis's low-contrast subset, §5.5.1). ``<lesion>`` and ``<skin>`` are single tokens.
* scenes — chapter 3's multi-concept scenes with their captions; regions = background + each object.
* cxr — NIH ChestX-ray14 (or the procedural MIMIC-CXR world) with label prompts
  ``a chest x-ray with cardiomegaly and effusion`` / ``a chest x-ray with no finding``; regions = the
  procedural world's true anatomy masks (lungs, heart), else lung fields segmented by scikit-image
  (``ctrlgen.data.anatomy``: NIH ships no masks).

The training itself is ``ctrlgen.experiments.base_models``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.transform import resize

from ctrlgen.data.anatomy import anatomy_regions
from ctrlgen.data.attributes import area_ratio, region_ita
from ctrlgen.data.datasets import load_dataset, load_multiconcept
from ctrlgen.data.imageio import read_image, read_mask
from ctrlgen.data.records import DataError

DOMAINS = ("derm", "scenes", "cxr")
DERM_TOKENS = ("<lesion>", "<skin>")
CXR_PROMPT = "a chest x-ray with {}"

@dataclass
class DomainData:
    """Training and held-out images of one domain at the model resolution, with prompts and regions."""

    domain: str
    dataset: str
    source: str
    provenance: str
    images: np.ndarray                      # (N, H, W, 3) uint8, training split
    captions: list[str]
    heldout_images: np.ndarray
    heldout_captions: list[str]
    regions: np.ndarray | None = None       # (N, H, W) int region labels (0 = background/skin)
    heldout_regions: np.ndarray | None = None
    region_names: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()            # placeholder-like words added to the tokenizer as single tokens
    ids: list[str] = field(default_factory=list)
    heldout_ids: list[str] = field(default_factory=list)
    fingerprint: str = ""
    notes: str = ""

    @property
    def has_regions(self) -> bool:
        return self.regions is not None

    @property
    def n_regions(self) -> int:
        return 0 if self.regions is None else int(max(self.regions.max(), self.heldout_regions.max())) + 1

    def describe(self) -> str:
        return (f"{self.domain}: {len(self.images)} training + {len(self.heldout_images)} held-out images of "
                f"{self.dataset} ({self.source}); {self.provenance}")


def _resize_batch(images: np.ndarray, masks: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    if images.shape[1] == size:
        return images, masks
    out = np.stack([np.clip(resize(im, (size, size), order=1, anti_aliasing=True, preserve_range=True) + 0.5, 0, 255)
                    .astype(np.uint8) for im in images])
    if masks is None:
        return out, None
    m = np.stack([resize(mk.astype(np.float32), (size, size), order=0, anti_aliasing=False, preserve_range=True)
                  for mk in masks]).round().astype(masks.dtype)
    return out, m


def _split(records: list, n_heldout: int, max_train: int, seed: int) -> tuple[list, list]:
    """Held-out = the val/test splits (else a seeded tenth); training = the train split (else the rest); each
    cut to its size by a seeded sample (``_sample``), never by its first records."""
    held = [r for r in records if r.split in ("val", "test")]
    train = [r for r in records if r.split not in ("val", "test")]
    if not held or not train:
        order = np.random.default_rng(seed).permutation(len(records))
        k = max(1, len(records) // 10)
        held, train = [records[i] for i in order[:k]], [records[i] for i in order[k:]]
    return _sample(train, max_train, seed, stream=1), _sample(held, n_heldout, seed, stream=0)


def _sample(records: list, n: int, seed: int, stream: int) -> list:
    """``n`` of ``records`` drawn without replacement by a seeded generator, kept in the reader's order (all of
    them when ``n`` is 0 or covers them). A reader's order can follow the labels: NIH's first 100 val/test
    images in ``Data_Entry`` order are all abnormal, so a first-``n`` cut held out no normal image."""
    if n <= 0 or len(records) <= n:
        return records
    keep = np.sort(np.random.default_rng([seed, 31, stream]).choice(len(records), size=n, replace=False))
    return [records[i] for i in keep]


def _fingerprint(name: str, source: str, records: list, captions: list[str]) -> str:
    h = hashlib.sha256(f"{name}|{source}".encode())
    for r, c in zip(records, captions):
        original = r.meta.get("original_image", r.image_path) if hasattr(r, "meta") else r.image_path
        size = Path(original).stat().st_size if original and Path(original).exists() else -1
        msize = Path(r.mask_path).stat().st_size if getattr(r, "mask_path", None) else -1
        h.update(f"{r.id}|{size}|{msize}|{c}\n".encode())
    return h.hexdigest()[:16]


def derm_captions(images: np.ndarray, masks: np.ndarray, area_cuts: tuple[float, float], low_contrast: float) -> list[str]:
    """``an image of a {size} {tone} <lesion> on <skin>`` from mask area (tertile cuts) and ITA difference."""
    area = area_ratio(masks)
    diff = region_ita(images, ~masks) - region_ita(images, masks)
    out = []
    for a, d in zip(area, diff):
        size = "small" if a <= area_cuts[0] else ("medium" if a <= area_cuts[1] else "large")
        tone = "dark" if np.isfinite(d) and d >= low_contrast else "faint"
        out.append(f"an image of a {size} {tone} <lesion> on <skin>")
    return out


def cxr_caption(labels: Mapping[str, float]) -> str:
    """Label prompt from NIH / CheXpert labels (positives only; "No Finding" when none)."""
    found = [k.lower().replace("_", " ") for k, v in labels.items()
             if v == 1.0 and k.lower() not in ("no finding", "no_finding")]
    return CXR_PROMPT.format(" and ".join(found) if found else "no finding")


def load_domain_data(cfg: Mapping[str, Any], domain: str, extra_texts: Sequence[str] = ()) -> DomainData:
    """The domain's data at ``models.image_size``: the first dataset of ``pretrain.domains[domain]`` found.

    ``extra_texts``: texts beyond the captions that shape what is trained on this data (the base models'
    tokenizer vocabulary); they enter ``DomainData.fingerprint``.
    """
    if domain not in DOMAINS:
        raise KeyError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    p = cfg["pretrain"]
    size, seed = int(cfg["models"]["image_size"]), int(cfg["seed"])
    n_held, max_train = int(p["n_heldout"]), int(p["max_train"])
    errors = []
    for name in p["domains"][domain]:
        try:
            if name == "multiconcept":
                ds = load_multiconcept(cfg)
                records = [r for r in ds.records if r.split == "pretrain"]
            else:
                ds = load_dataset(name, cfg, resolution=size, require_images=True)
                records = [r for r in ds.with_images() if domain != "derm" or r.mask_path is not None]
        except DataError as err:
            errors.append(f"{name}: {err}")
            continue
        if len(records) < 2:
            errors.append(f"{name}: only {len(records)} usable records")
            continue
        train, held = _split(records, n_held, max_train, seed)
        return _build_domain_data(cfg, domain, name, ds, train, held, extra_texts)
    raise DataError(f"no data for domain {domain}: " + "; ".join(errors))


def _build_domain_data(cfg, domain: str, name: str, ds, train: list, held: list,
                       extra_texts: Sequence[str] = ()) -> DomainData:
    size = int(cfg["models"]["image_size"])
    common = dict(domain=domain, dataset=name, source=ds.source, provenance=ds.provenance,
                  ids=[r.id for r in train], heldout_ids=[r.id for r in held])
    if domain == "derm":
        im, mk = ds.load_arrays(train)
        him, hmk = ds.load_arrays(held)
        im, mk = _resize_batch(im, mk, size)
        him, hmk = _resize_batch(him, hmk, size)
        cuts = tuple(float(c) for c in np.quantile(area_ratio(mk), [1 / 3, 2 / 3]))
        thr = float(cfg["data"]["attributes"]["low_contrast_threshold"])
        caps, hcaps = derm_captions(im, mk, cuts, thr), derm_captions(him, hmk, cuts, thr)
        data = DomainData(images=im, captions=caps, heldout_images=him, heldout_captions=hcaps,
                          regions=mk.astype(np.int64), heldout_regions=hmk.astype(np.int64),
                          region_names=("skin", "lesion"), tokens=DERM_TOKENS,
                          notes=f"size tertiles of the lesion area ratio at {cuts[0]:.3f} / {cuts[1]:.3f}; "
                                f"'faint' = ITA difference < {thr:g}", **common)
    elif domain == "scenes":
        def arrays(recs):
            images = np.stack([read_image(r.image_path) for r in recs])
            labels = np.zeros(images.shape[:3], np.int64)
            for i, r in enumerate(recs):
                for k, m in enumerate(r.meta["masks"], 1):
                    labels[i][read_mask(m)] = k
            return _resize_batch(images, labels, size)

        im, lab = arrays(train)
        him, hlab = arrays(held)
        k = int(max(lab.max(), hlab.max()))
        data = DomainData(images=im, captions=[r.text for r in train], heldout_images=him,
                          heldout_captions=[r.text for r in held], regions=lab, heldout_regions=hlab,
                          region_names=("background", *(f"object {i}" for i in range(1, k + 1))), **common)
    else:
        im, _ = ds.load_arrays(train)
        him, _ = ds.load_arrays(held)
        im, _ = _resize_batch(im, None, size)
        him, _ = _resize_batch(him, None, size)
        lab, how = anatomy_regions(ds, train, size)
        hlab, _ = anatomy_regions(ds, held, size)
        k = int(max(lab.max(), hlab.max()))
        data = DomainData(images=im, captions=[cxr_caption(r.labels) for r in train], heldout_images=him,
                          heldout_captions=[cxr_caption(r.labels) for r in held], regions=lab.astype(np.int64),
                          heldout_regions=hlab.astype(np.int64), region_names=("other", "lung fields", "heart")[:k + 1],
                          notes=f"regions: {how}", **common)
    # the extra vocabulary shapes the tokenizer, so it is part of the data the models are keyed by
    data.fingerprint = _fingerprint(name, ds.source, train + held, data.captions + data.heldout_captions + list(extra_texts))
    return data


__all__ = ["DOMAINS", "DERM_TOKENS", "CXR_PROMPT", "DomainData", "load_domain_data", "derm_captions", "cxr_caption"]
