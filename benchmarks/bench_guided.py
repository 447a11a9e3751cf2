"""Benchmark 2 of issue 18 (``ctrlgen bench guided``).

Layout-guided sampling (L_CA + L_SA on the first 50% of the steps) vs plain sampling (ratio, target <= 2.2).

JSON report in ``<output>/bench/``, with the machine and library versions; medians of several runs:

    python benchmarks/bench_guided.py --profile mini
    python benchmarks/bench_guided.py --arch sd21_base --device cuda --dtype bfloat16 --steps 50
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "guided", *sys.argv[1:]]))
