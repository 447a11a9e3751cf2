"""``ctrlgen pretrain DOMAIN``: pretrain (or load from the cache) the mini base models of a domain.

The parser only: the work is ``ctrlgen.cli.pretrain_run.cmd_pretrain``, imported when the command runs (it
loads torch and the models), so ``ctrlgen pretrain --help`` stays light.
"""
from __future__ import annotations

import argparse

from ctrlgen.cli.common import add_profile_args, run_later
from ctrlgen.data.domains import DOMAINS


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain", help="pretrain the mini models of a domain",
        description="Train the mini VAE, text encoder and U-Net of an image domain from scratch (chapter 2), on the "
                    "real data under the data root when present, else on the procedural world. Both variants are "
                    "trained by default: 'selfattn' (with the auxiliary self-attention structure loss) and 'plain' "
                    "(without); a complete cached model with the same key is reused.")
    p.add_argument("domain", choices=DOMAINS, help="image domain")
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
    p.set_defaults(func=run_later("ctrlgen.cli.pretrain_run", "cmd_pretrain"))
    return p
