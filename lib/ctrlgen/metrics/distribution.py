"""Distances between sample sets, for measuring how well a generator learned a distribution."""
from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_projections: int = 128, seed: int = 0) -> float:
    """Mean 1-D Wasserstein-1 distance over random unit directions (sliced Wasserstein-1).

    Each 1-D distance is scipy's exact ``wasserstein_distance`` of the projected samples.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (n, d) arrays with the same d, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_projections, a.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    pa, pb = a @ directions.T, b @ directions.T
    return float(np.mean([wasserstein_distance(pa[:, k], pb[:, k]) for k in range(n_projections)]))
