"""Benchmark 3 of issue 18: dual-branch generation vs the two-stage layout-then-style pipeline (``ctrlgen bench dual``).

Denoising passes (the thesis's measure, T vs 2T) and median wall time at equal steps, guidance included, as ratios:

    python benchmarks/bench_dual_branch.py --profile mini
    python benchmarks/bench_dual_branch.py --profile mini --device cuda --repeats 5
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "dual", *sys.argv[1:]]))
