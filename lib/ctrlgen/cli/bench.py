"""``ctrlgen bench attention|pairs|flops|dual``: the command line of the benchmarks in ``ctrlgen.bench``, and
benchmark 3 of issue 18 (``dual``: ``bench_dual``, on ``ctrlgen.methods.dual_branch.compare_efficiency``)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

import diffusers
import numpy as np
import torch

from ctrlgen import bench, paths
from ctrlgen.bench import bench_attention, bench_flops, bench_pairs
from ctrlgen.cli.common import EXIT_OK, add_profile_args, profile_from_args
from ctrlgen.methods.didgen import setup_placeholders
from ctrlgen.methods.dual_branch import DualBranchConfig, DualBranchGenerator, compare_efficiency, invert_style
from ctrlgen.models import build_caption_tokenizer, build_mini_components
from ctrlgen.results import atomic_write_json


def _publish(cfg, report: dict, name: str) -> int:
    """Write ``report`` to ``<output>/bench/<name>.json`` atomically, print it and where it went."""
    target = paths.output_root(cfg) / "bench" / f"{name}.json"
    atomic_write_json(target, report)
    json.dump(report, sys.stdout, indent=2)
    print(f"\nwritten to {target}")
    return EXIT_OK


def _pairs(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    return _publish(cfg, bench_pairs(cfg, args.pairs, args.repeats), f"pairs-{cfg.profile_name}")


def _attention(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    report = bench_attention(cfg, args.arch, args.device, args.dtype, args.batch, args.steps, args.repeats)
    return _publish(cfg, report, f"attention-{args.arch or cfg.profile_name}")


def _flops(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    return _publish(cfg, bench_flops(cfg, args.batch, args.repeats), f"flops-{cfg.profile_name}")


def machine() -> dict[str, Any]:
    """The machine and library versions a benchmark ran on."""
    return {"machine": platform.processor() or platform.machine(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""}


def bench_dual(cfg, targets: int = 2, repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Issue 18, benchmark 3: the dual-branch model (§5.3.3) against the two-stage layout-then-style pipeline
    (StyleID-style injection into a layout image) at equal steps T = ``sampling.inversion_steps``, on the
    profile's mini architecture with random weights: denoising passes (T vs 2T) and median wall time,
    guidance backward passes included, as ratios; the style inversion is precomputed (the thesis's count)."""
    prompt = f"{cfg.didgen.prefix}"
    tok = build_caption_tokenizer([prompt.replace("<lesion>", "lesion").replace("<skin>", "skin")],
                                  model_max_length=int(cfg.models.mini.text_encoder.max_length))
    model = build_mini_components(cfg, tok)
    setup_placeholders(model)
    if device != "cpu":
        model.to(device)
    config = DualBranchConfig.from_profile(cfg)
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    style = torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))
    reference = invert_style(model, style, prompt, config)
    yy, xx = np.mgrid[:side, :side]
    masks = np.stack([(yy - side / 2 + i % 5) ** 2 + (xx - side / 2) ** 2 <= (side / 4) ** 2 for i in range(targets)])
    report = compare_efficiency(DualBranchGenerator(model, config), reference, masks, prompt, repeats)
    return {"model": f"mini architecture ({cfg.profile_name}), random weights", "device": device,
            "prompt": prompt, **report, **machine()}


def _dual(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    report = bench_dual(cfg, args.targets, args.repeats, args.device)
    print(f"machine: {report['machine']} ({report['cpus']} CPUs, {report['threads']} threads), "
          f"torch {report['torch']}, diffusers {report['diffusers']}")
    return _publish(cfg, report, f"dual-{cfg.profile_name}")


def add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run the benchmarks (speed as ratios, peak memory)",
                                    description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
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
    flops = groups.add_parser("flops", help="FLOPs of a training and a sampling step against the machine's matmul rate",
                              description=bench_flops.__doc__)
    add_profile_args(flops)
    flops.add_argument("--batch", type=int, default=0, help="batch size (default: the profile's pretrain.unet.batch_size)")
    flops.add_argument("--repeats", type=int, default=3, help="timed repetitions per step (medians reported)")
    flops.set_defaults(func=_flops)
    dual = groups.add_parser("dual", help="dual-branch vs two-stage layout-then-style generation: passes and wall time",
                             description=bench_dual.__doc__)
    add_profile_args(dual)
    dual.add_argument("--targets", type=int, default=2, help="layout masks generated per run (one batch)")
    dual.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per method (medians reported)")
    dual.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    dual.set_defaults(func=_dual)
