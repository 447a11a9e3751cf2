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
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ctrlgen.cli.common import EXIT_OK, add_profile_args, profile_from_args

PROMPT = "an image of a small dark lesion on skin"
TARGETS = {"capture": 1.15, "guided": 2.2}


def bench_attention(cfg, arch: str = "", device: str = "cpu", dtype_name: str = "float32", batch: int = 1,
                    steps: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Time plain, capturing and guided sampling on one model, interleaved; return the report."""
    import resource
    import statistics
    import time

    import torch

    from ctrlgen.attention import AttentionCapture
    from ctrlgen.guidance import LayoutGuidance
    from ctrlgen.models import (build_caption_tokenizer, build_from_published_config, build_mini_components,
                                locate_tokens)
    from ctrlgen.sampling import sample

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
    import statistics
    import time

    import numpy as np
    import torch

    from ctrlgen.methods.didgen import PairConfig, PairGenerator, setup_placeholders
    from ctrlgen.models import build_caption_tokenizer, build_mini_components

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


def _pairs(args: argparse.Namespace) -> int:
    from ctrlgen import paths
    from ctrlgen.results import atomic_write_json

    cfg = profile_from_args(args)
    report = bench_pairs(cfg, args.pairs, args.repeats)
    target = paths.output_root(cfg) / "bench" / f"pairs-{cfg.profile_name}.json"
    atomic_write_json(target, report)
    json.dump(report, sys.stdout, indent=2)
    print(f"\nwritten to {target}")
    return EXIT_OK


def _attention(args: argparse.Namespace) -> int:
    from ctrlgen import paths
    from ctrlgen.results import atomic_write_json

    cfg = profile_from_args(args)
    report = bench_attention(cfg, args.arch, args.device, args.dtype, args.batch, args.steps, args.repeats)
    target = paths.output_root(cfg) / "bench" / f"attention-{args.arch or cfg.profile_name}.json"
    atomic_write_json(target, report)
    json.dump(report, sys.stdout, indent=2)
    print(f"\nwritten to {target}")
    return EXIT_OK


def add_bench_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run the benchmarks (speed as ratios, peak memory)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    attention = groups.add_parser("attention", help="attention capture and layout guidance vs plain sampling",
                                  description=bench_attention.__doc__)
    add_profile_args(attention)
    attention.add_argument("--arch", default="", help="sd21_base or sd14: the real architecture with random weights")
    attention.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    attention.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    attention.add_argument("--batch", type=int, default=1)
    attention.add_argument("--steps", type=int, default=0, help="sampling steps (default: the profile's sampling.num_steps)")
    attention.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per mode (medians reported)")
    attention.set_defaults(func=_attention)
    pairs = groups.add_parser("pairs", help="DiDGen lesion-mask pairs per minute, guided vs unguided",
                              description=bench_pairs.__doc__)
    add_profile_args(pairs)
    pairs.add_argument("--pairs", type=int, default=0, help="pairs per timed run (default: one batch, didgen.eval.pair_batch)")
    pairs.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per mode (medians reported)")
    pairs.set_defaults(func=_pairs)
