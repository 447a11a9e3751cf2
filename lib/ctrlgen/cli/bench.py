"""``ctrlgen bench attention|pairs|flops``: the command line of the benchmarks in ``ctrlgen.bench``."""
from __future__ import annotations

import argparse
import json
import sys

from ctrlgen import bench, paths
from ctrlgen.bench import bench_attention, bench_flops, bench_pairs
from ctrlgen.cli.common import EXIT_OK, add_profile_args, profile_from_args
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
