"""Pretraining the mini base models (chapter 2): the book's stand-in for the public SD checkpoints.

``pretrain_domain(cfg, domain, self_attention_loss)`` trains, for one image domain (``derm``,
``scenes``, ``cxr``), a mini VAE, then a CLIP text encoder and a U-Net jointly from scratch
(``ctrlgen.models.build_mini_components``), on the real data under the data root when present,
else on the procedural worlds:

* derm — ISIC 2018 Task 1 images; prompt ``an image of a {small|medium|large} {dark|faint} <lesion> on <skin>``
  with size from the mask-area tertiles of the training images and tone from the lesion–skin contrast
  (ITA difference, ``ctrlgen.data.attributes``; "faint" below ``data.attributes.low_contrast_threshold``,
  the thesis's low-contrast subset, §5.5.1). ``<lesion>`` and ``<skin>`` are single tokens.
* scenes — chapter 3's multi-concept scenes with their captions; regions = background + each object.
* cxr — NIH ChestX-ray14 (or the procedural MIMIC-CXR world) with label prompts
  ``a chest x-ray with cardiomegaly and effusion`` / ``a chest x-ray with no finding``; regions = the
  procedural world's true anatomy masks (lungs, heart), else lung fields segmented by scikit-image
  (``ctrlgen.data.anatomy``: NIH ships no masks).

Two variants per domain (``pretrain.variants``): ``selfattn`` adds an auxiliary self-attention
structure loss (``RegionSelfAttentionTerm``: the head/layer-mean self-attention mass each query
pixel sends to other regions of the true masks, NOTES-mini-feasibility.md) to L_rec; ``plain`` is
L_rec alone. The VAE is trained once per domain and shared by both.

Cache: every model folder carries ``pretrain.json`` with its key = hash of (profile name, the profile
values that affect the training, the data fingerprint, the code version = hash of the library files
training depends on). A complete folder with the same key is loaded instead of trained. Training
happens in ``<models>/mini-<profile>/.work/`` with checkpoints every ``pretrain.unet.checkpoint_every``
steps (an interrupted run resumes there) and the finished model is renamed into place.
The default variant lives in ``mini_model_dir(cfg, domain)`` (what ``load_base_model`` returns), the
other in the sibling ``<domain>-<variant>``; the shared VAE in ``<domain>-vae``.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrlgen.data.tensors import image_tensor
from ctrlgen.models import cache
from ctrlgen.models.registry import mini_model_dir, models_root

DOMAINS = ("derm", "scenes", "cxr")
VARIANTS = ("selfattn", "plain")
DERM_TOKENS = ("<lesion>", "<skin>")
# library files whose change must retrain the models (the code version of the cache key)
CODE_FILES = ("pretrain.py", "models/mini.py", "models/sd.py", "models/tokenizer.py", "training/loop.py",
              "training/losses.py", "training/vae.py", "training/params.py", "training/checkpoint.py",
              "attention/capture.py", "attention/layers.py", "data/attributes.py", "data/tensors.py")
# files only one domain's training reads (a change there retrains that domain only)
DOMAIN_CODE_FILES = {"cxr": ("data/anatomy.py",)}
CXR_PROMPT = "a chest x-ray with {}"


# ================================================================================================ keys
def code_version(domain: str = "") -> str:
    """Hash of the library files the training of ``domain`` depends on (``CODE_FILES`` + ``DOMAIN_CODE_FILES``)."""
    return cache.code_version(CODE_FILES + DOMAIN_CODE_FILES.get(domain, ()))


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def vae_key_parts(cfg: Mapping[str, Any], fingerprint: str, domain: str = "") -> dict[str, Any]:
    p = cfg["pretrain"]
    return {"profile": getattr(cfg, "profile_name", "") or "custom", "seed": int(cfg["seed"]),
            "image_size": int(cfg["models"]["image_size"]), "vae": cache.plain(cfg["models"]["mini"]["vae"]),
            "train": _without(cache.plain(p["vae"]), "checkpoint_every"), "max_train": int(p["max_train"]), "n_heldout": int(p["n_heldout"]),
            "data": fingerprint, "code": code_version(domain)}


def unet_key_parts(cfg: Mapping[str, Any], fingerprint: str, variant: str, domain: str = "") -> dict[str, Any]:
    """What the U-Net/text-encoder model of ``variant`` depends on (the cache key is its hash)."""
    p = cfg["pretrain"]
    unet = cache.plain(p["unet"])
    unet["steps"] = variant_steps(cfg, variant)
    unet.pop("plain_steps", None)
    unet.pop("checkpoint_every", None)  # where a run may resume does not change the model
    parts = {**vae_key_parts(cfg, fingerprint, domain), "variant": variant, "mini": cache.plain(cfg["models"]["mini"]), "unet": unet,
             "low_contrast_threshold": float(cfg["data"]["attributes"]["low_contrast_threshold"])}
    if variant == "selfattn":
        parts["self_attention_loss"] = cache.plain(p["self_attention_loss"])
    return parts


def variant_steps(cfg: Mapping[str, Any], variant: str) -> int:
    u = cfg["pretrain"]["unet"]
    return int(u["steps"] if variant == "selfattn" else u["plain_steps"])


# ================================================================================================ data
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
    from skimage.transform import resize

    out = np.stack([np.clip(resize(im, (size, size), order=1, anti_aliasing=True, preserve_range=True) + 0.5, 0, 255)
                    .astype(np.uint8) for im in images])
    if masks is None:
        return out, None
    m = np.stack([resize(mk.astype(np.float32), (size, size), order=0, anti_aliasing=False, preserve_range=True)
                  for mk in masks]).round().astype(masks.dtype)
    return out, m


def _split(records: list, n_heldout: int, max_train: int, seed: int) -> tuple[list, list]:
    """Held-out = the val/test splits (else a seeded tenth); training = the train split (else the rest)."""
    held = [r for r in records if r.split in ("val", "test")]
    train = [r for r in records if r.split not in ("val", "test")]
    if not held or not train:
        order = np.random.default_rng(seed).permutation(len(records))
        k = max(1, len(records) // 10)
        held, train = [records[i] for i in order[:k]], [records[i] for i in order[k:]]
    held = held[:n_heldout] if n_heldout > 0 else held
    train = train[:max_train] if max_train > 0 else train
    return train, held


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
    from ctrlgen.data.attributes import area_ratio, region_ita

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


def load_domain_data(cfg: Mapping[str, Any], domain: str) -> DomainData:
    """The domain's data at ``models.image_size``: the first dataset of ``pretrain.domains[domain]`` found."""
    from ctrlgen.data import DataError, load_dataset, load_multiconcept

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
        return _build_domain_data(cfg, domain, name, ds, train, held)
    raise DataError(f"no data for domain {domain}: " + "; ".join(errors))


def _build_domain_data(cfg, domain: str, name: str, ds, train: list, held: list) -> DomainData:
    size = int(cfg["models"]["image_size"])
    common = dict(domain=domain, dataset=name, source=ds.source, provenance=ds.provenance,
                  ids=[r.id for r in train], heldout_ids=[r.id for r in held])
    if domain == "derm":
        from ctrlgen.data.attributes import area_ratio

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
        from ctrlgen.data.imageio import read_image, read_mask

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
        from ctrlgen.data.anatomy import anatomy_regions

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
    data.fingerprint = _fingerprint(name, ds.source, train + held,
                                    data.captions + data.heldout_captions + extra_vocabulary(domain))
    return data


def region_maps(labels: np.ndarray, k: int, side: int) -> torch.Tensor:
    """One-hot region labels ``(N, H, W)`` -> area-pooled soft regions ``(N, k, side, side)`` (sum 1 per pixel)."""
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), k).permute(0, 3, 1, 2).float()
    return torch.nn.functional.adaptive_avg_pool2d(onehot, side)


# ================================================================================================ loss term
@dataclass
class RegionSelfAttentionTerm:
    """Auxiliary self-attention structure loss for K regions (NOTES-mini-feasibility.md; not a thesis loss).

    With soft one-hot regions ``R`` (B, K, s, s) area-pooled to the self-attention side and the
    head/layer-mean self-attention ``A`` (B, N, N): the mass a query pixel p sends outside its region,
    ``1 − Σ_k R_k(p) Σ_q A[p, q] R_k(q)``, averaged over p, images and sides. For K = 2 it equals
    ``ctrlgen.training.losses.self_attention_structure_loss`` (lesion vs skin).
    """

    weight: float = 0.3
    name: str = "sa_struct"
    needs_cross: bool = False
    needs_self: bool = True

    def __call__(self, ctx) -> torch.Tensor:
        return region_self_attention_loss(ctx.store.self_by_res(), ctx.batch["regions"])


def region_self_attention_loss(self_by_res: Mapping[int, torch.Tensor], regions: torch.Tensor) -> torch.Tensor:
    losses = []
    for side, sa in self_by_res.items():
        r = regions if regions.shape[-1] == side else torch.nn.functional.adaptive_avg_pool2d(regions, side)
        r = r.reshape(r.shape[0], r.shape[1], -1).to(sa)  # (B, K, N)
        same = torch.einsum("bpq,bkq->bkp", sa, r)  # mass of p in region k
        inside = (same * r).sum(1)  # (B, N)
        losses.append((1 - inside).mean())
    return torch.stack(losses).mean()


# ================================================================================================ batches
class Batches:
    """An endless, deterministic stream of batches (epoch e uses permutation ``rng(seed, e)``).

    Re-iterating starts again at epoch 0, so a resumed run that skips ``start`` batches sees exactly
    the batches it would have seen.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int, augment: bool = False):
        self.tensors, self.batch_size, self.seed, self.augment = tensors, batch_size, seed, augment
        self.n = len(next(iter(tensors.values())))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = 0
        bs = min(self.batch_size, self.n)
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = torch.from_numpy(rng.permutation(self.n))
            for i in range(0, self.n - bs + 1, bs):
                idx = order[i:i + bs]
                batch = {k: v[idx] for k, v in self.tensors.items()}
                if self.augment:  # dihedral augmentation of pixel batches (the VAE only)
                    x = batch["pixel_values"]
                    k, flip = int(rng.integers(4)), bool(rng.integers(2))
                    x = torch.rot90(x, k, (2, 3))
                    batch["pixel_values"] = x.flip(3) if flip else x
                yield batch
            epoch += 1


# ================================================================================================ folders
def variant_dir(cfg: Mapping[str, Any], domain: str, variant: str) -> Path:
    """Folder of a variant: the default one at ``mini_model_dir`` (what ``load_base_model`` loads), the other beside it."""
    base = mini_model_dir(cfg, domain)
    return base if variant == default_variant(cfg, domain) else base.with_name(f"{domain}-{variant}")


def vae_dir(cfg: Mapping[str, Any], domain: str) -> Path:
    return mini_model_dir(cfg, domain).with_name(f"{domain}-vae")


def available_variants(cfg: Mapping[str, Any], domain: str) -> tuple[str, ...]:
    """Variants trained for ``domain``: the profile's ``pretrain.variants`` (every domain has regions for the
    self-attention loss: lesion masks, object masks, CXR anatomy)."""
    return tuple(cfg["pretrain"]["variants"])


def default_variant(cfg: Mapping[str, Any], domain: str) -> str:
    want = str(cfg["pretrain"]["default_variant"])
    have = available_variants(cfg, domain)
    return want if want in have else have[0]


def _work_dir(cfg: Mapping[str, Any], name: str, fresh: bool = False) -> Path:
    """Where an unfinished training keeps its checkpoints (resumed by the next call with the same key)."""
    return cache.work_dir(models_root(cfg) / f"mini-{getattr(cfg, 'profile_name', '') or 'custom'}", name, fresh)


# ================================================================================================ result
@dataclass
class PretrainResult:
    """One pretrained variant of a domain: where it is, how it was trained, what it measures."""

    domain: str
    variant: str
    folder: Path
    vae_folder: Path
    cached: bool
    source: str
    dataset: str
    provenance: str
    key: str
    steps: int
    vae_history: list[dict[str, float]]
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    seconds: float              # wall time of this call
    train_seconds: float        # wall time the training of this model took (VAE share included when trained here)
    resumed_from: int = 0

    @property
    def is_default(self) -> bool:
        return self.folder.name == self.domain


# ================================================================================================ training
def _components_from_vae(cfg, data: DomainData, vae_folder: Path, seed: int):
    from diffusers import AutoencoderKL

    from ctrlgen.models import build_mini_components, load_tokenizer

    tok = load_tokenizer(vae_folder / "tokenizer")
    model = build_mini_components(cfg, tok, seed=seed, name=f"mini/{data.domain}")
    model.vae = AutoencoderKL.from_pretrained(str(vae_folder / "vae")).eval()
    return model


def _build_tokenizer(cfg, data: DomainData):
    from ctrlgen.models import build_caption_tokenizer

    t = cfg["models"]["mini"]["tokenizer"]
    tok = build_caption_tokenizer(tokenizer_corpus(data), int(t["max_vocab"]), int(t["min_frequency"]),
                                  model_max_length=int(cfg["models"]["mini"]["text_encoder"]["max_length"]))
    if data.tokens:
        tok.add_tokens(list(data.tokens))
    return tok


def extra_vocabulary(domain: str) -> list[str]:
    """Texts beyond the captions whose words must be single tokens: for derm every phrase the DermPrompt
    attribute captioner can write and the baselines' prompt (chapter 4 finetunes with them)."""
    if domain != "derm":
        return []
    from ctrlgen.methods.didgen.dermprompt import dermprompt_vocabulary

    return dermprompt_vocabulary() + ["An image of lesion on skin.", "An image of skin."]


def tokenizer_corpus(data: DomainData) -> list[str]:
    """The texts the domain's tokenizer vocabulary is built from: its captions and ``extra_vocabulary``."""
    return data.captions + data.heldout_captions + extra_vocabulary(data.domain)


def ensure_vae(cfg: Mapping[str, Any], data: DomainData, force: bool = False, progress: bool = True) -> tuple[Path, dict, bool]:
    """The domain's VAE (+ tokenizer) folder, trained unless a complete one with the same key exists."""
    from ctrlgen.analysis.quality import psnr
    from ctrlgen.models import build_mini_components, save_tokenizer
    from ctrlgen.training import VAETrainConfig, train_vae

    folder = vae_dir(cfg, data.domain)
    parts = vae_key_parts(cfg, data.fingerprint, data.domain)
    key = cache.key_hash(parts)
    info = None if force else cache.cached_record(folder, "pretrain.json", key, "vae")
    if info is not None:
        return folder, info, True
    seed = int(cfg["seed"])
    start = time.perf_counter()
    tok = _build_tokenizer(cfg, data)
    model = build_mini_components(cfg, tok, seed=seed)
    p = cfg["pretrain"]["vae"]
    x = image_tensor(data.images)
    work = _work_dir(cfg, f"{data.domain}-vae-{key}", fresh=force)
    spent = cache.read_json(work / "seconds.json") or {"seconds": 0.0}
    res = train_vae(model.vae, Batches({"pixel_values": x}, int(p["batch_size"]), seed, augment=True),
                    VAETrainConfig(steps=int(p["steps"]), lr=float(p["lr"]), seed=seed, progress=progress,
                                   output_dir=str(work), checkpoint_every=int(p["checkpoint_every"])))
    (work / "seconds.json").write_text(json.dumps({"seconds": spent["seconds"] + time.perf_counter() - start}))
    with torch.no_grad():
        hx = image_tensor(data.heldout_images)
        rec = model.vae.decode(model.vae.encode(hx).latent_dist.mode()).sample.clamp(-1, 1)
    metrics = {"vae_psnr_heldout_db": float(np.mean(psnr(hx, rec))), "scaling_factor": res.scaling_factor,
               "vae_parameters": sum(q.numel() for q in model.vae.parameters())}
    seconds = spent["seconds"] + time.perf_counter() - start
    info = {"key": key, "key_parts": parts, "history": res.history, "metrics": metrics, "seconds": seconds,
            "domain": data.domain, "resumed_from": res.resumed_from}

    def write(tmp: Path) -> None:
        model.vae.save_pretrained(tmp / "vae")
        save_tokenizer(tok, tmp / "tokenizer")

    cache.save_folder(folder, write, "pretrain.json", info, work)
    return folder, info, False


def _train_tensors(model, data: DomainData, cfg, variant: str) -> dict[str, torch.Tensor]:
    latents = model.encode_dataset(data.images, batch_size=64)
    tensors = {"latents": latents, "input_ids": model.tokenize(data.captions)}
    if variant == "selfattn":
        tensors["regions"] = region_maps(data.regions, data.n_regions, latents.shape[-1])
    return tensors


def pretrain_domain(cfg: Mapping[str, Any], domain: str, self_attention_loss: bool, force: bool = False,
                    progress: bool = True, stop_after: int = 0, data: DomainData | None = None,
                    force_vae: bool | None = None) -> PretrainResult:
    """Pretrain (or load from the cache) one variant of a domain's mini base model.

    Args:
        self_attention_loss: True for the ``selfattn`` variant, False for ``plain``.
        force: retrain even if a complete cached model with the same key exists.
        stop_after: stop after this many optimizer steps in this call (0 = run to the end), leaving a
            checkpoint that the next call resumes from (time-boxing; tests simulate interruptions with it).
        data: the domain's ``DomainData`` if already loaded.
        force_vae: retrain the shared VAE too (default: ``force``).
    Returns a ``PretrainResult``; ``metrics`` is empty while the run is unfinished (``stop_after``).
    """
    from ctrlgen.training import TrainConfig, select_trainable, train_diffusion
    from ctrlgen.training.checkpoint import latest_checkpoint

    t0 = time.perf_counter()
    variant = "selfattn" if self_attention_loss else "plain"
    if variant not in available_variants(cfg, domain):
        raise ValueError(f"variant {variant!r} is not trained for {domain}: "
                         f"pretrain.variants = {list(cfg['pretrain']['variants'])}")
    data = data or load_domain_data(cfg, domain)
    folder = variant_dir(cfg, domain, variant)
    parts = unet_key_parts(cfg, data.fingerprint, variant, domain)
    key = cache.key_hash(parts)
    info = None if force else cache.cached_record(folder, "pretrain.json", key, "unet")
    common = dict(domain=domain, variant=variant, folder=folder, vae_folder=vae_dir(cfg, domain), source=data.source,
                  dataset=data.dataset, provenance=data.provenance, key=key)
    if info is not None:
        return PretrainResult(**common, cached=True, steps=info["steps"], vae_history=info["vae_history"],
                              history=info["history"], metrics=info["metrics"], seconds=time.perf_counter() - t0,
                              train_seconds=info["train_seconds"], resumed_from=info.get("resumed_from", 0))
    vfolder, vinfo, vae_cached = ensure_vae(cfg, data, force=force if force_vae is None else force_vae, progress=progress)
    seed = int(cfg["seed"])
    model = _components_from_vae(cfg, data, vfolder, seed)
    p = cfg["pretrain"]
    u = p["unet"]
    steps = variant_steps(cfg, variant)
    work = _work_dir(cfg, f"{domain}-{variant}-{key}", fresh=force)
    hist_file = work / "history.jsonl"
    ckpt = latest_checkpoint(work)
    resumed_from = int(ckpt.name.split("-")[1]) if ckpt is not None else 0
    history = [json.loads(l) for l in hist_file.read_text().splitlines()] if hist_file.is_file() else []
    history = [h for h in history if h["step"] <= resumed_from]
    spent = float(json.loads((work / "seconds.json").read_text())["seconds"]) if (work / "seconds.json").is_file() else 0.0
    tensors = _train_tensors(model, data, cfg, variant)
    batches = Batches(tensors, int(u["batch_size"]), seed + 1)
    trainable = select_trainable(model.unet, model.text_encoder, "full", train_text_encoder=True)
    terms = []
    sa = p["self_attention_loss"]
    if variant == "selfattn":
        terms.append(RegionSelfAttentionTerm(float(sa["weight"])))
    every = max(1, int(u["checkpoint_every"]))
    target = min(steps, resumed_from + stop_after) if stop_after > 0 else steps
    step = resumed_from
    while step < target:
        end = min(target, (step // every + 1) * every)
        t_chunk = time.perf_counter()
        tc = TrainConfig(steps=end, lr=float(u["lr"]), warmup_steps=int(u["warmup_steps"]), prompt_dropout=float(u["prompt_dropout"]),
                         ema_decay=float(u["ema_decay"]), max_grad_norm=float(cfg["training"]["max_grad_norm"]),
                         self_res=tuple(int(r) for r in sa["res"]) if terms else (),
                         self_places=tuple(sa["places"]), checkpoint_every=every, keep_checkpoints=2,
                         output_dir=str(work), resume=True, seed=seed, progress=progress)
        res = train_diffusion(model, batches, tc, trainable, terms)
        history += res.history
        spent += time.perf_counter() - t_chunk
        with hist_file.open("a") as f:
            f.writelines(json.dumps(h) + "\n" for h in res.history)
        (work / "seconds.json").write_text(json.dumps({"seconds": spent}))
        step = end
    if step < steps:  # stopped early on purpose: the checkpoint stays for the next call
        return PretrainResult(**common, cached=False, steps=step, vae_history=vinfo["history"], history=history,
                              metrics={}, seconds=time.perf_counter() - t0, train_seconds=spent, resumed_from=resumed_from)
    # the last train_diffusion call leaves the EMA weights in the model (ema.copy_to); if the run was
    # complete before this call (only the publishing was missing), load the EMA copy from the checkpoint
    if resumed_from >= steps:
        from ctrlgen.training import load_trainable

        load_trainable(trainable, latest_checkpoint(work), use_ema=True)
    model.unet.eval()
    model.text_encoder.eval()
    trainable.remove_hooks()
    metrics = {**vinfo["metrics"], **measure_model(cfg, model, data, variant, progress=progress)}
    train_seconds = spent + (0.0 if vae_cached else float(vinfo["seconds"]))
    info = {"key": key, "key_parts": parts, "variant": variant, "domain": domain, "steps": steps, "history": history,
            "vae_history": vinfo["history"], "metrics": metrics, "train_seconds": train_seconds,
            "unet_seconds": spent, "vae_seconds": float(vinfo["seconds"]), "resumed_from": resumed_from,
            "data": {"dataset": data.dataset, "source": data.source, "provenance": data.provenance,
                     "n_train": len(data.images), "n_heldout": len(data.heldout_images), "notes": data.notes}}
    model.extras = {"ctrlgen_variant": variant, "ctrlgen_key": key}
    cache.save_folder(folder, model.save, "pretrain.json", info, work)
    return PretrainResult(**common, cached=False, steps=steps, vae_history=vinfo["history"], history=history,
                          metrics=metrics, seconds=time.perf_counter() - t0, train_seconds=train_seconds,
                          resumed_from=resumed_from)


# ================================================================================================ measuring
def generate(model, prompts: list[str], steps: int, guidance: float = 3.0, seed: int = 0, batch: int = 64) -> torch.Tensor:
    """Text-to-image samples ``(N, 3, H, W)`` in [0, 1] (float32, CPU) with DDIM and classifier-free guidance:
    ``ctrlgen.sampling.text_to_image`` with the chapter-2 defaults (one noise stream per ``seed``)."""
    from ctrlgen.sampling import text_to_image

    return text_to_image(model, prompts, num_steps=steps, guidance_scale=guidance, seed=seed, batch_size=batch).images


@torch.no_grad()
def heldout_noise_error(model, data: DomainData, timesteps=(250, 500, 750), seed: int = 0) -> dict[str, float]:
    """Mean ‖ε − ε_θ(z_t, t, y)‖² on the held-out images at fixed timesteps and a fixed noise draw."""
    x = image_tensor(data.heldout_images)
    z = model.encode_images(x)
    ids = model.tokenize(data.heldout_captions)
    emb = model.encode_ids(ids)
    sched = model.noise_scheduler()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        noise = torch.randn(z.shape, generator=gen)
        tt = torch.full((len(z),), t, dtype=torch.long)
        pred = model.unet(sched.add_noise(z, noise, tt), tt, encoder_hidden_states=emb).sample
        out[f"heldout eps-MSE t={t}"] = float(((pred - noise) ** 2).mean())
    return out


def affinity_for(cfg, model, data: DomainData, places=("down", "mid", "up")):
    """``analysis.affinity_table`` of a model on the domain's held-out images (None without regions)."""
    from ctrlgen.analysis.self_attention import affinity_table

    if not data.has_regions:
        return None
    with torch.no_grad():
        z = model.encode_images(image_tensor(data.heldout_images))
    side = z.shape[-1]
    return affinity_table(model, z, model.tokenize(data.heldout_captions), torch.from_numpy(data.heldout_regions),
                          t=int(cfg["pretrain"]["measure"]["timestep"]), res=(side,), places=places, seed=int(cfg["seed"]))


def measure_model(cfg, model, data: DomainData, variant: str, progress: bool = False) -> dict[str, Any]:
    """Quality and structure figures stored with a pretrained model (``pretrain.json``)."""
    from ctrlgen.analysis.quality import sample_distance
    from ctrlgen.analysis.self_attention import summarize_affinity

    m = cfg["pretrain"]["measure"]
    seed = int(cfg["seed"])
    n = int(m["n_samples"])
    prompts = [data.heldout_captions[i % len(data.heldout_captions)] for i in range(n)]
    t0 = time.perf_counter()
    samples = generate(model, prompts, int(m["sample_steps"]), float(cfg["sampling"]["guidance_scale"]), seed=seed)
    sample_seconds = (time.perf_counter() - t0) / max(n, 1)
    # float (N, H, W, 3) in [0, 1]: what sample_distance reads as is (a tensor it would take as [-1, 1])
    dist = sample_distance(samples.permute(0, 2, 3, 1).numpy(), data.heldout_images, data.images,
                           int(m["feature_side"]), seed)
    out: dict[str, Any] = {f"SW1 {k}": v for k, v in dist.items()}
    out["seconds per sample"] = sample_seconds
    out.update(heldout_noise_error(model, data, seed=seed))
    table = affinity_for(cfg, model, data)
    if table is not None:
        out.update(summarize_affinity(table))
    return out


def load_variant(cfg: Mapping[str, Any], domain: str, variant: str | None = None):
    """Load a pretrained variant (default: the profile's default base model) as ``SDComponents``."""
    from ctrlgen.models import ModelNotFoundError, load_components

    variant = variant or default_variant(cfg, domain)
    folder = variant_dir(cfg, domain, variant)
    if not (folder / "pretrain.json").is_file():
        raise ModelNotFoundError(f"no {variant} mini {domain} model at {folder}: run `ctrlgen pretrain {domain} "
                                 f"--profile {getattr(cfg, 'profile_name', '')}`")
    return load_components(folder, name=f"mini/{domain} ({variant})")


def pretrain_all(cfg: Mapping[str, Any], domain: str, force: bool = False, progress: bool = True) -> dict[str, PretrainResult]:
    """Every variant of a domain (sharing the data and the VAE), the default first."""
    data = load_domain_data(cfg, domain)
    order = sorted(available_variants(cfg, domain), key=lambda v: v != default_variant(cfg, domain))
    return {v: pretrain_domain(cfg, domain, v == "selfattn", force=force, progress=progress, data=data,
                               force_vae=force and i == 0) for i, v in enumerate(order)}
