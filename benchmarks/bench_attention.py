"""Benchmark of the attention toolkit: ``ctrlgen bench attention`` (see ``ctrlgen.bench``).

    python benchmarks/bench_attention.py --profile mini
    python benchmarks/bench_attention.py --arch sd21_base --device cuda --dtype float16
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))
