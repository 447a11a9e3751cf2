"""Adaptive sampling ratios (Eq. 3.4–3.5, §3.3.2) and the subset sampling of Stage II (§3.3.3, ω).

Eq. (3.5) gives ``r_i = 1 − softmax(S̄)_i`` with ``S̄_i = S_i / Σ_j S_j``. For two concepts the r_i sum to 1;
for N concepts they sum to N − 1, so they are divided by N − 1 to be a distribution (a stated choice; it
leaves the two-concept case unchanged). The ablations of Table 3.3: ``mode="equal"`` (1/N each) and
``mode="no_softmax"`` (``r_i = 1 − S̄_i``, renormalised the same way).

A step samples a multi-concept subset with probability ω (thesis 0.3) and otherwise one concept drawn
with the ratios. With three or more concepts the multi-concept subset is drawn uniformly from all subsets
of two or more concepts (the thesis is silent; for two concepts it is the pair).
"""
from __future__ import annotations

from itertools import combinations
from typing import Literal

import numpy as np
import torch

RatioMode = Literal["adaptive", "equal", "no_softmax"]


def sampling_ratios(scores: torch.Tensor | np.ndarray, mode: RatioMode = "adaptive") -> np.ndarray:
    """Single-concept sampling ratios from the attention scores S_i of Eq. (3.4) (module doc for N > 2)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    n = len(s)
    if n < 1 or not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"attention scores must be finite and non-negative, got {s}")
    if n == 1:
        return np.ones(1)
    if mode == "equal":
        return np.full(n, 1.0 / n)
    total = s.sum()
    s_bar = s / total if total > 0 else np.full(n, 1.0 / n)
    if mode == "adaptive":
        e = np.exp(s_bar - s_bar.max())
        r = 1.0 - e / e.sum()
    elif mode == "no_softmax":
        r = 1.0 - s_bar
    else:
        raise ValueError(f"mode must be 'adaptive', 'equal' or 'no_softmax', got {mode!r}")
    return r / (n - 1)


class SubsetSampler:
    """Draws the concept subset s of each training step: |s| > 1 with probability ω, else one concept by ``ratios``."""

    def __init__(self, ratios: np.ndarray, omega: float = 0.3):
        r = np.asarray(ratios, dtype=np.float64)
        if r.ndim != 1 or len(r) < 1 or np.any(r < 0) or not np.isclose(r.sum(), 1.0):
            raise ValueError(f"ratios must be a probability vector, got {r}")
        if not 0.0 <= omega <= 1.0:
            raise ValueError(f"omega={omega} must lie in [0, 1]")
        self.ratios, self.omega = r, float(omega) if len(r) > 1 else 0.0
        n = len(r)
        self.groups = [c for k in range(2, n + 1) for c in combinations(range(n), k)]

    def __call__(self, rng: np.random.Generator) -> tuple[int, ...]:
        if self.groups and rng.random() < self.omega:
            return self.groups[int(rng.integers(len(self.groups)))]
        return (int(rng.choice(len(self.ratios), p=self.ratios)),)


def union_sampler(n: int):
    """Break-a-Scene's union sampling (Avrahami et al. 2023): a random number k ∈ {1..N} of concepts, then a
    random subset of that size (every concept equally likely)."""
    def draw(rng: np.random.Generator) -> tuple[int, ...]:
        k = int(rng.integers(1, n + 1))
        return tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False)))
    return draw


def whole_group(n: int):
    """Custom Diffusion / DisenDiff: every step sees the prompt with all concepts."""
    return lambda rng: tuple(range(n))


__all__ = ["RatioMode", "sampling_ratios", "SubsetSampler", "union_sampler", "whole_group"]
