"""Which model the profile names, where its local folder is, and whether it is there.

Models root: ``models.root`` if absolute; relative to the project if relative; else
``<cache_root>/models``. A pretrained source (``models.pretrained.*``) is either a local path
(absolute, or relative to the models root) or a hub id ``org/name`` whose local copy lives in
``<models root>/org--name`` (what ``ctrlgen models fetch`` writes). Nothing is downloaded unless
``models.allow_download`` is true or the user runs ``fetch``; with ``HF_HUB_OFFLINE=1`` a missing
model stops with one message naming the folder and what should be in it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctrlgen.paths import cache_root, project_root

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def models_root(cfg: Mapping[str, Any]) -> Path:
    """Root of the local model folders (see module docstring)."""
    root = str(cfg["models"]["root"] or "")
    if root:
        p = Path(root).expanduser()
        return p if p.is_absolute() else project_root() / p
    return cache_root(cfg) / "models"


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not Path(source).expanduser().is_absolute() and not source.startswith(".")


def local_folder(cfg: Mapping[str, Any], source: str) -> Path:
    """Local folder for ``source``: the path itself, or ``<models root>/org--name`` for a hub id."""
    p = Path(source).expanduser()
    if p.is_absolute():
        return p
    root = models_root(cfg)
    if (root / p).exists() or not is_hub_id(source):
        return root / p
    return root / source.replace("/", "--")


def mini_model_dir(cfg: Mapping[str, Any], domain: str) -> Path:
    """Where ``ctrlgen pretrain DOMAIN`` keeps the mini base model of a profile (diffusers layout)."""
    profile = getattr(cfg, "profile_name", "") or "custom"
    return models_root(cfg) / f"mini-{profile}" / domain


@dataclass(frozen=True)
class ModelStatus:
    """One model the profile names: its key, source, local folder, and what is missing there."""

    key: str
    source: str
    folder: Path
    missing: tuple[str, ...]

    @property
    def present(self) -> bool:
        return not self.missing


def _status(key: str, source: str, folder: Path) -> ModelStatus:
    from ctrlgen.models.sd import missing_parts

    if not folder.is_dir():
        return ModelStatus(key, source, folder, ("the whole folder",))
    return ModelStatus(key, source, folder, tuple(missing_parts(folder)))


def pretrained_sources(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{"models.pretrained.sd21": "stabilityai/stable-diffusion-2-1-base", ...}`` — the SD checkpoints."""
    pre = cfg["models"]["pretrained"]
    return {f"models.pretrained.{k}": str(v) for k, v in pre.items() if k != "revision" and v}


def check_models(cfg: Mapping[str, Any], domains: tuple[str, ...] | None = None) -> list[ModelStatus]:
    """Status of every model the profile needs: SD checkpoints (kind pretrained) or the mini base models."""
    models = cfg["models"]
    out: list[ModelStatus] = []
    if models["kind"] == "pretrained":
        for key, source in pretrained_sources(cfg).items():
            out.append(_status(key, source, local_folder(cfg, source)))
    else:
        for domain in domains or tuple(models["domains"]):
            out.append(_status(f"mini/{domain}", f"ctrlgen pretrain {domain} --profile {getattr(cfg, 'profile_name', '')}",
                               mini_model_dir(cfg, domain)))
    return out


def load_base_model(cfg: Mapping[str, Any], domain: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None):
    """The base latent diffusion model of ``domain`` ("derm", "scenes", "cxr") for this profile.

    Full profile: the SD checkpoint ``models.domains[domain]`` names (SD 2.1-base or SD 1.4).
    Mini/smoke: the model ``ctrlgen pretrain DOMAIN`` saved under ``mini_model_dir``.
    Raises ``ModelNotFoundError`` with the folder and the command that fills it.
    """
    from ctrlgen.models.sd import ModelNotFoundError, load_components, missing_parts

    models = cfg["models"]
    if domain not in models["domains"]:
        raise KeyError(f"unknown domain {domain!r}; known: {', '.join(models['domains'])}")
    dtype = dtype or (DTYPES[models["dtype"]] if str(device).startswith("cuda") else torch.float32)
    if models["kind"] == "mini":
        folder = mini_model_dir(cfg, domain)
        if not folder.is_dir() or missing_parts(folder):
            raise ModelNotFoundError(f"no mini {domain} model at {folder}: run `ctrlgen pretrain {domain} --profile "
                                     f"{getattr(cfg, 'profile_name', '')}` first")
        return load_components(folder, dtype=dtype, name=f"mini/{domain}").to(device)
    key = str(models["domains"][domain])
    source = str(models["pretrained"][key])
    folder = local_folder(cfg, source)
    if folder.is_dir():
        return load_components(folder, dtype=dtype, name=source).to(device)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not models["allow_download"]
    if offline or not is_hub_id(source):
        raise ModelNotFoundError(
            f"{key} ({source}) is not at {folder}. Put a diffusers-layout folder there (unet/, vae/, text_encoder/, "
            f"tokenizer/, scheduler/) or run `ctrlgen models fetch --profile {getattr(cfg, 'profile_name', 'full')}`")
    return load_components(source, revision=str(models["pretrained"]["revision"]), local_files_only=False,
                           dtype=dtype, name=source).to(device)


FETCH_PATTERNS = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "unet/diffusion_pytorch_model.safetensors",
                  "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]


def fetch_models(cfg: Mapping[str, Any], only: tuple[str, ...] = ()) -> list[ModelStatus]:
    """Download every SD checkpoint the profile names into its local folder (huggingface_hub).

    Only the diffusers components in safetensors form are fetched. ``only`` restricts to keys such
    as ``sd21``. Refuses to run with ``HF_HUB_OFFLINE=1``.
    """
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise RuntimeError("HF_HUB_OFFLINE is set: unset it to let `ctrlgen models fetch` download")
    from huggingface_hub import snapshot_download

    done = []
    for key, source in pretrained_sources(cfg).items():
        if only and key.rsplit(".", 1)[-1] not in only:
            continue
        folder = local_folder(cfg, source)
        if is_hub_id(source):
            folder.mkdir(parents=True, exist_ok=True)
            snapshot_download(repo_id=source, revision=str(cfg["models"]["pretrained"]["revision"]) or None,
                              local_dir=str(folder), allow_patterns=FETCH_PATTERNS)
        done.append(_status(key, source, folder))
    return done
