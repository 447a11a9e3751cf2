"""The work of ``ctrlgen pretrain DOMAIN`` (its parser is ``ctrlgen.cli.pretrain``): pretrain, or load from the
cache, the mini base models of a domain and print what each measures; for ``scenes`` also each variant's stage B
(word alignment, ``experiments.base_models.word_alignment``)."""
from __future__ import annotations

import argparse
import os

import torch

from ctrlgen.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, profile_from_args
from ctrlgen.config import ConfigError
from ctrlgen.data import DataError
from ctrlgen.experiments import base_models as P
from ctrlgen.experiments.base_models import word_alignment


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Train (or load) the requested variants; exit 0, 1 when the data or training failed, 2 on bad usage."""
    try:
        cfg = profile_from_args(args)
    except ConfigError as err:
        print(f"ctrlgen: error: {err}")
        return EXIT_USAGE
    if args.quiet:  # every bar, the one-off data resize included (tqdm reads TQDM_DISABLE)
        os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    variants = P.available_variants(cfg, args.domain)
    if args.variant:
        if args.variant not in variants:
            print(f"ctrlgen: error: variant {args.variant} is not trained for {args.domain} (available: {', '.join(variants)})")
            return EXIT_USAGE
        variants = (args.variant,)
    try:
        data = P.load_domain_data(cfg, args.domain)
        print(data.describe(), flush=True)
        for i, v in enumerate(variants):
            r = P.pretrain_domain(cfg, args.domain, v == "selfattn", force=args.force, progress=not args.quiet,
                                  stop_after=args.stop_after, data=data, force_vae=args.force and i == 0)
            state = "cached" if r.cached else (f"stopped at step {r.steps} (resume with the same command)"
                                               if not r.metrics else f"trained in {r.seconds:.0f} s")
            default = " (default base model)" if r.is_default else ""
            print(f"{args.domain}/{v}{default}: {state} -> {r.folder}", flush=True)
            for k, val in r.metrics.items():
                print(f"    {k}: {val:.4g}" if isinstance(val, float) else f"    {k}: {val}")
            if args.domain == word_alignment.DOMAIN and r.metrics:  # stage B, the scenes models only (chapter 2)
                info = word_alignment.align_words(cfg, v, progress=not args.quiet, data=data)
                print(f"{args.domain}/{v} + words (stage B, chapter 3 starts from it): {info['steps']} steps, "
                      f"{info['seconds']:.0f} s of training -> {word_alignment.aligned_dir(cfg, v)}", flush=True)
    except (DataError, ValueError, OSError) as err:
        print(f"ctrlgen: error: {err}")
        return EXIT_FAILED
    return EXIT_OK
