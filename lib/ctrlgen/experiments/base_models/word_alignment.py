"""Stage B of the scenes base models: word–region alignment (the book's choice, not a step of the thesis).

Why: chapter 3's Stage I cuts each concept's mask out of its identifier's cross-attention map, and the identifier
starts as the class word (§3.3.1, §3.4.1). Stable Diffusion learned where its words are from billions of captions;
the mini scenes model learns from 2,000 captions of one fixed grammar, and after its pretraining (stage A) a bare
class word does not localize: chapter 3's token-attention table found the first-named identifier attending the
background, whatever its word. Stage B continues each stage-A variant of the scenes domain with

    L = L_rec (+ the variant's self-attention structure term) + α·L_attn,

L_attn being the cross-attention alignment loss of Eq. (4.5) (DiDGen's region-aware finetuning uses it the same
way, §4.3.3): every colour, texture and shape word of a caption is pulled to its object's true mask and the
background words to the background. The captions are recomposed at every step from the world's complete ones, the
objects in random order (a word's map must follow the word, not its position); with ``bare_probability`` a caption
is *bare* — its shape words only, chapter 3's prompt grammar ("a photo of circle and square") — else complete.
A bare caption teaches where its words are, not what to draw: it leaves the image's colours unnamed, so with
``bare_reconstruction`` false it enters L_attn only (its L_rec weight is 0; a caption that names no colour would
otherwise teach the model to draw any colour — session 11's probe, where each word was dropped on its own, lost
chapter 2's colour fidelity, 0.80 -> 0.24). Stage B drops whole prompts itself (classifier-free guidance) so that a
dropped prompt has no aligned word; a dropped prompt keeps its L_rec.

Only the scenes domain has a stage B (derm and cxr captions name no object per region), so this module is not one
of ``keys.CODE_FILES``: changing it retrains the scenes stage-B models, never the derm or cxr base models. Its models
live beside stage A's, in ``<domain>-<variant>-words``, keyed by the stage-A model's key, the settings and
``CODE_FILES`` below; an interrupted run resumes from its checkpoints.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrlgen.data.caption_labels import with_complete_captions
from ctrlgen.data.domains import DomainData
from ctrlgen.data.tensors import region_maps
from ctrlgen.analysis.attribute_labels import scene_objects
from ctrlgen.data.worlds.multiconcept import Concept
from ctrlgen.experiments.base_models.keys import variant_dir, work_dir
from ctrlgen.experiments.base_models.train import load_domain_data, load_variant, pretrain_domain
from ctrlgen.models import ModelNotFoundError, load_components
from ctrlgen.models import cache
from ctrlgen.training import (AttentionAlignmentTerm, RegionSelfAttentionTerm, TrainConfig, load_trainable,
                              select_trainable, train_diffusion)
from ctrlgen.training.checkpoint import latest_checkpoint

DOMAIN = "scenes"
# library files whose change must retrain the stage-B models (beside the stage-A model's own key)
CODE_FILES = ("experiments/base_models/word_alignment.py", "training/loop.py", "training/losses.py",
              "training/params.py", "training/region_loss.py", "attention/capture.py", "attention/layers.py",
              "data/tensors.py", "data/caption_labels.py", "analysis/attribute_labels.py")
RECORD = "words.json"
MAX_WORDS = 12            # aligned words per caption: 3 objects x (colour, texture, shape) + background kind and word


@dataclass(frozen=True)
class WordAlignmentSettings:
    """``pretrain.word_alignment`` of the profile (each value's reason is beside it there)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    alpha: float
    bare_probability: float
    bare_reconstruction: bool
    prompt_dropout: float
    ema_decay: float
    checkpoint_every: int

    @classmethod
    def from_profile(cls, cfg: Mapping[str, Any]) -> "WordAlignmentSettings":
        w = cfg["pretrain"]["word_alignment"]
        return cls(**{name: w[name] for name in cls.__dataclass_fields__})


def recompose(objects: Sequence[Concept], background: str, rng: np.random.Generator, bare: bool
              ) -> tuple[list[str], list[int]]:
    """A recomposed caption as words, and the region each word names (k + 1 for object k, 0 for the background
    words, -1 for none), the objects in a random order: complete ("a photo of a red square and a blue striped ring on
    a field background"), or ``bare``, the shape words only ("a photo of ring and square")."""
    words, regions = ["a", "photo", "of"], [-1, -1, -1]
    for n, k in enumerate(rng.permutation(len(objects))):
        o = objects[k]
        written = (o.colour, o.texture) if o.texture != "plain" else (o.colour,)  # "plain" is never written out
        phrase = ([] if bare else ["a", *written]) + [o.shape]
        words += (["and"] if n else []) + phrase
        regions += ([-1] if n else []) + ([] if bare else [-1] + [k + 1] * len(written)) + [k + 1]
    if not bare:
        words += ["on", "a", background, "background"]
        regions += [-1, -1, 0, 0]
    return words, regions


def word_positions(tokenizer, words: Sequence[str], regions: Sequence[int]) -> tuple[list[int], list[int]]:
    """The caption's ids (with start and end tokens, unpadded) and each word's first token position. An aligned word
    (``regions`` >= 0) must be one token of the domain's tokenizer (its vocabulary is built from these captions):
    ``ValueError`` naming it otherwise, and when the caption is longer than the text encoder reads."""
    ids, positions = [tokenizer.bos_token_id], []
    for w, r in zip(words, regions, strict=True):
        piece = tokenizer(w, add_special_tokens=False).input_ids
        if r >= 0 and len(piece) != 1:
            raise ValueError(f"word {w!r} is {len(piece)} tokens of the scenes tokenizer, expected one")
        positions.append(len(ids))
        ids += piece
    ids.append(tokenizer.eos_token_id)
    if len(ids) > tokenizer.model_max_length:
        raise ValueError(f"recomposed caption {' '.join(words)!r} is {len(ids)} tokens, over the text encoder's "
                         f"{tokenizer.model_max_length}")
    return ids, positions


class AlignmentBatches:
    """An endless, deterministic stream of stage-B batches (batch n draws from ``rng(seed, n)``; re-iterating starts
    again at batch 0, so a resumed run that skips ``start`` batches sees exactly the batches it would have seen).

    Each batch: ``latents``, ``input_ids`` of recomposed captions, the aligned words' ``token_indices``,
    ``token_masks`` (their regions at the latent side) and ``token_valid``, ``regions`` for the self-attention
    term, and ``rec_weight`` (0 for a bare caption when ``bare_reconstruction`` is false, else 1)."""

    def __init__(self, latents: torch.Tensor, captions: Sequence[str], labels: np.ndarray, tokenizer,
                 settings: WordAlignmentSettings, seed: int):
        self.latents, self.tokenizer, self.settings, self.seed = latents, tokenizer, settings, seed
        self.scenes = [scene_objects(c) for c in captions]
        k = int(labels.max()) + 1
        self.regions = region_maps(labels, k, latents.shape[-1])  # (N, k, s, s), soft one-hot
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = 0
        while True:
            yield self.batch(np.random.default_rng([self.seed, n]))
            n += 1

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        s = self.settings
        idx = rng.choice(len(self.scenes), size=min(s.batch_size, len(self.scenes)), replace=False)
        length = int(self.tokenizer.model_max_length)
        ids = torch.full((len(idx), length), self.pad, dtype=torch.long)
        token_indices = torch.zeros(len(idx), MAX_WORDS, dtype=torch.long)
        token_region = torch.zeros(len(idx), MAX_WORDS, dtype=torch.long)
        valid = torch.zeros(len(idx), MAX_WORDS, dtype=torch.bool)
        rec_weight = torch.ones(len(idx))
        for row, i in enumerate(idx):
            objects, background = self.scenes[i]
            bare = bool(rng.random() < s.bare_probability)
            words, regions = recompose(objects, background, rng, bare)
            if rng.random() < s.prompt_dropout:
                words, regions = [], []
            elif bare and not s.bare_reconstruction:
                rec_weight[row] = 0.0
            caption_ids, positions = word_positions(self.tokenizer, words, regions)
            ids[row, :len(caption_ids)] = torch.tensor(caption_ids)
            aligned = [(p, r) for p, r in zip(positions, regions) if r >= 0]
            for j, (p, r) in enumerate(aligned):
                token_indices[row, j], token_region[row, j], valid[row, j] = p, r, True
        regions = self.regions[torch.from_numpy(idx)]
        masks = regions.gather(1, token_region[:, :, None, None].expand(-1, -1, *regions.shape[-2:]))
        return {"latents": self.latents[torch.from_numpy(idx)], "input_ids": ids, "token_indices": token_indices,
                "token_masks": masks, "token_valid": valid, "regions": regions, "rec_weight": rec_weight}


def aligned_dir(cfg: Mapping[str, Any], variant: str) -> Path:
    """Folder of the stage-B model of a scenes variant (beside the stage-A one)."""
    return variant_dir(cfg, DOMAIN, variant).with_name(f"{DOMAIN}-{variant}-words")


def key_parts(cfg: Mapping[str, Any], stage_a_key: str, variant: str) -> dict[str, Any]:
    a = cfg["attention"]
    parts = {"stage_a": stage_a_key, "variant": variant, "settings": WordAlignmentSettings.from_profile(cfg).__dict__,
             "seed": int(cfg["seed"]), "cross_res": [int(r) for r in a["train_cross_res"]],
             "max_grad_norm": float(cfg["training"]["max_grad_norm"]), "code": cache.code_version(CODE_FILES)}
    if variant == "selfattn":
        parts["self_attention_loss"] = cache.plain(cfg["pretrain"]["self_attention_loss"])
    return parts


def align_words(cfg: Mapping[str, Any], variant: str, progress: bool = True, data: DomainData | None = None,
                stop_after: int = 0) -> dict[str, Any]:
    """Train (or find in the cache) the stage-B model of scenes ``variant``; returns its record (``words.json``:
    key, history, seconds). ``stop_after`` > 0 stops after that many steps of this call, leaving a checkpoint that
    the next call resumes from (tests simulate an interruption with it); the record then has ``"finished": False``."""
    data = data or load_domain_data(cfg, DOMAIN)
    stage_a = pretrain_domain(cfg, DOMAIN, variant == "selfattn", progress=progress, data=data)
    parts = key_parts(cfg, stage_a.key, variant)
    key = cache.key_hash(parts)
    folder = aligned_dir(cfg, variant)
    info = cache.cached_record(folder, RECORD, key, "unet")
    if info is not None:
        return info
    s = WordAlignmentSettings.from_profile(cfg)
    seed = int(cfg["seed"])
    model = load_variant(cfg, DOMAIN, variant)
    complete = with_complete_captions(cfg, data)
    stream = AlignmentBatches(model.encode_dataset(complete.images, batch_size=64), complete.captions,
                              complete.regions, model.tokenizer, s, seed + 2)
    trainable = select_trainable(model.unet, model.text_encoder, "full", train_text_encoder=True)
    terms = [AttentionAlignmentTerm(s.alpha)]
    sa = cfg["pretrain"]["self_attention_loss"]
    if variant == "selfattn":
        terms.append(RegionSelfAttentionTerm(float(sa["weight"])))
    work = work_dir(cfg, f"{DOMAIN}-{variant}-words-{key}")
    resumed_from = _done(work)
    steps = min(s.steps, resumed_from + stop_after) if stop_after > 0 else s.steps
    start = time.perf_counter()
    tc = TrainConfig(steps=steps, lr=s.lr, warmup_steps=s.warmup_steps, ema_decay=s.ema_decay,
                     max_grad_norm=float(cfg["training"]["max_grad_norm"]),
                     cross_res=tuple(int(r) for r in cfg["attention"]["train_cross_res"]),
                     self_res=tuple(int(r) for r in sa["res"]) if variant == "selfattn" else (),
                     self_places=tuple(sa["places"]), checkpoint_every=max(1, s.checkpoint_every), keep_checkpoints=2,
                     output_dir=str(work), resume=True, seed=seed, progress=progress)
    res = train_diffusion(model, stream, tc, trainable, terms)
    history = cache.read_json(work / "history.json") or {"history": [], "seconds": 0.0}
    history = {"history": [h for h in history["history"] if h["step"] <= resumed_from] + res.history,
               "seconds": history["seconds"] + time.perf_counter() - start}
    (work / "history.json").write_text(json.dumps(history))
    if steps < s.steps:
        return {"key": key, "finished": False, "steps": steps, **history}
    if resumed_from >= s.steps:  # finished before this call: the EMA weights are in the checkpoint
        load_trainable(trainable, latest_checkpoint(work), use_ema=True)
    trainable.remove_hooks()
    model.unet.eval()
    model.text_encoder.eval()
    info = {"key": key, "key_parts": parts, "finished": True, "variant": variant, "stage_a_key": stage_a.key,
            "steps": s.steps, "resumed_from": resumed_from, **history}
    model.extras = {"ctrlgen_variant": f"{variant}+words", "ctrlgen_key": key}
    cache.save_folder(folder, model.save, RECORD, info, work)
    return info


def _done(work: Path) -> int:
    """Optimizer steps already checkpointed in ``work``."""
    ckpt = latest_checkpoint(work)
    return int(ckpt.name.split("-")[1]) if ckpt is not None else 0


def load_aligned(cfg: Mapping[str, Any], variant: str):
    """The stage-B model of scenes ``variant`` as ``SDComponents`` (``align_words`` must have trained it)."""
    folder = aligned_dir(cfg, variant)
    if not (folder / RECORD).is_file():
        raise ModelNotFoundError(f"no word-aligned {variant} scenes model at {folder}: run align_words(cfg, {variant!r})")
    return load_components(folder, name=f"mini/{DOMAIN} ({variant} + words)")


def aligned_key(cfg: Mapping[str, Any], variant: str) -> str:
    """The cache key of the stage-B model of scenes ``variant`` (``words.json``)."""
    info = cache.read_json(aligned_dir(cfg, variant) / RECORD)
    if info is None:
        raise ModelNotFoundError(f"no word-aligned {variant} scenes model at {aligned_dir(cfg, variant)}")
    return str(info["key"])


__all__ = ["CODE_FILES", "WordAlignmentSettings", "recompose", "word_positions",
           "AlignmentBatches", "aligned_dir", "key_parts", "align_words", "load_aligned", "aligned_key"]
