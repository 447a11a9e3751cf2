"""Where computation runs: the profile's ``device`` key resolved against the machine."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctrlgen.config import DEVICE, ConfigError


def resolve_device(cfg: Mapping[str, Any]) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"`` (cuda when available) → a torch device string.

    Asking for an accelerator the machine does not have is refused with one clear message rather
    than a CUDA/MPS error deep inside a training step. The spelling is checked by the profile schema
    (``config.SCHEMA["device"]``) when the profile is loaded; it is checked again here for plain mappings.
    """
    import torch  # heavy: this layer-1 module is loaded by `ctrlgen --help`, which must not load torch

    wanted = str(cfg["device"])
    if not DEVICE.ok(wanted):
        raise ConfigError(f"device = {wanted!r} is not allowed: expected {DEVICE.allowed}")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {wanted!r} requested but no CUDA device is available; use -p device=cpu or device=auto")
        index = int(wanted.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {wanted!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if wanted == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but Apple's Metal backend is not available; use -p device=cpu")
    return wanted
