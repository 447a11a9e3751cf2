"""Deterministic, resumable batch streams over in-memory tensors (the base models' training data)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

class Batches:
    """An endless, deterministic stream of batches (epoch e uses permutation ``rng(seed, e)``).

    Re-iterating starts again at epoch 0, so a resumed run that skips ``start`` batches sees exactly
    the batches it would have seen.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int, augment: bool = False):
        self.tensors, self.batch_size, self.seed, self.augment = tensors, batch_size, seed, augment
        self.n = len(next(iter(tensors.values())))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = 0
        bs = min(self.batch_size, self.n)
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = torch.from_numpy(rng.permutation(self.n))
            for i in range(0, self.n - bs + 1, bs):
                idx = order[i:i + bs]
                batch = {k: v[idx] for k, v in self.tensors.items()}
                if self.augment:  # dihedral augmentation of pixel batches (the VAE only)
                    x = batch["pixel_values"]
                    k, flip = int(rng.integers(4)), bool(rng.integers(2))
                    x = torch.rot90(x, k, (2, 3))
                    batch["pixel_values"] = x.flip(3) if flip else x
                yield batch
            epoch += 1


__all__ = ["Batches"]
