"""Checkpoints of a training run: trainable tensors in safetensors, optimizer and RNG state, written atomically.

A checkpoint is a folder ``<run>/checkpoint-<step:07d>/`` holding ``trainable.safetensors`` (the
trainable parameters by name), ``ema.safetensors`` (if EMA is on), ``state.pt`` (optimizer,
lr scheduler, step, RNG states). It is written to a temporary folder and renamed, so a killed run
never leaves a half checkpoint; ``latest_checkpoint`` finds the newest complete one.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ctrlgen.paths import make_public

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu").contiguous() for n, t in named.items()}


def save_checkpoint(run_dir: str | Path, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any],
                    ema: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` checkpoints."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step:07d}-", dir=run_dir))
    try:
        save_file(_tensors(trainable), str(tmp / "trainable.safetensors"))
        if ema is not None:
            save_file(_tensors(ema), str(tmp / "ema.safetensors"))
        torch.save({**state, "step": step}, tmp / "state.pt")
        make_public(tmp)  # usual umask permissions, not mkdtemp's 0700 nor safetensors' 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := PATTERN.match(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict, dict | None]:
    """(trainable tensors, state, ema tensors or None) of a checkpoint folder."""
    folder = Path(folder)
    trainable = load_file(str(folder / "trainable.safetensors"), device=str(map_location))
    ema = load_file(str(folder / "ema.safetensors"), device=str(map_location)) if (folder / "ema.safetensors").is_file() else None
    state = torch.load(folder / "state.pt", map_location=map_location, weights_only=False)
    return trainable, state, ema
