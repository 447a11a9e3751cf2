"""Chapter 3's experiments (AttenCraft vs Custom Diffusion, DisenDiff, Break-a-Scene; Tables 3.1–3.3, 3.6; Fig. 3.8).

What only chapter 3 does: which customization sets it reads (the scenes world's two-concept sets, thesis
§3.6.1), which models it finetunes and caches (every method × dataset × learning rate × steps, as content-keyed
trained tensors, ``result_cache``), how samples are drawn and scored, and how tables and figures are assembled.

Metrics (§3.4.1 defines CLIP-I, CLIP-T, DINO, CLIP-I-sync). The ``full`` profile uses CLIP ViT-L/14 and DINOv2
from the local folders ``models.weights.clip``/``dino`` (``Extractors``); neither runs offline on the mini world, so there:

* **image alignment** (the CLIP-I stand-in, "feat-I"): cosine similarity of the scenes VAE encoder's pooled
  features (``metrics.image.VAEEncoderFeatures``) between a sample and its reference — the concept's crop for
  single-concept prompts, the whole input image for the group (§3.4.1's DisenDiff-dataset rule);
* **identity** (the DINO stand-in, "cls-I"): the same cosine on the features of the scenes attribute classifier
  (``experiments.base_models.bar.domain_classifier``: a CNN trained on the world's images and captions);
* **measured ground truth** the world allows: *colour fidelity* (share of a sample's pixels in the concept's own
  colour, at full or textured shade) and *feature fusion* (share in the **other** concept's colour, in
  single-concept samples — concept B's colour leaking into concept A);
* **CLIP-I-sync**: |feat-I(concept 1) − feat-I(concept 2)| per dataset;
* **CLIP-T**: not measured (no text–image model offline); the prompts' contexts are the world's backgrounds.
"""
from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

from ctrlgen import result_cache
from ctrlgen.attention.maps import normalize_minmax, resize_maps
from ctrlgen.data import load_multiconcept
from ctrlgen.data.imageio import read_image, read_mask
from ctrlgen.data.worlds.multiconcept import COLOURS, Concept, render_scene
from ctrlgen.experiments.base_models import (available_variants, default_variant, load_domain_data, load_variant,
                                            pretrain_domain)
from ctrlgen.experiments.base_models.bar import BarSettings, domain_classifier
from ctrlgen.experiments.base_models.word_alignment import align_words, aligned_key, load_aligned
from ctrlgen.methods.attencraft import (AttenCraftConfig, MaskSettings, concept_masks, mask_iou, sampling_ratios,
                                        stage_one, token_maps)
from ctrlgen.methods.attencraft.training import attencraft_finetune
from ctrlgen.methods.baselines.break_a_scene import BreakASceneConfig, break_a_scene_finetune
from ctrlgen.methods.baselines.custom_diffusion import CustomDiffusionConfig, custom_diffusion_finetune
from ctrlgen.methods.baselines.disendiff import DisenDiffConfig, disendiff_finetune
from ctrlgen.methods.customization import PROMPT_TEMPLATE, Customized, add_identifiers, load_state
from ctrlgen.metrics.image import VAEEncoderFeatures
from ctrlgen.models import load_base_model
from ctrlgen.models.registry import weight_path
from ctrlgen.parallel import run_all
from ctrlgen.sampling import text_to_image

METHODS = ("CusDiff", "DisenDiff", "BAS", "Mine")
# arms of Tables 3.1 / 3.6 beyond the thesis's four, each labelled as its own: {label: (method, its settings)}.
# "Mine + tokens": AttenCraft training the identifier tokens' embeddings too (§3.4.1 keeps them at their class-name
# initialisation; the issue lets the book show this variant). Not one of the thesis's rows: no claim reads it.
VARIANT_ARMS: dict[str, tuple[str, dict[str, Any]]] = {"Mine + tokens": ("Mine", {"train_tokens": True})}
CODE = ("ctrlgen.methods.attencraft", "ctrlgen.methods.customization", "ctrlgen.methods.baselines.custom_diffusion",
        "ctrlgen.methods.baselines.disendiff", "ctrlgen.methods.baselines.break_a_scene", "ctrlgen.training.loop")
SAMPLE_CODE = CODE + ("ctrlgen.sampling.pipeline", "ctrlgen.sampling.loop")


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class PreliminarySettings:
    """§3.6.2 (Fig. 3.4): Break-a-Scene without textual inversion, ``steps`` at ``lr``, evaluated every ``eval_every``
    steps, on the first ``n_datasets`` datasets (thesis: 1000, 100, 5e-5, 10)."""

    steps: int
    eval_every: int
    lr: float
    n_datasets: int

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError(f"ch03.preliminary: steps {self.steps} and eval_every {self.eval_every} must be >= 1")


@dataclass(frozen=True)
class Ch3Config:
    """The profile's ``ch03`` section, typed."""

    n_datasets: int
    n_stage1_datasets: int  # Stage I (masks, token maps, Fig. 3.8) runs on more sets than the finetuning: it is one step
    steps: dict[str, int]
    lr: dict[str, float]
    sweep_lrs: tuple[float, ...]
    step_scales: tuple[float, ...]
    omegas: tuple[float, ...]
    n_ablation_datasets: int
    n_ratio_datasets: int
    timing_steps: int
    mask: MaskSettings
    alpha: float
    omega: float
    bas_ti_lr: float
    bas_attn_weight: float
    bind_weight: float
    sep_weight: float
    general_word: str
    contexts: tuple[str, ...]
    n_images: int
    num_steps: int
    guidance_scale: float
    scheduler: str
    train_cross_res: tuple[int, ...]
    seed: int
    preliminary: PreliminarySettings

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "Ch3Config":
        c, a, b, e = cfg["ch03"], cfg["ch03"]["attencraft"], cfg["ch03"]["baselines"], cfg["ch03"]["eval"]
        p = c["preliminary"]
        mask = MaskSettings(nu=float(a["nu"]), tau=float(a["tau"]), gamma=float(a["gamma"]), t_max=int(a["t_max"]),
                            n_top=int(a["n_top"]), score_timesteps=tuple(int(t) for t in a["score_times"]),
                            cross_res=int(cfg["attention"]["cross_res"][0]), self_res=int(cfg["attention"]["self_res"][0]))
        return cls(n_datasets=int(c["n_datasets"]), n_stage1_datasets=max(int(c["stage1_datasets"]), int(c["n_datasets"])),
                   steps={"Mine": int(a["steps"]), "CusDiff": int(b["cusdiff_steps"]),
                          "DisenDiff": int(b["disendiff_steps"]), "BAS": int(b["bas_steps"]), "BAS-TI": int(b["bas_ti_steps"])},
                   lr={"Mine": float(a["lr"]), "CusDiff": float(b["lr"]), "DisenDiff": float(b["lr"]), "BAS": float(b["lr"])},
                   sweep_lrs=tuple(float(x) for x in c["sweep"]["lrs"]),
                   step_scales=tuple(float(x) for x in c["sweep"]["step_scales"]),
                   omegas=tuple(float(x) for x in c["ablations"]["omegas"]),
                   n_ablation_datasets=int(c["ablations"]["n_datasets"]),
                   n_ratio_datasets=int(c["ablations"]["n_ratio_datasets"]), timing_steps=int(c["timing_steps"]), mask=mask, alpha=float(a["alpha"]),
                   omega=float(a["omega"]), bas_ti_lr=float(b["bas_ti_lr"]), bas_attn_weight=float(b["bas_attn_weight"]),
                   bind_weight=float(b["disendiff_bind_weight"]), sep_weight=float(b["disendiff_sep_weight"]),
                   general_word=str(c["general_word"]), contexts=tuple(str(x) for x in e["contexts"]),
                   n_images=int(e["n_images"]), num_steps=int(e["num_steps"]), guidance_scale=float(e["guidance_scale"]),
                   scheduler=str(e["scheduler"]), train_cross_res=tuple(int(r) for r in cfg["attention"]["train_cross_res"]),
                   seed=int(cfg["seed"]),
                   preliminary=PreliminarySettings(steps=int(p["steps"]), eval_every=int(p["eval_every"]),
                                                   lr=float(p["lr"]), n_datasets=int(p["n_datasets"])))


# ------------------------------------------------------------------------------------------ data and models
@dataclass(frozen=True)
class Scene:
    """One customization set: the image (H, W, 3) uint8, one true mask per concept (N, H, W), class names, colours."""

    name: str
    image: np.ndarray
    masks: np.ndarray
    class_names: tuple[str, ...]
    colours: tuple[str, ...]


def _resize(image: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    im = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=(size, size), mode="area")[:, 0] > 0.5
    return im[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy(), m.numpy()


def load_scenes(cfg: Mapping[str, Any], n: int) -> list[Scene]:
    """The first ``n`` two-concept customization sets of the scenes world (§3.6.1), at the models' image size."""
    ds = load_multiconcept(cfg)
    size = int(cfg["models"]["image_size"])
    out = []
    for r in [r for r in ds.records if r.split == "customize"][:n]:
        masks = np.stack([read_mask(p) for p in r.meta["masks"]])
        image, masks = _resize(read_image(r.image_path), masks, size)
        out.append(Scene(r.id, image, masks, tuple(r.meta["class_names"]), tuple(c["colour"] for c in r.meta["concepts"])))
    return out


# Held-out triples (``held_out_combinations``) of shapes the base model knows: novel instances of known
# classes, as the customization sets are (§3.3.1 reads the class names' cross-attention).
THREE_CONCEPTS = (Concept("circle", "red", "plain"), Concept("square", "blue", "striped"),
                  Concept("cross", "yellow", "plain"))
SAME_CLASS_CONCEPTS = (Concept("circle", "red", "plain"), Concept("circle", "yellow", "striped"))


def three_concept_scene(cfg: Mapping[str, Any]) -> Scene:
    """A three-concept input (§3.4.5): three known shapes in three colours, rendered by the world's renderer."""
    size = int(cfg["models"]["image_size"])
    concepts = list(THREE_CONCEPTS)
    image, masks, _ = render_scene(concepts, 256, np.random.default_rng([int(cfg["seed"]), 33]), "plain")
    image, m = _resize(image, np.stack(masks), size)
    return Scene("three concepts", image, m, tuple(c.shape for c in concepts), tuple(c.colour for c in concepts))


def same_class_scene(cfg: Mapping[str, Any]) -> Scene:
    """§7.2's first limitation: two concepts of the same known class in two colours (both tokens start from
    the same word)."""
    size = int(cfg["models"]["image_size"])
    concepts = list(SAME_CLASS_CONCEPTS)
    image, masks, _ = render_scene(concepts, 256, np.random.default_rng([int(cfg["seed"]), 34]), "plain")
    image, m = _resize(image, np.stack(masks), size)
    return Scene(f"two {concepts[0].shape}s", image, m, tuple(c.shape for c in concepts), tuple(c.colour for c in concepts))


def base_model(cfg: Mapping[str, Any], variant: str | None = None):
    """The scenes base model the chapter starts from. Mini: the word-aligned (stage B) model of ``variant``
    (``base_models.word_alignment``; trained now, with its stage A, if the cache lacks it) — stage A alone leaves
    bare class words that do not localize, which Stage I reads (``token_attention_table`` shows both)."""
    if str(cfg["models"]["kind"]) != "mini" or variant == "pretrained":
        return load_base_model(cfg, "scenes")
    variant = variant or default_variant(cfg, "scenes")
    align_words(cfg, variant, progress=False)
    return load_aligned(cfg, variant)


def stage_a_models(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Mini: each scenes variant before word alignment, named "<variant> (stage A)" (what Stage I's masks and the
    token-attention diagnosis compare the chapter's base models with); full: none."""
    if str(cfg["models"]["kind"]) != "mini":
        return {}
    out = {}
    for variant in variants(cfg):
        pretrain_domain(cfg, "scenes", variant == "selfattn", progress=False)
        out[f"{variant} (stage A)"] = load_variant(cfg, "scenes", variant)
    return out


def base_key(cfg: Mapping[str, Any], variant: str | None = None) -> str:
    if str(cfg["models"]["kind"]) != "mini":
        return f"pretrained:{cfg['models']['pretrained'][cfg['models']['domains']['scenes']]}"
    return aligned_key(cfg, variant or default_variant(cfg, "scenes"))


def variants(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The scenes base models Stage I is compared on (mini: ``selfattn`` and ``plain``; full: the pretrained one)."""
    return available_variants(cfg, "scenes") if str(cfg["models"]["kind"]) == "mini" else ("pretrained",)


def default_name(cfg: Mapping[str, Any]) -> str:
    """The base model the chapter finetunes (a key of ``variants``)."""
    return default_variant(cfg, "scenes") if str(cfg["models"]["kind"]) == "mini" else "pretrained"


@torch.no_grad()
def latent_of(model, scene: Scene) -> torch.Tensor:
    """The VAE latent of the scene image ``(1, C, h, w)``."""
    return model.encode_dataset(scene.image[None])


# ------------------------------------------------------------------------------------------ Stage I
MASK_ABLATIONS = {"all three techniques": {}, "w/o cross-attention suppression": {"suppression": False},
                  "w/o self-attention enhancement": {"enhancement": False},
                  "Otsu instead of delta masking": {"thresholding": "otsu"},
                  # not a thesis ablation: the book's decision (rows of (A_S)^τ renormalised, masks.py) against the raw product
                  "(A_S)^τ rows not renormalised": {"renormalize_rows": False}}


def stage_one_masks(model, scene: Scene, settings: MaskSettings, seed: int) -> dict[str, Any]:
    """Stage I on a fresh copy of ``model`` with class-name tokens: maps, masks of each Fig. 3.8 variant, IoUs."""
    m = copy.deepcopy(model)
    tokens = add_identifiers(m, scene.class_names)
    custom = Customized("Mine", tokens, scene.class_names, with_class=False)
    st = stage_one(m, latent_of(m, scene), custom.prompt(range(len(scene.class_names))), tokens.tokens, settings, seed)
    out = {"stage": st, "masks": {}, "iou": {}}
    for name, change in MASK_ABLATIONS.items():
        masks = concept_masks(st.cross, st.self_attn, replace(settings, **change))
        out["masks"][name] = masks
        out["iou"][name] = mask_iou(masks, scene.masks)
    return out


def mask_table(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Mean IoU with the true masks per variant (Fig. 3.8) for each base model."""
    rows = {v: {name: float(np.mean(np.concatenate([r["iou"][name] for r in res])))
                for name in MASK_ABLATIONS} for v, res in results.items()}
    return pd.DataFrame(rows).T.rename_axis("base model")


def token_attention_table(scenes: Sequence[Scene], results: Mapping[str, Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    """Where each identifier token's Stage I cross-attention sits, per base model, dataset and concept: its mean
    inside the concept's true mask, inside the other concepts' masks and on the background (masks resized by area to
    the map's side, > 0.5), and whether it localizes (own > both). A token that does not localize cannot get a mask
    from any refinement of its map: the diagnosis behind a low Stage I IoU."""
    rows = []
    for variant, per_scene in results.items():
        for scene, res in zip(scenes, per_scene):
            cross = res["stage"].cross
            truth = resize_maps(torch.from_numpy(scene.masks).float(), cross.shape[-1], mode="area") > 0.5
            background = ~truth.any(0)
            for k, name in enumerate(scene.class_names):
                others = truth[[j for j in range(len(truth)) if j != k]].any(0)
                own, other, bg = (float(cross[k][m].mean()) if m.any() else float("nan")
                                  for m in (truth[k], others, background))
                rows.append({"base model": variant, "dataset": scene.name, "concept": name, "own mask": own,
                             "other concepts": other, "background": bg, "localizes": own > max(other, bg)})
    return pd.DataFrame(rows).set_index(["base model", "dataset", "concept"])


def mask_figure(scenes: Sequence[Scene], results: Sequence[Mapping[str, Any]]):
    """Fig. 3.8/3.14 analogue: input, true masks, and each variant's masks (concept 1 red, concept 2 green, 3 blue)."""
    cols = ["input", "true masks"] + list(MASK_ABLATIONS)
    fig, axes = plt.subplots(len(scenes), len(cols), figsize=(2 * len(cols), 2 * len(scenes)), squeeze=False)
    for i, (scene, res) in enumerate(zip(scenes, results)):
        axes[i, 0].imshow(scene.image)
        axes[i, 1].imshow(_colour_masks(torch.from_numpy(scene.masks)))
        for j, name in enumerate(MASK_ABLATIONS, 2):
            axes[i, j].imshow(_colour_masks(res["masks"][name]))
            axes[i, j].set_xlabel(" / ".join(f"{v:.2f}" for v in res["iou"][name]), fontsize=7)
        for j, c in enumerate(cols):
            axes[0, j].set_title(c, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("Stage I masks (IoU with the true masks under each)")
    fig.tight_layout()
    return fig


def _colour_masks(masks: torch.Tensor) -> np.ndarray:
    m = masks.float().numpy()
    rgb = np.zeros((*m.shape[1:], 3))
    for k in range(min(3, m.shape[0])):
        rgb[..., k] = m[k]
    return rgb


def ratio_table(scenes: Sequence[Scene], stages: Sequence[Any]) -> pd.DataFrame:
    """Eq. (3.4) scores and Eq. (3.5) ratios per dataset (and the Table 3.3 variants)."""
    rows = []
    for scene, st in zip(scenes, stages):
        s = st.scores.numpy()
        r = sampling_ratios(s)
        rows.append({"dataset": scene.name, "S_1": s[0], "S_2": s[1], "r_1": r[0], "r_2": r[1],
                     "r_1 w/o softmax": sampling_ratios(s, "no_softmax")[0], "ratio gap": abs(r[0] - r[1])})
    return pd.DataFrame(rows).set_index("dataset")


# ------------------------------------------------------------------------------------------ finetuning (cached)
@dataclass
class Trial:
    """One finetuned model: method, dataset, settings, trained tensors and history."""

    method: str
    scene: Scene
    settings: dict[str, Any]
    state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    init_words: tuple[str, ...]
    ratios: list[float] = field(default_factory=list)


def _train_now(cfg, model, method: str, scene: Scene, s: dict[str, Any], cc: Ch3Config) -> dict[str, Any]:
    latent = latent_of(model, scene)
    tc = {"mixed_precision": str(cfg["training"]["mixed_precision"])}
    common = dict(cross_res=cc.train_cross_res, seed=cc.seed)
    if method == "Mine":
        c = AttenCraftConfig(steps=s["steps"], lr=s["lr"], alpha=cc.alpha, omega=s["omega"], ratio_mode=s["ratio_mode"],
                             rec_on_groups=s["rec_on_groups"], train_tokens=bool(s.get("train_tokens", False)),
                             masks=cc.mask, **common)
        r = attencraft_finetune(model, latent, scene.class_names, c, train_config=tc)
        return {"state": r.state, "history": r.train.history, "init": list(r.custom.tokens.init_words),
                "ratios": [float(x) for x in r.ratios], "masks": r.stage.masks.float()}
    if method == "CusDiff":
        r = custom_diffusion_finetune(model, latent, scene.class_names, CustomDiffusionConfig(steps=s["steps"], lr=s["lr"], **common),
                                      train_config=tc)
    elif method == "DisenDiff":
        r = disendiff_finetune(model, latent, scene.class_names,
                               DisenDiffConfig(steps=s["steps"], lr=s["lr"], bind_weight=cc.bind_weight,
                                               sep_weight=cc.sep_weight, nu=cc.mask.nu, **common), train_config=tc)
    else:
        c = BreakASceneConfig(ti_steps=s["ti_steps"], ti_lr=cc.bas_ti_lr, steps=s["steps"], lr=s["lr"],
                              attn_weight=cc.bas_attn_weight, **common)
        r = break_a_scene_finetune(model, latent, scene.class_names, scene.masks, c, init_words=s.get("init"), train_config=tc)
    return {"state": r.state, "history": r.train.history, "init": list(r.custom.tokens.init_words), "ratios": []}


def trial_settings(cc: Ch3Config, method: str, lr: float | None = None, scale: float = 1.0, **variant: Any) -> dict[str, Any]:
    """A trial's settings: steps scaled by ``scale`` (the sweep), lr, and AttenCraft's variant switches."""
    s = {"lr": float(lr if lr is not None else cc.lr[method]), "steps": max(1, int(round(cc.steps[method] * scale)))}
    if method == "Mine":
        s.update(omega=cc.omega, ratio_mode="adaptive", rec_on_groups=False)
    if method == "BAS":
        s["ti_steps"] = cc.steps["BAS-TI"]
    s.update(variant)
    return s


def finetune(cfg: Mapping[str, Any], base, method: str, scene: Scene, settings: dict[str, Any], cc: Ch3Config) -> Trial:
    """The trial's trained tensors, from the result cache or trained now on a copy of ``base``."""
    parts = {"what": "ch03 finetune", "method": method, "base": base_key(cfg), "scene": scene.name,
             "image": _digest(scene), "settings": settings, "mask": cc.mask.__dict__,
             "alpha": cc.alpha, "bas": [cc.bas_ti_lr, cc.bas_attn_weight], "disendiff": [cc.bind_weight, cc.sep_weight],
             "cross_res": list(cc.train_cross_res), "seed": cc.seed}
    out = result_cache.cached(parts, lambda: _train_now(cfg, copy.deepcopy(base), method, scene, settings, cc),
                              kind="torch", cfg=cfg, code=CODE)
    return Trial(method, scene, settings, out["state"], out["history"], tuple(out["init"]), list(out["ratios"]))


def _digest(scene: Scene) -> str:
    return hashlib.sha256(scene.image.tobytes() + scene.masks.tobytes()).hexdigest()


def customized(base, trial: Trial) -> tuple[Any, Customized]:
    """A copy of ``base`` with the trial's tokens and trained tensors."""
    m = copy.deepcopy(base)
    tokens = add_identifiers(m, trial.init_words)
    with_class = trial.method in ("CusDiff", "DisenDiff")
    load_state(m, trial.state)
    m.unet.eval()
    return m, Customized(trial.method, tokens, trial.scene.class_names, with_class)


# ------------------------------------------------------------------------------------------ sampling and metrics
@dataclass(frozen=True)
class Extractors:
    """Feature extractors of the image-alignment and identity metrics, and their column names.

    ``full`` (``models.weights.clip``/``dino`` set and the pretrained SD): CLIP ViT-L/14 image features
    ("CLIP-I"), their text features ("CLIP-T") and the DINO CLS token ("DINO"). ``mini``/``smoke``: the scenes
    VAE encoder ("feat-I") and the scenes attribute classifier ("cls-I"); no text metric.
    Every ``image``/``identity`` function takes ``(B, 3, H, W)`` in [0, 1].
    """

    image: Callable[[torch.Tensor], torch.Tensor]
    identity: Callable[[torch.Tensor], torch.Tensor]
    text: Callable[[list[str]], torch.Tensor] | None
    image_name: str
    identity_name: str
    note: str

    @property
    def sync_name(self) -> str:
        return f"CLIP-I-sync ({self.image_name}) ↓"


def extractors(cfg: Mapping[str, Any], base) -> Extractors:
    """The profile's extractors (class doc)."""
    w = cfg["models"]["weights"]
    if str(cfg["models"]["kind"]) != "mini" and str(w["clip"]) and str(w["dino"]):
        return _clip_dino(weight_path(cfg, str(w["clip"]), "transformers"), weight_path(cfg, str(w["dino"]), "transformers"))
    data = load_domain_data(cfg, "scenes")
    clf = domain_classifier(cfg, data, BarSettings.from_profile(cfg))
    vae = VAEEncoderFeatures(base.vae).eval()
    return Extractors(vae, lambda x: clf.features(x * 2 - 1), None, "feat-I", "cls-I",
                      "feat-I: scenes VAE-encoder features (CLIP-I stand-in); cls-I: scenes attribute-classifier "
                      "features (DINO stand-in); colour fidelity / fusion measured from the world's palette; "
                      "CLIP-T not measured (no text-image model offline)")


def _clip_dino(clip_dir, dino_dir) -> Extractors:
    """CLIP ViT-L/14 (image and text features) and DINO (CLS token) from local folders (§3.4.1)."""
    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    dino = AutoModel.from_pretrained(dino_dir, local_files_only=True).eval()
    dproc = AutoImageProcessor.from_pretrained(dino_dir, local_files_only=True)

    def pixels(processor, x):
        return processor(images=[im.permute(1, 2, 0).numpy() for im in x.clamp(0, 1)], return_tensors="pt",
                         do_rescale=False)["pixel_values"]

    return Extractors(lambda x: clip.get_image_features(pixel_values=pixels(proc, x)),
                      lambda x: dino(pixel_values=pixels(dproc, x)).last_hidden_state[:, 0],
                      lambda t: clip.get_text_features(**proc(text=t, return_tensors="pt", padding=True)),
                      "CLIP-I", "DINO", f"CLIP-I/CLIP-T: {clip_dir}; DINO: {dino_dir} (CLS token)")


@torch.no_grad()
def _cos(features, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    a, b = features(x), features(ref)
    return F.cosine_similarity(a, b.expand_as(a), dim=1)


def _crop(scene: Scene, i: int) -> torch.Tensor:
    ys, xs = np.nonzero(scene.masks[i])
    pad = 2
    y0, y1 = max(0, ys.min() - pad), min(scene.image.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(scene.image.shape[1], xs.max() + pad + 1)
    crop = torch.from_numpy(scene.image[y0:y1, x0:x1]).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(crop, size=scene.image.shape[:2], mode="bilinear", align_corners=False)


def colour_share(images: torch.Tensor, colour: str, tol: float = 50.0) -> torch.Tensor:
    """Share of each image's pixels within ``tol`` (RGB, 0–255) of ``colour`` at full or textured (×0.55) shade."""
    rgb = torch.tensor(COLOURS[colour], dtype=torch.float32)
    px = images.permute(0, 2, 3, 1) * 255
    d = torch.stack([(px - rgb * s).norm(dim=-1) for s in (1.0, 0.55)]).amin(0)
    return (d < tol).float().flatten(1).mean(1)


def prompts_for(custom: Customized, n: int, cc: Ch3Config) -> dict[tuple[int, ...], list[str]]:
    """Single-concept and group prompts × contexts × images (§3.4.1: 10 prompts × 10 images each)."""
    subsets = [(i,) for i in range(n)] + [tuple(range(n))]
    return {s: [custom.prompt(s, f"on a {c} background") for c in cc.contexts for _ in range(cc.n_images)] for s in subsets}


def sample_trial(cfg: Mapping[str, Any], base, trial: Trial, cc: Ch3Config) -> dict[str, torch.Tensor]:
    """Samples of every subset (cached by content): ``{"0": (n, 3, H, W), "1": …, "0,1": …}`` in [0, 1]."""
    def draw():
        model, custom = customized(base, trial)
        out = {}
        for s, prompts in prompts_for(custom, len(trial.scene.class_names), cc).items():
            out[",".join(map(str, s))] = text_to_image(model, prompts, num_steps=cc.num_steps, guidance_scale=cc.guidance_scale,
                                                       scheduler=cc.scheduler, seed=cc.seed).images.cpu()
        return out
    parts = {"what": "ch03 samples", "method": trial.method, "scene": trial.scene.name, "base": base_key(cfg),
             "settings": trial.settings, "state": _state_digest(trial.state), "contexts": list(cc.contexts),
             "n_images": cc.n_images, "steps": cc.num_steps, "cfg": cc.guidance_scale, "scheduler": cc.scheduler,
             "seed": cc.seed}
    return result_cache.cached(parts, draw, kind="torch", cfg=cfg, code=SAMPLE_CODE)


def _state_digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()


def class_prompts(scene: Scene, cc: Ch3Config) -> dict[str, list[str]]:
    """CLIP-T's texts: each sample's prompt with its identifier tokens replaced by the class names."""
    n = len(scene.class_names)
    subsets = [(i,) for i in range(n)] + [tuple(range(n))]
    return {",".join(map(str, s)): [PROMPT_TEMPLATE.format(" and ".join(scene.class_names[i] for i in s)) + f" on a {c} background"
                                    for c in cc.contexts for _ in range(cc.n_images)] for s in subsets}


@torch.no_grad()
def score_samples(samples: Mapping[str, torch.Tensor], scene: Scene, ex: Extractors,
                  texts: Mapping[str, list[str]] | None = None) -> pd.DataFrame:
    """Per-image metrics: scope (single / group), concept, image alignment, identity, (text alignment), colour
    fidelity and feature fusion (module doc). References: the concept's crop for one concept, the input for the group."""
    rows = []
    n = len(scene.class_names)
    whole = torch.from_numpy(np.array(scene.image)).permute(2, 0, 1)[None].float() / 255
    for key, images in samples.items():
        subset = tuple(int(k) for k in key.split(","))
        single = len(subset) == 1
        ref = _crop(scene, subset[0]) if single else whole
        cols = {ex.image_name: _cos(ex.image, images, ref), ex.identity_name: _cos(ex.identity, images, ref)}
        if ex.text is not None and texts is not None:
            cols["CLIP-T"] = F.cosine_similarity(ex.image(images), ex.text(texts[key]), dim=1)
        cols["colour fidelity"] = torch.stack([colour_share(images, scene.colours[i]) for i in subset]).mean(0)
        others = [i for i in range(n) if i not in subset and scene.colours[i] not in {scene.colours[j] for j in subset}]
        cols["feature fusion"] = (torch.stack([colour_share(images, scene.colours[i]) for i in others]).mean(0) if others
                                  else torch.full((len(images),), float("nan")))
        for j in range(len(images)):
            rows.append({"scope": "single" if single else "group", "concept": key, "image": j,
                         **{k: float(v[j]) for k, v in cols.items()}})
    return pd.DataFrame(rows)


def sync(per_image: pd.DataFrame, column: str = "feat-I") -> float:
    """CLIP-I-sync (§3.4.1): |mean image alignment of concept 1 − of concept 2| in single-concept samples."""
    s = per_image[per_image.scope == "single"].groupby("concept")[column].mean()
    return float(abs(s.iloc[0] - s.iloc[1])) if len(s) >= 2 else float("nan")


def summary(per_image: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Table 3.1's rows for one method: each metric column per scope."""
    metrics = [c for c in per_image.columns if c not in ("scope", "concept", "image", "dataset")]
    out = {}
    for scope, label in (("single", "Single concept"), ("group", "Concept group")):
        part = per_image[per_image.scope == scope]
        for m in metrics:  # the thesis's row labels carry the direction ("CLIP-I ↑"): full's rows line up with them
            out[(label, f"{m} {'↓' if m == 'feature fusion' else '↑'}")] = float(part[m].mean())
    return out


@dataclass
class Evaluated:
    """A trial with its per-image scores (all datasets of the method's arm)."""

    trials: list[Trial]
    per_image: pd.DataFrame
    syncs: list[float]
    image_name: str = "feat-I"

    @property
    def score(self) -> float:
        """What picks the best trial of a sweep (§3.6.3: "best-performing"): mean image alignment over both scopes."""
        return float(self.per_image.groupby("scope")[self.image_name].mean().mean())

    def only(self, datasets: Sequence[str]) -> "Evaluated":
        """The same arm restricted to ``datasets`` (a like-for-like subset for the ablations)."""
        keep = [i for i, t in enumerate(self.trials) if t.scene.name in set(datasets)]
        return Evaluated([self.trials[i] for i in keep], self.per_image[self.per_image.dataset.isin(list(datasets))],
                         [self.syncs[i] for i in keep], self.image_name)


def evaluate_arm(cfg, base, method: str, scenes: Sequence[Scene], settings: dict[str, Any], cc: Ch3Config, ex: Extractors) -> Evaluated:
    """Finetune (cached) and score one method with one setting on every dataset."""
    trials, frames, syncs = [], [], []
    for scene in scenes:
        t = finetune(cfg, base, method, scene, settings, cc)
        per = score_samples(sample_trial(cfg, base, t, cc), scene, ex, class_prompts(scene, cc)).assign(dataset=scene.name)
        trials.append(t)
        frames.append(per)
        syncs.append(sync(per, ex.image_name))
    return Evaluated(trials, pd.concat(frames, ignore_index=True), syncs, ex.image_name)


def arm_table(arms: Mapping[str, Evaluated]) -> pd.DataFrame:
    """Rows (scope, metric), one column per arm, plus the sync row (Table 3.1 layout)."""
    cols = {}
    for name, ev in arms.items():
        col = summary(ev.per_image)
        sync_label = "CLIP-I-sync ↓" if ev.image_name == "CLIP-I" else f"CLIP-I-sync ({ev.image_name}) ↓"
        col[("Concept group", sync_label)] = float(np.nanmean(ev.syncs))
        cols[name] = col
    frame = pd.DataFrame(cols)
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["Setting", "Metrics"])  # Table 3.1's index names
    return frame


def sweep(cfg, base, scenes, cc: Ch3Config, ex: Extractors, lrs: Sequence[float]) -> dict[str, dict[str, Evaluated]]:
    """Every method (and ``VARIANT_ARMS``) at every (lr, step scale) of the sweep: ``{arm: {"lr=…, steps=…":
    Evaluated}}``."""
    arms = {m: (m, {}) for m in METHODS} | VARIANT_ARMS
    out: dict[str, dict[str, Evaluated]] = {}
    for arm, (method, extra) in arms.items():
        for lr in lrs:
            for scale in cc.step_scales:
                s = trial_settings(cc, method, lr, scale, **extra)
                out.setdefault(arm, {})[f"lr={lr:g}, steps={s['steps']}"] = evaluate_arm(cfg, base, method, scenes, s, cc, ex)
    return out


def best(trials: Mapping[str, Evaluated]) -> tuple[str, Evaluated]:
    name = max(trials, key=lambda k: trials[k].score)
    return name, trials[name]


def step_time_ratio(base, scene: Scene, cc: Ch3Config) -> dict[str, float]:
    """Seconds per training step of AttenCraft and of Custom Diffusion, measured side by side in this process
    (``timing_steps`` steps each, the loop only: Stage I and set-up excluded), and their ratio (issue 16's benchmark)."""
    lat = latent_of(base, scene)
    common = dict(steps=cc.timing_steps, lr=1e-4, cross_res=cc.train_cross_res, seed=cc.seed)
    mine = attencraft_finetune(copy.deepcopy(base), lat, scene.class_names, AttenCraftConfig(masks=cc.mask, **common),
                               true_masks=torch.from_numpy(scene.masks))
    cd = custom_diffusion_finetune(copy.deepcopy(base), lat, scene.class_names, CustomDiffusionConfig(**common))
    a, b = mine.train.seconds / cc.timing_steps, cd.train.seconds / cc.timing_steps
    return {"AttenCraft s/step": a, "Custom Diffusion s/step": b, "ratio": a / b}


# ------------------------------------------------------------------------------------------ figures
def samples_figure(samples: Mapping[str, Mapping[str, torch.Tensor]], scene: Scene, title: str):
    """Fig. 3.5 analogue: the input and, per method, one sample of each concept and of the group."""
    keys = list(next(iter(samples.values())))
    fig, axes = plt.subplots(len(samples) + 1, len(keys), figsize=(1.8 * len(keys), 1.8 * (len(samples) + 1)), squeeze=False)
    axes[0, 0].imshow(scene.image)
    axes[0, 0].set_title("input", fontsize=8)
    for j in range(1, len(keys)):
        axes[0, j].axis("off")
    for i, (method, s) in enumerate(samples.items(), 1):
        for j, k in enumerate(keys):
            axes[i, j].imshow(s[k][0].permute(1, 2, 0).numpy())
            axes[i, j].set_title(f"{method}: " + (f"[V{int(k) + 1}]" if "," not in k else "group"), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def attention_figure(base, trials: Mapping[str, Trial], cc: Ch3Config, seed: int):
    """Fig. 3.7 analogue: each method's cross-attention map of every [V] on its own group prompt at t = t_max/2."""
    fig, axes = plt.subplots(len(trials), 3, figsize=(6, 2 * len(trials)), squeeze=False)
    for i, (method, t) in enumerate(trials.items()):
        model, custom = customized(base, t)
        lat = latent_of(model, t.scene)
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))
        cross, _ = token_maps(model, lat, custom.prompt((0, 1)), custom.tokens.tokens[:2], cc.mask.t_max // 2, noise,
                              cc.mask, with_self=False)
        axes[i, 0].imshow(t.scene.image)
        axes[i, 0].set_ylabel(method, fontsize=8)
        for k in range(2):
            axes[i, k + 1].imshow(normalize_minmax(cross[k]).numpy(), cmap="jet")
            axes[i, k + 1].set_title(f"[V{k + 1}]", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig


def loss_curves(trials: Mapping[str, Trial]):
    fig, ax = plt.subplots(figsize=(6, 3))
    for name, t in trials.items():
        ax.plot([h["step"] for h in t.history], [h["loss"] for h in t.history], label=name)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ preliminary (§3.6.2)
PATTERNS = ("P-P", "P-G", "G-P")
TURN = 0.3  # §3.3.2: P "tends to degrade after 300 steps" of 1000: the claims read each curve at 30 % and at the end


def pattern_words(scene: Scene, general: str) -> dict[str, tuple[str, str]]:
    """Table 3.4's row for ``scene``: the initialisation words of [V1], [V2] of each training (P: the class name,
    G: ``general``; a multi-word ``general`` initialises with the mean of its words' embeddings)."""
    p = scene.class_names
    return {"P-P": (p[0], p[1]), "P-G": (p[0], general), "G-P": (general, p[1])}


def concept_pattern(training: str, k: int) -> str:
    """The pattern of training ``training`` from concept ``k``'s view (§3.3.2's footnote): the evaluated token's
    initialisation first. "cat-animal" is P-G for "cat" (k = 0) but G-P for "dog" (k = 1)."""
    own, other = training.split("-")
    return training if k == 0 else f"{other}-{own}"


def _token_scores(model, custom: Customized, scene: Scene, cc: Ch3Config) -> np.ndarray:
    """Eq. (3.4) score of each [V] on the true masks, on the group prompt (what Fig. 3.4b and Table 3.5 read)."""
    n = len(scene.class_names)
    st = stage_one(model, latent_of(model, scene), custom.prompt(range(n)), custom.tokens.tokens[:n], cc.mask, cc.seed,
                   masks=torch.from_numpy(scene.masks))
    return st.scores.numpy()


def init_scores(base, scene: Scene, cc: Ch3Config, general: str) -> dict[str, np.ndarray]:
    """Eq. (3.4) scores of [V1], [V2] on the true masks, before training, for P-P, P-G and G-P initialisations."""
    out = {}
    for name, words in pattern_words(scene, general).items():
        m = copy.deepcopy(base)
        custom = Customized("BAS", add_identifiers(m, words), scene.class_names, with_class=False)
        out[name] = _token_scores(m, custom, scene, cc)
    return out


@torch.no_grad()
def _measure(model, custom: Customized, scene: Scene, cc: Ch3Config, ex: Extractors) -> dict[str, torch.Tensor]:
    """One evaluation of Fig. 3.4: the chapter's single-concept samples (``prompts_for``, same prompts and seed at
    every step) scored by image alignment with the concept's crop (``score_samples``), and the Eq. (3.4) scores."""
    n = len(scene.class_names)
    samples = {str(s[0]): text_to_image(model, prompts, num_steps=cc.num_steps, guidance_scale=cc.guidance_scale,
                                        scheduler=cc.scheduler, seed=cc.seed).images.cpu()
               for s, prompts in prompts_for(custom, n, cc).items() if len(s) == 1}
    per = score_samples(samples, scene, ex)
    image = torch.tensor(np.stack([per[per.concept == str(k)].sort_values("image")[ex.image_name].to_numpy()
                                   for k in range(n)]), dtype=torch.float32)
    return {"image": image, "score": torch.from_numpy(_token_scores(model, custom, scene, cc)).float()}


def _curve_now(cfg, model, scene: Scene, words: tuple[str, str], cc: Ch3Config, ex: Extractors) -> dict[str, Any]:
    """Train ``model`` in place (§3.6.2: no textual-inversion phase) and measure it at every evaluation step."""
    p = cc.preliminary
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def look(step: int, m, custom: Customized) -> None:
        seen[step] = _measure(m, custom, scene, cc, ex)

    c = BreakASceneConfig(ti_steps=0, steps=p.steps, lr=p.lr, attn_weight=cc.bas_attn_weight,
                          cross_res=cc.train_cross_res, seed=cc.seed)
    r = break_a_scene_finetune(model, latent_of(model, scene), scene.class_names, scene.masks, c, init_words=words,
                               train_config={"mixed_precision": str(cfg["training"]["mixed_precision"])},
                               snapshot_every=p.eval_every, on_snapshot=look)
    steps = sorted(seen)
    return {"step": torch.tensor(steps), "image": torch.stack([seen[k]["image"] for k in steps]),
            "score": torch.stack([seen[k]["score"] for k in steps]), "history": r.train.history}


def init_curve(cfg: Mapping[str, Any], base, scene: Scene, training: str, cc: Ch3Config,
               ex: Extractors) -> dict[str, Any]:
    """One training of Fig. 3.4 (cached by content): BAS without textual inversion from the ``training`` pattern's
    words, evaluated every ``eval_every`` steps from step 0. ``{"step": (S,), "image": (S, N, images) image alignment
    per single-concept sample, "score": (S, N) Eq. (3.4), "history"}``."""
    words = pattern_words(scene, cc.general_word)[training]
    parts = {"what": "ch03 init curve", "base": base_key(cfg), "scene": scene.name, "image": _digest(scene),
             "init": list(words), "settings": cc.preliminary.__dict__, "attn_weight": cc.bas_attn_weight,
             "cross_res": list(cc.train_cross_res), "mask": cc.mask.__dict__, "contexts": list(cc.contexts),
             "n_images": cc.n_images, "sampling": [cc.num_steps, cc.guidance_scale, cc.scheduler],
             "metric": [ex.image_name, ex.note], "precision": str(cfg["training"]["mixed_precision"]), "seed": cc.seed}
    # the scores are stored, not the samples (full: 200 images of 512 px per evaluation); like ``finetune``'s, the key
    # holds the library code, not this module's scoring helpers (``score_samples``): after changing those, recompute
    # with $CTRLGEN_NO_RESULT_CACHE=1
    return result_cache.cached(parts, lambda: _curve_now(cfg, copy.deepcopy(base), scene, words, cc, ex), kind="torch",
                               cfg=cfg, code=SAMPLE_CODE + ("ctrlgen.metrics.image",))


def init_curves(cfg: Mapping[str, Any], base, scenes: Sequence[Scene], cc: Ch3Config, ex: Extractors) -> pd.DataFrame:
    """Fig. 3.4 / 3.13: the three trainings of each dataset (two at a time, ``parallel.run_all``) as a tidy frame, one
    row per (dataset, concept, training, step, sample): the pattern from the concept's view, its image alignment
    (``ex.image_name``) and the [V]'s Eq. (3.4) score."""
    jobs = {(s.name, t): partial(init_curve, cfg, base, s, t, cc, ex) for s in scenes for t in PATTERNS}
    results = run_all(jobs, cfg, "ch03 init curves")
    rows = []
    for scene in scenes:
        for training in PATTERNS:
            r = results[(scene.name, training)]
            for i, step in enumerate(r["step"].tolist()):
                for k, concept in enumerate(scene.class_names):
                    rows += [{"dataset": scene.name, "concept": concept, "training": training,
                              "pattern": concept_pattern(training, k), "step": step, "image": j,
                              ex.image_name: float(v), "score": float(r["score"][i, k])}
                             for j, v in enumerate(r["image"][i, k].tolist())]
    return pd.DataFrame(rows)


def curve_table(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean image alignment over the samples and the Eq. (3.4) score per (dataset, concept, pattern, step)."""
    return curves.groupby(["dataset", "concept", "pattern", "step"])[[metric, "score"]].mean()


def init_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Table 3.5: the Eq. (3.4) score of each concept's [V] at step 0, one column per training (Table 3.4's columns:
    the dataset's pattern, not the concept's view)."""
    start = curves[(curves.step == 0) & (curves.image == 0)]
    table = start.pivot_table(index=["dataset", "concept"], columns="training", values="score", sort=False)
    return table[list(PATTERNS)].rename_axis(columns=None)


def turn_step(cc: Ch3Config) -> int:
    """The evaluated step nearest to ``TURN`` of the training (the thesis's step 300 of 1000)."""
    p = cc.preliminary
    steps = sorted({*range(0, p.steps, p.eval_every), p.steps})
    return min(steps, key=lambda k: (abs(k - TURN * p.steps), k))


def _paired(curves: pd.DataFrame, metric: str, a: Mapping[str, Any], b: Mapping[str, Any],
            keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``metric`` of the rows selected by ``a`` and by ``b`` (column -> value), paired on ``keys``."""
    def pick(sel):
        part = curves
        for column, value in sel.items():
            part = part[part[column].isin(value if isinstance(value, (list, tuple)) else [value])]
        return part.set_index(list(keys))[metric]
    x, y = pick(a), pick(b)
    joined = pd.concat({"a": x, "b": y}, axis=1, join="inner").sort_index()
    if len(joined) != len(x) or len(joined) != len(y):
        raise ValueError(f"{metric}: the two selections do not pair on {list(keys)} ({len(x)} vs {len(y)} rows)")
    return joined["a"].to_numpy(), joined["b"].to_numpy()


def init_claims(curves: pd.DataFrame, metric: str, cc: Ch3Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The paired (a, b) values of the §3.3.2 / §3.6.2 claims, per single-concept sample (same prompt and seed):

    * ``start``: P vs G at step 0 (P-P and P-G coincide there: the other token is not in the prompt);
    * ``p_degrades``: P (P-P and P-G) at ``turn_step`` vs at the end; ``g_improves``: G-P at the end vs at the turn;
    * ``other_init``: |P-P − P-G| (the other token's initialisation) vs |P-P − G-P| (its own), every step after 0;
    * ``score_start``: Table 3.5's Eq. (3.4) score of P-P vs G-P at step 0, one pair per concept."""
    end, turn = cc.preliminary.steps, turn_step(cc)
    sample = ["dataset", "concept", "image"]
    out = {"start": _paired(curves, metric, {"step": 0, "pattern": "P-P"}, {"step": 0, "pattern": "G-P"}, sample)}
    p = ["P-P", "P-G"]
    out["p_degrades"] = _paired(curves, metric, {"step": turn, "pattern": p}, {"step": end, "pattern": p},
                                sample + ["pattern"])
    out["g_improves"] = _paired(curves, metric, {"step": end, "pattern": "G-P"}, {"step": turn, "pattern": "G-P"},
                                sample)
    later = curves[curves.step > 0]
    pp, pg = _paired(later, metric, {"pattern": "P-P"}, {"pattern": "P-G"}, sample + ["step"])
    _, gp = _paired(later, metric, {"pattern": "P-P"}, {"pattern": "G-P"}, sample + ["step"])
    out["other_init"] = (np.abs(pp - pg), np.abs(pp - gp))
    first = curves[curves.image == 0]
    out["score_start"] = _paired(first, "score", {"step": 0, "pattern": "P-P"}, {"step": 0, "pattern": "G-P"},
                                 ["dataset", "concept"])
    return out


def init_figure(curves: pd.DataFrame, metric: str):
    """Fig. 3.4 analogue: (a) mean single-concept image alignment vs step per pattern (the evaluated concept's view),
    (b) the mean highest cross-attention score (Eq. 3.4) of [V] vs step per pattern."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    panels = ((axes[0], metric, f"(a) single-concept {metric}"),
              (axes[1], "score", "(b) highest cross-attention score of [V]"))
    for ax, column, title in panels:
        for pattern in PATTERNS:
            mean = curves[curves.pattern == pattern].groupby("step")[column].mean()
            ax.plot(mean.index, mean.to_numpy(), marker="o", ms=3, label=pattern)
        ax.set_xlabel("training step"), ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8, title="pattern", title_fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["METHODS", "VARIANT_ARMS", "Ch3Config", "Scene", "load_scenes", "THREE_CONCEPTS", "SAME_CLASS_CONCEPTS", "three_concept_scene",
           "same_class_scene", "base_model",
           "stage_a_models", "variants", "default_name", "latent_of", "MASK_ABLATIONS", "stage_one_masks", "mask_table", "token_attention_table", "mask_figure", "ratio_table",
           "Trial", "trial_settings", "finetune", "customized", "Extractors", "extractors", "colour_share", "prompts_for",
           "sample_trial", "class_prompts", "score_samples", "step_time_ratio", "sync", "summary", "Evaluated", "evaluate_arm", "arm_table", "sweep", "best",
           "samples_figure", "attention_figure", "loss_curves", "PreliminarySettings", "PATTERNS", "TURN",
           "pattern_words", "concept_pattern", "init_scores", "init_curve", "init_curves", "curve_table", "init_table", "turn_step",
           "init_claims", "init_figure"]
