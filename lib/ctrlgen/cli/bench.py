"""``ctrlgen bench capture|guided|dual|finetune|memory|book|flops|parallel|attention|pairs|all``: the command line of
the benchmarks in ``ctrlgen.bench`` (1 capture, 2 guided, 4 finetune, 5 memory, 6 book, 7 flops, 8 parallel), and
benchmark 3 (``dual``: ``bench_dual``, on ``ctrlgen.methods.dual_branch.compare_efficiency``). Every report is
written as JSON to ``<output>/bench/<name>-<profile or arch>.json`` with the machine and library versions;
``all`` runs 1–8 in turn.

One table (``COMMANDS``) says, per benchmark, its options, its help and how its function is called; one handler
(``_run``) loads the profile, runs it and publishes the report."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ctrlgen import bench, paths
from ctrlgen.bench import (bench_attention, bench_book, bench_capture, bench_finetune, bench_flops, bench_guided,
                           bench_memory, bench_pairs, bench_parallel, growth_figure, machine)
from ctrlgen.book import toc_chapters
from ctrlgen.cli.common import EXIT_OK, add_profile_args, profile_from_args
from ctrlgen.config import Config
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


def _book(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark 6 with its growth figure saved beside the report (``report["figure"]``)."""
    report = bench_book(cfg, toc_chapters(), args.profiles, args.sizes, args.repeats)
    fig = growth_figure(report)
    figure = paths.output_root(cfg) / "bench" / f"book-{cfg.profile_name}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)
    report["figure"] = figure.name
    return report


def _csv(convert: Callable[[str], Any]) -> Callable[[str], tuple]:
    """An argparse ``type`` for a comma-separated list: ``"1,2,4"`` → ``(1, 2, 4)`` with ``int``."""
    def parse(text: str) -> tuple:
        return tuple(convert(s) for s in text.split(","))
    parse.__name__ = f"comma-separated {convert.__name__}"  # argparse names the type in its error message
    return parse


# ----------------------------------------------------------------------------------------- options, by meaning
Option = tuple[str, dict[str, Any]]
ARCH: Option = ("--arch", dict(default="", help="sd21_base or sd14: the real architecture with random weights"))
DEVICE: Option = ("--device", dict(default="cpu", help="cpu or cuda[:N]"))
DTYPE: Option = ("--dtype", dict(default="float32", choices=["float32", "float16", "bfloat16"]))
BATCH: Option = ("--batch", dict(type=int, default=1))
STEPS: Option = ("--steps", dict(type=int, default=0, help="sampling steps (default: the profile's sampling.num_steps)"))


def repeats(what: str, default: int = 3) -> Option:
    """``--repeats``: ``what`` is repeated (medians reported)."""
    return ("--repeats", dict(type=int, default=default, help=f"{what} (medians reported)"))


SAMPLING: tuple[Option, ...] = (ARCH, DEVICE, DTYPE, BATCH, STEPS, repeats("interleaved repetitions per mode"))


@dataclass(frozen=True)
class Command:
    """One ``ctrlgen bench`` sub-command: its name, ``--help`` line, options, the function whose docstring is its
    description (by name in ``ctrlgen.cli.bench``, looked up when it runs) and how the parsed options become that
    function's arguments (``call(cfg, args) -> report``). The report is written as ``<name>-<tag>.json``, the tag
    being ``--arch`` where given, else the profile, and ``-latent<N>`` after it for ``--latent N``."""

    name: str
    help: str
    function: str
    options: tuple[Option, ...]
    call: Callable[[Config, argparse.Namespace], dict[str, Any]]
    print_machine: bool = True
    repeats_in_all: bool = True  # ``all`` passes its --repeats on

    def report_name(self, cfg: Config, args: argparse.Namespace) -> str:
        side = f"-latent{args.latent}" if getattr(args, "latent", 0) else ""
        return f"{self.name}-{getattr(args, 'arch', '') or cfg.profile_name}{side}"


def _sampling_call(function: str) -> Callable[[Config, argparse.Namespace], dict[str, Any]]:
    """``function(cfg, arch, device, dtype, batch, steps, repeats)`` (benchmarks 1, 2 and attention)."""
    return lambda cfg, a: globals()[function](cfg, a.arch, a.device, a.dtype, a.batch, a.steps, a.repeats)


# the sub-commands, in the order ``ctrlgen bench --help`` lists them
COMMANDS: tuple[Command, ...] = (
    Command("attention", "attention capture and layout guidance vs plain sampling", "bench_attention", SAMPLING,
            _sampling_call("bench_attention"), print_machine=False),
    Command("pairs", "DiDGen lesion-mask pairs per minute, guided vs unguided", "bench_pairs",
            (("--pairs", dict(type=int, default=0,
                              help="pairs per timed run (default: one batch, didgen.eval.pair_batch)")),
             repeats("interleaved repetitions per mode")),
            lambda cfg, a: bench_pairs(cfg, a.pairs, a.repeats), print_machine=False),
    Command("flops", "FLOPs of a training and a sampling step against the machine's matmul rate", "bench_flops",
            (("--batch", dict(type=int, default=0, help="batch size (default: the profile's pretrain.unet.batch_size)")),
             repeats("timed repetitions per step")),
            lambda cfg, a: bench_flops(cfg, a.batch, a.repeats)),
    Command("dual", "dual-branch vs two-stage layout-then-style generation: passes and wall time", "bench_dual",
            (("--targets", dict(type=int, default=2, help="layout masks generated per run (one batch)")),
             repeats("interleaved repetitions per method"), DEVICE),
            lambda cfg, a: bench_dual(cfg, a.targets, a.repeats, a.device)),
    Command("capture", "benchmark 1: sampling with the attention capture vs plain sampling", "bench_capture",
            SAMPLING, _sampling_call("bench_capture")),
    Command("guided", "benchmark 2: layout-guided vs plain sampling", "bench_guided", SAMPLING,
            _sampling_call("bench_guided")),
    Command("finetune", "benchmark 4: region-aware vs plain finetuning step", "bench_finetune",
            (("--steps", dict(type=int, default=3, help="optimizer steps per timed run")),
             repeats("interleaved repetitions per arm")),
            lambda cfg, a: bench_finetune(cfg, a.steps, a.repeats)),
    Command("memory", "benchmark 5: peak memory of each step and of the largest capture", "bench_memory",
            (ARCH, DEVICE, DTYPE, BATCH,
             ("--train", dict(default="auto", choices=["auto", "yes", "no"],
                              help="measure the finetuning steps (auto: only if weights + AdamW state fit in memory)")),
             ("--latent", dict(type=int, default=0, help="latent side of the sampling steps (default: the U-Net's)"))),
            lambda cfg, a: bench_memory(cfg, a.arch, a.device, a.dtype, a.batch, a.train, a.latent),
            repeats_in_all=False),
    Command("parallel", "benchmark 8: independent classifier fits in forked workers vs one after the other",
            "bench_parallel",
            (("--jobs", dict(type=int, default=2, help="independent fits per arm")),
             ("--images", dict(type=int, default=512, help="random training images per fit")),
             ("--epochs", dict(type=int, default=3, help="epochs per fit")),
             repeats("interleaved repetitions per arm", default=1)),
            lambda cfg, a: bench_parallel(cfg, a.jobs, a.images, a.epochs, a.repeats)),
    Command("book", "benchmark 6: the book's wall time per chapter and its growth", "bench_book",
            (("--profiles", dict(default="smoke,mini", type=_csv(str), help="profiles whose chapter records are read")),
             ("--sizes", dict(default="1,2,4", type=_csv(int), help="pairs generated / training steps of the growth fit")),
             repeats("repetitions per size", default=1)),
            _book, repeats_in_all=False),
)
BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}
ALL = ("capture", "guided", "dual", "finetune", "memory", "book", "flops", "parallel")  # benchmarks 1–8, the order ``all`` runs


def _run(args: argparse.Namespace) -> int:
    """The one handler: the profile, the benchmark's report, the machine line, the JSON file."""
    command = BY_NAME[args.benchmark]
    cfg = profile_from_args(args)
    report = command.call(cfg, args)
    if command.print_machine:
        _print_machine(report)
    return _publish(cfg, report, command.report_name(cfg, args))


def _all(args: argparse.Namespace) -> int:
    """Benchmarks 1–8 in turn on one profile, each with its defaults and ``--repeats``."""
    profile = ["--profile", args.profile, *sum((["-p", p] for p in args.params), [])]
    codes = []
    for name in ALL:
        extra = ["--repeats", str(args.repeats)] if BY_NAME[name].repeats_in_all else []
        sub = _PARSERS[name].parse_args([*profile, *extra])
        print(f"\n== ctrlgen bench {name} ==")
        codes.append(sub.func(sub))
    return max(codes)


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def add_bench_parser(subparsers) -> None:
    """``ctrlgen bench``: one sub-command per row of ``COMMANDS``, and ``all``."""
    parser = subparsers.add_parser("bench", help="run the benchmarks (speed as ratios, peak memory)",
                                    description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for command in COMMANDS:
        sub = groups.add_parser(command.name, help=command.help, description=globals()[command.function].__doc__)
        add_profile_args(sub)
        for flag, kwargs in command.options:
            sub.add_argument(flag, **kwargs)
        sub.set_defaults(func=_run, benchmark=command.name)
    every = groups.add_parser("all", help="benchmarks 1-7 in turn on one profile")
    add_profile_args(every)
    every.add_argument("--repeats", type=int, default=3)
    every.set_defaults(func=_all)
    _PARSERS.update(groups.choices)
