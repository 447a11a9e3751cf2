"""Benchmark 1 of issue 18 (``ctrlgen bench capture``).

Attention capture overhead: sampling with the capture layout guidance needs vs plain SDPA sampling (ratio,
target <= 1.15).

JSON report in ``<output>/bench/``, with the machine and library versions; medians of several runs:

    python benchmarks/bench_capture.py --profile mini
    python benchmarks/bench_capture.py --arch sd21_base --device cuda --dtype bfloat16 --steps 50
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "capture", *sys.argv[1:]]))
