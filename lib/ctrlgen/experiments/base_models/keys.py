"""Cache keys and folders of the base models (chapter 2's pretraining, ``ctrlgen.experiments.base_models``).

Every model folder carries ``pretrain.json`` with its key = hash of (profile name, the profile values that
affect the training, the data fingerprint, the code version = hash of the library files training depends
on). The default variant lives in ``mini_model_dir(cfg, domain)`` (what ``load_base_model`` returns), the
other in the sibling ``<domain>-<variant>``; the shared VAE in ``<domain>-vae``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctrlgen.models import cache
from ctrlgen.models.registry import mini_model_dir, models_root

VARIANTS = ("selfattn", "plain")
# library files whose change must retrain the models (the code version of the cache key): the VAE's
# (a change to the U-Net's training alone must not retrain the shared VAE), then the U-Net's on top
VAE_CODE_FILES = ("experiments/base_models/train.py", "experiments/base_models/keys.py", "data/domains.py",
                  "data/batches.py", "models/mini.py", "models/sd.py", "models/tokenizer.py", "training/losses.py",
                  "training/vae.py", "training/checkpoint.py", "data/attributes.py", "data/tensors.py")
CODE_FILES = VAE_CODE_FILES + ("training/region_loss.py", "experiments/base_models/measure.py", "training/loop.py",
                               "training/params.py", "attention/capture.py", "attention/layers.py")
# files only one domain's training reads (a change there retrains that domain only)
DOMAIN_CODE_FILES = {"cxr": ("data/anatomy.py",)}


def code_version(domain: str = "", files: tuple[str, ...] = CODE_FILES) -> str:
    """Hash of the library ``files`` the training of ``domain`` depends on (+ its ``DOMAIN_CODE_FILES``)."""
    return cache.code_version(files + DOMAIN_CODE_FILES.get(domain, ()))


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def vae_key_parts(cfg: Mapping[str, Any], fingerprint: str, domain: str = "") -> dict[str, Any]:
    p = cfg["pretrain"]
    return {"profile": getattr(cfg, "profile_name", "") or "custom", "seed": int(cfg["seed"]),
            "image_size": int(cfg["models"]["image_size"]), "vae": cache.plain(cfg["models"]["mini"]["vae"]),
            "train": _without(cache.plain(p["vae"]), "checkpoint_every"), "max_train": int(p["max_train"]), "n_heldout": int(p["n_heldout"]),
            "data": fingerprint, "code": code_version(domain, VAE_CODE_FILES)}


def unet_key_parts(cfg: Mapping[str, Any], fingerprint: str, variant: str, domain: str = "") -> dict[str, Any]:
    """What the U-Net/text-encoder model of ``variant`` depends on (the cache key is its hash)."""
    p = cfg["pretrain"]
    unet = cache.plain(p["unet"])
    unet["steps"] = variant_steps(cfg, variant)
    unet.pop("plain_steps", None)
    unet.pop("checkpoint_every", None)  # where a run may resume does not change the model
    parts = {**vae_key_parts(cfg, fingerprint, domain), "unet_code": code_version(domain), "variant": variant, "mini": cache.plain(cfg["models"]["mini"]), "unet": unet,
             "low_contrast_threshold": float(cfg["data"]["attributes"]["low_contrast_threshold"])}
    if variant == "selfattn":
        parts["self_attention_loss"] = cache.plain(p["self_attention_loss"])
    return parts


def variant_steps(cfg: Mapping[str, Any], variant: str) -> int:
    u = cfg["pretrain"]["unet"]
    return int(u["steps"] if variant == "selfattn" else u["plain_steps"])


def snapshot_steps(cfg: Mapping[str, Any], variant: str) -> list[int]:
    """Steps at which the default variant's training keeps an EMA snapshot for chapter 2's quality-against-
    minutes curve (``pretrain.unet.curve_points`` points in all: these and the final model)."""
    if variant != cfg["pretrain"]["default_variant"]:
        return []
    steps, points = variant_steps(cfg, variant), int(cfg["pretrain"]["unet"]["curve_points"])
    return sorted({round(steps * k / points) for k in range(1, points)} - {0, steps})


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


def work_dir(cfg: Mapping[str, Any], name: str, fresh: bool = False) -> Path:
    """Where an unfinished training keeps its checkpoints (resumed by the next call with the same key)."""
    return cache.work_dir(models_root(cfg) / f"mini-{getattr(cfg, 'profile_name', '') or 'custom'}", name, fresh)


__all__ = ["VARIANTS", "VAE_CODE_FILES", "CODE_FILES", "DOMAIN_CODE_FILES", "code_version", "snapshot_steps", "vae_key_parts", "unet_key_parts",
           "variant_steps", "variant_dir", "vae_dir", "available_variants", "default_variant", "work_dir"]
