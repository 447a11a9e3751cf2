"""Stable Diffusion components: load a checkpoint, build the published architectures, encode and decode.

``SDComponents`` bundles what every method needs (VAE, U-Net, CLIP text encoder, tokenizer and
the training noise schedule) whether it holds SD 2.1 / SD 1.4 weights (full profile) or the book's
own mini models: the code path is the same.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ctrlgen.data.tensors import image_tensor
from ctrlgen.models.tokenizer import build_caption_tokenizer

ARCHES = ("sd21_base", "sd14")
SCHEDULERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "ddpm": DDPMScheduler}


class ModelNotFoundError(FileNotFoundError):
    """A model folder or hub id that cannot be used offline; the message says what should be where."""


def published_config(arch: str, component: Literal["unet", "vae", "text_encoder", "scheduler"]) -> dict[str, Any]:
    """The published ``config.json`` of a component of ``arch`` ("sd21_base" or "sd14"), shipped with the package."""
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHES)}")
    text = resources.files("ctrlgen.models").joinpath("configs", arch, f"{component}.json").read_text()
    return json.loads(text)


SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas",
                 "rescale_betas_zero_snr", "timestep_spacing")


def schedule_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The noise-schedule keys of a model's scheduler config that every diffusers scheduler shares.

    ``rescale_betas_zero_snr`` with ``prediction_type: v_prediction`` and ``timestep_spacing: trailing`` is the
    zero-terminal-SNR schedule of Lin et al. (2024, "Common diffusion noise schedules and sample steps are
    flawed"): ᾱ_T = 0, so nothing of the image survives at t = T and sampling starts where training ended.
    """
    base = {k: config[k] for k in SCHEDULE_KEYS if k in config and config[k] is not None}
    if base.get("rescale_betas_zero_snr") and base.get("prediction_type", "epsilon") == "epsilon":
        raise ValueError("the scheduler config (profile key models.mini.scheduler for the mini models) sets "
                         "rescale_betas_zero_snr: true with prediction_type: epsilon; set prediction_type: v_prediction "
                         "(ε cannot be predicted at t = T where ᾱ_T = 0)")
    return base


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to predict for ``add_noise(latents, noise, t)``: ε, v = √ᾱ_t ε − √(1−ᾱ_t) z_0
    (diffusers' ``get_velocity``; the zero-terminal-SNR mini models), or z_0 itself, by the scheduler's
    ``prediction_type``. The one place the training loop, the held-out loss and the benchmark take it from."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config; expected one of {', '.join(PREDICTION_TYPES)}")


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A diffusers scheduler ``name`` (ddim, pndm, ddpm) with the noise schedule ``config`` of a model.

    DDIM uses ``set_alpha_to_one=False`` and ``steps_offset=1`` like the SD pipelines, so that its
    timesteps match ``DDIMInverseScheduler`` (inversion) exactly.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    base = schedule_kwargs(config)
    if name == "pndm" and base.get("rescale_betas_zero_snr"):
        # PNDM divides by ᾱ_t, which a zero-terminal-SNR schedule sets to 0 at t = T
        raise ValueError("the pndm scheduler cannot sample a zero-terminal-SNR schedule "
                         "(rescale_betas_zero_snr: true); use sampling.scheduler: ddim or ddpm")
    extra: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    if name == "pndm":
        extra = {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}
    if name == "ddpm":
        extra = {"clip_sample": False, "steps_offset": 1}
    return SCHEDULERS[name](**base, **extra)


VAE = AutoencoderKL | AutoencoderTiny
VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def vae_levels(vae: VAE) -> int:
    """Resolution levels of a VAE (image side / latent side = 2^(levels − 1))."""
    cfg = vae.config
    return len(cfg.encoder_block_out_channels if isinstance(vae, AutoencoderTiny) else cfg.block_out_channels)


def encode_latents(vae: VAE, images: torch.Tensor, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Unscaled latents E(x) of images in [-1, 1]: ``AutoencoderKL``'s posterior mean (or a draw with ``sample``),
    ``AutoencoderTiny``'s deterministic latents (the mini VAE; ``sample`` has nothing to draw there)."""
    if isinstance(vae, AutoencoderTiny):
        return vae.encode(images).latents
    dist = vae.encode(images).latent_dist
    return dist.sample(generator) if sample else dist.mode()


def load_vae(folder: str | Path, subfolder: str | None = None, **kwargs: Any) -> VAE:
    """A saved VAE of either class, chosen by the ``_class_name`` its ``config.json`` records (``kwargs`` go to
    ``from_pretrained``: revision, local_files_only, torch_dtype)."""
    where = {k: kwargs[k] for k in ("revision", "local_files_only") if k in kwargs}
    name = AutoencoderKL.load_config(str(folder), subfolder=subfolder, **where).get("_class_name", "AutoencoderKL")
    if name not in VAE_CLASSES:
        raise ValueError(f"{folder}: VAE class {name!r} is not supported; expected one of {', '.join(VAE_CLASSES)}")
    return VAE_CLASSES[name].from_pretrained(str(folder), subfolder=subfolder, **kwargs)


@dataclass
class SDComponents:
    """VAE, U-Net, text encoder, tokenizer and noise schedule of one latent diffusion model."""

    vae: VAE
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    name: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Image side / latent side (8 for SD, 4 for the mini VAE)."""
        return 2 ** (vae_levels(self.vae) - 1)

    @property
    def scaling_factor(self) -> float:
        """Latent scale: z = scaling_factor * E(x) (0.18215 for SD)."""
        return float(self.vae.config.scaling_factor)

    def latent_size(self, image_size: int) -> int:
        return image_size // self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SDComponents":
        for m in (self.vae, self.unet, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    def scheduler(self, name: str = "ddim"):
        """A fresh sampling scheduler (ddim, pndm, ddpm) on this model's noise schedule."""
        return make_scheduler(name, self.scheduler_config)

    def noise_scheduler(self) -> DDPMScheduler:
        """The training noise schedule (adds noise, Eq. 4.1)."""
        return make_scheduler("ddpm", self.scheduler_config)

    # -- text and images ------------------------------------------------------------------------------
    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings τ_θ(y) ``(B, L, D)``: the text encoder's last hidden state, as SD uses it."""
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Tokenise and encode prompts (padded to the tokenizer's ``model_max_length``)."""
        return self.encode_ids(self.tokenize(prompts))

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents ``z = scaling_factor * E(x)`` of images in [-1, 1] ``(B, 3, H, W)`` (an ``AutoencoderKL``'s
        posterior mean unless ``sample``; an ``AutoencoderTiny``'s are deterministic)."""
        return encode_latents(self.vae, images.to(self.vae.device, self.vae.dtype), sample, generator) * self.scaling_factor

    @torch.no_grad()
    def encode_dataset(self, images: np.ndarray | torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """The VAE latents (the posterior mean for an ``AutoencoderKL``) of a whole image set, ``batch_size``
        images at a time, returned on the CPU (training data encoded once). ``images``: uint8/unit-float arrays
        ``(N, H, W, 3)``, converted per batch so the full set never exists as float pixels, or a pixel tensor in
        [-1, 1] ``(N, 3, H, W)``."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = chunk if isinstance(chunk, torch.Tensor) else image_tensor(chunk)
            out.append(self.encode_images(x).cpu())
        return torch.cat(out)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``(B, 3, H, W)`` from latents (inverse of ``encode_images``)."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample

    # -- persistence ------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the diffusers folder layout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        (folder / "scheduler").mkdir(exist_ok=True)
        sched = {"_class_name": "DDPMScheduler", **self.scheduler_config}
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "name": self.name,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", type(self.vae).__name__],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", sched["_class_name"]], **self.extras}, indent=2, default=str))
        return folder


REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def missing_parts(folder: Path) -> list[str]:
    """Component sub-folders of a diffusers layout that ``folder`` lacks (empty when complete)."""
    return [p for p in REQUIRED if not (folder / p).is_dir()]


def load_components(source: str | Path, revision: str | None = None, local_files_only: bool = True,
                    dtype: torch.dtype = torch.float32, name: str = "") -> SDComponents:
    """Load a diffusers-layout Stable Diffusion folder (or hub id, when downloads are allowed).

    Raises ``ModelNotFoundError`` naming the folder and what should be in it when offline and absent.
    """
    path = Path(source)
    if path.exists():
        missing = missing_parts(path)
        if missing:
            raise ModelNotFoundError(f"{path} is not a complete Stable Diffusion folder: missing {', '.join(missing)} "
                                     f"(expected the diffusers layout {', '.join(REQUIRED)})")
    elif local_files_only:
        raise ModelNotFoundError(f"model {source} not found locally and downloads are off")
    kw = dict(revision=revision or None, local_files_only=local_files_only)
    src = str(source)
    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, **kw)
        vae = load_vae(src, subfolder="vae", torch_dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        sched = DDPMScheduler.load_config(src, subfolder="scheduler", **kw)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load Stable Diffusion from {source}: {err}") from err
    sched = {k: v for k, v in dict(sched).items() if not k.startswith("_")}
    for m in (unet, vae, text_encoder):
        m.eval()
    return SDComponents(vae, unet, text_encoder, tokenizer, sched, name=name or str(source))


def build_from_published_config(arch: str, tokenizer: CLIPTokenizer | None = None, seed: int = 0,
                                dtype: torch.dtype = torch.float32, parts: tuple[str, ...] = ("unet", "vae", "text_encoder"),
                                ) -> SDComponents:
    """The real SD 2.1-base / SD 1.4 architectures with random weights (no download).

    ``parts`` limits what is built (others are ``None``) to save memory in tests. Without a
    ``tokenizer`` a tiny CLIP-format one is built (ids below the real 49408-token vocabulary).
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(published_config(arch, "unet")).to(dtype) if "unet" in parts else None
    vae = AutoencoderKL.from_config(published_config(arch, "vae")).to(dtype) if "vae" in parts else None
    te = None
    if "text_encoder" in parts:
        cfg = {k: v for k, v in published_config(arch, "text_encoder").items() if k not in ("architectures", "torch_dtype")}
        te = CLIPTextModel(CLIPTextConfig(**cfg)).to(dtype)
    if tokenizer is None:
        tokenizer = build_caption_tokenizer(["an image of a lesion on skin", "a photo of a cat and a dog"],
                                            model_max_length=77)
    for m in (unet, vae, te):
        if m is not None:
            m.eval()
    sched = {k: v for k, v in published_config(arch, "scheduler").items() if not k.startswith("_")}
    return SDComponents(vae, unet, te, tokenizer, sched, name=f"{arch} (random weights)")
