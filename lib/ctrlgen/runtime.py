"""Where computation runs: the profile's ``device`` key resolved against the machine."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctrlgen.config import ConfigError


def resolve_device(cfg: Mapping[str, Any]) -> str:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda when available) → a torch device string.

    Asking for cuda on a machine without it is refused with one clear message rather than a
    CUDA error deep inside a training step.
    """
    import torch

    wanted = str(cfg["device"])
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {wanted!r} requested but no CUDA device is available; use -p device=cpu or device=auto")
    if wanted != "cpu" and not wanted.startswith("cuda"):
        raise ConfigError(f"device must be cpu, cuda[:N] or auto, got {wanted!r}")
    return wanted
