"""Pieces every ``ctrlgen`` sub-command shares: profile options and exit codes."""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from ctrlgen.config import Config, load_profile, parse_assignments

# Conventional exit codes: 0 ok, 1 the work itself failed (a chapter raised, a check found problems),
# 2 the command line was wrong (unknown chapter, profile or key: argparse uses 2 as well).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_profile_args(parser: argparse.ArgumentParser, default: str = "mini") -> None:
    """``--profile P`` and repeatable ``-p key=value`` overrides (nested keys with dots)."""
    parser.add_argument("--profile", default=default, help=f"profile name: smoke, mini or full (default: {default})")
    parser.add_argument(
        "-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
        help="override one profile value, e.g. -p ch02.toy.train_steps=500 (repeatable)",
    )


def profile_from_args(args: argparse.Namespace) -> Config:
    """The profile named on the command line with its overrides applied (raises ConfigError)."""
    return load_profile(args.profile, parse_assignments(args.params))


def run_later(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command handler that imports ``module`` only when the command runs.

    For commands whose work loads torch: their parser stays light, so ``ctrlgen CMD --help`` is instant.
    The module is named by its full dotted name (tests/test_layering.py reads such names as import edges).
    """
    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    handler.__qualname__ = f"{module}.{function}"
    return handler
