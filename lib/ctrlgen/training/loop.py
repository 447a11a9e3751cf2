"""Generic latent-diffusion training loop on Accelerate (Eq. 4.3, 4.6, 3.8; pretraining of the mini models).

One loop serves every training in the book: region-aware finetuning (L_rec + α L_attn, Eq. 4.6),
AttenCraft's feature-retaining training (masked L_rec weighted per sample + L_attn, Eq. 3.6–3.8),
Custom Diffusion / LoRA / DreamBooth-style baselines and the pretraining of the mini base models
(full U-Net + text encoder trainable, prompt drop-out for classifier-free guidance, EMA, optional
self-attention structure term). What is trained is a ``TrainableParams``; extra objectives are
``LossTerm`` objects reading the batch and the captured attention maps.

Batch format (a dict per step, from any iterable; it is cycled until ``steps``):
``pixel_values`` (B, 3, H, W) in [-1, 1] *or* ``latents`` (B, C, h, w) already scaled;
``input_ids`` (B, L) *or* ``prompts`` (list of str) *or* ``encoder_hidden_states`` (B, L, D), the condition itself
(no text encoder call, no ``prompt_dropout``: the caller drops conditions); optional ``mask`` (B, 1, H, W) region mask
(masked L_rec when ``TrainConfig.masked_rec``), ``rec_weight`` (B,), ``token_indices`` (B, K),
``token_masks`` (B, K, H, W), ``token_valid`` (B, K) for the attention-alignment term.

The regression target follows the model's scheduler (``prediction_type``): ε for ε-prediction (SD 1.4 / 2.1 base),
v = ``get_velocity(z_0, ε, t)`` for v-prediction (the mini models' zero-terminal-SNR schedule, Lin et al. 2024);
``LossContext.noise_pred`` is the U-Net output, whichever of the two it predicts.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from diffusers.models.modeling_utils import ModelMixin
from diffusers.training_utils import EMAModel

from ctrlgen.attention.capture import AttentionCapture, AttentionStore
from ctrlgen.models.sd import SDComponents, diffusion_target
from ctrlgen.progress import tqdm
from ctrlgen.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ctrlgen.training.losses import attention_alignment_loss, reconstruction_loss, self_attention_structure_loss
from ctrlgen.training.params import TrainableParams


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (thesis values: §3.4.1 lr 1e-4, 300 steps; §4.7.2 lr 1e-5, AdamW β (0.9, 0.999), wd 1e-2)."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (β1, β2); chapter 4 reads them from didgen.finetune.adam_betas
    eps: float = 1e-8  # AdamW ε (PyTorch's default, written out so that a profile can set it)
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    prompt_dropout: float = 0.0  # replace the prompt by "" with this probability (classifier-free guidance)
    ema_decay: float = 0.0
    noise_offset: float = 0.0  # diffusers' train_text_to_image --noise_offset: + offset·N(0,1) per (sample, channel)
    masked_rec: bool = False  # Eq. (3.6): L_rec on the ``mask`` region only
    cross_res: tuple[int, ...] = (16,)  # attention sides captured for the loss terms
    self_res: tuple[int, ...] = ()
    self_places: tuple[str, ...] = ("down", "mid", "up")
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    output_dir: str = ""  # checkpoints go here; "" = no checkpoints
    resume: bool = True
    seed: int = 0
    progress: bool = True
    # recompute activations in the backward pass instead of storing them (diffusers'
    # ``enable_gradient_checkpointing``): full U-Net finetuning at 512 px needs it to fit in 24 GB
    gradient_checkpointing: bool = False


def train_config_from(settings: Mapping[str, Any], train_config: Mapping[str, Any] | None = None) -> TrainConfig:
    """The one merge rule of the methods' training settings: ``TrainConfig(**{**settings, **train_config})``.

    ``settings`` are what a method sets from its own arguments / config dataclass (steps, lr, ...);
    ``train_config`` is the caller's extra ``TrainConfig`` fields (checkpointing, mixed precision) and
    **wins** on a key both give — it is the later, more specific layer, as ``from_profile(**overrides)``
    overrides the profile. A key that is no ``TrainConfig`` field raises one ``ValueError`` naming it and
    the fields (not Python's "got multiple values for keyword argument"). Lists become tuples (YAML has no tuples).
    """
    names = [f.name for f in fields(TrainConfig)]
    merged = {**dict(settings), **dict(train_config or {})}
    unknown = sorted(set(merged) - set(names))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}: a train_config key must be a TrainConfig field, "
                         f"one of {', '.join(names)}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})


@dataclass
class LossContext:
    """What a loss term can read at one step: ``noise_pred`` is the U-Net output and ``target`` its regression target
    (ε, or v under v-prediction: never assume ε)."""

    batch: dict[str, Any]
    noise_pred: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    store: AttentionStore | None


class LossTerm(Protocol):
    """An extra objective ``weight * term(ctx)``; ``needs_cross``/``needs_self`` say which maps to capture."""

    name: str
    weight: float
    needs_cross: bool
    needs_self: bool

    def __call__(self, ctx: LossContext) -> torch.Tensor: ...


@dataclass
class AttentionAlignmentTerm:
    """α·L_attn, Eq. (3.7) / (4.5) (thesis α: 0.01 in §3.4.1, 0.1 in §4.3.3) from ``token_indices``/``token_masks``."""

    weight: float = 0.1
    name: str = "attn"
    needs_cross: bool = True
    needs_self: bool = False

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        b = ctx.batch
        return attention_alignment_loss(ctx.store.cross_by_res(), b["token_indices"], b["token_masks"], b.get("token_valid"))


@dataclass
class SelfAttentionStructureTerm:
    """Auxiliary self-attention structure loss on the batch's ``mask`` (NOTES-mini-feasibility.md: weight 0.3)."""

    weight: float = 0.3
    name: str = "sa_struct"
    needs_cross: bool = False
    needs_self: bool = True

    def __call__(self, ctx: LossContext) -> torch.Tensor:
        return self_attention_structure_loss(ctx.store.self_by_res(), ctx.batch["mask"])


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0


def _cycle(data: Iterable[dict]) -> Iterator[dict]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data yielded no batch")


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


@contextmanager
def gradient_checkpointing(net: torch.nn.Module, enable: bool) -> Iterator[None]:
    """Turn diffusers' gradient checkpointing on for every model inside ``net`` that supports it (the U-Net; a
    ``ControlledUNet``'s U-Net and ControlNet) for the block, then put each model's previous state back.

    ValueError when ``enable`` and no model in ``net`` supports it (e.g. the U-ViT backbone)."""
    if not enable:
        yield
        return
    models = [m for m in net.modules() if isinstance(m, ModelMixin) and m._supports_gradient_checkpointing]
    if not models:
        raise ValueError(f"gradient_checkpointing: {type(net).__name__} holds no diffusers model that supports "
                         "gradient checkpointing; set TrainConfig.gradient_checkpointing = False for it")
    before = [m.is_gradient_checkpointing for m in models]
    for m in models:
        m.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for m, was in zip(models, before):
            if not was:
                m.disable_gradient_checkpointing()


def train_diffusion(model: SDComponents, data: Iterable[dict[str, Any]], config: TrainConfig,
                    trainable: TrainableParams, terms: Sequence[LossTerm] = (), accelerator=None) -> TrainResult:
    """Train ``trainable`` parameters of ``model`` on ``data`` for ``config.steps`` optimizer steps.

    L = L_rec (Eq. 4.3, or masked Eq. 3.6, weighted per sample by ``rec_weight``) + Σ weight·term.
    Checkpoints (safetensors, atomic) every ``checkpoint_every`` steps into ``output_dir``; with
    ``resume`` the run continues from the newest checkpoint there. Returns the per-step loss history.
    With ``gradient_checkpointing`` the U-Net recomputes its activations in the backward pass for this run
    only (same loss and gradients, less memory; the attention capture records each map once).
    """
    with gradient_checkpointing(model.unet, config.gradient_checkpointing):
        return _train(model, data, config, trainable, terms, accelerator)


def _train(model: SDComponents, data: Iterable[dict[str, Any]], config: TrainConfig, trainable: TrainableParams,
           terms: Sequence[LossTerm], accelerator) -> TrainResult:
    acc = accelerator or Accelerator(mixed_precision=config.mixed_precision,
                                     gradient_accumulation_steps=config.gradient_accumulation_steps)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    params = list(trainable.named.values())
    if not params:
        raise ValueError("nothing to train: select_trainable selected no parameters")
    optimizer = torch.optim.AdamW(trainable.groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                  weight_decay=config.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps))
    unet_raw = model.unet
    model.vae.requires_grad_(False)
    te_trains = any(n.startswith("text_encoder.") for n in trainable.named)
    unet, optimizer, lr_sched = acc.prepare(unet_raw, optimizer, lr_sched)
    text_encoder = acc.prepare(model.text_encoder) if te_trains else model.text_encoder.to(acc.device)
    model.vae.to(acc.device)
    noise_sched = model.noise_scheduler()
    ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None:
        ema.to(acc.device)

    start, run_dir = 0, Path(config.output_dir) if config.output_dir else None
    if run_dir is not None and config.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        tensors, state, ema_tensors = load_checkpoint(ckpt)
        with torch.no_grad():
            for n, p in trainable.named.items():
                p.copy_(tensors[n].to(p))
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["gen_rng"])
        if ema is not None and ema_tensors is not None:
            for s, n in zip(ema.shadow_params, trainable.named):
                s.copy_(ema_tensors[n].to(s))
            # the EMA's own step count sets its warm-up decay; resume it too (a fresh count would restart the warm-up)
            ema.optimization_step = int(state.get("ema_step", state["step"]))
        start = int(state["step"])

    needs_cross = any(t.needs_cross for t in terms)
    needs_self = any(t.needs_self for t in terms)
    if needs_cross and not config.cross_res or needs_self and not config.self_res:
        raise ValueError("a loss term needs attention maps: set TrainConfig.cross_res / self_res")
    empty_ids = model.tokenize([""])
    history: list[dict[str, float]] = []
    t0 = time.time()
    step = start
    stream = _cycle(data)
    for _ in range(start * config.gradient_accumulation_steps):  # resume at the same place in the data
        next(stream)
    bar = tqdm(total=config.steps, initial=start, disable=not config.progress, desc="training", leave=False)
    unet.train()
    if te_trains:
        text_encoder.train()
    while step < config.steps:
        batch = _to(next(stream), acc.device)
        with acc.accumulate(unet):
            with torch.no_grad():
                if "latents" in batch:
                    latents = batch["latents"]
                else:
                    latents = model.encode_images(batch["pixel_values"], sample=True)
            if "encoder_hidden_states" in batch:  # conditions computed by the caller (Eq. 6.1: text + image embedding)
                emb = batch["encoder_hidden_states"]
            else:
                ids = batch["input_ids"] if "input_ids" in batch else model.tokenize(batch["prompts"])
                ids = ids.to(acc.device)
                if config.prompt_dropout > 0:
                    drop = torch.rand(ids.shape[0], generator=gen) < config.prompt_dropout
                    ids = torch.where(drop[:, None].to(acc.device), empty_ids.to(acc.device).expand_as(ids), ids)
                with torch.set_grad_enabled(te_trains):
                    emb = text_encoder(ids)[0]
            noise = torch.randn(latents.shape, generator=gen).to(latents)
            if config.noise_offset > 0:
                # Guttenberg (2023), diffusers' --noise_offset: a per-channel constant in the noise, so that the
                # latent's mean is not left at t = T for the model to read (the mean-colour leak).
                noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(latents)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(acc.device)
            noisy = noise_sched.add_noise(latents, noise, t)
            target = diffusion_target(noise_sched, latents, noise, t)
            hw = tuple(latents.shape[-2:])
            if needs_cross or needs_self:
                cap = AttentionCapture(unet_raw, cross_res=config.cross_res if needs_cross else (),
                                       self_res=config.self_res if needs_self else (), self_places=config.self_places,
                                       keep_grad=True, latent_size=hw)
            else:
                cap = None
            # the backward pass runs inside the capture: gradient checkpointing recomputes the blocks there, and
            # must meet the same (capturing) processors as the forward pass did
            with cap if cap is not None else nullcontext() as store:
                with acc.autocast():
                    pred = unet(noisy, t, encoder_hidden_states=emb).sample
                    mask = batch.get("mask") if config.masked_rec else None
                    rec = reconstruction_loss(pred, target, mask, batch.get("rec_weight"))
                    ctx = LossContext(batch, pred, target, t, store)
                    values = {term.name: term(ctx) for term in terms}
                    loss = rec + sum(term.weight * values[term.name] for term in terms)
                acc.backward(loss)
            if acc.sync_gradients and config.max_grad_norm > 0:
                acc.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            step += 1
            bar.update(1)
            if ema is not None:
                ema.step(params)
            record = {"step": step, "loss": float(loss.detach()), "rec": float(rec.detach()),
                      **{k: float(v.detach()) for k, v in values.items()}}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if run_dir is not None and config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.steps):
                _save(run_dir, step, trainable, optimizer, lr_sched, gen, ema, config.keep_checkpoints, acc)
    bar.close()
    unet.eval()
    text_encoder.eval()
    if ema is not None:
        ema.copy_to(params)
    ckpt = latest_checkpoint(run_dir) if run_dir is not None else None
    return TrainResult(step, history, ckpt, time.time() - t0)


def _save(run_dir: Path, step: int, trainable: TrainableParams, optimizer, lr_sched, gen, ema, keep: int, acc) -> None:
    if not acc.is_main_process:
        return
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(),
             "torch_rng": torch.get_rng_state(), "gen_rng": gen.get_state()}
    if ema is not None:
        state["ema_step"] = int(ema.optimization_step)
    ema_t = dict(zip(trainable.named, ema.shadow_params)) if ema is not None else None
    save_checkpoint(run_dir, step, dict(trainable.named), state, ema_t, keep)


def load_trainable(trainable: TrainableParams, checkpoint: str | Path, use_ema: bool = True) -> None:
    """Copy a checkpoint's trainable tensors (its EMA copy if present and ``use_ema``) into the parameters."""
    tensors, _, ema = load_checkpoint(checkpoint)
    src = ema if (use_ema and ema is not None) else tensors
    with torch.no_grad():
        for n, p in trainable.named.items():
            p.copy_(src[n].to(p))
