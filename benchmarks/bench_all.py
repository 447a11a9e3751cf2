"""Benchmark 1-7 of issue 18 (``ctrlgen bench all``).

Every benchmark in turn on one profile.

JSON report in ``<output>/bench/``, with the machine and library versions; medians of several runs:

    python benchmarks/bench_all.py --profile smoke --repeats 1
    python benchmarks/bench_all.py --profile mini
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "all", *sys.argv[1:]]))
