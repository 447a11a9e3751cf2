"""Cached trained-model folders: content keys, resumable work folders, atomic publishing.

Every model the book trains itself (the mini base models of ``ctrlgen.experiments.base_models``, chapter 4's
finetuned models of ``ctrlgen.experiments.ch04_didgen``) lives in a folder holding the model and one JSON record
with its ``key`` — a hash of everything the weights depend on (settings, data fingerprint, code
version). A folder whose key matches is reused; otherwise training runs in a work folder (checkpoints,
resumed by the next call with the same key) and the finished model replaces the old folder in one
rename, so a reader never sees half a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ctrlgen.paths import make_public
from ctrlgen.result_cache import code_text

LIB_ROOT = Path(__file__).resolve().parents[1]


def plain(value: Any) -> Any:
    """A profile section as a plain dict (profiles are ``Config`` mappings with ``to_dict``)."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def key_hash(parts: Any) -> str:
    """The 16-hex-digit key of a JSON-able description of what a model depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version(files: Iterable[str]) -> str:
    """Hash of library files (paths relative to ``lib/ctrlgen``) whose change must retrain a model.

    A Python file counts by its syntax tree without docstrings (``code_text``): a reworded comment or
    docstring does not retrain twenty minutes of base model; any change to what the code does does.
    """
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode())
        path = LIB_ROOT / rel
        h.update(code_text(path.read_text()).encode() if path.suffix == ".py" else path.read_bytes())
    return h.hexdigest()[:12]


def read_json(path: Path) -> dict | None:
    """The record at ``path``, or None if it is missing or unreadable (an incomplete folder is retrained)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def cached_record(folder: Path, record_name: str, key: str, required: str = "") -> dict | None:
    """The folder's record if its key is ``key`` (and ``required`` exists inside it), else None."""
    info = read_json(folder / record_name)
    if info and info.get("key") == key and (not required or (folder / required).exists()):
        return info
    return None


def work_dir(parent: Path, name: str, fresh: bool = False) -> Path:
    """The work folder of an unfinished training (``fresh``: its old checkpoints are discarded)."""
    work = Path(parent) / ".work" / name
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def publish(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``tmp`` (rename; the old one is removed first)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def save_folder(folder: Path, write: Callable[[Path], None], record_name: str, record: Mapping[str, Any],
                work: Path | None = None) -> None:
    """Write a model with ``write(tmp)`` and its record into a fresh folder beside ``folder``, publish it
    over ``folder`` atomically and remove the finished training's ``work`` folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    write(tmp)
    (tmp / record_name).write_text(json.dumps(dict(record), indent=1, default=str))
    make_public(tmp)  # mkdtemp 0700 and safetensors 0600 would hide the model from other users
    publish(tmp, folder)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["plain", "key_hash", "code_version", "read_json", "cached_record", "work_dir", "publish", "save_folder"]
