"""``ctrlgen bench``: performance measured as ratios side by side in one run (never a timed test).

``ctrlgen bench attention --profile mini`` reports, against plain SDPA sampling with classifier-free
guidance: sampling with ``AttentionCapture`` on the profile's cross/self sides at every step (target
≤ 1.15) and ``LayoutGuidance`` (L_CA + L_SA, one gradient step per step, Eq. 4.10) on the first half of
the steps (target ≤ 2.2), plus the peak memory of each mode (CUDA: max allocated; CPU: the process's
peak RSS). ``--arch sd21_base --device cuda --dtype float16`` times the real SD 2.1 shape with random
weights. Each mode runs ``--repeats`` times interleaved after a warm-up; medians are reported and
written to ``<output>/bench/attention-<profile>.json``.
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
                                end_position, token_positions)
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
    lesion = token_positions(model.tokenizer, PROMPT, "lesion")[0]
    last = end_position(model.tokenizer, PROMPT)
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
                                   eta=20.0)
            sample(model.unet, scheduler, z, cond, uncond, refine=guide, refine_fraction=0.5, **common)
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
