"""The one seeding helper (DESIGN.md §5): same seed and profile give the same numbers on CPU."""
from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int, deterministic: bool = True):
    """Seed Python, NumPy and torch (all devices); return a CPU ``torch.Generator`` for diffusers.

    diffusers schedulers and pipelines take an explicit generator; a CPU generator gives the same
    noise on CPU and GPU, so a sample can be reproduced across machines.
    """
    import torch  # heavy: this layer-1 module is loaded by `ctrlgen --help`, which must not load torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return make_generator(seed)


def make_generator(seed: int, device: str = "cpu"):
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``."""
    import torch  # heavy: this layer-1 module is loaded by `ctrlgen --help`, which must not load torch

    return torch.Generator(device=device).manual_seed(seed)


def numpy_rng(seed: int) -> np.random.Generator:
    """A NumPy ``Generator`` for code that should not touch the global state."""
    return np.random.default_rng(seed)
