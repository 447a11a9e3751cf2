"""``ctrlgen bench capture|guided|dual|finetune|memory|book|flops|attention|pairs|all``: the command line of the
benchmarks of issue 18 in ``ctrlgen.bench`` (1 capture, 2 guided, 4 finetune, 5 memory, 6 book, 7 flops), and
benchmark 3 (``dual``: ``bench_dual``, on ``ctrlgen.methods.dual_branch.compare_efficiency``). Every report is
written as JSON to ``<output>/bench/<name>-<profile or arch>.json`` with the machine and library versions;
``all`` runs 1–7 in turn."""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ctrlgen import bench, paths
from ctrlgen.bench import (bench_attention, bench_book, bench_capture, bench_finetune, bench_flops, bench_guided,
                           bench_memory, bench_pairs, growth_figure, machine)
from ctrlgen.book import toc_chapters
from ctrlgen.cli.common import EXIT_OK, add_profile_args, profile_from_args
from ctrlgen.methods.didgen import setup_placeholders
from ctrlgen.methods.dual_branch import DualBranchConfig, DualBranchGenerator, compare_efficiency, invert_style
from ctrlgen.models import build_caption_tokenizer, build_mini_components
from ctrlgen.results import atomic_write_json


def _publish(cfg, report: dict, name: str) -> int:
    """Write ``report`` to ``<output>/bench/<name>.json`` atomically, print it and where it went."""
    target = paths.output_root(cfg) / "bench" / f"{name}.json"
    report = {"name": name, "profile": getattr(cfg, "profile_name", ""),
              "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **report}
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
    report = bench_flops(cfg, args.batch, args.repeats)
    _print_machine(report)
    return _publish(cfg, report, f"flops-{cfg.profile_name}")


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


def _print_machine(report: dict[str, Any]) -> None:
    print(f"machine: {report['machine']} ({report['cpus']} CPUs, {report['threads']} threads"
          f"{', ' + report['cuda'] if report.get('cuda') else ''}), torch {report['torch']}, "
          f"diffusers {report['diffusers']}")


def _dual(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    report = bench_dual(cfg, args.targets, args.repeats, args.device)
    _print_machine(report)
    return _publish(cfg, report, f"dual-{cfg.profile_name}")


def _capture(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    report = bench_capture(cfg, args.arch, args.device, args.dtype, args.batch, args.steps, args.repeats)
    _print_machine(report)
    return _publish(cfg, report, f"capture-{args.arch or cfg.profile_name}")


def _guided(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    report = bench_guided(cfg, args.arch, args.device, args.dtype, args.batch, args.steps, args.repeats)
    _print_machine(report)
    return _publish(cfg, report, f"guided-{args.arch or cfg.profile_name}")


def _finetune(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    report = bench_finetune(cfg, args.steps, args.repeats)
    _print_machine(report)
    return _publish(cfg, report, f"finetune-{cfg.profile_name}")


def _memory(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    report = bench_memory(cfg, args.arch, args.device, args.dtype, args.batch, args.train, args.latent)
    _print_machine(report)
    side = f"-latent{args.latent}" if args.latent else ""
    return _publish(cfg, report, f"memory-{args.arch or cfg.profile_name}{side}")


def _book(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    report = bench_book(cfg, toc_chapters(), tuple(args.profiles.split(",")), sizes, args.repeats)
    _print_machine(report)
    fig = growth_figure(report)
    figure = paths.output_root(cfg) / "bench" / f"book-{cfg.profile_name}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)
    report["figure"] = figure.name
    return _publish(cfg, report, f"book-{cfg.profile_name}")


def _all(args: argparse.Namespace) -> int:
    """Benchmarks 1–7 in turn on one profile, each with its defaults and ``--repeats``."""
    profile = ["--profile", args.profile, *sum((["-p", p] for p in args.params), [])]
    codes = []
    for name in ("capture", "guided", "dual", "finetune", "memory", "book", "flops"):
        extra = ["--repeats", str(args.repeats)] if name not in ("memory", "book") else []
        sub = _PARSERS[name].parse_args([*profile, *extra])
        print(f"\n== ctrlgen bench {name} ==")
        codes.append(sub.func(sub))
    return max(codes)


_PARSERS: dict[str, argparse.ArgumentParser] = {}


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
    for name, fn, helptext in (("capture", _capture, "benchmark 1: sampling with the attention capture vs plain sampling"),
                               ("guided", _guided, "benchmark 2: layout-guided vs plain sampling")):
        sub = groups.add_parser(name, help=helptext, description=getattr(bench, f"bench_{name}").__doc__)
        add_profile_args(sub)
        sub.add_argument("--arch", default="", help="sd21_base or sd14: the real architecture with random weights")
        sub.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        sub.add_argument("--batch", type=int, default=1)
        sub.add_argument("--steps", type=int, default=0, help="sampling steps (default: the profile's sampling.num_steps)")
        sub.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per mode (medians reported)")
        sub.set_defaults(func=fn)
    finetune = groups.add_parser("finetune", help="benchmark 4: region-aware vs plain finetuning step",
                                 description=bench_finetune.__doc__)
    add_profile_args(finetune)
    finetune.add_argument("--steps", type=int, default=3, help="optimizer steps per timed run")
    finetune.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per arm (medians reported)")
    finetune.set_defaults(func=_finetune)
    memory = groups.add_parser("memory", help="benchmark 5: peak memory of each step and of the largest capture",
                               description=bench_memory.__doc__)
    add_profile_args(memory)
    memory.add_argument("--arch", default="", help="sd21_base or sd14: the real architecture with random weights")
    memory.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    memory.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    memory.add_argument("--batch", type=int, default=1)
    memory.add_argument("--train", default="auto", choices=["auto", "yes", "no"],
                        help="measure the finetuning steps (auto: only if weights + AdamW state fit in memory)")
    memory.add_argument("--latent", type=int, default=0,
                        help="latent side of the sampling steps (default: the U-Net's)")
    memory.set_defaults(func=_memory)
    book = groups.add_parser("book", help="benchmark 6: the book's wall time per chapter and its growth",
                             description=bench_book.__doc__)
    add_profile_args(book)
    book.add_argument("--profiles", default="smoke,mini", help="profiles whose chapter records are read")
    book.add_argument("--sizes", default="1,2,4", help="pairs generated / training steps of the growth fit")
    book.add_argument("--repeats", type=int, default=1, help="repetitions per size (medians reported)")
    book.set_defaults(func=_book)
    every = groups.add_parser("all", help="benchmarks 1-7 in turn on one profile")
    add_profile_args(every)
    every.add_argument("--repeats", type=int, default=3)
    every.set_defaults(func=_all)
    _PARSERS.update(groups.choices)
