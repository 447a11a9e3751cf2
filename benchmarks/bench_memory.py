"""Benchmark 5 of issue 18 (``ctrlgen bench memory``).

Peak memory of each sampling and finetuning step and of the largest attention capture, mini and real SD 2.1
size.

JSON report in ``<output>/bench/``, with the machine and library versions; one measured run per mode:

    python benchmarks/bench_memory.py --profile mini
    python benchmarks/bench_memory.py --profile full --arch sd21_base --device cuda --dtype bfloat16 --train yes
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "memory", *sys.argv[1:]]))
