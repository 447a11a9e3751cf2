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

import os
import platform
import resource
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ctrlgen.attention import AttentionCapture
from ctrlgen.guidance import LayoutGuidance
from ctrlgen.methods.didgen import PairConfig, PairGenerator, setup_placeholders
from ctrlgen.models import build_caption_tokenizer, build_from_published_config, build_mini_components, locate_tokens
from ctrlgen.sampling import sample

PROMPT = "an image of a small dark lesion on skin"
TARGETS = {"capture": 1.15, "guided": 2.2}


def bench_attention(cfg, arch: str = "", device: str = "cpu", dtype_name: str = "float32", batch: int = 1,
                    steps: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Time plain, capturing and guided sampling on one model, interleaved; return the report."""
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

    modes = ("plain", "capture", "guided")
    times: dict[str, list[float]] = {m: [] for m in modes}
    peak: dict[str, float] = {}
    for mode in modes:  # warm-up
        run(mode)
    for _ in range(repeats):
        for mode in modes:
            times[mode].append(run(mode))
            peak[mode] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    median = {m: statistics.median(v) for m, v in times.items()}
    return {
        "model": arch or f"mini ({cfg.profile_name})", "device": device, "dtype": dtype_name, "batch": batch,
        "steps": steps, "latent": latent, "cross_res": cross_res, "self_res": self_res,
        "threads": torch.get_num_threads(), "seconds_median": median,
        "ratio_capture_vs_plain": median["capture"] / median["plain"], "target_capture": TARGETS["capture"],
        "ratio_guided_vs_plain": median["guided"] / median["plain"], "target_guided": TARGETS["guided"],
        "peak_memory_mib": peak,
        "peak_memory_kind": "cuda max allocated" if cuda else "process peak RSS (cumulative over modes)",
    }


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
            "ratio_guided_vs_unguided": median["guided"] / median["unguided"]}


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

    def train_step() -> None:
        pred = unet(latents + noise, t, encoder_hidden_states=text(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
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
    return {"model": f"mini architecture ({cfg.profile_name}), random weights", "batch": batch, "latent": side,
            "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "matmul_GFLOP/s": matmul / 1e9, "steps": steps}


__all__ = ["PROMPT", "TARGETS", "bench_attention", "bench_pairs", "bench_flops", "count_flops",
           "matmul_flops_per_second"]
