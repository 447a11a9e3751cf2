"""Benchmark of the attention toolkit (issue 4): ratios measured side by side in one run.

    python benchmarks/bench_attention.py --profile mini            # CPU, the mini architecture
    python benchmarks/bench_attention.py --arch sd21_base --device cuda --dtype float16   # real SD 2.1 shape, random weights

Reports, as ratios against plain SDPA sampling with classifier-free guidance:
  capture  — sampling with AttentionCapture on the profile's cross/self sides at every step (target ≤ 1.15)
  guided   — LayoutGuidance (L_CA + L_SA, one gradient step) on the first half of the steps (target ≤ 2.2)
and the peak memory of each mode (CUDA: max allocated; CPU: the process's peak RSS after the mode).
Each mode runs ``--repeats`` times interleaved; medians are reported. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

import torch  # noqa: E402

from ctrlgen.attention import AttentionCapture  # noqa: E402
from ctrlgen.config import load_profile  # noqa: E402
from ctrlgen.guidance import LayoutGuidance  # noqa: E402
from ctrlgen.models import build_caption_tokenizer, build_from_published_config, build_mini_components  # noqa: E402
from ctrlgen.sampling import sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="mini")
    ap.add_argument("--arch", default="", help="sd21_base or sd14: the real architecture with random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="default: the profile's sampling.num_steps")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_profile(args.profile)
    dtype = getattr(torch, args.dtype)
    if args.arch:
        model = build_from_published_config(args.arch, parts=("unet", "text_encoder"), dtype=dtype)
        cross_res, self_res, latent = 16, 32, model.unet.config.sample_size
    else:
        tok = build_caption_tokenizer(["an image of a small dark lesion on skin"])
        model = build_mini_components(cfg, tok)
        cross_res, self_res = cfg.attention.cross_res[0], cfg.attention.self_res[0]
        latent = model.unet.config.sample_size
    for m in (model.unet, model.text_encoder):
        m.to(args.device).eval()
        if dtype != torch.float32:
            m.to(dtype)
    steps = args.steps or cfg.sampling.num_steps
    with torch.no_grad():
        cond = model.encode_prompt(["an image of a small dark lesion on skin"] * args.batch)
        uncond = model.encode_prompt([""])
    mask = torch.zeros(latent * 4, latent * 4)
    mask[latent:3 * latent, latent:3 * latent] = 1
    z = torch.randn(args.batch, model.unet.config.in_channels, latent, latent,
                    generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
    cuda = args.device.startswith("cuda")

    def run(mode: str) -> float:
        sched = model.scheduler("ddim")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        if mode == "plain":
            sample(model.unet, sched, z, cond, uncond, num_steps=steps, guidance_scale=cfg.sampling.guidance_scale, progress=False)
        elif mode == "capture":
            with AttentionCapture(model.unet, cross_res=[cross_res], self_res=[self_res], latent_size=latent) as store:
                sample(model.unet, sched, z, cond, uncond, num_steps=steps, guidance_scale=cfg.sampling.guidance_scale,
                       store=store, progress=False)
        else:
            guide = LayoutGuidance(mask=mask, token_index=5, last=9, cross_res=cross_res, self_res=self_res, eta=20.0)
            sample(model.unet, sched, z, cond, uncond, num_steps=steps, guidance_scale=cfg.sampling.guidance_scale,
                   refine=guide, refine_fraction=0.5, progress=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    modes = ["plain", "capture", "guided"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    peak: dict[str, float] = {}
    for m in modes:  # warm-up
        run(m)
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(run(m))
            peak[m] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    med = {m: statistics.median(v) for m, v in times.items()}
    report = {
        "model": args.arch or f"mini ({args.profile})", "device": args.device, "dtype": args.dtype, "batch": args.batch,
        "steps": steps, "latent": latent, "cross_res": cross_res, "self_res": self_res,
        "threads": torch.get_num_threads(), "seconds_median": med,
        "ratio_capture_vs_plain": med["capture"] / med["plain"], "target_capture": 1.15,
        "ratio_guided_vs_plain": med["guided"] / med["plain"], "target_guided": 2.2,
        "peak_memory_mib": peak, "peak_memory_kind": "cuda max allocated" if cuda else "process peak RSS (cumulative)",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
