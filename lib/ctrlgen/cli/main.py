"""``ctrlgen`` — run chapters, build the book, check data and models.

Exit codes: 0 success, 1 the work failed (a chapter raised, a build failed), 2 bad usage
(unknown chapter, profile or key; the message lists what is allowed).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from ctrlgen import __version__, paths
from ctrlgen.book import ChapterFailed, build_site, run_chapter, toc_chapters
from ctrlgen.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_profile_args
from ctrlgen.config import ConfigError, load_profile, parse_assignments

# Sub-command groups in ``ctrlgen.cli``; each module exposes add_<name>_parser. They are imported only
# when their command is used (``models``, ``pretrain`` and ``bench`` pull in torch and diffusers), so
# ``ctrlgen --help`` and ``ctrlgen run`` do not load them.
PLUGINS = {
    "data": ("ctrlgen.cli.data", "add_data_parser", "inspect, download or generate the datasets"),
    "models": ("ctrlgen.cli.models", "add_models_parser", "check or fetch the models a profile names"),
    "pretrain": ("ctrlgen.cli.pretrain", "add_pretrain_parser", "pretrain the mini models of a domain"),
    "bench": ("ctrlgen.cli.bench", "add_bench_parser", "run the benchmarks (speed as ratios, peak memory)"),
}


def _err(message: str) -> None:
    print(f"ctrlgen: error: {message}", file=sys.stderr)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _progress_label(args: argparse.Namespace, label: str) -> str | None:
    """The status-line label, or None for no live progress (``--quiet``; ``-v`` streams the output instead)."""
    return None if args.quiet or args.verbose else label


def _outcome(result) -> str:
    if result.cached:
        return "up to date (cached)"
    why = f" ({'; '.join(result.reasons)})" if result.reasons else ""
    return f"executed in {result.seconds:.1f} s{why}"


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_assignments(args.params)
    try:
        result = run_chapter(args.chapter, args.profile, overrides, force=not args.cached, log_output=args.verbose,
                             progress=_progress_label(args, "[1/1]"))
    except ChapterFailed as err:
        _err(str(err))
        return EXIT_FAILED
    _say(args, f"{result.chapter}: {_outcome(result)} -> {result.notebook}")
    return EXIT_OK


def cmd_book(args: argparse.Namespace) -> int:
    overrides = parse_assignments(args.params)
    paths.check_data_root(load_profile(args.profile, overrides))  # refuse bad keys, values or roots before anything runs
    start = time.perf_counter()
    chapters = toc_chapters()
    for i, chapter in enumerate(chapters, 1):
        label = f"[{i}/{len(chapters)}]"
        _say(args, f"{label} {chapter} on {args.profile} ...")
        try:
            result = run_chapter(chapter, args.profile, overrides, force=args.force, log_output=args.verbose,
                                 progress=_progress_label(args, label))
        except ChapterFailed as err:
            _err(f"{err}\nthe book was not rebuilt; the previous site (if any) is untouched")
            return EXIT_FAILED
        _say(args, f"    {_outcome(result)} -> {result.notebook}")
    if args.no_html:
        return EXIT_OK
    _say(args, "building the HTML book with jupyter-book ...")
    try:
        site = build_site(args.profile, strict=not args.no_strict)
    except (RuntimeError, FileNotFoundError) as err:
        _err(str(err))
        return EXIT_FAILED
    _say(args, f"book built in {time.perf_counter() - start:.0f} s: {site / 'index.html'}")
    return EXIT_OK


def cmd_chapters(args: argparse.Namespace) -> int:
    for chapter in toc_chapters():
        print(chapter)
    return EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    cfg = load_profile(args.profile, parse_assignments(args.params))
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    return EXIT_OK


def _plugin_available(module_name: str) -> bool:
    """Whether the plugin's file exists, without importing its package (find_spec would)."""
    package_dir = Path(__file__).resolve().parents[1]
    relative = Path(*module_name.split(".")[1:])
    return package_dir.joinpath(relative).with_suffix(".py").is_file()


def build_parser(argv: Sequence[str] | None = None, load_all: bool = False) -> argparse.ArgumentParser:
    """The full parser; plugin groups are imported only if ``argv`` uses them (or ``load_all``)."""
    parser = argparse.ArgumentParser(
        prog="ctrlgen",
        description="The executable thesis: run chapters with papermill, build the Jupyter Book, manage data and models.",
        epilog="Profiles: smoke (seconds, CI), mini (default, CPU, small scale), full (GPU, paper scale).",
    )
    parser.add_argument("--version", action="version", version=f"ctrlgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="execute one chapter with papermill", description=(
        "Convert chapters/CHAPTER.py to a notebook and execute it with papermill into "
        "_build/executed/<profile>/CHAPTER.ipynb (the source is never modified). While it runs, a status "
        "line on stderr shows the cell, the training/sampling bars and the time against the last run."))
    run.add_argument("chapter", help="chapter name from _toc.yml or a unique prefix (e.g. ch02)")
    add_profile_args(run)
    run.add_argument("--cached", action="store_true",
                     help="skip the chapter if none of its inputs changed since its executed copy")
    run.add_argument("-v", "--verbose", action="store_true", help="stream the notebook's output")
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no live progress)")
    run.set_defaults(func=cmd_run)

    book = sub.add_parser("book", help="execute every chapter and build the HTML book", description=(
        "Execute every chapter of _toc.yml in order, then build the HTML book with jupyter-book into "
        "_build/html/<profile>/. A chapter is re-executed only when its own inputs changed (its source, the "
        "library modules it imports, the profile values it read, the data) unless --force."))
    add_profile_args(book)
    book.add_argument("--force", action="store_true", help="re-execute chapters even if their executed copy is up to date")
    book.add_argument("--no-html", action="store_true", help="execute the chapters only")
    book.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    book.add_argument("-v", "--verbose", action="store_true", help="stream the notebooks' output")
    book.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no live progress)")
    book.set_defaults(func=cmd_book)

    chapters = sub.add_parser("chapters", help="list the chapters in book order")
    chapters.set_defaults(func=cmd_chapters)

    profile = sub.add_parser("profile", help="print a profile with overrides applied (checks the keys)")
    add_profile_args(profile)
    profile.set_defaults(func=cmd_profile)

    words = [w for w in (argv if argv is not None else sys.argv[1:]) if not w.startswith("-")]
    for name, (module_name, function, help_text) in PLUGINS.items():
        if not _plugin_available(module_name):
            continue  # that layer is not built yet
        if load_all or (words and words[0] == name):
            getattr(importlib.import_module(module_name), function)(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; loaded when used
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        _err(str(err))
        return EXIT_USAGE
    except KeyError as err:  # unknown chapter / table: the message lists the known ones
        _err(str(err.args[0]) if err.args else str(err))
        return EXIT_USAGE
    except FileNotFoundError as err:
        _err(str(err))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
