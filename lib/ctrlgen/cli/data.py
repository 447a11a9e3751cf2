"""``ctrlgen data check | fetch NAME | generate [WORLD ...]`` (wired into the main CLI by ``add_data_parser``)."""
from __future__ import annotations

import argparse
import sys

from ctrlgen.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_profile_args, profile_from_args
from ctrlgen.config import ConfigError
from ctrlgen.data.check import check_all, format_report
from ctrlgen.data.datasets import world_root
from ctrlgen.data.fetch import FetchError, fetch_dataset, refusal
from ctrlgen.data.registry import WORLD_OF
from ctrlgen.paths import data_root


def _check(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)  # a ConfigError becomes exit 2 in ctrlgen.cli.main
    root = data_root(cfg)
    if not root.is_dir():
        print(f"ctrlgen: error: the data root {root} does not exist; create it and put the datasets there in their "
              f"official layouts, or point $CTRLGEN_DATA_ROOT / paths.data_root at the folder that holds them",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"data root: {root}")
    results = check_all(cfg, verify="header" if args.quick else "full")
    print(format_report(results))
    bad = sum(len(r.bad) for r in results)
    if bad and cfg["data"]["strict"]:  # the profile's strict mode: any unusable file is a failure
        print(f"ctrlgen: error: data.strict is set and {bad} file(s) are not usable (listed above)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _fetch(args: argparse.Namespace) -> int:
    reason = refusal(args.name)
    if reason:
        print(f"ctrlgen: error: {reason}", file=sys.stderr)
        return EXIT_USAGE
    cfg = profile_from_args(args)  # a ConfigError becomes exit 2 in ctrlgen.cli.main
    mirror = args.mirror or str(cfg["data"]["fetch_mirror"])
    try:
        installed = fetch_dataset(args.name, data_root(cfg), mirror=mirror, progress=not args.quiet)
    except FetchError as err:
        print(f"ctrlgen: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.name}: installed {len(installed)} item(s) under {data_root(cfg)}")
    return EXIT_OK


def _generate(args: argparse.Namespace) -> int:
    cfg = profile_from_args(args)  # a ConfigError becomes exit 2 in ctrlgen.cli.main
    worlds = args.worlds or list(WORLD_OF)
    unknown = [w for w in worlds if w not in WORLD_OF]
    if unknown:
        print(f"ctrlgen: error: unknown world(s) {', '.join(unknown)}; known: {', '.join(WORLD_OF)}", file=sys.stderr)
        return EXIT_USAGE
    for world in worlds:
        print(f"{world}: {world_root(world, cfg)}")
    return EXIT_OK


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` with sub-commands ``check``, ``fetch`` and ``generate``; each sets ``func``."""
    data = subparsers.add_parser("data", help="inspect, download or generate the datasets",
                                 description="Datasets: what the data root holds, downloads, procedural worlds.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{check,fetch,generate}")
    check = sub.add_parser("check", help="list every dataset: found / partial / missing, counts, bad files, where to get it",
                           description="Report each dataset under the data root, decoding every image and mask "
                                       "(verdicts cached by size and mtime) and naming every unusable file; "
                                       "a data root that does not exist is an error.")
    check.add_argument("--quick", action="store_true",
                       help="read file headers only (misses truncated files; nothing is decoded)")
    add_profile_args(check)
    check.set_defaults(func=_check)
    fetch = sub.add_parser("fetch", help="download an openly available dataset into the data root",
                           description="Download NAME from its official source into its official layout "
                                       "(resumable, checksummed; credentialed datasets are refused with instructions).")
    fetch.add_argument("name", metavar="NAME", help="dataset name, e.g. isic2018_task1, isic2018_task3, ham10000, fitzpatrick17k")
    fetch.add_argument("--mirror", default="", help="base URL to download the same file names from instead")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    add_profile_args(fetch)
    fetch.set_defaults(func=_fetch)
    generate = sub.add_parser("generate", help="build the procedural worlds now (else built on first use)",
                              description="Generate procedural worlds into the cache in the official layouts.")
    generate.add_argument("worlds", nargs="*", metavar="WORLD", help="derm, cxr, multiconcept (default: all)")
    add_profile_args(generate)
    generate.set_defaults(func=_generate)
