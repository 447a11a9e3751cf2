"""Pretraining the book's base models (chapter 2): the stand-in for the public SD checkpoints.

``pretrain_domain(cfg, domain, self_attention_loss)`` trains, for one image domain (``derm``, ``scenes``,
``cxr``; the data and captions are ``ctrlgen.data.domains``), a mini VAE, then a CLIP text encoder and a
U-Net jointly from scratch (``ctrlgen.models.build_mini_components``), on the real data under the data root
when present, else on the procedural worlds.

Two variants per domain (``pretrain.variants``): ``selfattn`` adds an auxiliary self-attention
structure loss (``RegionSelfAttentionTerm``: the head/layer-mean self-attention mass each query
pixel sends to other regions of the true masks, NOTES-mini-feasibility.md) to L_rec; ``plain`` is
L_rec alone. The VAE is trained once per domain and shared by both.

Cache (``keys``): a complete model folder with the same key is loaded instead of trained. Training
happens in ``<models>/mini-<profile>/.work/`` with checkpoints every ``pretrain.unet.checkpoint_every``
steps (an interrupted run resumes there) and the finished model is renamed into place.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ctrlgen.analysis.quality import psnr
from ctrlgen.data import domains
from ctrlgen.data.batches import Batches
from ctrlgen.data.domains import DomainData
from ctrlgen.data.tensors import image_tensor, region_maps
from ctrlgen.experiments.base_models.keys import (available_variants, default_variant, snapshot_steps, unet_key_parts,
                                                  vae_dir, vae_key_parts, variant_dir, variant_steps, work_dir)
from ctrlgen.experiments.base_models.measure import measure_model
from ctrlgen.methods.cxr_irgen.prompts import prompt_vocabulary as cxr_prompt_vocabulary
from ctrlgen.methods.didgen.dermprompt import dermprompt_vocabulary
from ctrlgen.models import (ModelNotFoundError, build_caption_tokenizer, build_mini_components, encode_latents,
                            load_components, load_tokenizer, load_vae, save_tokenizer)
from ctrlgen.models import cache
from ctrlgen.training import (RegionSelfAttentionTerm, TrainConfig, VAETrainConfig, load_trainable, select_trainable,
                              train_diffusion, train_vae)
from ctrlgen.training.checkpoint import latest_checkpoint


def load_domain_data(cfg: Mapping[str, Any], domain: str) -> DomainData:
    """``ctrlgen.data.domains.load_domain_data`` with the base models' extra vocabulary in the fingerprint
    (it shapes the tokenizer, so it is part of the data the models are keyed by)."""
    return domains.load_domain_data(cfg, domain, extra_vocabulary(domain))


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
    snapshots: list[dict[str, float]] = field(default_factory=list)  # {"step", "train_seconds"} of the curve points
    curve_seconds: float = 0.0  # VAE + U-Net training time of the final model (the curve's last point), cached or not

    @property
    def is_default(self) -> bool:
        return self.folder.name == self.domain


def _components_from_vae(cfg, data: DomainData, vae_folder: Path, seed: int):
    tok = load_tokenizer(vae_folder / "tokenizer")
    model = build_mini_components(cfg, tok, seed=seed, name=f"mini/{data.domain}")
    model.vae = load_vae(vae_folder / "vae").eval()
    return model


def _build_tokenizer(cfg, data: DomainData):
    t = cfg["models"]["mini"]["tokenizer"]
    tok = build_caption_tokenizer(tokenizer_corpus(data), int(t["max_vocab"]), int(t["min_frequency"]),
                                  model_max_length=int(cfg["models"]["mini"]["text_encoder"]["max_length"]))
    if data.tokens:
        tok.add_tokens(list(data.tokens))
    return tok


def extra_vocabulary(domain: str) -> list[str]:
    """Texts beyond the captions whose words must be single tokens: for derm every phrase the DermPrompt
    attribute captioner can write and the baselines' prompt (chapter 4 finetunes with them); for cxr every
    CXR-IRGen label prompt (chapter 6 finetunes with them, §6.3.1). Scenes need none: chapter 3's
    customization concepts are held-out combinations of pretraining words (§3.6.1)."""
    if domain == "derm":
        return dermprompt_vocabulary() + ["An image of lesion on skin.", "An image of skin."]
    if domain == "cxr":
        return cxr_prompt_vocabulary()
    return []


def tokenizer_corpus(data: DomainData) -> list[str]:
    """The texts the domain's tokenizer vocabulary is built from: its captions and ``extra_vocabulary``."""
    return data.captions + data.heldout_captions + extra_vocabulary(data.domain)


def ensure_vae(cfg: Mapping[str, Any], data: DomainData, force: bool = False, progress: bool = True) -> tuple[Path, dict, bool]:
    """The domain's VAE (+ tokenizer) folder, trained unless a complete one with the same key exists."""
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
    work = work_dir(cfg, f"{data.domain}-vae-{key}", fresh=force)
    spent = cache.read_json(work / "seconds.json") or {"seconds": 0.0}
    res = train_vae(model.vae, Batches({"pixel_values": x}, int(p["batch_size"]), seed, augment=True),
                    VAETrainConfig(steps=int(p["steps"]), lr=float(p["lr"]), seed=seed, progress=progress,
                                   output_dir=str(work), checkpoint_every=int(p["checkpoint_every"])))
    (work / "seconds.json").write_text(json.dumps({"seconds": spent["seconds"] + time.perf_counter() - start}))
    with torch.no_grad():
        hx = image_tensor(data.heldout_images)
        rec = model.vae.decode(encode_latents(model.vae, hx)).sample.clamp(-1, 1)
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


SNAPSHOTS = "snapshots"


def _save_snapshot(work: Path, model, step: int, train_seconds: float) -> dict[str, float]:
    """The EMA U-Net and text encoder at ``step`` (``train_diffusion`` leaves the EMA weights in the model)."""
    folder = work / SNAPSHOTS / f"step-{step}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.unet.save_pretrained(tmp / "unet")
    model.text_encoder.save_pretrained(tmp / "text_encoder")
    record = {"step": step, "train_seconds": train_seconds}
    (tmp / "snapshot.json").write_text(json.dumps(record))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a snapshot folder is complete or absent
    return record


def _snapshots(work: Path) -> list[dict[str, float]]:
    """The snapshot records already written in ``work`` (a resumed run keeps them), by step."""
    files = (work / SNAPSHOTS).glob("step-*/snapshot.json") if (work / SNAPSHOTS).is_dir() else []
    return sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["step"])


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
                              train_seconds=info["train_seconds"], resumed_from=info.get("resumed_from", 0),
                              snapshots=info.get("snapshots", []), curve_seconds=info.get("curve_seconds", 0.0))
    vfolder, vinfo, vae_cached = ensure_vae(cfg, data, force=force if force_vae is None else force_vae, progress=progress)
    seed = int(cfg["seed"])
    model = _components_from_vae(cfg, data, vfolder, seed)
    p = cfg["pretrain"]
    u = p["unet"]
    steps = variant_steps(cfg, variant)
    work = work_dir(cfg, f"{domain}-{variant}-{key}", fresh=force)
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
    marks = snapshot_steps(cfg, variant)
    target = min(steps, resumed_from + stop_after) if stop_after > 0 else steps
    step = resumed_from
    while step < target:
        end = min([target, (step // every + 1) * every] + [m for m in marks if m > step])
        t_chunk = time.perf_counter()
        tc = TrainConfig(steps=end, lr=float(u["lr"]), warmup_steps=int(u["warmup_steps"]), prompt_dropout=float(u["prompt_dropout"]),
                         ema_decay=float(u["ema_decay"]), max_grad_norm=float(cfg["training"]["max_grad_norm"]),
                         noise_offset=float(u["noise_offset"]),
                         self_res=tuple(int(r) for r in sa["res"]) if terms else (),
                         self_places=tuple(sa["places"]), checkpoint_every=every, keep_checkpoints=2,
                         output_dir=str(work), resume=True, seed=seed, progress=progress)
        res = train_diffusion(model, batches, tc, trainable, terms)
        history += res.history
        spent += time.perf_counter() - t_chunk
        with hist_file.open("a") as f:
            f.writelines(json.dumps(h) + "\n" for h in res.history)
        (work / "seconds.json").write_text(json.dumps({"seconds": spent}))
        if end in marks:
            _save_snapshot(work, model, end, float(vinfo["seconds"]) + spent)  # the curve counts the VAE's time
        step = end
    if step < steps:  # stopped early on purpose: the checkpoint stays for the next call
        return PretrainResult(**common, cached=False, steps=step, vae_history=vinfo["history"], history=history,
                              metrics={}, seconds=time.perf_counter() - t0, train_seconds=spent, resumed_from=resumed_from)
    # the last train_diffusion call leaves the EMA weights in the model (ema.copy_to); if the run was
    # complete before this call (only the publishing was missing), load the EMA copy from the checkpoint
    if resumed_from >= steps:
        load_trainable(trainable, latest_checkpoint(work), use_ema=True)
    model.unet.eval()
    model.text_encoder.eval()
    trainable.remove_hooks()
    metrics = {**vinfo["metrics"], **measure_model(cfg, model, data, variant, progress=progress)}
    train_seconds = spent + (0.0 if vae_cached else float(vinfo["seconds"]))
    snapshots = _snapshots(work)
    info = {"key": key, "key_parts": parts, "variant": variant, "domain": domain, "steps": steps, "history": history,
            "vae_history": vinfo["history"], "metrics": metrics, "train_seconds": train_seconds,
            "unet_seconds": spent, "vae_seconds": float(vinfo["seconds"]), "resumed_from": resumed_from,
            "snapshots": snapshots, "curve_seconds": spent + float(vinfo["seconds"]), "data": {"dataset": data.dataset, "source": data.source, "provenance": data.provenance,
                     "n_train": len(data.images), "n_heldout": len(data.heldout_images), "notes": data.notes}}
    model.extras = {"ctrlgen_variant": variant, "ctrlgen_key": key}

    def write(tmp: Path) -> None:
        model.save(tmp)
        if snapshots:
            shutil.copytree(work / SNAPSHOTS, tmp / SNAPSHOTS)

    cache.save_folder(folder, write, "pretrain.json", info, work)
    return PretrainResult(**common, cached=False, steps=steps, vae_history=vinfo["history"], history=history,
                          metrics=metrics, seconds=time.perf_counter() - t0, train_seconds=train_seconds,
                          resumed_from=resumed_from, snapshots=snapshots, curve_seconds=info["curve_seconds"])


def load_variant(cfg: Mapping[str, Any], domain: str, variant: str | None = None):
    """Load a pretrained variant (default: the profile's default base model) as ``SDComponents``."""
    variant = variant or default_variant(cfg, domain)
    folder = variant_dir(cfg, domain, variant)
    if not (folder / "pretrain.json").is_file():
        raise ModelNotFoundError(f"no {variant} mini {domain} model at {folder}: run `ctrlgen pretrain {domain} "
                                 f"--profile {getattr(cfg, 'profile_name', '')}`")
    return load_components(folder, name=f"mini/{domain} ({variant})")


def load_snapshot(cfg: Mapping[str, Any], domain: str, step: int):
    """The default variant of ``domain`` as it was at ``step`` of its training (a curve point of chapter 2):
    the final model's VAE and tokenizer with the snapshot's EMA U-Net and text encoder."""
    variant = default_variant(cfg, domain)
    model = load_variant(cfg, domain, variant)
    folder = variant_dir(cfg, domain, variant) / SNAPSHOTS / f"step-{step}"
    if not (folder / "snapshot.json").is_file():
        raise ModelNotFoundError(f"no snapshot at step {step} in {folder.parent}: the model was trained without "
                                 f"pretrain.unet.curve_points, or with other steps")
    model.unet = type(model.unet).from_pretrained(str(folder / "unet")).eval()
    model.text_encoder = type(model.text_encoder).from_pretrained(str(folder / "text_encoder")).eval()
    model.name = f"{model.name} @ step {step}"
    return model


def pretrain_all(cfg: Mapping[str, Any], domain: str, force: bool = False, progress: bool = True) -> dict[str, PretrainResult]:
    """Every variant of a domain (sharing the data and the VAE), the default first."""
    data = load_domain_data(cfg, domain)
    order = sorted(available_variants(cfg, domain), key=lambda v: v != default_variant(cfg, domain))
    return {v: pretrain_domain(cfg, domain, v == "selfattn", force=force, progress=progress, data=data,
                               force_vae=force and i == 0) for i, v in enumerate(order)}


__all__ = ["PretrainResult", "load_domain_data", "extra_vocabulary", "tokenizer_corpus", "ensure_vae", "pretrain_domain",
           "load_variant", "load_snapshot", "pretrain_all"]
