"""Thesis methods and baselines (DESIGN.md §3 layer 6): one module per method, ``baselines/`` for the comparisons."""
