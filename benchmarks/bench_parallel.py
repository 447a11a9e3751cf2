"""Benchmark 8 (``ctrlgen bench parallel``).

Independent cached classifier fits run by ``ctrlgen.parallel.run_all`` in forked workers (the profile's ``jobs``,
one thread each) against the same fits one after the other on torch's default threads (time ratio, target <= 0.75
on 2 cores). JSON report in ``<output>/bench/``, with the machine and library versions:

    python benchmarks/bench_parallel.py --profile mini
    python benchmarks/bench_parallel.py --profile mini --jobs 4 --epochs 3 --repeats 3
"""
import sys

from ctrlgen.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "parallel", *sys.argv[1:]]))
