"""Deterministic train / val / test splits from a seed.

Official splits are used where a dataset ships them (ISIC 2018 validation/test sets, Derm7pt index
files, the R2Gen IU X-ray split, MIMIC-CXR's split CSV). Elsewhere the records are split by a seeded
permutation of their sorted group keys (lesion ids for HAM10000, so images of one lesion never
straddle two splits); the same ids and seed always give the same split, on any machine.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """How many of ``n`` items each split gets (largest remainders; sums to ``n``)."""
    fractions = np.asarray(fractions, dtype=float)
    if fractions.ndim != 1 or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative and not all zero, got {list(fractions)}")
    exact = fractions / fractions.sum() * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def assign_splits(keys: Sequence[str], fractions: Sequence[float], seed: int,
                  names: Sequence[str] = SPLIT_NAMES) -> dict[str, str]:
    """Map each distinct key to a split name; deterministic in (set of keys, fractions, seed)."""
    unique = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    bounds = np.cumsum([0, *split_counts(len(unique), fractions)])
    result: dict[str, str] = {}
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        for i in order[lo:hi]:
            result[unique[i]] = name
    return result
