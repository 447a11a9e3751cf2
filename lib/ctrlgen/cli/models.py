"""``ctrlgen models check|fetch``: what the profile's models are, where they live, whether they are there."""
from __future__ import annotations

import argparse
import sys

from ctrlgen.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_profile_args, profile_from_args
from ctrlgen.config import ConfigError
from ctrlgen.models.registry import check_models, fetch_models


def _print(statuses) -> None:
    """One line per model (key, ok / MISSING what, where), then what is expected there."""
    for s in statuses:
        state = "ok" if s.present else "MISSING " + ", ".join(s.missing)
        print(f"{s.key:40s} {state:30s} {s.folder}  ({s.source})")
        if s.expect:
            print(f"{'':40s} expected: {s.expect}")
    missing = sum(not s.present for s in statuses)
    print(f"{len(statuses) - missing} of {len(statuses)} present" + (f"; {missing} MISSING" if missing else ""))


def _check(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)  # a ConfigError becomes exit 2 in ctrlgen.cli.main
    statuses = check_models(cfg)
    _print(statuses)
    return EXIT_OK if all(s.present for s in statuses) else EXIT_FAILED


def _fetch(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)  # a ConfigError becomes exit 2 in ctrlgen.cli.main
    if cfg["models"]["kind"] != "pretrained":
        print(f"profile {args.profile!r} uses the book's mini models: they are trained by `ctrlgen pretrain`, "
              f"not downloaded (use --profile full)")
        return EXIT_USAGE
    try:
        statuses = fetch_models(cfg, tuple(args.only))
    except Exception as err:  # network, auth, disk: one clear line
        print(f"ctrlgen: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    _print(statuses)
    return EXIT_OK if all(s.present for s in statuses) else EXIT_FAILED


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``models`` with sub-commands ``check`` and ``fetch`` (each sets ``func``)."""
    parser = subparsers.add_parser("models", help="check or fetch the models a profile names")
    sub = parser.add_subparsers(dest="models_command", required=True)
    check = sub.add_parser("check", help="report every model and weight file the profile names, and whether it is there")
    add_profile_args(check)
    check.set_defaults(func=_check)
    fetch = sub.add_parser("fetch", help="download the Stable Diffusion checkpoints the profile names (needs network)")
    add_profile_args(fetch, default="full")
    fetch.add_argument("--only", action="append", default=[], metavar="KEY",
                       help="only this models.pretrained key (sd21, sd14); repeatable")
    fetch.set_defaults(func=_fetch)
