"""Chapter 4, part II (§4.4.3, §4.4.4, §4.5, §4.7.2): does synthetic data help downstream models?

Classification (Tables 4.2–4.4): the six minority classes of HAM10000 (MEL, BCC, AKIEC, BKL, DF, VASC — never
NV) get ``n_per_class`` synthetic images each from every generator; four classifiers are trained on the original
and on each augmented training set; micro precision/recall/F1 and class-wise F1 on the test split; external
evaluation on Derm7pt when its images are present, else PH2's melanoma/nevus labels.

Segmentation (Tables 4.5–4.7, Fig. 4.11): DiDGen lesion–mask pairs conditioned on real training masks; every
mask-conditioned baseline draws images from DiDGen's *new* masks (the thesis's leakage-avoiding design); four
segmenters trained on the original and augmented sets at two scales; per-image Dice/IoU, PH2 as the external
set, paired t-tests and the gain analysis.

Chapter 4 part I's models and pair generation are reused: the chapter passes them in (a chapter's experiments
module never imports another chapter's). A generator that cannot run (no training image of any minority class, no
usable DiDGen pair to condition on) is a row of :class:`NotRun` with the reason — never a number. Trained diffusion
finetunes, sample sets and
every trained classifier's/segmenter's predictions are stored by content (``ctrlgen.result_cache``).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from ctrlgen import result_cache
from ctrlgen.analysis.bias import poor_vs_rest
from ctrlgen.data import load_dataset
from ctrlgen.data.records import DataError
from ctrlgen.data.tensors import image_tensor
from ctrlgen.downstream import (
    TaskSettings,
    build_classifier,
    build_segmenter,
    classification_scores,
    gain_analysis,
    paired_test,
    predict_labels,
    predict_masks,
    segmentation_scores,
    train_classifier,
    train_segmenter,
)
from ctrlgen.methods.baselines import controlnet, pix2pixhd, progressive_gan, stylegan
from ctrlgen.methods.baselines.attention_refocusing import RefocusConfig, refocus_refiner
from ctrlgen.methods.baselines.dreambooth import generate_class_images
from ctrlgen.methods.baselines.zestguide import ZestGuideConfig, zestguide_refiner
from ctrlgen.models.tokens import locate_tokens
from ctrlgen.parallel import run_all
from ctrlgen.sampling import text_to_image
from ctrlgen.thesis.claims import record_claim
from ctrlgen.training import select_trainable, train_config_from, train_diffusion

# ================================================================================================ names
HAM = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")          # Table 4.3's column order (data layer: lower case)
MINORITY = ("mel", "bcc", "akiec", "bkl", "df", "vasc")           # §4.4.3: NV is never augmented
CLASS_WORDS = {"mel": "melanoma", "nv": "melanocytic nevus", "bcc": "basal cell carcinoma",
               "akiec": "actinic keratosis", "bkl": "benign keratosis", "df": "dermatofibroma",
               "vasc": "vascular lesion"}
CLASSIFIER_LABELS = {"vgg16": "VGG16", "resnet18": "ResNet18", "densenet121": "DenseNet121", "vit_b_16": "ViT"}
SEGMENTER_LABELS = {"unet": "U-Net", "attention_unet": "AttenU-Net", "dcsau_net": "DCSAU-Net",
                    "xboundformer": "XBound-Former"}
CLASSIFICATION_ROWS = ("SL-StyleGAN", "PGAN", "SD-Finetune", "DreamBooth", "Mine-DermPrompt")   # Table 4.2's columns
SEGMENTATION_ROWS = ("Pix2PixHD", "ControlNet", "Zestguide", "Attn-refocus", "Mine")            # Table 4.5's columns
ORIGINAL = "Original"
NO_CA = "w/o guidance"          # Table 4.7: DiDGen pairs without cross-attention guidance
WITH_CA = "w/ guidance (Mine)"
SCALE_LABELS = ("S_{1k}", "S_{2.5k}")                             # the thesis's names for the two data scales
ABLATION_ROWS = (NO_CA,)


@dataclass(frozen=True)
class NotRun:
    """A generator row that did not run, and why (shown in the tables instead of numbers)."""

    reason: str

    def __str__(self) -> str:
        return f"not run: {self.reason}"


# ================================================================================================ settings
@dataclass(frozen=True)
class DownstreamConfig:
    """Part II's settings, typed once from the profile section ``ch04_downstream``, the model lists of the harness
    sections ``downstream.classification`` / ``downstream.segmentation`` (chapter 4 trains with the harness defaults
    as they are: §4.7.2) and the sampling settings of part I's pair generation, which every mask-conditioned row
    shares."""

    n_per_class: int                    # §4.4.3: synthetic images per minority class (thesis 1000)
    classifiers: tuple[str, ...]        # downstream.classification.models (input side, trainer: the same section)
    max_train_images: int               # real classification training images used (0 = all)
    max_eval_images: int                # validation and test images used, each (0 = all)
    val_metric: str                     # what early stopping watches: accuracy (§4.7.2) | macro_f1 (downstream.VAL_METRICS)
    finetune_steps: int                 # class-conditional diffusion finetuning (thesis 20k)
    finetune_batch: int
    finetune_lr: float
    segmenters: tuple[str, ...]         # downstream.segmentation.models (widths, trainer: the same section)
    scales: tuple[int, int]             # real training pairs at S_1k and S_2.5k (0 = all)
    n_pairs: int                        # synthetic pairs added at each scale (thesis 2500)
    val_fraction: float                 # share of the real training pairs held out for early stopping
    gain_bins: tuple[float, ...]        # Fig. 4.11 bins of the original IoU
    poor_iou: float                     # "poorly segmented": original IoU below this
    n_figure: int
    num_steps: int                      # sampling of every diffusion row (part I's pair settings)
    guidance_scale: float
    prefix: str
    seed: int

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "DownstreamConfig":
        d = cfg["ch04_downstream"]
        c, s, p = d["classification"], d["segmentation"], cfg["didgen"]["pairs"]
        scales = tuple(int(v) for v in s["scales"])
        if len(scales) != 2:
            raise ValueError(f"ch04_downstream.segmentation.scales needs two sizes (S_1k, S_2.5k), got {list(scales)}")
        return cls(n_per_class=int(c["n_per_class"]), classifiers=TaskSettings.from_profile(cfg, "classification").models,
                   max_train_images=int(c["max_train_images"]), max_eval_images=int(c["max_eval_images"]),
                   val_metric=str(c["val_metric"]),
                   finetune_steps=int(c["finetune_steps"]), finetune_batch=int(c["finetune_batch"]),
                   finetune_lr=float(c["finetune_lr"]), segmenters=TaskSettings.from_profile(cfg, "segmentation").models,
                   scales=scales, n_pairs=int(s["n_pairs"]),
                   val_fraction=float(s["val_fraction"]), gain_bins=tuple(float(b) for b in d["gain_bins"]),
                   poor_iou=float(d["poor_iou"]), n_figure=int(d["n_figure"]), num_steps=int(p["num_steps"]),
                   guidance_scale=float(p["guidance_scale"]), prefix=str(cfg["didgen"]["prefix"]),
                   seed=int(cfg["seed"]))


def digest(*values: Any) -> str:
    """SHA-256 of arrays, tensors and JSON values (cache key parts for data too long to key verbatim)."""
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, (np.ndarray, torch.Tensor)):
            a = np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def stored(key_parts: Mapping[str, Any], compute: Callable[[], Any], kind: str, cfg: Mapping[str, Any],
           code: Sequence[str]) -> Any:
    """``result_cache.cached`` keyed on ``code`` and what it imports (parsed and hashed once per process per file)."""
    return result_cache.cached(key_parts, compute, kind=kind, cfg=cfg, code=code)


def model_key(model) -> str:
    """A content key of a diffusion model's U-Net weights (for a start model that has no cache key of its own)."""
    state = model.unet.state_dict()
    return digest(*[state[k] for k in sorted(state)], sorted(state))


def _source(*functions: Any) -> str:
    """Hash of the functions that compute a cached value: editing tables or figures re-trains nothing."""
    return digest([inspect.getsource(f) for f in functions])


def pixels01(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1]."""
    return image_tensor(images, signed=False)


def uint8_images(images: torch.Tensor) -> np.ndarray:
    """float ``(N, 3, H, W)`` in [0, 1] -> uint8 ``(N, H, W, 3)`` (what the downstream trainers take)."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def to_side(images: torch.Tensor, side: int) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] at ``side`` × ``side`` (bilinear, antialiased; unchanged at that size)."""
    if images.shape[-1] == side and images.shape[-2] == side:
        return images.float()
    return F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0, 1)


# ================================================================================================ classification data
@dataclass
class ClassSets:
    """The classification data: train/val/test images (float ``(N, 3, H, W)`` in [0, 1]) and labels (class names),
    the external set, and what each is."""

    train_x: torch.Tensor
    train_y: np.ndarray
    val_x: torch.Tensor
    val_y: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray
    external_x: torch.Tensor
    external_y: np.ndarray
    external_name: str
    external_labels: tuple[str, ...]
    source: str
    notes: list[str] = field(default_factory=list)

    def counts(self) -> pd.DataFrame:
        """Images per class and split (a class missing from a split shows 0 and is reported in ``notes``)."""
        rows = {name: pd.Series(y).value_counts() for name, y in
                (("train", self.train_y), ("val", self.val_y), ("test", self.test_y))}
        return pd.DataFrame(rows).reindex(HAM).fillna(0).astype(int).T


def _split_arrays(ds, side: int) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    out = {}
    for split in ("train", "val", "test"):
        records = [r for r in ds.split(split) if r.image_path is not None and r.label in HAM]
        images, _ = ds.load_arrays(records)
        x = to_side(pixels01(images), side) if len(records) else torch.zeros(0, 3, side, side)
        out[split] = (x, np.array([r.label for r in records], dtype=object))
    return out


def capped_indices(labels: np.ndarray, cap: int, seed: int) -> tuple[np.ndarray, str]:
    """``cap`` indices of ``labels`` (sorted) drawn stratified by class — every class keeps its share, rounded, so a
    rare class (HAM10000's DF: 1.1%) is not lost to a random draw — and how they were drawn. scikit-learn's
    ``train_test_split(stratify=...)`` needs two images of every class; with fewer it is a plain random draw."""
    index = np.arange(len(labels))
    counts = pd.Series(labels).value_counts()
    if counts.min() >= 2 and cap >= len(counts):
        keep, _ = train_test_split(index, train_size=cap, stratify=labels, random_state=seed)
        return np.sort(keep), "a class-stratified"
    return np.sort(np.random.default_rng(seed).permutation(len(labels))[:cap]), "a random"


def classification_sets(cfg: Mapping[str, Any], dc: DownstreamConfig, side: int) -> ClassSets:
    """HAM10000 for classification: DermaMNIST (HAM10000's 10,015 images at 28 px with DermaMNIST's own split) when
    the data root holds it, else the procedural world's HAM10000 layout; images at ``side`` pixels. External set:
    Derm7pt with images, else PH2 (melanoma vs common/atypical nevus -> mel/nv)."""
    notes: list[str] = []
    try:
        ds = load_dataset("dermamnist", cfg, resolution=side, require_images=True)
        source = f"DermaMNIST ({ds.provenance}): HAM10000 at 28 px upsampled to {side} px, DermaMNIST's split"
    except DataError as err:
        ds = load_dataset("ham10000", cfg, resolution=side, require_images=True)
        source = f"HAM10000 layout ({ds.provenance}); DermaMNIST unavailable: {str(err).splitlines()[0]}"
    parts = _split_arrays(ds, side)
    for split, cap in (("train", dc.max_train_images), ("val", dc.max_eval_images), ("test", dc.max_eval_images)):
        if cap and len(parts[split][1]) > cap:
            keep, how = capped_indices(parts[split][1], cap, dc.seed)
            parts[split] = (parts[split][0][keep], parts[split][1][keep])
            notes.append(f"{split} images: {how} {cap} of the split (the profile's cap)")
    consequence = {"train": "no generator can learn them: they get no synthetic images",
                   "val": "early stopping does not see them",
                   "test": "their F1 is 0 by definition (scikit-learn zero_division=0) and says nothing"}
    for split, (_, y) in parts.items():
        missing = [c.upper() for c in HAM if c not in set(y)]
        if missing:
            notes.append(f"{split} split has no {', '.join(missing)} image: {consequence[split]}")
        if len(y) == 0:
            raise DataError(f"{ds.name}: the {split} split has no labelled image with a file ({ds.root})")
    ext_x, ext_y, ext_name, ext_labels = _external_classification(cfg, side, notes)
    return ClassSets(*parts["train"], *parts["val"], *parts["test"], ext_x, ext_y, ext_name, ext_labels, source, notes)


PH2_TO_HAM = {"melanoma": "mel", "common_nevus": "nv", "atypical_nevus": "nv"}


def _external_classification(cfg: Mapping[str, Any], side: int, notes: list[str]):
    try:
        ds = load_dataset("derm7pt", cfg, resolution=side, require_images=True)
        records = [r for r in ds.with_images() if r.label in HAM]
        name, labels = "Derm7pt", tuple(c for c in HAM if any(r.label == c for r in records))
    except DataError as err:
        notes.append(f"Derm7pt images absent ({str(err).splitlines()[0]}): external evaluation on PH2's "
                     "melanoma/nevus labels instead (atypical and common nevi -> NV)")
        ds = load_dataset("ph2", cfg, resolution=side, require_images=True)
        records = [r for r in ds.with_images() if r.label in PH2_TO_HAM]
        name, labels = f"PH2 ({ds.source})", ("mel", "nv")
    images, _ = ds.load_arrays(records)
    x = to_side(pixels01(images), side) if records else torch.zeros(0, 3, side, side)
    y = np.array([PH2_TO_HAM.get(r.label, r.label) for r in records], dtype=object)
    return x, y, name, labels


# ================================================================================================ generators
@dataclass
class ClassSamples:
    """One generator's synthetic images per minority class (float ``(n, 3, H, W)`` in [0, 1]) or why it did not run."""

    name: str
    images: dict[str, torch.Tensor] | None
    not_run: NotRun | None = None
    note: str = ""
    seconds: float = 0.0

    @property
    def ran(self) -> bool:
        return self.not_run is None


def class_prompt(generator: str, cls: str, prefix: str) -> str:
    """The class prompt of a class-conditional diffusion generator (unstated in the thesis: this book's choice).
    SD-Finetune and DreamBooth keep §4.4.2's sentence with the diagnosis inserted; Mine adds the diagnosis to the
    P-Token prefix."""
    if generator in ("SD-Finetune", "DreamBooth"):
        return f"An image of {CLASS_WORDS[cls]} lesion on skin."
    return f"{prefix}, {CLASS_WORDS[cls]}"


@dataclass(frozen=True)
class Prior:
    """DreamBooth's prior preservation (Ruiz et al. 2023): class images of the frozen start model with their prompt,
    weighted λ against the instance images (the two halves of every batch weigh 2 and 2λ, as ``dreambooth`` does)."""

    images: torch.Tensor                # (M, 3, H, W) in [0, 1]
    prompt: str
    weight: float


def _class_batches(latents: torch.Tensor, ids: torch.Tensor, batch_size: int, seed: int,
                   prior_latents: torch.Tensor | None = None, prior_ids: torch.Tensor | None = None,
                   prior_weight: float = 1.0):
    """Endless shuffled batches of precomputed latents with each image's own prompt ids; with a prior, each batch
    also holds ``batch_size`` prior images (weights 2 and 2λ, ``methods.baselines.dreambooth.prior_batches``)."""
    rng = np.random.default_rng(seed)
    n = len(latents)
    while True:
        order = rng.permutation(n)
        for start in range(0, max(1, n - batch_size + 1), batch_size):
            idx = torch.as_tensor(order[start:start + batch_size])
            if prior_latents is None:
                yield {"latents": latents[idx], "input_ids": ids[idx]}
                continue
            b = torch.as_tensor(rng.integers(0, len(prior_latents), len(idx)))
            yield {"latents": torch.cat([latents[idx], prior_latents[b]]),
                   "input_ids": torch.cat([ids[idx], prior_ids.expand(len(idx), -1)]),
                   "rec_weight": torch.tensor([2.0] * len(idx) + [2.0 * prior_weight] * len(idx))}


def _class_finetune(model, images: torch.Tensor, prompts: Sequence[str], dc: DownstreamConfig,
                    cfg: Mapping[str, Any], prior: Prior | None = None) -> dict[str, torch.Tensor]:
    """L_rec (Eq. 4.3) finetuning of the whole U-Net on the minority-class images, jointly, each with its class
    prompt (§4.4.3: the diffusion models are trained jointly on the six classes), with DreamBooth's prior term when
    ``prior`` is given; returns the U-Net state dict."""
    f = cfg["didgen"]["finetune"]
    tc = train_config_from(dict(steps=dc.finetune_steps, lr=dc.finetune_lr, weight_decay=float(f["weight_decay"]),
                                betas=tuple(f["adam_betas"]), eps=float(f["adam_eps"]), seed=dc.seed, progress=False))
    trainable = select_trainable(model.unet, model.text_encoder, mode="full", weight_decay=tc.weight_decay)
    latents = model.encode_dataset(images * 2 - 1)  # the VAE takes [-1, 1]
    ids = model.tokenize(list(prompts))
    extra = {}
    if prior is not None:
        extra = dict(prior_latents=model.encode_dataset(prior.images * 2 - 1), prior_ids=model.tokenize([prior.prompt]),
                     prior_weight=prior.weight)
    train_diffusion(model, _class_batches(latents, ids, dc.finetune_batch, dc.seed, **extra), tc, trainable)
    model.unet.requires_grad_(False)
    return {k: v.detach().cpu() for k, v in model.unet.state_dict().items()}


@torch.no_grad()
def _sample(model, prompts: Sequence[str], dc: DownstreamConfig, seed: int, batch: int = 32) -> torch.Tensor:
    out = [text_to_image(model, list(prompts[i:i + batch]), num_steps=dc.num_steps, guidance_scale=dc.guidance_scale,
                         seed=seed + i).images for i in range(0, len(prompts), batch)]
    return torch.cat(out) if out else torch.zeros(0, 3, 1, 1)


def diffusion_class_samples(name: str, start, start_key: str, sets: ClassSets, dc: DownstreamConfig,
                            cfg: Mapping[str, Any]) -> ClassSamples:
    """``SD-Finetune``, ``DreamBooth`` (both from the base model ``start``; DreamBooth with prior preservation on
    class images the base model draws for ``didgen.baselines.dreambooth_class_prompt``, the settings of part I's
    DreamBooth) or ``Mine-DermPrompt`` (from part I's region-aware model): finetuned jointly on the minority classes
    with class prompts, then ``n_per_class`` samples per class. The finetuned U-Net and the samples are stored by
    content (start model, data, settings, code)."""
    t0 = time.perf_counter()
    keep = np.isin(sets.train_y, MINORITY)
    images, labels = sets.train_x[keep], sets.train_y[keep]
    classes, skipped = present_classes(sets.train_y)
    if not classes:
        return ClassSamples(name, None, NotRun("no training image of any minority class to learn from"))
    side = int(start.unet.config.sample_size) * start.vae_scale_factor
    train_images = to_side(images, side)
    prompts = [class_prompt(name, c, dc.prefix) for c in labels]
    f = cfg["didgen"]["finetune"]
    parts = {"what": "ch04 downstream class finetune", "generator": name, "start": start_key,
             "data": digest(train_images, list(prompts)), "steps": dc.finetune_steps, "batch": dc.finetune_batch,
             "lr": dc.finetune_lr, "adamw": [float(f["weight_decay"]), list(f["adam_betas"]), float(f["adam_eps"])],
             "seed": dc.seed, "function": _source(_class_finetune, _class_batches)}
    b = cfg["didgen"]["baselines"]
    if name == "DreamBooth":
        parts["prior"] = {"prompt": str(b["dreambooth_class_prompt"]), "n": int(b["dreambooth_class_images"]),
                          "weight": float(b["dreambooth_prior_weight"]), "sampling": [dc.num_steps, dc.guidance_scale]}
    model = copy.deepcopy(start)

    def train() -> dict[str, torch.Tensor]:
        prior = None
        if name == "DreamBooth":  # the frozen start model draws the class images before it is finetuned
            images = generate_class_images(model, str(b["dreambooth_class_prompt"]), int(b["dreambooth_class_images"]),
                                           dc.num_steps, dc.guidance_scale, seed=dc.seed)
            prior = Prior(pixels01(images), str(b["dreambooth_class_prompt"]), float(b["dreambooth_prior_weight"]))
        return _class_finetune(model, train_images, prompts, dc, cfg, prior)

    state = stored(parts, train, "torch", cfg, ("ctrlgen.training.loop", "ctrlgen.models.sd",
                                                "ctrlgen.methods.baselines.dreambooth"))
    model.unet.load_state_dict(state)
    model.unet.eval()
    out = {}
    for k, cls in enumerate(MINORITY):
        if cls not in classes:
            continue
        cls_prompts = [class_prompt(name, cls, dc.prefix)] * dc.n_per_class
        key = {"what": "ch04 downstream class samples", "model": digest(parts), "prompts": cls_prompts,
               "num_steps": dc.num_steps, "guidance_scale": dc.guidance_scale, "seed": dc.seed + 1000 * k,
               "function": _source(_sample)}
        out[cls] = stored(key, lambda: _sample(model, cls_prompts, dc, dc.seed + 1000 * k), "torch", cfg,
                          ("ctrlgen.sampling",))
    note = {"SD-Finetune": "from the base model", "DreamBooth": "from the base model, prior preservation"}.get(
        name, "from part I's region-aware model; L_rec only (HAM10000/DermaMNIST have no lesion masks for L_attn)")
    return ClassSamples(name, out, note=note + skipped, seconds=time.perf_counter() - t0)


def present_classes(labels: np.ndarray) -> tuple[list[str], str]:
    """The minority classes with at least one training image, and a note naming the ones without (no generator can
    learn a class it never sees: those classes get no synthetic images, in every row alike)."""
    classes = [c for c in MINORITY if c in set(labels)]
    missing = [c.upper() for c in MINORITY if c not in classes]
    return classes, (f"; no training image of {', '.join(missing)}: not augmented" if missing else "")


# generator -> (module, its config class: profile gan_baselines.<section>, training function); one model per class
GANS = {"PGAN": (progressive_gan, progressive_gan.PGANConfig, progressive_gan.train_pgan),
        "SL-StyleGAN": (stylegan, stylegan.StyleGANConfig, stylegan.train_stylegan)}


def gan_class_samples(name: str, sets: ClassSets, dc: DownstreamConfig, cfg: Mapping[str, Any]) -> ClassSamples:
    """PGAN / SL-StyleGAN: unconditional, one model per class (§4.4.3), ``n_per_class`` samples each, stored by
    content (training data, the profile's ``gan_baselines`` settings, seed, the module's code)."""
    module, config_class, train = GANS[name]
    t0 = time.perf_counter()
    config = config_class.from_profile(cfg)
    classes, skipped = present_classes(sets.train_y)
    if not classes:
        return ClassSamples(name, None, NotRun("no training image of any minority class to train a GAN on"))
    out = {}
    for k, cls in enumerate(MINORITY):
        if cls not in classes:
            continue
        uint8 = uint8_images(sets.train_x[sets.train_y == cls])
        key = {"what": "ch04 downstream GAN samples", "generator": name, "class": cls, "data": digest(uint8),
               "config": repr(config), "n": dc.n_per_class, "seed": dc.seed + k}

        def compute(uint8=uint8, k=k):
            model = train(uint8, config, seed=dc.seed + k, progress=False)
            return module.generate(model, dc.n_per_class, seed=dc.seed + k)

        out[cls] = stored(key, compute, "torch", cfg, (module.__name__,))
    return ClassSamples(name, out, note="one model per class" + skipped, seconds=time.perf_counter() - t0)


def classification_generators(cfg: Mapping[str, Any], sets: ClassSets, dc: DownstreamConfig,
                              base, base_key: str, mine, mine_key: str) -> dict[str, ClassSamples]:
    """Every Table 4.2 generator's samples (or its "not run" reason), in the table's column order."""
    rows = run_all({"SL-StyleGAN": partial(gan_class_samples, "SL-StyleGAN", sets, dc, cfg),
                    "PGAN": partial(gan_class_samples, "PGAN", sets, dc, cfg),
                    "SD-Finetune": partial(diffusion_class_samples, "SD-Finetune", base, base_key, sets, dc, cfg),
                    "DreamBooth": partial(diffusion_class_samples, "DreamBooth", base, base_key, sets, dc, cfg),
                    "Mine-DermPrompt": partial(diffusion_class_samples, "Mine-DermPrompt", mine, mine_key, sets, dc, cfg)},
                   cfg, "generators")
    return {name: rows[name] for name in CLASSIFICATION_ROWS}


def augment_classification(x: torch.Tensor, y: np.ndarray, samples: ClassSamples, side: int
                           ) -> tuple[torch.Tensor, np.ndarray]:
    """The training set plus the generator's images: exactly ``n`` per minority class it has images of (every class
    with training images), none for NV (§4.4.3). Unequal synthetic sets are refused (every generator adds the same
    number per class)."""
    if not samples.ran:
        raise ValueError(f"{samples.name} did not run ({samples.not_run.reason}): nothing to augment with")
    unknown = sorted(set(samples.images) - set(MINORITY))
    if unknown:
        raise ValueError(f"{samples.name}: synthetic images of {unknown}; NV is never augmented (§4.4.3: it already "
                         "dominates HAM10000) and only the six minority classes are")
    classes = [c for c in MINORITY if c in samples.images]
    sizes = {c: len(samples.images[c]) for c in classes}
    if not classes or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise ValueError(f"{samples.name}: synthetic sets of unequal or zero size per class {sizes}; "
                         "expected the same n")
    extra = torch.cat([to_side(samples.images[c], side) for c in classes])
    labels = np.concatenate([np.array([c] * sizes[c], dtype=object) for c in classes])
    return torch.cat([x, extra]), np.concatenate([y, labels])


# ================================================================================================ classifiers
def _fit_classifier(name: str, train_x, train_y, val_x, val_y, eval_sets: Mapping[str, torch.Tensor],
                    settings, image_size: int, val_metric: str) -> dict[str, np.ndarray]:
    torch.manual_seed(settings.seed)  # the weights' initialisation: the same run gives the same model
    model = build_classifier(name, num_classes=len(HAM), image_size=image_size)
    index = {c: i for i, c in enumerate(HAM)}
    to_idx = lambda y: np.asarray([index[c] for c in y], dtype=np.int64)  # noqa: E731
    fit = train_classifier(model, uint8_images(train_x), to_idx(train_y), uint8_images(val_x), to_idx(val_y), settings,
                           val_metric=val_metric)
    out = {f"pred {k}": np.asarray(predict_labels(fit.model, uint8_images(x)))
           for k, x in eval_sets.items() if len(x)}
    out["epochs"] = np.asarray([fit.epochs_run])
    return out


def classifier_predictions(cfg: Mapping[str, Any], name: str, train_x, train_y, sets: ClassSets,
                           dc: DownstreamConfig, task: TaskSettings) -> dict[str, np.ndarray]:
    """Test and external predictions (class indices into ``HAM``) of classifier ``name`` trained on
    ``(train_x, train_y)`` with early stopping on the validation split (``task``: the profile's
    ``TaskSettings.from_profile(cfg, "classification")``: input side and fit settings); stored by content."""
    settings = task.fit
    evals = {"test": sets.test_x, "external": sets.external_x}
    key = {"what": "ch04 downstream classifier", "name": name, "train": digest(train_x, list(train_y)),
           "val": digest(sets.val_x, list(sets.val_y)), "eval": digest(sets.test_x, sets.external_x),
           "settings": repr(settings), "image_size": task.image_size, "seed": dc.seed,
           "val_metric": dc.val_metric,
           "function": _source(_fit_classifier)}
    def fit() -> dict[str, np.ndarray]:
        return _fit_classifier(name, train_x, train_y, sets.val_x, sets.val_y, evals, settings, task.image_size,
                               dc.val_metric)

    return stored(key, fit, "numpy", cfg, ("ctrlgen.downstream",))


@dataclass
class ClassificationRun:
    """Per (training set, classifier): predictions on the test and external sets, and the scores."""

    predictions: dict[tuple[str, str], dict[str, np.ndarray]]
    rows: list[str]                     # training sets that ran, Original first
    not_run: dict[str, NotRun]


def run_classification(cfg: Mapping[str, Any], sets: ClassSets, generators: Mapping[str, ClassSamples],
                       dc: DownstreamConfig, task: TaskSettings) -> ClassificationRun:
    """Train every classifier on the original and on every augmented training set that exists."""
    side = sets.train_x.shape[-1]
    training = {ORIGINAL: (sets.train_x, sets.train_y)}
    not_run = {}
    for name, samples in generators.items():
        if samples.ran:
            training[name] = augment_classification(sets.train_x, sets.train_y, samples, side)
        else:
            not_run[name] = samples.not_run
    preds = run_all({(row, clf): partial(classifier_predictions, cfg, clf, x, y, sets, dc, task)
                     for row, (x, y) in training.items() for clf in dc.classifiers}, cfg, "classifiers")
    return ClassificationRun(preds, list(training), not_run)


def _labels(pred: np.ndarray) -> np.ndarray:
    return np.array([HAM[int(i)] for i in pred], dtype=object)


def table_4_2(run: ClassificationRun, sets: ClassSets, dc: DownstreamConfig, average: str = "micro") -> pd.DataFrame:
    """Precision/recall/F1 on the test split (``average``: §4.4.3's "micro"; for single-label data micro P = R = F1 =
    accuracy, while the thesis's three differ — "weighted" is the likely reading), one column per training set
    (Table 4.2's layout)."""
    cols = {}
    for row in (ORIGINAL, *CLASSIFICATION_ROWS):
        values = {}
        for clf in dc.classifiers:
            label = CLASSIFIER_LABELS.get(clf, clf)
            if row in run.rows:
                s = classification_scores(sets.test_y, _labels(run.predictions[row, clf]["pred test"]), labels=HAM,
                                          average=average)
                values.update({("Precision↑", label): s.precision, ("Recall↑", label): s.recall,
                               ("F1 Score↑", label): s.f1})
            else:
                for metric in ("Precision↑", "Recall↑", "F1 Score↑"):
                    values[(metric, label)] = str(run.not_run[row])
        cols[row] = values
    frame = pd.DataFrame(cols)
    frame.index.names = ["Metrics", "Classifier"]
    return frame


def table_4_3(run: ClassificationRun, sets: ClassSets, dc: DownstreamConfig, augmented: str = "Mine-DermPrompt"
              ) -> pd.DataFrame:
    """Class-wise F1 (Table 4.3): each classifier on the original and on the ``augmented`` training set."""
    rows = {}
    for clf in dc.classifiers:
        for row, label in ((ORIGINAL, "Original"), (augmented, "Augmented")):
            if row not in run.rows:
                rows[(CLASSIFIER_LABELS.get(clf, clf), label)] = {c.upper(): str(run.not_run[row]) for c in HAM}
                continue
            s = classification_scores(sets.test_y, _labels(run.predictions[row, clf]["pred test"]), labels=HAM)
            rows[(CLASSIFIER_LABELS.get(clf, clf), label)] = {c.upper(): s.class_f1[c] for c in HAM}
    frame = pd.DataFrame(rows).T
    frame.index.names = ["Classifier", "Training data"]
    return frame


def table_4_4(run: ClassificationRun, sets: ClassSets, dc: DownstreamConfig) -> pd.DataFrame:
    """Precision/recall/F1 on the external set, averaged over the classifiers (Table 4.4). Scores are micro over the
    external set's labels (PH2: mel and nv; a prediction of another class counts as a miss)."""
    rows = {}
    for row in (ORIGINAL, *CLASSIFICATION_ROWS):
        if row not in run.rows or len(sets.external_y) == 0:
            why = run.not_run.get(row, NotRun(f"no labelled image in {sets.external_name}"))
            rows[row] = {m: str(why) for m in ("Precision ↑", "Recall ↑", "F1 Score ↑")}
            continue
        scores = [classification_scores(sets.external_y, _labels(run.predictions[row, clf]["pred external"]),
                                        labels=list(sets.external_labels)) for clf in dc.classifiers]
        rows[row] = {"Precision ↑": float(np.mean([s.precision for s in scores])),
                     "Recall ↑": float(np.mean([s.recall for s in scores])),
                     "F1 Score ↑": float(np.mean([s.f1 for s in scores]))}
    frame = pd.DataFrame(rows).T
    frame.index.name = "Methods"
    return frame


def correct(run: ClassificationRun, sets: ClassSets, row: str, classifiers: Sequence[str], split: str = "test"
            ) -> np.ndarray:
    """Per image 1 (correct) or 0, the classifiers' results concatenated in ``classifiers`` order — the paired unit
    of the classification claims (same images, same order, in every arm)."""
    truth = sets.test_y if split == "test" else sets.external_y
    return np.concatenate([(_labels(run.predictions[row, c][f"pred {split}"]) == truth).astype(float)
                           for c in classifiers])


# ================================================================================================ segmentation data
@dataclass
class SegSets:
    """Real segmentation pairs: the training pool (shuffled once), a validation split, the test set and PH2."""

    train_x: torch.Tensor               # (N, 3, H, W) in [0, 1]
    train_y: torch.Tensor               # (N, H, W) bool
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_name: str
    ph2_x: torch.Tensor
    ph2_y: torch.Tensor
    ph2_name: str
    source: str

    def scale(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` training pairs (0 or more than there are: all)."""
        n = len(self.train_x) if n <= 0 else min(n, len(self.train_x))
        return self.train_x[:n], self.train_y[:n]


def segmentation_sets(cfg: Mapping[str, Any], train_images: np.ndarray, train_masks: np.ndarray,
                      test_images: np.ndarray, test_masks: np.ndarray, test_name: str, source: str,
                      dc: DownstreamConfig) -> SegSets:
    """Part I's ISIC 2018 Task 1 pairs (``DermSets``' training split and test set), a validation split of
    ``val_fraction`` of the larger scale's size from the shuffled training pairs (the rest is the training pool the
    scales take their first pairs from), and PH2 (real when present, else the procedural world's)."""
    side = train_images.shape[1]
    order = np.random.default_rng(dc.seed).permutation(len(train_images))
    largest = max(dc.scales) if min(dc.scales) > 0 else len(order)
    n_val = max(1, int(round(dc.val_fraction * min(largest, len(order)))))
    if len(order) - n_val < 1:
        raise ValueError(f"{len(order)} training pairs cannot give a validation split of {dc.val_fraction}")
    val, train = order[:n_val], order[n_val:]
    x, y = pixels01(train_images), torch.as_tensor(np.asarray(train_masks, bool))
    ph2 = load_dataset("ph2", cfg, resolution=side, require_images=True)
    records = [r for r in ph2.with_images() if r.mask_path is not None]
    ph2_images, ph2_masks = ph2.load_arrays(records)
    return SegSets(x[train], y[train], x[val], y[val], pixels01(test_images),
                   torch.as_tensor(np.asarray(test_masks, bool)), test_name, pixels01(ph2_images),
                   torch.as_tensor(np.asarray(ph2_masks, bool)), f"PH2 ({ph2.source})", source)


# ================================================================================================ mask-conditioned rows
@dataclass
class PairSet:
    """A synthetic segmentation set: images ``(N, 3, H, W)`` in [0, 1] and masks ``(N, H, W)`` bool, or why not."""

    name: str
    images: torch.Tensor | None
    masks: torch.Tensor | None
    not_run: NotRun | None = None
    note: str = ""
    prompts: list[str] = field(default_factory=list)   # DiDGen's prompts, which the training-free rows reuse

    @property
    def ran(self) -> bool:
        return self.not_run is None


def _guided_images(model, masks: torch.Tensor, prompts: Sequence[str], method: str, config, dc: DownstreamConfig,
                   batch: int) -> torch.Tensor:
    """Images of the region-aware ``model`` with a training-free layout baseline steering ``<lesion>`` into
    ``masks`` (one refiner per batch: the terms hold that batch's masks), through ``text_to_image``."""
    out = []
    g = torch.Generator().manual_seed(dc.seed)
    for i in range(0, len(masks), batch):
        m, p = masks[i:i + batch].float().to(model.device), list(prompts[i:i + batch])
        loc = locate_tokens(model.tokenizer, p, ["<lesion>", "<skin>"])
        lesion, skin, ends = loc.position("<lesion>"), loc.position("<skin>"), tuple(loc.ends.tolist())
        refiner = (zestguide_refiner(m, lesion, skin, config) if method == "Zestguide"
                   else refocus_refiner(m, lesion, ends, config))
        out.append(text_to_image(model, p, num_steps=dc.num_steps, guidance_scale=dc.guidance_scale, generator=g,
                                 refiner=refiner).images)
    return torch.cat(out)


def training_free_pairs(method: str, mine, mine_key: str, didgen: PairSet, cfg: Mapping[str, Any],
                        dc: DownstreamConfig, batch: int) -> PairSet:
    """ZestGuide or Attention-Refocusing on part I's region-aware model, conditioned on DiDGen's new masks with
    DiDGen's prompts (§4.4.4), stored by content."""
    if not didgen.ran:
        return PairSet(method, None, None, NotRun("needs DiDGen's masks, which did not run"))
    config = ZestGuideConfig.from_profile(cfg) if method == "Zestguide" else RefocusConfig.from_profile(cfg)
    prompts = didgen.prompts
    key = {"what": "ch04 downstream training-free", "method": method, "model": mine_key, "config": repr(config),
           "masks": digest(didgen.masks), "prompts": digest(prompts), "steps": dc.num_steps,
           "guidance_scale": dc.guidance_scale, "seed": dc.seed, "batch": batch, "function": _source(_guided_images)}
    module = "zestguide" if method == "Zestguide" else "attention_refocusing"
    images = stored(key, lambda: _guided_images(mine, didgen.masks, prompts, method, config, dc, batch), "torch", cfg,
                    (f"ctrlgen.methods.baselines.{module}", "ctrlgen.sampling"))
    return PairSet(method, images, didgen.masks.clone(), note="training-free, on part I's region-aware model")


def didgen_pair_set(result, name: str = "Mine") -> PairSet:
    """A part-I ``PairResult`` as a training set: its valid pairs (annotated masks, Eq. 4.11) with their prompts."""
    valid = result.valid()
    if len(valid.images) == 0:
        return PairSet(name, None, None, NotRun("every generated pair failed annotation"))
    return PairSet(name, valid.images.float(), valid.masks.bool(),
                   note=f"{len(valid.images)} of {len(result.images)} pairs with a usable annotation",
                   prompts=list(valid.prompts))


def _pix2pixhd(images: np.ndarray, masks: np.ndarray, new_masks: np.ndarray, cfg, base, dc) -> torch.Tensor:
    model = pix2pixhd.train_pix2pixhd(images, masks, pix2pixhd.Pix2PixHDConfig.from_profile(cfg), seed=dc.seed,
                                      progress=False)
    return pix2pixhd.pix2pixhd_generate(model, new_masks)


def _controlnet(images: np.ndarray, masks: np.ndarray, new_masks: np.ndarray, cfg, base, dc) -> torch.Tensor:
    # trained on the derm base model (frozen) with the baselines' prompt of §4.4.2, as SD-Finetune and DreamBooth
    config, prompt = controlnet.ControlNetConfig.from_profile(cfg), str(cfg["didgen"]["baselines"]["prompt"])
    net = controlnet.train_controlnet(copy.deepcopy(base), images, masks, prompt, config, seed=dc.seed, progress=False)
    return controlnet.controlnet_generate(base, net, new_masks, prompt, num_steps=dc.num_steps,
                                          guidance_scale=dc.guidance_scale, seed=dc.seed,
                                          conditioning_scale=float(config.conditioning_scale))


# generator -> (its module, train-and-generate); settings from the profile's gan_baselines.<module>
MASK_TO_IMAGE = {"Pix2PixHD": (pix2pixhd, _pix2pixhd), "ControlNet": (controlnet, _controlnet)}


def trained_mask_to_image(name: str, sets: SegSets, didgen: PairSet, cfg: Mapping[str, Any], dc: DownstreamConfig,
                          base=None, base_key: str = "") -> PairSet:
    """Pix2PixHD / ControlNet (ControlNet on the derm ``base`` model) trained on the real training pairs (Task 1), then
    drawing images from DiDGen's new masks; stored by content. Without DiDGen's masks (or, for ControlNet, a base
    model): a "not run" row."""
    module, make = MASK_TO_IMAGE[name]
    section = module.__name__.rsplit(".", 1)[-1]
    if not didgen.ran:
        return PairSet(name, None, None, NotRun("needs DiDGen's masks, which did not run"))
    if name == "ControlNet" and base is None:
        return PairSet(name, None, None, NotRun("no base model given"))
    images, masks = uint8_images(sets.train_x), sets.train_y.numpy()
    key = {"what": "ch04 downstream mask-to-image", "generator": name, "data": digest(images, masks),
           "config": digest(cfg["gan_baselines"][section]), "masks": digest(didgen.masks), "seed": dc.seed,
           "base": base_key, "sampling": [dc.num_steps, dc.guidance_scale], "function": _source(make)}
    out = stored(key, lambda: make(images, masks, didgen.masks.numpy(), cfg, base, dc), "torch", cfg,
                 (module.__name__,))
    return PairSet(name, to_side(out, sets.train_x.shape[-1]), didgen.masks.clone(), note="trained on the Task 1 pairs")


# ================================================================================================ segmenters
def _fit_segmenter(name: str, size: str, train_x, train_y, val_x, val_y, eval_sets: Mapping[str, tuple],
                   settings) -> dict[str, np.ndarray]:
    torch.manual_seed(settings.seed)  # the weights' initialisation: the same run gives the same model
    model = build_segmenter(name, size=size)
    fit = train_segmenter(model, uint8_images(train_x), train_y.numpy(), uint8_images(val_x), val_y.numpy(), settings)
    out = {"epochs": np.asarray([fit.epochs_run])}
    for k, (x, y) in eval_sets.items():
        scores = segmentation_scores(predict_masks(fit.model, uint8_images(x)), y.numpy())
        out[f"IoU {k}"], out[f"Dice {k}"] = scores["IoU"], scores["Dice"]
    return out


def segmenter_scores(cfg: Mapping[str, Any], name: str, train_x, train_y, sets: SegSets, dc: DownstreamConfig,
                     task: TaskSettings, external: bool) -> dict[str, np.ndarray]:
    """Per-image IoU and Dice on the test set (and PH2 with ``external``) of segmenter ``name`` trained on
    ``(train_x, train_y)`` with early stopping on the validation pairs (``task``: the profile's
    ``TaskSettings.from_profile(cfg, "segmentation")``: widths and fit settings); stored by content."""
    settings = task.fit
    evals = {"test": (sets.test_x, sets.test_y)} | ({"ph2": (sets.ph2_x, sets.ph2_y)} if external else {})
    key = {"what": "ch04 downstream segmenter", "name": name, "size": task.size,
           "train": digest(train_x, train_y), "val": digest(sets.val_x, sets.val_y),
           "eval": {k: digest(*v) for k, v in evals.items()}, "settings": repr(settings), "seed": dc.seed,
           "function": _source(_fit_segmenter)}
    def fit() -> dict[str, np.ndarray]:
        return _fit_segmenter(name, task.size, train_x, train_y, sets.val_x, sets.val_y, evals, settings)

    return stored(key, fit, "numpy", cfg, ("ctrlgen.downstream",))


@dataclass
class SegmentationRun:
    """Per (scale label, training set, segmenter): per-image scores; the rows that ran and the ones that did not."""

    scores: dict[tuple[str, str, str], dict[str, np.ndarray]]
    rows: list[str]
    not_run: dict[str, NotRun]
    sizes: dict[str, int]


def run_segmentation(cfg: Mapping[str, Any], sets: SegSets, pair_sets: Mapping[str, PairSet],
                     dc: DownstreamConfig, task: TaskSettings) -> SegmentationRun:
    """Every segmenter on the original and every augmented set, at both scales (PH2 at the larger scale). The same
    synthetic pairs are added at both scales (the thesis does not say how many S_1k gets: this book's choice)."""
    jobs, sizes = {}, {}
    ran = [name for name, p in pair_sets.items() if p.ran]
    not_run = {name: p.not_run for name, p in pair_sets.items() if not p.ran}
    for scale, n in zip(SCALE_LABELS, dc.scales):
        x, y = sets.scale(n)
        sizes[scale] = len(x)
        for row in (ORIGINAL, *ran):
            if row in ABLATION_ROWS and scale != SCALE_LABELS[1]:
                continue  # Table 4.7's ablation is at the larger scale only
            tx, ty = (x, y) if row == ORIGINAL else (torch.cat([x, pair_sets[row].images]),
                                                      torch.cat([y, pair_sets[row].masks]))
            for seg in dc.segmenters:
                jobs[scale, row, seg] = partial(segmenter_scores, cfg, seg, tx, ty, sets, dc, task,
                                                external=scale == SCALE_LABELS[1])
    return SegmentationRun(run_all(jobs, cfg, "segmenters"), [ORIGINAL, *ran], not_run, sizes)


def table_4_5(run: SegmentationRun, dc: DownstreamConfig, columns: Sequence[str] = SEGMENTATION_ROWS) -> pd.DataFrame:
    """Mean IoU and Dice on the test set per (metric, scale, segmenter), one column per training set (Table 4.5)."""
    cols = {}
    for row in (ORIGINAL, *columns):
        values = {}
        for metric, key in (("IoU↑", "IoU test"), ("Dice↑", "Dice test")):
            for scale in SCALE_LABELS:
                for seg in dc.segmenters:
                    label = (metric, scale, SEGMENTER_LABELS.get(seg, seg))
                    values[label] = (float(run.scores[scale, row, seg][key].mean()) if row in run.rows
                                     else str(run.not_run.get(row, NotRun("not requested"))))
        cols[row] = values
    frame = pd.DataFrame(cols)
    frame.index.names = ["Metrics", "Base Dataset", "Segmentation model"]
    return frame


def table_4_6(run: SegmentationRun, dc: DownstreamConfig) -> pd.DataFrame:
    """PH2 IoU and Dice averaged over the segmenters trained at the larger scale (Table 4.6)."""
    rows = {}
    for row in (ORIGINAL, *SEGMENTATION_ROWS):
        if row not in run.rows:
            rows[row] = {"IoU ↑": str(run.not_run[row]), "Dice ↑": str(run.not_run[row])}
            continue
        s = [run.scores[SCALE_LABELS[1], row, seg] for seg in dc.segmenters]
        rows[row] = {"IoU ↑": float(np.mean([v["IoU ph2"].mean() for v in s])),
                     "Dice ↑": float(np.mean([v["Dice ph2"].mean() for v in s]))}
    frame = pd.DataFrame(rows).T
    frame.index.name = "Methods"
    return frame


def table_4_7(run: SegmentationRun, dc: DownstreamConfig) -> pd.DataFrame:
    """The segmentation rows of Table 4.7: DiDGen pairs without vs with cross-attention guidance, larger scale."""
    rows = {}
    for metric, key in (("IoU ↑", "IoU test"), ("Dice ↑", "Dice test")):
        for seg in dc.segmenters:
            rows[(metric, SEGMENTER_LABELS.get(seg, seg))] = {
                col: (float(run.scores[SCALE_LABELS[1], row, seg][key].mean()) if row in run.rows
                      else str(run.not_run.get(row, NotRun("not requested"))))
                for col, row in ((NO_CA, NO_CA), (WITH_CA, "Mine"))}
    frame = pd.DataFrame(rows).T
    frame.index.names = ["Metrics", "Segmentation models"]
    return frame


def pooled(run: SegmentationRun, scale: str, row: str, key: str, segmenters: Sequence[str]) -> np.ndarray:
    """Per-image values of ``key`` (e.g. "IoU test") concatenated over ``segmenters`` in order: the paired unit."""
    return np.concatenate([run.scores[scale, row, seg][key] for seg in segmenters])


def significance(a: np.ndarray, b: np.ndarray, label: str) -> dict[str, Any]:
    """§4.5's paired t-test of ``a`` (augmented) against ``b`` (original) on the same samples in the same order."""
    t = paired_test(a, b)
    return {"comparison": label, "pairs": t.n, "mean difference": t.mean_difference, "t": t.statistic, "p": t.p}


def gains(run: SegmentationRun, dc: DownstreamConfig, row: str = "Mine") -> pd.DataFrame:
    """Fig. 4.11's table per segmenter (larger scale): per-image IoU gain binned by the original IoU."""
    frames = []
    for seg in dc.segmenters:
        g = gain_analysis(run.scores[SCALE_LABELS[1], ORIGINAL, seg]["IoU test"],
                          run.scores[SCALE_LABELS[1], row, seg]["IoU test"], dc.gain_bins)
        frames.append(g.assign(model=SEGMENTER_LABELS.get(seg, seg)))
    return pd.concat(frames, ignore_index=True)


def gain_figure(run: SegmentationRun, dc: DownstreamConfig, row: str = "Mine"):
    """Fig. 4.11 analogue: per segmenter, the per-image IoU gain against the original IoU (top), counts (middle)
    and mean gain (bottom) per bin."""
    n = len(dc.segmenters)
    fig, axes = plt.subplots(3, n, figsize=(2.8 * n, 6.2), squeeze=False, sharex=True)
    centres = (np.asarray(dc.gain_bins[:-1]) + np.asarray(dc.gain_bins[1:])) / 2
    width = np.diff(dc.gain_bins).min() * 0.8
    for j, seg in enumerate(dc.segmenters):
        base = run.scores[SCALE_LABELS[1], ORIGINAL, seg]["IoU test"]
        gain = run.scores[SCALE_LABELS[1], row, seg]["IoU test"] - base
        table = gain_analysis(base, base + gain, dc.gain_bins)
        axes[0, j].scatter(base, gain, s=6, alpha=0.6)
        axes[0, j].axhline(0, color="k", lw=0.6)
        axes[0, j].set_title(f"({'abcdefgh'[j]}) {SEGMENTER_LABELS.get(seg, seg)}", fontsize=9)
        axes[1, j].bar(centres, table["count"], width=width)
        axes[2, j].bar(centres, table["mean gain"].fillna(0), width=width,
                       color=["tab:green" if v > 0 else "tab:red" for v in table["mean gain"].fillna(0)])
        axes[2, j].axhline(0, color="k", lw=0.6)
        axes[2, j].set_xlabel("IoU, original training set")
    axes[0, 0].set_ylabel("IoU gain")
    axes[1, 0].set_ylabel("images")
    axes[2, 0].set_ylabel("mean gain")
    fig.tight_layout()
    return fig


def poor_vs_good(run: SegmentationRun, dc: DownstreamConfig, row: str = "Mine") -> tuple[np.ndarray, np.ndarray, str]:
    """Per-image IoU gains (larger scale, segmenters pooled) of the poorly segmented images (original IoU <
    ``poor_iou``) and of the rest: the two arms of the Fig. 4.11 claim, split by
    :func:`ctrlgen.analysis.bias.poor_vs_rest` (its fallbacks when an arm is empty; the note says which ran)."""
    base = pooled(run, SCALE_LABELS[1], ORIGINAL, "IoU test", dc.segmenters)
    gain = pooled(run, SCALE_LABELS[1], row, "IoU test", dc.segmenters) - base
    return poor_vs_rest(gain, base, dc.poor_iou, label="original IoU")


# ================================================================================================ figures
def class_samples_figure(generators: Mapping[str, ClassSamples], sets: ClassSets, n: int = 1):
    """Fig. 4.4 analogue: per generator (rows) ``n`` samples of each minority class (columns), the real images first."""
    blank = torch.ones(n, *sets.train_x.shape[1:])  # a class without training images: a white cell, said in it
    absent = set(MINORITY) - set(sets.train_y)
    rows = {"real": torch.cat([sets.train_x[sets.train_y == c][:n] if c not in absent else blank for c in MINORITY])}
    side = sets.train_x.shape[-1]
    for name, s in generators.items():
        if s.ran:
            rows[name] = torch.cat([to_side(s.images[c][:n], side) if c in s.images else blank for c in MINORITY])
    fig, axes = plt.subplots(len(rows), len(MINORITY) * n, figsize=(1.2 * len(MINORITY) * n, 1.3 * len(rows)),
                             squeeze=False)
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(len(MINORITY) * n):
            axes[r, c].imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(MINORITY[c // n].upper(), fontsize=8)
            if MINORITY[c // n] in absent:
                axes[r, c].text(0.5, 0.5, "no training\nimages", ha="center", va="center", fontsize=6,
                                transform=axes[r, c].transAxes)
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


def pairs_figure(pair_sets: Mapping[str, PairSet], n: int = 4):
    """Fig. 4.6 analogue: DiDGen's new masks (first row) and each mask-conditioned generator's images with the mask's
    outline."""
    ran = {k: p for k, p in pair_sets.items() if p.ran}
    if not ran:
        return None
    masks = next(iter(ran.values())).masks[:n]
    fig, axes = plt.subplots(len(ran) + 1, n, figsize=(1.5 * n, 1.5 * (len(ran) + 1)), squeeze=False)
    for c in range(n):
        for r, (name, p) in enumerate([("mask", None), *ran.items()]):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(masks):
                continue
            if p is None:
                ax.imshow(masks[c].numpy(), cmap="gray")
            else:
                ax.imshow(p.images[c].permute(1, 2, 0).clamp(0, 1).numpy())
                ax.contour(p.masks[c].numpy().astype(float), levels=[0.5], colors="lime", linewidths=0.6)
            if c == 0:
                ax.set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def status_table(rows: Mapping[str, Any]) -> pd.DataFrame:
    """One line per generator: ran or not (and why), what it is, its wall time."""
    out = {}
    for name, r in rows.items():
        out[name] = {"status": "ran" if r.ran else str(r.not_run), "note": r.note,
                     "seconds": float(getattr(r, "seconds", 0.0))}
    return pd.DataFrame(out).T


def record_claims(run: Any, crun: Any, srun: Any, cls_sets: Any, dc: Any, seeds: int) -> None:
    """Record the claims of §4.4.3–§4.5 in the chapter's run (ledger units: per test image, paired, the models
    pooled; one value per trained classifier for MEL F1). A claim whose compared generator did not run is not
    recorded, and a run note says so."""
    big = SCALE_LABELS[1]
    no_vgg = [c for c in dc.classifiers if c != "vgg16"] or list(dc.classifiers)

    def correct_of(row, classifiers=dc.classifiers):
        return correct(crun, cls_sets, row, classifiers)

    def ran(*rows):
        return all(r in crun.rows or r in srun.rows for r in rows)

    def missing(claim_id, *rows):
        run.note(f"claim {claim_id} not recorded: {', '.join(r for r in rows if not ran(r))} did not run")


    if ran("Mine-DermPrompt"):
        record_claim(run, "ch4.t42_vs_original", a=correct_of("Mine-DermPrompt"), b=correct_of("Original"), seeds=seeds)
        mel = table_4_3(crun, cls_sets, dc)["MEL"]
        record_claim(run, "ch4.t43_mel", a=mel.xs("Augmented", level=1).astype(float),
                     b=mel.xs("Original", level=1).astype(float), seeds=seeds)
    else:
        missing("ch4.t42_vs_original / ch4.t43_mel", "Mine-DermPrompt")
    if ran("Mine-DermPrompt", "SD-Finetune"):
        record_claim(run, "ch4.t42_best_except_vgg16", a=correct_of("Mine-DermPrompt", no_vgg),
                     b=correct_of("SD-Finetune", no_vgg), seeds=seeds)
        if len(cls_sets.external_y):
            ext = {row: correct(crun, cls_sets, row, dc.classifiers, "external")
                   for row in ("Mine-DermPrompt", "Original", "SD-Finetune")}
            record_claim(run, "ch4.t44_derm7pt", a=ext["Mine-DermPrompt"],
                         b={"Original": ext["Original"], "augmented by SD-Finetune": ext["SD-Finetune"]}, seeds=seeds,
                         note=f"external set: {cls_sets.external_name}")
    else:
        missing("ch4.t42_best_except_vgg16 / ch4.t44_derm7pt", "Mine-DermPrompt", "SD-Finetune")
    if ran("Mine"):
        def dice(row):
            return pooled(srun, big, row, "Dice test", dc.segmenters)

        def ph2(row):
            return pooled(srun, big, row, "IoU ph2", dc.segmenters)

        record_claim(run, "ch4.t45_vs_original", a=dice("Mine"), b=dice("Original"), seeds=seeds)
        poor, good, split_note = poor_vs_good(srun, dc)
        record_claim(run, "ch4.fig411_poor_cases", a=poor, b=good, seeds=seeds, note=split_note)
        if ran(NO_CA):
            record_claim(run, "ch4.t47_segmentation", a=dice("Mine"), b=dice(NO_CA), seeds=seeds)
        if ran("ControlNet"):
            record_claim(run, "ch4.t45_vs_controlnet", a=dice("Mine"), b=dice("ControlNet"), seeds=seeds)
            record_claim(run, "ch4.t46_ph2", a=ph2("Mine"),
                         b={"Original": ph2("Original"), "augmented by ControlNet": ph2("ControlNet")}, seeds=seeds)
        else:
            missing("ch4.t45_vs_controlnet / ch4.t46_ph2", "ControlNet")
    else:
        missing("segmentation claims", "Mine")


__all__ = ["record_claims", "HAM", "MINORITY", "CLASSIFICATION_ROWS", "SEGMENTATION_ROWS", "ORIGINAL", "NO_CA", "WITH_CA",
           "SCALE_LABELS",
           "NotRun", "DownstreamConfig", "ClassSets", "classification_sets", "ClassSamples", "class_prompt",
           "capped_indices", "diffusion_class_samples", "gan_class_samples", "classification_generators", "present_classes", "Prior",
           "augment_classification",
           "classifier_predictions", "ClassificationRun", "run_classification", "table_4_2", "table_4_3", "table_4_4",
           "correct", "SegSets", "segmentation_sets", "PairSet", "didgen_pair_set", "training_free_pairs",
           "trained_mask_to_image", "segmenter_scores", "SegmentationRun", "run_segmentation", "table_4_5",
           "table_4_6", "table_4_7", "pooled", "significance", "gains", "gain_figure", "poor_vs_good",
           "class_samples_figure", "pairs_figure", "status_table", "digest", "model_key", "uint8_images", "to_side",
           "pixels01"]
