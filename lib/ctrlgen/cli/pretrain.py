"""``ctrlgen pretrain DOMAIN``: pretrain (or load from the cache) the mini base models of a domain.

Torch and the models are imported inside the handler so that ``ctrlgen --help`` stays fast.
"""
from __future__ import annotations

import argparse

from ctrlgen.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_profile_args, profile_from_args

DOMAIN_CHOICES = ("derm", "scenes", "cxr")


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain", help="pretrain the mini models of a domain",
        description="Train the mini VAE, text encoder and U-Net of an image domain from scratch (chapter 2), on the "
                    "real data under the data root when present, else on the procedural world. Both variants are "
                    "trained by default: 'selfattn' (with the auxiliary self-attention structure loss) and 'plain' "
                    "(without); a complete cached model with the same key is reused.")
    p.add_argument("domain", choices=DOMAIN_CHOICES, help="image domain")
    add_profile_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-self-attention-loss", dest="variant", action="store_const", const="plain",
                       help="train only the plain variant (no auxiliary self-attention loss)")
    which.add_argument("--self-attention-loss", dest="variant", action="store_const", const="selfattn",
                       help="train only the selfattn variant")
    p.add_argument("--force", action="store_true", help="retrain even if a cached model with the same key exists")
    p.add_argument("--stop-after", type=int, default=0, metavar="STEPS",
                   help="stop after this many U-Net steps, keeping a checkpoint that the next call resumes from")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pretrain)
    return p


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ctrlgen.config import ConfigError

    try:
        cfg = profile_from_args(args)
    except ConfigError as err:
        print(f"ctrlgen: error: {err}")
        return EXIT_USAGE
    if args.quiet:  # every bar, the one-off data resize included (tqdm reads TQDM_DISABLE)
        import os

        os.environ["TQDM_DISABLE"] = "1"
    import torch

    from ctrlgen import pretrain as P
    from ctrlgen.data import DataError

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
    except (DataError, ValueError, OSError) as err:
        print(f"ctrlgen: error: {err}")
        return EXIT_FAILED
    return EXIT_OK
