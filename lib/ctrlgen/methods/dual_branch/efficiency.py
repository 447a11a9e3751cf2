"""Counting denoising passes and timing generators side by side (§5.3.3 "halving inference cost", issue 18 benchmark 3).

The thesis measures cost in denoising passes: the dual-branch model runs one trajectory of T batched U-Net
calls, the two-stage pipeline two trajectories (2T). ``UNetCalls`` counts the U-Net calls a generator
actually makes, by kind: ``denoising`` (the trajectory's calls, no gradient), ``guidance`` (calls made with
gradients enabled, i.e. the refiner's L_CA/L_SA captures) and ``annotation`` (the final-step maps of Eq. 4.11),
together with the batch rows each kind processed. ``median_seconds`` times several generators interleaved
after a warm-up (ratios of medians, never a timed assertion).
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

KINDS = ("denoising", "guidance", "annotation")


class UNetCalls:
    """Context manager: count the forward calls of ``unet`` by kind (module doc) with a forward pre-hook.

    ``phase`` names the kind of the no-gradient calls from now on (default ``denoising``); calls made with
    gradients enabled always count as ``guidance``. ``counts()`` gives calls per kind, ``rows()`` batch rows.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.phase = "denoising"
        self._calls: Counter[str] = Counter()
        self._rows: Counter[str] = Counter()
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kind = "guidance" if torch.is_grad_enabled() else self.phase
        x = args[0] if args else kwargs["sample"]
        self._calls[kind] += 1
        self._rows[kind] += int(x.shape[0])

    def __enter__(self) -> "UNetCalls":
        self._handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def counts(self) -> dict[str, int]:
        """U-Net calls per kind (every kind present, 0 when none)."""
        return {k: int(self._calls.get(k, 0)) for k in sorted(set(KINDS) | set(self._calls))}

    def rows(self) -> dict[str, int]:
        """Batch rows per kind (a call on ``[uncond; cond] x [layout, style]`` of one target counts 4)."""
        return {k: int(self._rows.get(k, 0)) for k in sorted(set(KINDS) | set(self._rows))}


def median_seconds(runs: Mapping[str, Callable[[], Any]], repeats: int = 3,
                   synchronize: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall time of each callable: one warm-up each, then ``repeats`` rounds interleaved (``a, b, a, b, ...``)
    so that drifts in machine load hit every method alike. Returns the times of the timed rounds."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    sync = synchronize or (lambda: None)
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    """Median of each method's times."""
    return {name: statistics.median(v) for name, v in times.items()}


__all__ = ["KINDS", "UNetCalls", "median_seconds", "medians"]
