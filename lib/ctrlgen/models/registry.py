"""Which model the profile names, where its local folder is, and whether it is there.

Models root: ``models.root`` if absolute; relative to the project if relative; else
``<cache_root>/models``. A pretrained source (``models.pretrained.*``) is either a local path
(absolute, or relative to the models root) or a hub id ``org/name`` whose local copy lives in
``<models root>/org--name`` (what ``ctrlgen models fetch`` writes). Nothing is downloaded unless
``models.allow_download`` is true or the user runs ``fetch``; with ``HF_HUB_OFFLINE=1`` a missing
model stops with one message naming the folder and what should be in it.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download

from ctrlgen.models.sd import ModelNotFoundError, load_components, missing_parts
from ctrlgen.paths import cache_root, project_root


class _AutoencoderTinyConfigNote(logging.Filter):
    """diffusers' ``AutoencoderTiny`` registers ``block_out_channels`` in its own config (for the pipelines'
    ``vae_scale_factor``) and then, loading that config back, warns that the key is unexpected: every load of a
    mini VAE would print it. This drops exactly that message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("were passed to AutoencoderTiny" in message and "block_out_channels" in message)


logging.getLogger("diffusers.configuration_utils").addFilter(_AutoencoderTinyConfigNote())

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
    expect: str = ""     # what should be at ``folder`` (format, file name, thesis section)

    @property
    def present(self) -> bool:
        return not self.missing


def _status(key: str, source: str, folder: Path) -> ModelStatus:
    if not folder.is_dir():
        return ModelStatus(key, source, folder, ("the whole folder",))
    return ModelStatus(key, source, folder, tuple(missing_parts(folder)))


def pretrained_sources(cfg: Mapping[str, Any]) -> dict[str, str]:
    """``{"models.pretrained.sd21": "stabilityai/stable-diffusion-2-1-base", ...}`` — the SD checkpoints."""
    pre = cfg["models"]["pretrained"]
    return {f"models.pretrained.{k}": str(v) for k, v in pre.items() if k != "revision" and v}


@dataclass(frozen=True)
class WeightSpec:
    """A network the profile names by a path or hub id (at profile key ``path``), besides the SD checkpoints.

    ``kind``: ``transformers`` (a ``from_pretrained`` folder: config.json and weights), ``file`` (one
    state-dict file; relative paths under the models root). ``path`` ending in ``*`` is a mapping of them.
    ``tokenizer``: a transformers folder must also hold tokenizer files. ``unset``: when non-empty, an empty
    profile value is reported as missing ("not set") with this sentence on what runs instead — for weights
    the thesis used that the book can do without (or cannot run without) but the full profile leaves empty.
    """

    path: tuple[str, ...]
    kind: str
    what: str
    tokenizer: bool = True
    unset: str = ""

    @property
    def key(self) -> str:
        return ".".join(self.path)


TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")
FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # = metrics.image.INCEPTION_WEIGHTS_NAME
# The torchvision ImageNet backbones the thesis fine-tunes, and where (models.weights.imagenet.<name>).
IMAGENET_BACKBONES = {
    "vgg16": "§4.4.3 Table 4.2 classifier; §5.4.1 skin-tone ensemble",
    "resnet18": "§4.4.3 Table 4.2 classifier; §5.4.1 Table 5.1",
    "densenet121": "§4.4.3 Table 4.2 classifier; §5.4.1 Table 5.1",
    "vit_b_16": "§4.4.3 Table 4.2 classifier (§4.7.2: ViT Base, 16x16 patches); §5.4.1 skin-tone ensemble",
    "efficientnet_v2_s": "§5.4.1 Table 5.1 (EfficientNet-V2)",
    "mobilenet_v2": "§5.4.1 skin-tone ensemble",
    "resnet34": "§5.4.2 FAT-Net's CNN encoder (segmentation zoo)",
}
# Every weight a profile can name, with what must be at its path. The thesis section is in each line.
WEIGHTS = (
    WeightSpec(("didgen", "dermprompt", "vlm_model"), "transformers",
               "§4.3.2 DermPrompt VLM (Llama-3.2-Vision-Instruct): transformers folder with config.json, weights, "
               "tokenizer and processor files"),
    WeightSpec(("didgen", "metrics", "inception_weights"), "file",
               f"§4.7.1 FID network: torch-fidelity's TF Inception-v3 file {FID_INCEPTION_FILE} (pytorch-fid's "
               "pt_inception-2015-12-05-6726825d.pth is the same network)"),
    WeightSpec(("didgen", "metrics", "alexnet_weights"), "file",
               "§4.7.1 LPIPS backbone: torchvision's AlexNet ImageNet state dict alexnet-owt-7be5be79.pth"),
    WeightSpec(("didgen", "metrics", "lpips_weights"), "file",
               "§4.7.1 LPIPS linear layers: the lpips package's weights/v0.1/alex.pth"),
    WeightSpec(("models", "weights", "clip"), "transformers",
               "§3.4.1 CLIP-I / CLIP-T and §6.3.1 reference image embedding: CLIP ViT-L/14 (openai/clip-vit-large-patch14) "
               "transformers folder"),
    WeightSpec(("models", "weights", "dino"), "transformers",
               "§3.4.1, §5.5.2 DINO score: DINOv2 ViT-B/14 (facebook/dinov2-base) transformers folder", tokenizer=False),
    WeightSpec(("models", "weights", "bart"), "transformers",
               "§6.3.2 CXR-IRGen language module: BART base (facebook/bart-base) transformers folder"),
    WeightSpec(("models", "weights", "xrv_densenet"), "file",
               "§6.4.3 AUROC classifier: torchxrayvision DenseNet-121 'densenet121-res224-all' weights file"),
    WeightSpec(("models", "weights", "imagenet", "*"), "file",
               "torchvision ImageNet state dict of {name} (the file torchvision publishes): {where}"),
    WeightSpec(("gan_baselines", "pix2pixhd", "vgg_weights"), "file",
               "§4.4.4 Pix2PixHD perceptual loss: torchvision VGG19 ImageNet state dict vgg19-dcbb9e9d.pth"),
    WeightSpec(("ch06", "vision", "clip_image_encoder"), "transformers",
               "§6.3.1 CXR-IRGen reference-image embedding: CLIP ViT-L/14 image tower (openai/clip-vit-large-patch14) "
               "as a transformers CLIPVisionModelWithProjection folder", tokenizer=False,
               unset="chapter 6 stops on the full profile until it is set (ch06.vision.image_encoder is 'clip')"),
    WeightSpec(("ch06", "vision", "uvit", "weights"), "file",
               "§6.3.1 'a pre-trained U-ViT backbone': a state dict of the book's U-ViT (ch06.vision.uvit width/depth/"
               "heads/patch_size)",
               unset="the U-ViT backbone is trained from scratch (the thesis starts from a pre-trained one)"),
    WeightSpec(("ch06", "language", "bart"), "transformers",
               "§6.3.2 CXR-IRGen language module: BART base (facebook/bart-base) transformers folder with its "
               "tokenizer",
               unset="a small BART of ch06.language d_model/layers/heads/ffn is trained from scratch (the thesis "
                     "finetunes BART)"),
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def _setting(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError):
            return None
    return node


def _weight_entries(cfg: Mapping[str, Any]) -> list[tuple[str, str, WeightSpec]]:
    """(profile key, source, spec) of every non-empty weight setting; ``*`` expands a mapping of sources."""
    out = []
    full = _setting(cfg, "models.kind") == "pretrained"  # only paper scale needs what the thesis used
    for spec in WEIGHTS:
        if spec.path[-1] == "*":
            group = _setting(cfg, ".".join(spec.path[:-1])) or {}
            out += [(".".join((*spec.path[:-1], name)), str(v),
                     replace(spec, what=spec.what.format(name=name, where=IMAGENET_BACKBONES.get(name, "a backbone"))))
                    for name, v in group.items() if str(v or "")]
        elif str(_setting(cfg, spec.key) or "") or (spec.unset and full and _setting(cfg, spec.key) is not None):
            out.append((spec.key, str(_setting(cfg, spec.key) or ""), spec))
    return out


def weight_path(cfg: Mapping[str, Any], source: str, kind: str) -> Path:
    """Local path of a weight: absolute as is; a file relative to the models root; a folder via ``local_folder``."""
    if kind == "file":
        p = Path(source).expanduser()
        return p if p.is_absolute() else models_root(cfg) / p
    return local_folder(cfg, source)


def _missing_transformers(folder: Path, needs_tokenizer: bool) -> list[str]:
    if not folder.is_dir():
        return ["the whole folder"]
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / f).is_file() for f in TRANSFORMERS_WEIGHTS):
        missing.append("weights (model.safetensors or its index)")
    if needs_tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files")
    return missing


def weight_status(cfg: Mapping[str, Any], key: str, source: str, spec: WeightSpec) -> ModelStatus:
    """Whether the weight ``key`` names is where the profile says, and what is missing there."""
    if not source:  # an empty setting listed because the thesis used this weight (``WeightSpec.unset``)
        return ModelStatus(key, "", Path(f"<not set: set {key}>"), ("not set",), f"{spec.what}; meanwhile {spec.unset}")
    path = weight_path(cfg, source, spec.kind)
    if spec.kind == "file":
        missing = [] if path.is_file() else ["the file"]
    else:
        missing = _missing_transformers(path, needs_tokenizer=spec.tokenizer)
    return ModelStatus(key, source, path, tuple(missing), spec.what)


def check_models(cfg: Mapping[str, Any], domains: tuple[str, ...] | None = None) -> list[ModelStatus]:
    """Status of every model the profile names: SD checkpoints (kind pretrained) or the mini base models,
    then every further weight it names by a non-empty path (``WEIGHTS``: VLM, FID/LPIPS networks, CLIP,
    DINOv2, BART, the torchxrayvision DenseNet, ImageNet backbones, Pix2PixHD's VGG19, chapter 6's CLIP image
    tower, U-ViT and BART), each with what is expected there; an empty setting of a weight the thesis used
    (``WeightSpec.unset``) is listed as "not set" with what runs instead."""
    models = cfg["models"]
    out: list[ModelStatus] = []
    if models["kind"] == "pretrained":
        for key, source in pretrained_sources(cfg).items():
            status = _status(key, source, local_folder(cfg, source))
            out.append(ModelStatus(status.key, source, status.folder, status.missing,
                                   "Stable Diffusion in diffusers layout (model_index.json, unet/, vae/, text_encoder/, "
                                   "tokenizer/, scheduler/)"))
    else:
        for domain in domains or tuple(models["domains"]):
            out.append(_status(f"mini/{domain}", f"ctrlgen pretrain {domain} --profile {getattr(cfg, 'profile_name', '')}",
                               mini_model_dir(cfg, domain)))
    out += [weight_status(cfg, key, source, spec) for key, source, spec in _weight_entries(cfg)]
    return out


def load_base_model(cfg: Mapping[str, Any], domain: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None):
    """The base latent diffusion model of ``domain`` ("derm", "scenes", "cxr") for this profile.

    Full profile: the SD checkpoint ``models.domains[domain]`` names (SD 2.1-base or SD 1.4).
    Mini/smoke: the model ``ctrlgen pretrain DOMAIN`` saved under ``mini_model_dir``.
    Raises ``ModelNotFoundError`` with the folder and the command that fills it.
    """
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
