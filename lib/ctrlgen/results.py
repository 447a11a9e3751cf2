"""Result records: one JSON file per chapter run, written atomically (DESIGN.md §4).

A chapter starts with :meth:`ChapterRun.start` (profile, seed, threads, quiet library logging),
records metrics keyed by the thesis table they mirror (``run.log_table("4.1", frame)`` or
``run.log_metric("4.1", "Mine-DermPrompt", "FID", 12.3)``), shows figures through it
(``run.show(fig, "samples")``: saved beside the record and displayed) and calls ``run.save()`` at the
end. The record lands in ``<output>/results/<profile>/<chapter>.json`` with profile, overrides, seed,
git commit and wall time.

Metrics are the run's numbers: the same profile and seed give the same metrics on a CPU, from a warm
or an empty cache. Wall-clock measurements depend on the machine and its load, so they are kept apart
(``run.log_timing``, the record's ``timings``) and never compared for reproducibility.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ctrlgen import paths
from ctrlgen.config import Config, load_profile
from ctrlgen.seeding import seed_everything


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    A reader sees either the old file or the complete new one, never a partial write. The file gets
    the usual permissions under the process umask (``paths.publish_mode``), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        paths.make_public(tmp)  # mkstemp's 0600 would hide the record from other users of the site
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def _jsonable(obj: Any, nonfinite_to_none: bool = True,
              error: str = "cannot store {kind} in a result record: {value!r}") -> Any:
    """Plain JSON types; numpy/torch scalars become Python numbers, NaN/inf become None unless
    ``nonfinite_to_none`` is False (``result_cache`` keys keep them, so existing keys stay the same).
    ``error`` is the message for anything else, formatted with ``kind`` and ``value``."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, nonfinite_to_none, error) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, nonfinite_to_none, error) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if nonfinite_to_none and isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(error.format(kind=type(obj).__name__, value=obj))


def git_commit(root: Path | None = None) -> str:
    """The checkout's commit (``-dirty`` appended when there are uncommitted changes), or "unknown"."""
    root = root or paths.project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


class ChapterRun:
    """Collects one chapter run's metrics and figures and writes its JSON record.

    ``metrics`` is ``{table_id: {row: {column: value}}}``; table ids are the thesis's (``"4.1"``)
    or a chapter-local id for measurements the thesis has no table for (``"ch02.toy"``).
    """

    def __init__(self, chapter: str, cfg: Config):
        self.chapter = chapter
        self.cfg = cfg
        self.profile = cfg.profile_name or "unnamed"
        self.started = time.perf_counter()
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.metrics: dict[str, dict[str, dict[str, Any]]] = {}
        self.timings: dict[str, dict[str, dict[str, Any]]] = {}
        self.figures: list[str] = []
        self.notes: list[str] = []
        self.dir = paths.results_dir(self.profile, cfg)
        self.figure_dir = self.dir / "figures" / chapter

    @classmethod
    def start(cls, chapter: str, profile: str, overrides: Mapping[str, Any] | None = None) -> "ChapterRun":
        """The first call of every chapter: load ``profile`` with ``overrides``, seed everything, fix the
        torch threads (1 on smoke, where a kernel shares the machine with the test runner; at most 2
        otherwise) and quieten the libraries' progress bars and warnings that would clutter the page."""
        import torch  # noqa: PLC0415 — results is layer 1; torch is needed only by chapters
        from diffusers.utils import logging as diffusers_logging  # noqa: PLC0415 — idem
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 — idem

        cfg = load_profile(profile, dict(overrides or {}))
        seed_everything(cfg.seed)
        torch.set_num_threads(1 if cfg.profile_name == "smoke" else min(2, torch.get_num_threads()))
        hf_logging.disable_progress_bar()  # no "Loading weights" bars in the book
        hf_logging.set_verbosity_error()  # an over-long prompt's untruncated token count is checked, not an error
        diffusers_logging.set_verbosity_error()  # "modules kept in float32: []" on every load
        return cls(chapter, cfg)

    @property
    def record_path(self) -> Path:
        return self.dir / f"{self.chapter}.json"

    def log_metric(self, table: str, row: str, column: str, value: Any) -> None:
        self.metrics.setdefault(table, {}).setdefault(str(row), {})[str(column)] = value

    def log_timing(self, table: str, row: str, column: str, seconds: Any) -> None:
        """A wall-clock measurement (seconds, items per minute, a time ratio): kept in the record's ``timings``,
        apart from the metrics, because it depends on the machine and its load, not on the profile and seed."""
        self.timings.setdefault(table, {}).setdefault(str(row), {})[str(column)] = seconds

    def log_table(self, table: str, frame: Any) -> None:
        """Record every cell of a pandas DataFrame (rows = index, columns = metrics)."""
        for row, values in frame.to_dict(orient="index").items():
            label = " / ".join(map(str, row)) if isinstance(row, tuple) else str(row)
            for column, value in values.items():
                col = " / ".join(map(str, column)) if isinstance(column, tuple) else str(column)
                self.log_metric(table, label, col, value)

    def note(self, text: str) -> None:
        """A sentence the record keeps (what ran on which data, a fallback taken, ...)."""
        self.notes.append(text)

    def save_figure(self, fig: Any, name: str, dpi: int = 110) -> Path:
        """Save a matplotlib figure as PNG beside the record (atomically) and remember its path."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        path = atomic_write_bytes(self.figure_dir / f"{name}.png", buffer.getvalue())
        rel = str(path.relative_to(self.dir))
        if rel not in self.figures:
            self.figures.append(rel)
        return path

    def show(self, fig: Any, name: str, dpi: int = 110) -> Path:
        """Save ``fig`` beside the record (``save_figure``) and display it once in the notebook."""
        import matplotlib.pyplot as plt  # noqa: PLC0415 — only chapters draw

        path = self.save_figure(fig, name, dpi)
        try:
            from IPython.display import display  # noqa: PLC0415 — absent outside Jupyter
        except ImportError:
            display = None
        if display is not None:
            display(fig)
        plt.close(fig)  # the inline backend would otherwise show it a second time at the end of the cell
        return path

    def record(self) -> dict[str, Any]:
        seed = self.cfg.get("seed") if hasattr(self.cfg, "get") else None
        return {
            "chapter": self.chapter,
            "profile": self.profile,
            "overrides": dict(self.cfg.overrides),
            "seed": seed,
            "git_commit": git_commit(),
            "started_at": self.started_at,
            "wall_time_s": round(time.perf_counter() - self.started, 3),
            "metrics": self.metrics,
            "timings": self.timings,
            "figures": self.figures,
            "notes": self.notes,
        }

    def save(self) -> Path:
        """Write ``<output>/results/<profile>/<chapter>.json`` atomically; return its path."""
        return atomic_write_json(self.record_path, self.record())

    def stamp(self) -> str:
        """One line for the end of a chapter: profile, seed, commit, wall time."""
        rec = self.record()
        return (f"profile `{rec['profile']}` · overrides {rec['overrides'] or 'none'} · seed {rec['seed']} · "
                f"commit `{rec['git_commit'][:12]}` · wall time {rec['wall_time_s']:.1f} s")


def load_record(profile: str, chapter: str, cfg: Config | None = None) -> dict[str, Any]:
    """Read a chapter's record back (raises FileNotFoundError naming the expected path)."""
    path = paths.results_dir(profile, cfg) / f"{chapter}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no result record for chapter {chapter!r} on profile {profile!r}: expected {path}")
    return json.loads(path.read_text(encoding="utf-8"))
