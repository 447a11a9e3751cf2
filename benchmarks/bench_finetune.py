"""Benchmark 4 of issue 18 (``ctrlgen bench finetune``).

Region-aware finetuning step (L_rec + alpha L_attn) vs plain finetuning step (ratio, target <= 1.3).

JSON report in ``<output>/bench/``, with the machine and library versions; medians of several runs:

    python benchmarks/bench_finetune.py --profile mini
    python benchmarks/bench_finetune.py --profile mini --repeats 5 --steps 5
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "finetune", *sys.argv[1:]]))
