"""Chapter 4's four finetuned models, trained once from the derm base model and cached (§4.4.2, §4.4.5).

* ``mine``           region-aware finetuning (L_rec + α L_attn, Eq. 4.6) with DermPrompt prompts (§4.3.3);
* ``mine-noregion``  the same prompts, α = 0 (the "w/o region-aware finetuning" ablation, Fig. 4.7a);
* ``sd-finetune``    L_rec with the one prompt "An image of lesion on skin." (§4.4.2);
* ``dreambooth``     the same prompt with prior preservation on base-model class images (Ruiz et al. 2023).

All four see the same training images, steps, batch and AdamW settings (and, with
``didgen.finetune.precompute_latents``, the same latents, each image encoded once). Each is cached under
``<models>/mini-<profile>/didgen/<name>`` with a key = hash of (base model key, the profile values that
affect it, the training data and caption texts, the code version = this file and the training code), so
editing the chapter's evaluation, tables or figures (the package's ``__init__``) retrains nothing. An
interrupted run resumes from its checkpoints (``training.checkpoint_every``). The data object is any
``sets`` with ``train_images``, ``train_masks``, ``prompts`` and ``fingerprint`` (``DermSets``).
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrlgen.experiments.base_models import default_variant, pretrain_domain, variant_dir
from ctrlgen.methods.baselines.dreambooth import dreambooth_finetune, generate_class_images
from ctrlgen.methods.baselines.sd_finetune import sd_finetune
from ctrlgen.methods.didgen import PLACEHOLDERS, RegionAwareConfig, region_aware_finetune, setup_placeholders
from ctrlgen.models import cache, load_base_model, load_components
from ctrlgen.models.registry import mini_model_dir

MODEL_NAMES = ("mine", "mine-noregion", "sd-finetune", "dreambooth")
# the captions' texts are in the key already (the data fingerprint), so the captioner's code is not listed
# what the finetuning runs: the batches (flips and mirrored prompts: training/augment.py), the loop and its resume
# (checkpoint.py), the attention capture behind L_attn (processor, layers, maps), the VAE/tokenizer calls (models/sd.py)
# and DreamBooth's class images (sampling). training/region_loss.py is chapter 2's term, not used here.
CODE_FILES = ("experiments/ch04_didgen/models.py", "data/tensors.py", "methods/didgen/region_aware.py", "methods/baselines/sd_finetune.py",
              "methods/baselines/dreambooth.py", "training/loop.py", "training/params.py", "training/losses.py",
              "training/augment.py", "training/checkpoint.py", "attention/capture.py", "attention/processor.py",
              "attention/layers.py", "attention/maps.py", "models/tokens.py", "models/sd.py", "sampling/pipeline.py",
              "sampling/loop.py")


@dataclass
class Finetuned:
    """One finetuned model of chapter 4, from the cache or trained by this call."""

    name: str
    model: Any                          # SDComponents
    folder: Path
    cached: bool
    history: list[dict[str, float]]
    train_seconds: float
    key: str
    extra: dict[str, Any] = field(default_factory=dict)


def _key(cfg: Mapping[str, Any], name: str, base_key: str, sets, seed: int | None = None) -> tuple[str, dict]:
    d, plain = cfg["didgen"], cache.plain
    seed = int(cfg["seed"]) if seed is None else int(seed)
    parts = {"name": name, "base": base_key, "data": sets.fingerprint, "seed": seed,
             "finetune": plain(d["finetune"]), "prefix": str(d["prefix"]), "code": cache.code_version(CODE_FILES),
             "placeholder_init": [str(w) for w in d["placeholder_init"]],
             "cross_res": list(cfg["attention"]["train_cross_res"])}
    if name in ("sd-finetune", "dreambooth"):
        parts["baselines"] = plain(d["baselines"])
        parts["sampling"] = [int(cfg["sampling"]["num_steps"]), float(cfg["sampling"]["guidance_scale"])]
    return cache.key_hash(parts), parts


def models_dir(cfg: Mapping[str, Any]) -> Path:
    return mini_model_dir(cfg, "derm").parent / "didgen"


def base_model(cfg: Mapping[str, Any], ensure: bool = True, data=None):
    """The derm base model chapter 4 finetunes (mini/smoke: the default pretrained variant, trained now if the
    cache lacks it — as ``ctrlgen pretrain derm`` would; full: SD 2.1). ``data``: the derm ``DomainData``
    if already loaded (the cache check needs its fingerprint)."""
    if ensure and str(cfg["models"]["kind"]) == "mini":
        pretrain_domain(cfg, "derm", default_variant(cfg, "derm") == "selfattn", progress=False, data=data)
    return load_base_model(cfg, "derm")


def _base_key(cfg: Mapping[str, Any]) -> str:
    if str(cfg["models"]["kind"]) != "mini":
        return f"pretrained:{cfg['models']['pretrained'][cfg['models']['domains']['derm']]}"
    info = json.loads((variant_dir(cfg, "derm", default_variant(cfg, "derm")) / "pretrain.json").read_text())
    return str(info["key"])


def finetune(cfg: Mapping[str, Any], name: str, sets, progress: bool = False, force: bool = False,
             seed: int | None = None) -> Finetuned:
    """The finetuned model ``name`` (one of ``MODEL_NAMES``), loaded from the cache or trained now.

    ``seed``: the training seed (default the profile's ``seed``); another seed is a replicate for the claims ledger
    (``claims.seeds``), kept in its own folder ``<name>-seed<seed>`` so that replicates never evict each other."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown chapter-4 model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    seed = int(cfg["seed"]) if seed is None else int(seed)
    key, parts = _key(cfg, name, _base_key(cfg), sets, seed)
    folder = models_dir(cfg) / (name if seed == int(cfg["seed"]) else f"{name}-seed{seed}")
    info = None if force else cache.cached_record(folder, "didgen.json", key, "unet")
    if info is not None:
        model = load_components(folder, name=f"didgen/{name}")
        return Finetuned(name, model, folder, True, info["history"], info["train_seconds"], key, info.get("extra", {}))
    work = cache.work_dir(models_dir(cfg), f"{name}-{key}", fresh=force)
    start = time.perf_counter()
    model = base_model(cfg, ensure=False)
    history, extra = _train(cfg, name, model, sets, work, progress, seed)
    seconds = time.perf_counter() - start
    info = {"key": key, "key_parts": parts, "history": history, "train_seconds": seconds, "extra": extra}
    cache.save_folder(folder, model.save, "didgen.json", info, work)
    model.unet.eval()
    return Finetuned(name, model, folder, False, history, seconds, key, extra)


def _train(cfg, name: str, model, sets, work: Path, progress: bool, seed: int | None = None) -> tuple[list[dict], dict]:
    f, b = cfg["didgen"]["finetune"], cfg["didgen"]["baselines"]
    seed = int(cfg["seed"]) if seed is None else int(seed)
    ckpt = {"checkpoint_every": int(cfg["training"]["checkpoint_every"]), "keep_checkpoints": 2,
            "mixed_precision": str(cfg["training"]["mixed_precision"])}
    if name in ("mine", "mine-noregion"):
        rc = RegionAwareConfig.from_profile(cfg, seed=seed, **({"alpha": 0.0} if name == "mine-noregion" else {}))
        # §4.3.3: the P-Tokens start from the embeddings of the profile's words (didgen.placeholder_init); a token the
        # base model already has (the mini base models learn <lesion>/<skin> in pretraining) keeps its embedding
        tokens = setup_placeholders(model, PLACEHOLDERS, tuple(str(w) for w in cfg["didgen"]["placeholder_init"]))
        res, _ = region_aware_finetune(model, sets.train_images, sets.train_masks, sets.prompts, rc, output_dir=str(work),
                                       train_config=ckpt, tokens=tokens, progress=progress)
        return res.history, {"alpha": rc.alpha}
    # the same data as the region-aware run: with precompute_latents every image's VAE latent (the posterior mean
    # for an AutoencoderKL) is encoded once, without flips, for all four models — for time only: the VAE encoder then
    # runs once per image instead of at every step
    common = dict(steps=int(f["steps"]), batch_size=int(f["batch_size"]), lr=float(f["lr"]),
                  weight_decay=float(f["weight_decay"]), adam_betas=tuple(f["adam_betas"]), adam_eps=f["adam_eps"],
                  seed=seed, output_dir=str(work), train_config=ckpt,
                  progress=progress, precompute_latents=bool(f["precompute_latents"]))
    if name == "sd-finetune":
        return sd_finetune(model, sets.train_images, prompt=str(b["prompt"]), **common).history, {"prompt": str(b["prompt"])}
    s = cfg["sampling"]
    class_images = generate_class_images(model, str(b["dreambooth_class_prompt"]), int(b["dreambooth_class_images"]),
                                         int(s["num_steps"]), float(s["guidance_scale"]), seed=seed)
    res = dreambooth_finetune(model, sets.train_images, class_images, prior_weight=float(b["dreambooth_prior_weight"]),
                              instance_prompt=str(b["prompt"]), class_prompt=str(b["dreambooth_class_prompt"]), **common)
    return res.history, {"prompt": str(b["prompt"]), "class_prompt": str(b["dreambooth_class_prompt"]),
                         "class_images": int(len(class_images))}


__all__ = ["MODEL_NAMES", "CODE_FILES", "Finetuned", "finetune", "models_dir", "base_model"]
