"""``ctrlgen bench``: performance measured as ratios side by side in one run (never a timed test).

``ctrlgen bench attention --profile mini`` reports, against plain SDPA sampling with classifier-free
guidance: sampling with ``AttentionCapture`` on the profile's cross/self sides at every step (target
≤ 1.15) and ``LayoutGuidance`` (L_CA + L_SA, one gradient step per step, Eq. 4.10) on the first half of
the steps (target ≤ 2.2), plus the peak memory of each mode (CUDA: max allocated; CPU: the process's
peak RSS). ``--arch sd21_base --device cuda --dtype float16`` times the real SD 2.1 shape with random
weights. Each mode runs ``--repeats`` times interleaved after a warm-up; medians are reported and
written to ``<output>/bench/attention-<profile>.json``.

``ctrlgen bench pairs --profile mini`` reports DiDGen's lesion–mask pair generation (§4.3.4, the
profile's ``didgen.pairs`` settings, annotation included) in pairs per minute, guided (L_CA + L_SA on
the first ``guidance_fraction`` of the steps) against the same generator unguided, batched as the
chapter runs it (``didgen.eval.pair_batch``); ratios of medians over interleaved repeats, written to
``<output>/bench/pairs-<profile>.json``.

``ctrlgen bench flops --profile mini`` (issue 18, benchmark 7) counts the floating-point operations of one
training step (text encoder + U-Net forward and backward, AdamW update) and of one classifier-free-guided
sampling step of the profile's mini architecture with torch's ``FlopCounterMode``, times both, and times a
dense float32 matmul in the same process: achieved FLOP/s against the machine's matmul FLOP/s says how much
faster any code change could make the mini book on this hardware. Written to ``<output>/bench/flops-<profile>.json``
with the machine and library versions.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ctrlgen import parallel, paths, result_cache
from ctrlgen.attention import AttentionCapture
from ctrlgen.config import load_profile
from ctrlgen.downstream import FitSettings, build_classifier, train_classifier
from ctrlgen.downstream.train import seeded_model
from ctrlgen.attention.layers import available_resolutions, select_layers
from ctrlgen.guidance import LayoutGuidance
from ctrlgen.methods.didgen import (PairConfig, PairGenerator, RegionAwareConfig, region_aware_finetune,
                                    setup_placeholders)
from ctrlgen.models import build_caption_tokenizer, build_from_published_config, build_mini_components, diffusion_target, locate_tokens
from ctrlgen.sampling import sample
from ctrlgen.training import TrainResult

PROMPT = "an image of a small dark lesion on skin"
TARGETS = {"capture": 1.15, "guided": 2.2}


def bench_attention(cfg, arch: str = "", device: str = "cpu", dtype_name: str = "float32", batch: int = 1,
                    steps: int = 0, repeats: int = 3, modes: tuple[str, ...] = ("plain", "capture", "guided"),
                    ) -> dict[str, Any]:
    """Time plain, capturing and guided sampling on one model, interleaved; return the report.

    ``modes``: which of them run (``plain`` always; benchmark 1 is plain + capture, benchmark 2 plain + guided).
    Peak memory of each mode is measured on one extra run after the timed ones (``measure_peak``)."""
    modes = ("plain", *[m for m in modes if m != "plain"])
    dtype = getattr(torch, dtype_name)
    if arch:
        model = build_from_published_config(arch, parts=("unet", "text_encoder"), dtype=dtype)
        cross_res, self_res = 16, 32  # the thesis's sides for a 64x64 latent
    else:
        model = build_mini_components(cfg, build_caption_tokenizer([PROMPT]))
        cross_res, self_res = cfg.attention.cross_res[0], cfg.attention.self_res[0]
    latent = model.unet.config.sample_size
    for module in (model.unet, model.text_encoder):
        module.to(device=device, dtype=dtype).eval()
    steps = steps or cfg.sampling.num_steps
    with torch.no_grad():
        cond = model.encode_prompt([PROMPT] * batch)
        uncond = model.encode_prompt([""])
    mask = torch.zeros(latent * 4, latent * 4)
    mask[latent:3 * latent, latent:3 * latent] = 1
    loc = locate_tokens(model.tokenizer, PROMPT, "lesion")
    lesion, last = loc.position("lesion"), int(loc.ends[0])
    z = torch.randn(batch, model.unet.config.in_channels, latent, latent,
                    generator=torch.Generator().manual_seed(0)).to(device, dtype)
    cuda = device.startswith("cuda")
    common = dict(num_steps=steps, guidance_scale=cfg.sampling.guidance_scale, progress=False)

    def run(mode: str) -> float:
        scheduler = model.scheduler("ddim")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if mode == "plain":
            sample(model.unet, scheduler, z, cond, uncond, **common)
        elif mode == "capture":
            with AttentionCapture(model.unet, cross_res=[cross_res], self_res=[self_res], latent_size=latent) as store:
                sample(model.unet, scheduler, z, cond, uncond, store=store, **common)
        else:
            guide = LayoutGuidance(mask=mask, token_index=lesion, last=last, cross_res=cross_res, self_res=self_res,
                                   eta=20.0, fraction=0.5)
            sample(model.unet, scheduler, z, cond, uncond, refine=guide, **common)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {m: [] for m in modes}
    for mode in modes:  # warm-up
        run(mode)
    for _ in range(repeats):
        for mode in modes:
            times[mode].append(run(mode))
    memory = {mode: measure_peak(lambda mode=mode: run(mode), device) for mode in modes}
    median = {m: statistics.median(v) for m, v in times.items()}
    report = {
        "model": arch or f"mini ({cfg.profile_name})", "device": device, "dtype": dtype_name, "batch": batch,
        "steps": steps, "latent": latent, "cross_res": cross_res, "self_res": self_res, "repeats": repeats,
        "seconds": times, "seconds_median": median,
        "peak_memory_mib": {m: v["peak_mib"] for m, v in memory.items()},
        "peak_memory_delta_mib": {m: v["delta_mib"] for m, v in memory.items()},
        "peak_memory_kind": memory["plain"]["kind"], **machine(),
    }
    for mode, name in (("capture", "capture"), ("guided", "guided")):
        if mode in modes:
            report[f"ratio_{mode}_vs_plain"] = median[mode] / median["plain"]
            report[f"target_{name}"] = TARGETS[name]
    return report


def bench_pairs(cfg, n_pairs: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Pairs per minute of guided vs unguided lesion–mask pair generation on a mini-architecture model."""
    prefix = str(cfg.didgen.prefix)
    tok = build_caption_tokenizer([prefix.replace("<lesion>", "lesion").replace("<skin>", "skin") + ", a brown lesion"],
                                  model_max_length=int(cfg.models.mini.text_encoder.max_length))
    model = build_mini_components(cfg, tok)
    setup_placeholders(model)
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    batch = int(cfg.didgen.eval.pair_batch)
    n = n_pairs or batch
    yy, xx = np.mgrid[:side, :side]
    masks = np.stack([(yy - side / 2 + i % 5) ** 2 + (xx - side / 2) ** 2 <= (side / 4) ** 2 for i in range(n)])
    prompt = f"{prefix}, a brown lesion"
    gens = {"guided": PairGenerator(model, PairConfig.from_profile(cfg)),
            "unguided": PairGenerator(model, PairConfig.from_profile(cfg, guidance=False))}

    def run(mode: str) -> float:
        start = time.perf_counter()
        gens[mode].generate(masks, [prompt], seed=0, batch_size=batch)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {m: [] for m in gens}
    for mode in gens:  # warm-up
        run(mode)
    for _ in range(repeats):
        for mode in gens:
            times[mode].append(run(mode))
    median = {m: statistics.median(v) for m, v in times.items()}
    return {"model": f"mini architecture ({cfg.profile_name}), random weights", "pairs": n, "batch": batch,
            "steps": int(cfg.didgen.pairs.num_steps), "guidance_fraction": float(cfg.didgen.pairs.guidance_fraction),
            "threads": torch.get_num_threads(), "seconds_median": median,
            "pairs_per_minute": {m: 60 * n / t for m, t in median.items()},
            "ratio_guided_vs_unguided": median["guided"] / median["unguided"], **machine()}


def count_flops(fn) -> int:
    """Floating-point operations torch's ``FlopCounterMode`` counts for one call of ``fn`` (matmuls and
    convolutions, forward and backward: 2·m·n·k for an (m×k)·(k×n) product)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(n: int = 1024, repeats: int = 5) -> float:
    """This process's dense float32 matmul rate: 2·n³ operations per (n×n)·(n×n) product, median time."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    return 2 * n**3 / _median_seconds(lambda: a @ b, repeats)


def bench_flops(cfg, batch: int = 0, repeats: int = 3) -> dict[str, Any]:
    """FLOPs, achieved FLOP/s and the matmul rate for a training step and a sampling step (module doc)."""
    batch = batch or int(cfg.pretrain.unet.batch_size)
    tok = build_caption_tokenizer([PROMPT], model_max_length=int(cfg.models.mini.text_encoder.max_length))
    model = build_mini_components(cfg, tok)
    unet, text = model.unet, model.text_encoder
    side, channels = int(unet.config.sample_size), int(unet.config.in_channels)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, channels, side, side, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ids = model.tokenize([PROMPT] * batch)
    params = [p for m in (unet, text) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sched = model.noise_scheduler()
    noisy = sched.add_noise(latents, noise, t)
    # the model's own target (ε, or v on the zero-terminal-SNR mini models), as the training loop computes it
    target = diffusion_target(sched, latents, noise, t)

    def train_step() -> None:
        pred = unet(noisy, t, encoder_hidden_states=text(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        cond, uncond = model.encode_prompt([PROMPT] * batch), model.encode_prompt([""] * batch)

    @torch.no_grad()
    def sample_step() -> None:  # classifier-free guidance: one U-Net call on [uncond; cond]
        unet(torch.cat([latents, latents]), t[0], encoder_hidden_states=torch.cat([uncond, cond]))

    matmul = matmul_flops_per_second()
    steps = {}
    for name, fn in (("training step", train_step), ("sampling step", sample_step)):
        flops = count_flops(fn)
        seconds = _median_seconds(fn, repeats)
        steps[name] = {"GFLOP": flops / 1e9, "seconds_median": seconds, "GFLOP/s": flops / seconds / 1e9,
                       "fraction_of_matmul_rate": flops / seconds / matmul}
    return {"benchmark": 7, "model": f"mini architecture ({cfg.profile_name}), random weights", "batch": batch,
            "latent": side, "matmul_GFLOP/s": matmul / 1e9, "steps": steps, **machine()}


# ---------------------------------------------------------------- machine, memory
def machine() -> dict[str, Any]:
    """The machine and library versions a benchmark ran on (every report carries them)."""
    return {"machine": platform.processor() or platform.machine(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""}


def _proc_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``) and reset the peak RSS (Linux ≥ 4.0:
    writing 5 to ``/proc/self/clear_refs`` sets VmHWM to the current RSS). False if the kernel refuses."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # else memory the last mode freed hides this mode's growth
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_peak(fn: Callable[[], Any], device: str = "cpu") -> dict[str, Any]:
    """Peak memory while ``fn()`` runs, in MiB: ``peak_mib`` (absolute), ``baseline_mib`` (before it) and
    ``delta_mib`` = peak − baseline (what ``fn`` itself needed: activations, gradients, optimizer state, maps).

    CUDA: ``torch.cuda`` allocated bytes (reset before). CPU: the process's resident set, its peak reset
    before the call (``_reset_peak_rss``); where the kernel refuses the reset, the lifetime peak RSS
    (``kind`` says which, and the delta is then an upper bound on nothing: read it as absent)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": peak / 2**20, "baseline_mib": base / 2**20, "delta_mib": (peak - base) / 2**20,
                "kind": "cuda max allocated"}
    reset = _reset_peak_rss()
    base = _proc_kib("VmRSS")
    fn()
    peak = _proc_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if base is None or peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mib": peak / 1024, "baseline_mib": 0.0, "delta_mib": peak / 1024,
                "kind": "process lifetime peak RSS (no /proc)"}
    return {"peak_mib": peak / 1024, "baseline_mib": base / 1024, "delta_mib": (peak - base) / 1024,
            "kind": "process peak RSS, reset before each measurement" if reset else "process lifetime peak RSS"}


def available_mib() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in MiB (inf where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


# ---------------------------------------------------------------- what a capture stores
def capture_bound_bytes(batch: int, cross_res: Sequence[int], self_res: Sequence[int], tokens: int,
                        bytes_per_value: int = 4) -> int:
    """The stated bound on the maps ``AttentionCapture`` keeps after one U-Net call (square latents): one
    head- and layer-mean float32 tensor per captured side and kind — cross ``(B, r², T)``, self ``(B, r², r²)`` —
    whatever the number of layers and heads: ``bytes · B · (Σ_cross r²·T + Σ_self r⁴)``."""
    return bytes_per_value * batch * (sum(r * r * tokens for r in cross_res) + sum(r**4 for r in self_res))


def stored_maps(store, unet: torch.nn.Module, latent: int) -> dict[str, Any]:
    """What a store holds after one call: sides per kind, layer maps averaged into each side (against the
    number of attention layers of that side the U-Net has) and the bytes held."""
    held = {**{("cross", r): m for r, m in store.cross_by_res().items()},
            **{("self", r): m for r, m in store.self_by_res().items()}}
    sides = {k: sorted((r for kk, r in held if kk == k), reverse=True) for k in ("cross", "self")}
    layers = {f"{k} {r}": {"averaged": store.count(k, r),
                           "in_unet": len(select_layers(unet, k, [r], latent_size=latent))} for k, r in held}
    return {"sides": sides, "layer_maps": layers, "attention_layers_in_unet": len(unet.attn_processors),
            "stored_bytes": int(sum(m.numel() * m.element_size() for m in held.values())),
            "batch": int(next(iter(held.values())).shape[0]) if held else 0}


def bench_capture(cfg, arch: str = "", device: str = "cpu", dtype_name: str = "float32", batch: int = 1,
                  steps: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Issue 18, benchmark 1: sampling with the capture layout guidance needs (cross side ``attention.cross_res[0]``,
    self side ``attention.self_res[0]``, every step) against plain SDPA sampling, same model and steps — ratio of
    medians (target ≤ 1.15) — plus what the capture stores after one step against ``capture_bound_bytes``."""
    report = bench_attention(cfg, arch, device, dtype_name, batch, steps, repeats, modes=("plain", "capture"))
    model = _model_for(cfg, arch, getattr(torch, dtype_name), device)
    store = _one_step(model, device, getattr(torch, dtype_name), batch, cross=[report["cross_res"]],
                      self_=[report["self_res"]])
    facts = stored_maps(store, model.unet, report["latent"])
    tokens = int(model.text_encoder.config.max_position_embeddings)
    facts["bound_bytes"] = capture_bound_bytes(batch, [report["cross_res"]], [report["self_res"]], tokens)
    return {**report, "benchmark": 1, "stored_maps": facts}


def bench_guided(cfg, arch: str = "", device: str = "cpu", dtype_name: str = "float32", batch: int = 1,
                 steps: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Issue 18, benchmark 2: layout-guided sampling (L_CA + L_SA, Eq. 4.10, one gradient step per step on the first
    50% of the steps) against plain sampling, same model and steps — ratio of medians (target ≤ 2.2)."""
    report = bench_attention(cfg, arch, device, dtype_name, batch, steps, repeats, modes=("plain", "guided"))
    return {**report, "benchmark": 2, "guided_steps": int(0.5 * report["steps"])}


def _model_for(cfg, arch: str, dtype: torch.dtype, device: str, vae: bool = False, prompts: Sequence[str] = (PROMPT,)):
    words = [p.replace("<lesion>", "lesion").replace("<skin>", "skin") for p in prompts]
    if arch:
        tok = build_caption_tokenizer(words, model_max_length=77)
        model = build_from_published_config(arch, tok, parts=("unet", "text_encoder", *(("vae",) if vae else ())),
                                            dtype=dtype)
    else:
        model = build_mini_components(cfg, build_caption_tokenizer(
            words, model_max_length=int(cfg.models.mini.text_encoder.max_length)))
    for module in (model.unet, model.text_encoder, model.vae):
        if module is not None:  # no dtype when it is already float32: diffusers warns on every cast
            (module.to(device) if dtype == torch.float32 else module.to(device=device, dtype=dtype)).eval()
    return model


def _one_step(model, device: str, dtype: torch.dtype, batch: int, cross: Sequence[int] = (), self_: Sequence[int] = (),
              guided: tuple[int, int] | None = None, latent: int = 0):
    """One classifier-free-guided sampling step (``sample`` with one step) at latent side ``latent`` (default: the
    U-Net's): plain, capturing ``cross``/``self_`` sides (the store is returned) or layout-guided (``guided`` =
    (cross side, self side))."""
    latent = latent or int(model.unet.config.sample_size)
    with torch.no_grad():
        cond, uncond = model.encode_prompt([PROMPT] * batch), model.encode_prompt([""])
    z = torch.randn(batch, model.unet.config.in_channels, latent, latent,
                    generator=torch.Generator().manual_seed(0)).to(device, dtype)
    common = dict(num_steps=1, guidance_scale=7.5, progress=False)
    if guided is not None:
        mask = torch.zeros(latent * 4, latent * 4)
        mask[latent:3 * latent, latent:3 * latent] = 1
        loc = locate_tokens(model.tokenizer, PROMPT, "lesion")
        guide = LayoutGuidance(mask=mask, token_index=loc.position("lesion"), last=int(loc.ends[0]),
                               cross_res=guided[0], self_res=guided[1], eta=20.0, fraction=1.0)
        sample(model.unet, model.scheduler("ddim"), z, cond, uncond, refine=guide, **common)
        return None
    if not cross and not self_:
        sample(model.unet, model.scheduler("ddim"), z, cond, uncond, **common)
        return None
    with AttentionCapture(model.unet, cross_res=cross, self_res=self_, latent_size=latent,
                          allow_large_self=True) as store:
        sample(model.unet, model.scheduler("ddim"), z, cond, uncond, store=store, **common)
    return store


# ---------------------------------------------------------------- benchmark 4: region-aware finetuning
FINETUNE_TARGET = 1.3


def _finetune_data(model, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:side, :side]
    masks = np.stack([(yy - side / 2 + i % 5) ** 2 + (xx - side / 2) ** 2 <= (side / 4) ** 2 for i in range(n)])
    return images, masks, [FINETUNE_PROMPT] * n


FINETUNE_PROMPT = "an image of <lesion> on <skin>"


def _finetune(model, cfg, steps: int, alpha: float, data) -> TrainResult:
    config = RegionAwareConfig.from_profile(cfg, steps=steps, alpha=alpha)
    result, _ = region_aware_finetune(model, *data, config, progress=False)
    return result


def bench_finetune(cfg, steps: int = 3, repeats: int = 3) -> dict[str, Any]:
    """Issue 18, benchmark 4: a region-aware finetuning step (L_rec + α L_attn, Eq. 4.5–4.6: the U-Net's
    cross-attention captured with its graph at ``attention.train_cross_res``) against a plain finetuning step
    (α = 0), on the profile's mini architecture with random weights and images, the profile's ``didgen.finetune``
    batch and latents: seconds per step (``TrainResult.seconds`` / steps, median of interleaved runs) and their
    ratio (target ≤ 1.3)."""
    model = _model_for(cfg, "", torch.float32, "cpu", prompts=(FINETUNE_PROMPT,))
    setup_placeholders(model)
    alpha = float(cfg.didgen.finetune.alpha)
    data = _finetune_data(model, max(2, int(cfg.didgen.finetune.batch_size)))
    arms = {"plain": 0.0, "region_aware": alpha}
    per_step: dict[str, list[float]] = {a: [] for a in arms}
    history_keys: dict[str, list[str]] = {}
    for arm, a in arms.items():  # warm-up
        _finetune(model, cfg, 1, a, data)
    for _ in range(repeats):
        for arm, a in arms.items():
            result = _finetune(model, cfg, steps, a, data)
            per_step[arm].append(result.seconds / steps)
            history_keys[arm] = sorted(result.history[-1]) if result.history else []
            if len(result.history) != steps:
                raise RuntimeError(f"{arm} finetuning ran {len(result.history)} steps, not {steps}")
    median = {a: statistics.median(v) for a, v in per_step.items()}
    return {"benchmark": 4, "model": f"mini architecture ({cfg.profile_name}), random weights", "steps": steps,
            "batch": int(cfg.didgen.finetune.batch_size), "alpha": alpha,
            "train_cross_res": [int(r) for r in cfg.attention.train_cross_res],
            "precompute_latents": bool(cfg.didgen.finetune.precompute_latents), "repeats": repeats,
            "seconds_per_step": per_step, "seconds_per_step_median": median, "history_keys": history_keys,
            "ratio_region_aware_vs_plain": median["region_aware"] / median["plain"], "target": FINETUNE_TARGET,
            **machine()}


# ---------------------------------------------------------------- benchmark 8: independent jobs in parallel
PARALLEL_TARGET = 0.75


def _classifier_job(cfg, arm: str, repeat: int, seed: int, n: int, epochs: int) -> Callable[[], Any]:
    """One cached classifier fit of the harness (the profile's ``downstream.classification`` model and settings,
    ``epochs`` epochs without early stopping) on ``n`` random images: what chapters 4 and 5 run many of."""
    name = str(cfg.downstream.classification.models[0])
    side = int(cfg.downstream.classification.image_size)
    fit = replace(FitSettings.from_profile(cfg, "classification"), max_epochs=epochs, patience=epochs, seed=seed)

    def compute() -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        labels = rng.integers(0, 7, n)
        model = seeded_model(build_classifier, seed, name, num_classes=7, image_size=side)
        result = train_classifier(model, images, labels, images[: n // 4], labels[: n // 4], fit)
        return {"history": [h["train loss"] for h in result.history]}

    # never a hit: bench_parallel runs every arm in a fresh scratch cache (``_scratch_cache``), and arm and repeat
    # are in the key
    parts = {"what": "bench parallel", "arm": arm, "repeat": repeat, "seed": seed, "n": n, "epochs": epochs}
    return lambda: result_cache.cached(parts, compute, "json", cfg=cfg)


@contextmanager
def _scratch_cache() -> Iterator[None]:
    """A throwaway cache root (``$CTRLGEN_CACHE_ROOT``) for the block, removed after it: benchmark 8's jobs must
    train every time, and their entries must not litter the user's cache."""
    before = os.environ.get(paths.ENV_CACHE)
    with tempfile.TemporaryDirectory(prefix="ctrlgen-bench-") as root:
        os.environ[paths.ENV_CACHE] = root
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(paths.ENV_CACHE, None)
            else:
                os.environ[paths.ENV_CACHE] = before


def bench_parallel(cfg, n_jobs: int = 2, n_images: int = 512, epochs: int = 3, repeats: int = 1) -> dict[str, Any]:
    """Benchmark 8: ``n_jobs`` independent classifier fits (``_classifier_job``) three ways, interleaved: called one
    after the other on torch's default threads (how the chapters ran them before ``ctrlgen.parallel``), through
    ``run_all`` with ``jobs: 1`` (one after the other, one thread each) and through ``run_all`` with the profile's
    ``jobs`` (forked workers, one thread each). Wall time per arm (median of repeats), the ratio of the parallel arm
    to the default-threads arm (target ≤ 0.75 on 2 cores) and the largest difference between the loss histories
    of the two ``run_all`` arms (0: one thread gives the same floats in a worker and here)."""
    arms = {"default threads": None, "jobs 1": load_profile(cfg.profile_name, {**cfg.overrides, "jobs": 1}),
            "parallel": cfg}
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    histories: dict[str, Any] = {}
    with _scratch_cache():
        for repeat in range(repeats):
            for arm, arm_cfg in arms.items():
                jobs = {j: _classifier_job(arm_cfg or cfg, arm, repeat, j, n_images, epochs) for j in range(n_jobs)}
                t0 = time.perf_counter()
                out = {j: job() for j, job in jobs.items()} if arm_cfg is None else parallel.run_all(jobs, arm_cfg, arm)
                seconds[arm].append(time.perf_counter() - t0)
                histories[arm] = [out[j]["history"] for j in range(n_jobs)]
    median = {a: statistics.median(v) for a, v in seconds.items()}
    diff = max(abs(a - b) for s, p in zip(histories["jobs 1"], histories["parallel"]) for a, b in zip(s, p))
    return {"benchmark": 8, "model": f"{cfg.downstream.classification.models[0]} ({cfg.profile_name}), random images",
            "jobs": n_jobs, "workers": parallel.job_count(cfg), "images": n_images, "epochs": epochs,
            "repeats": repeats, "torch_threads": torch.get_num_threads(), "seconds": seconds, "seconds_median": median,
            "ratio_parallel_vs_sequential": median["parallel"] / median["default threads"],
            "ratio_parallel_vs_jobs_1": median["parallel"] / median["jobs 1"], "target": PARALLEL_TARGET,
            "max_loss_difference_parallel_vs_jobs_1": diff, **machine()}


# ---------------------------------------------------------------- benchmark 5: peak memory
def bench_memory(cfg, arch: str = "", device: str = "cpu", dtype_name: str = "float32", batch: int = 1,
                 train: str = "auto", latent: int = 0) -> dict[str, Any]:
    """Issue 18, benchmark 5: peak memory (``measure_peak``) of one classifier-free-guided sampling step plain, with
    the layout-guidance capture, layout-guided, of one plain and one region-aware finetuning step, and of the
    largest attention capture (every cross- and self-attention side of the U-Net, self included at the latent's
    own side), on the mini architecture or the real ``arch`` (``sd21_base``: SD 2.1, random weights). Each mode's
    stored maps are checked against ``capture_bound_bytes``. ``train``: ``auto`` skips the finetuning steps when
    weights + gradients + AdamW state (16 bytes per U-Net parameter) would not fit in 60% of the free memory.
    ``latent``: the sampling steps' latent side (default the U-Net's; a real architecture at a smaller side keeps a
    CPU run short — the captured sides then scale with it, latent/4 and latent/2 as 16 and 32 of 64). With ``arch``
    there is no warm-up run (a real-size step on a CPU takes minutes; first-call allocations are small beside it)."""
    dtype = getattr(torch, dtype_name)
    model = _model_for(cfg, arch, dtype, device, vae=True, prompts=(PROMPT, FINETUNE_PROMPT))
    unet, latent = model.unet, latent or int(model.unet.config.sample_size)
    if arch:
        cross_res, self_res = (latent // 4,), (latent // 2,)  # the thesis's 16 and 32 for a 64x64 latent
    else:
        cross_res, self_res = tuple(cfg.attention.cross_res[:1]), tuple(cfg.attention.self_res[:1])
    every = {k: available_resolutions(unet, k, latent) for k in ("cross", "self")}
    tokens = int(model.text_encoder.config.max_position_embeddings)
    params = sum(p.numel() for p in unet.parameters())
    modes: dict[str, Any] = {}
    stores: dict[str, Any] = {}

    def keep(name: str, **kw):
        return lambda: stores.__setitem__(name, _one_step(model, device, dtype, batch, latent=latent, **kw))

    runs = {"sampling step (plain)": keep("plain"),
            "sampling step (capture)": keep("capture", cross=cross_res, self_=self_res),
            "sampling step (layout-guided)": keep("guided", guided=(cross_res[0], self_res[0])),
            "largest capture": keep("largest", cross=every["cross"], self_=every["self"])}
    for name, fn in runs.items():
        if not arch:
            fn()  # warm-up: first-call allocations are not the mode's own
        modes[name] = measure_peak(fn, device)
    need = 16 * params / 2**20
    skip_train = train == "no" or (train == "auto" and need > 0.6 * available_mib())
    if skip_train:
        modes["finetuning step"] = {"skipped": f"weights + gradients + AdamW state alone need {need / 1024:.1f} GiB "
                                               f"(16 B x {params / 1e6:.0f}M U-Net parameters); "
                                               f"{available_mib() / 1024:.1f} GiB free"}
    else:
        setup_placeholders(model)
        data = _finetune_data(model, max(1, int(cfg.didgen.finetune.batch_size)))
        for name, a in (("finetuning step (plain)", 0.0), ("finetuning step (region-aware)",
                                                           float(cfg.didgen.finetune.alpha))):
            _finetune(model, cfg, 1, a, data)
            modes[name] = measure_peak(lambda a=a: _finetune(model, cfg, 1, a, data), device)
    maps = {name: stored_maps(stores[name], unet, latent) for name in ("capture", "largest")}
    maps["capture"]["bound_bytes"] = capture_bound_bytes(batch, cross_res, self_res, tokens)
    maps["largest"]["bound_bytes"] = capture_bound_bytes(batch, every["cross"], every["self"], tokens)
    return {"benchmark": 5, "model": arch or f"mini ({cfg.profile_name})", "weights": "random", "device": device,
            "dtype": dtype_name, "batch": batch, "latent": latent, "image_side": latent * model.vae_scale_factor,
            "cross_res": list(cross_res), "self_res": list(self_res), "unet_parameters": params,
            "unet_weights_mib": params * torch.tensor([], dtype=dtype).element_size() / 2**20,
            "modes": modes, "stored_maps": maps, "kind": modes["sampling step (plain)"]["kind"], **machine()}


# ---------------------------------------------------------------- benchmark 6: the book's wall time
def chapter_times(output: Path, profiles: Sequence[str], chapters: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{profile: {chapter: {"wall_time_s", "started_at", "git_commit"} or None}}`` from the chapters' records
    (``<output>/results/<profile>/<chapter>.json``, written by ``ChapterRun.save``); None: not run there."""
    out: dict[str, dict[str, Any]] = {}
    for profile in profiles:
        out[profile] = {}
        for chapter in chapters:
            path = output / "results" / profile / f"{chapter}.json"
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                out[profile][chapter] = {k: rec.get(k) for k in ("wall_time_s", "started_at", "git_commit")}
            except (OSError, json.JSONDecodeError):
                out[profile][chapter] = None
    return out


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least squares ``y = a + b·x`` (``numpy.polyfit``) with R², and the exponent k of ``y ∝ x^k`` between the
    two largest sizes on the part above the intercept (k ≈ 1: linear; k > 1: worse than linear)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    hi = np.argsort(x)[-2:]
    above = np.maximum(y[hi] - a, 1e-12)
    k = float(np.log(above[1] / above[0]) / np.log(x[hi[1]] / x[hi[0]]))
    return {"intercept_s": float(a), "slope_s": float(b), "r2": r2, "exponent_top": k}


def bench_book(cfg, chapters: Sequence[str], profiles: Sequence[str] = ("smoke", "mini"),
               sizes: Sequence[int] = (1, 2, 4), repeats: int = 1) -> dict[str, Any]:
    """Issue 18, benchmark 6: the whole book's wall time per chapter on each profile, from the chapters' records
    (not re-run: ``ctrlgen book`` writes them), and how the two costs a chapter scales grow — DiDGen lesion–mask
    pairs (the profile's ``didgen.pairs`` generator, guided) against their number, and region-aware finetuning
    against its steps — on this profile's mini architecture, each fitted by ``linear_fit`` (median of ``repeats``).
    ``sizes`` count training steps, and batches of ``didgen.eval.pair_batch`` pairs (a part-filled batch costs a
    whole one, so pairs are timed in whole batches)."""
    times = chapter_times(Path(paths.output_root(cfg)), profiles, chapters)
    totals = {p: sum(r["wall_time_s"] for r in t.values() if r) for p, t in times.items()}
    model = _model_for(cfg, "", torch.float32, "cpu", prompts=(f"{cfg.didgen.prefix}, a brown lesion", FINETUNE_PROMPT))
    setup_placeholders(model)
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    yy, xx = np.mgrid[:side, :side]
    gen = PairGenerator(model, PairConfig.from_profile(cfg))
    batch = int(cfg.didgen.eval.pair_batch)
    data = _finetune_data(model, max(2, int(cfg.didgen.finetune.batch_size)))

    def pairs(n: int) -> None:
        masks = np.stack([(yy - side / 2 + i % 5) ** 2 + (xx - side / 2) ** 2 <= (side / 4) ** 2 for i in range(n)])
        gen.generate(masks, [f"{cfg.didgen.prefix}, a brown lesion"], seed=0, batch_size=batch)

    growth = {}
    def steps(n: int) -> None:
        _finetune(model, cfg, n, float(cfg.didgen.finetune.alpha), data)

    # pairs in whole batches, as a chapter generates them
    for name, fn, scale in (("generated pairs", pairs, batch), ("training steps", steps, 1)):
        fn(scale)  # warm-up
        secs = []
        for n in (s * scale for s in sizes):
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(n)
                runs.append(time.perf_counter() - start)
            secs.append(statistics.median(runs))
        n = [s * scale for s in sizes]
        growth[name] = {"sizes": n, "seconds_median": secs, "fit": linear_fit(n, secs)}
    return {"benchmark": 6, "profile": cfg.profile_name, "chapters": list(chapters), "chapter_wall_time_s": times,
            "book_wall_time_s": totals, "pair_batch": batch, "growth": growth, "repeats": repeats, **machine()}


def growth_figure(report: dict[str, Any]):
    """Seconds against size for each growth series of ``bench_book``'s report, with the fitted line."""
    # no matplotlib.use() here: in a chapter's kernel it would replace the inline backend and the page would show
    # "<Figure ...>" instead of the figure; headless, matplotlib picks Agg by itself
    import matplotlib.pyplot as plt  # noqa: PLC0415 — drawing only when asked

    series = report["growth"]
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2))
    for ax, (name, g) in zip(np.atleast_1d(axes), series.items()):
        x = np.asarray(g["sizes"], float)
        ax.plot(x, g["seconds_median"], "o", label="measured (median)")
        f = g["fit"]
        ax.plot(x, f["intercept_s"] + f["slope_s"] * x, "-",
                label=f"{f['intercept_s']:.2f} + {f['slope_s']:.2f}·n s (R² {f['r2']:.3f})")
        ax.set(xlabel=name, ylabel="seconds", title=f"{name} ({report['profile']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the book's summary page (appx_benchmarks)
BENCHMARKS = {  # issue 18's numbering: report name, headline field, target, what is measured
    1: ("capture", "ratio_capture_vs_plain", TARGETS["capture"], "attention capture vs plain sampling (time ratio)"),
    2: ("guided", "ratio_guided_vs_plain", TARGETS["guided"], "layout-guided vs plain sampling (time ratio)"),
    3: ("dual", "ratio_wall_time", 0.6, "dual-branch vs two-stage generation (time ratio; passes 0.5)"),
    4: ("finetune", "ratio_region_aware_vs_plain", FINETUNE_TARGET,
        "region-aware vs plain finetuning step (time ratio)"),
    5: ("memory", "", None, "peak memory of each step and of the largest capture"),
    6: ("book", "", None, "book wall time per chapter; growth with samples and steps"),
    7: ("flops", "", None, "FLOPs per step against the machine's matmul rate"),
    8: ("parallel", "ratio_parallel_vs_sequential", PARALLEL_TARGET,
        "independent classifier fits in forked workers vs one after the other (time ratio)"),
}


def load_reports(*folders: Path) -> list[dict[str, Any]]:
    """Every ``<name>.json`` report in ``folders`` (all kept, also when two folders hold the same name), each with
    ``source`` = its folder and ``file`` = its name; an unreadable file is skipped."""
    out = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            out.append({**report, "source": str(folder), "file": path.name})
    return out


def _headline(number: int, report: dict[str, Any]) -> str:
    name, field, target, _ = BENCHMARKS[number]
    if field:
        value = report.get(field)
        return "" if value is None else f"{value:.2f} (target ≤ {target})"
    if name == "memory":
        modes = report.get("modes", {}).items()
        return ", ".join(f"{k}: +{v['delta_mib']:.0f} MiB" for k, v in modes if "delta_mib" in v)
    if name == "book":
        books = [f"{p} book: {t:.0f} s" for p, t in report.get("book_wall_time_s", {}).items() if t]
        fits = [f"{k}: {f['slope_s']:.2f} s each (R² {f['r2']:.3f}, exponent {f['exponent_top']:.2f})"
                for k, f in ((k, g["fit"]) for k, g in report.get("growth", {}).items())]
        return "; ".join(books + fits)
    if name == "flops":
        steps = report.get("steps", {})
        return ", ".join(f"{k}: {v['GFLOP']:.1f} GFLOP at {v['fraction_of_matmul_rate']:.0%} of matmul rate"
                         for k, v in steps.items())
    return ""


def summary_rows(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per benchmark and report (a benchmark without any report: one row saying "not run")."""
    rows = []
    for number, (name, _, _, what) in BENCHMARKS.items():
        mine = [r for r in reports if str(r.get("file", "")).startswith(f"{name}-")]
        for r in mine:
            device = r.get("device", "cpu")
            rows.append({"benchmark": number, "measures": what, "report": r["file"],
                         "model": r.get("model", r.get("profile", "")), "device": device,
                         "machine": f"{r.get('machine', '')}, {r.get('cpus', '')} CPUs, {r.get('threads', '')} threads"
                                    + (f", {r['cuda']}" if r.get("cuda") and str(device).startswith("cuda") else ""),
                         "when": r.get("written_at", ""), "result": _headline(number, r), "where": r["source"]})
        if not mine:
            rows.append({"benchmark": number, "measures": what, "report": "", "model": "", "device": "",
                         "machine": "", "when": "", "result": "not run", "where": ""})
    return rows


__all__ = ["PROMPT", "TARGETS", "FINETUNE_TARGET", "bench_attention", "bench_capture", "bench_guided", "bench_pairs",
           "bench_flops", "bench_finetune", "bench_memory", "bench_book", "chapter_times", "linear_fit",
           "growth_figure",
           "count_flops", "matmul_flops_per_second", "machine", "measure_peak", "available_mib", "capture_bound_bytes",
           "stored_maps", "BENCHMARKS", "load_reports", "summary_rows"]
