"""Benchmark 6 of issue 18 (``ctrlgen bench book``).

Whole-book wall time per chapter (from the chapters' records) and its growth with samples and training steps.

JSON report in ``<output>/bench/``, with the machine and library versions; medians of several runs:

    python benchmarks/bench_book.py --profile mini --profiles smoke,mini
    python benchmarks/bench_book.py --profile mini --sizes 1,2,4,8 --repeats 3
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "book", *sys.argv[1:]]))
