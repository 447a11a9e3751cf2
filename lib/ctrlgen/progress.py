"""Live progress of a chapter run: bars inside the kernel, one status line in the ``ctrlgen`` process.

Inside a chapter kernel started by ``ctrlgen book`` / ``ctrlgen run``, ``$CTRLGEN_PROGRESS_FILE``
names a small JSON file. :func:`tqdm` (use it where you would use ``tqdm.auto.tqdm``; same
arguments) then returns a bar that writes its state to that file instead of drawing in the notebook,
so the rendered book has no progress bars and the terminal still sees the training and sampling loops.
Outside the book (a student in Jupyter, the test suite) it is plain ``tqdm.auto.tqdm``::

    from ctrlgen.progress import tqdm

    for step in tqdm(range(config.steps), desc="training", disable=not progress):
        ...

The parent process runs a :class:`ProgressMonitor`: it polls the file and prints
``[i/N] chapter · cell j/M (section) · training 120/600 [00:45<02:10] · 3m05s elapsed, ~4m left``.
On a terminal the line is redrawn in place; in a log (not a TTY) a line is printed only when the
state changed and at most every ``$CTRLGEN_PROGRESS_INTERVAL`` seconds (default 30), so long runs
do not flood CI logs. ``--quiet`` never starts a monitor.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm as _std_tqdm
from tqdm.auto import tqdm as _auto_tqdm

PROGRESS_ENV = "CTRLGEN_PROGRESS_FILE"
INTERVAL_ENV = "CTRLGEN_PROGRESS_INTERVAL"
DEFAULT_LOG_INTERVAL_S = 30.0

_ACTIVE: dict[int, dict[str, Any]] = {}  # this process's open reporting bars, by creation order
_IDS = itertools.count()
_LOCK = threading.Lock()


# ---------------------------------------------------------------- kernel side
class _Sink(io.TextIOBase):
    """Where a reporting bar's own drawing goes: nowhere (its state goes to the progress file)."""

    def write(self, text: str) -> int:
        return len(text)


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic write (temporary file + replace): the parent polls the file while it changes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    os.replace(tmp, path)


class ReportingTqdm(_std_tqdm):
    """A tqdm bar that reports to the progress file (the documented way to redirect tqdm: override
    ``display``, as ``tqdm.contrib.telegram`` does) and draws nothing itself."""

    def __init__(self, *args: Any, report_to: str | os.PathLike, **kwargs: Any):
        self._report_to = Path(report_to)
        self._report_id = next(_IDS)
        kwargs["file"] = _Sink()
        kwargs["disable"] = False  # the caller's disable= decides what the notebook shows; it shows nothing here
        kwargs.setdefault("mininterval", 0.5)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # noqa: ARG002 (tqdm's signature)
        d = self.format_dict
        state = {"desc": str(d.get("prefix") or "").rstrip(": "), "n": d["n"], "total": d["total"],
                 "elapsed": d["elapsed"], "rate": d["rate"], "unit": d["unit"]}
        with _LOCK:
            if not getattr(self, "_closing", False):
                _ACTIVE[self._report_id] = state
            _write_state(self._report_to, {"bars": list(_ACTIVE.values()), "last": state, "time": time.time()})
        return True

    def close(self) -> None:
        if self.disable:  # already closed
            return
        self._closing = True
        with _LOCK:
            _ACTIVE.pop(self._report_id, None)
        self.display()  # the final count, as "last"
        super().close()


def in_worker() -> None:
    """Called first in a forked worker (``ctrlgen.parallel``): a fresh lock (the parent's may have been held at the
    fork), none of the parent's bars, and no bar at all unless it reports to the progress file (a notebook widget
    would write to the parent's kernel sockets)."""
    global _LOCK, _QUIET
    _LOCK = threading.Lock()
    _ACTIVE.clear()
    _QUIET = not os.environ.get(PROGRESS_ENV)


_QUIET = False


def tqdm(*args: Any, **kwargs: Any) -> _std_tqdm:
    """``tqdm.auto.tqdm`` outside the book; a :class:`ReportingTqdm` inside a ``ctrlgen book``/``run`` kernel.

    ``TQDM_DISABLE`` is read at each call (tqdm reads it once, when it is imported), with tqdm's precedence:
    an explicit ``disable=`` wins; so a command can turn every bar off after the library is loaded.
    """
    if _QUIET or ("disable" not in kwargs and os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")):
        kwargs["disable"] = True
    target = os.environ.get(PROGRESS_ENV)
    if target:
        return ReportingTqdm(*args, report_to=target, **kwargs)
    return _auto_tqdm(*args, **kwargs)


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The kernel's last reported bars (``{"bars": [...], "last": {...}}``); empty if nothing yet."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------- parent side
def format_seconds(seconds: float) -> str:
    """``3725`` → ``1h02m05s``; ``65`` → ``1m05s``; ``7.3`` → ``7s``."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_bar(bar: dict[str, Any]) -> str:
    """``training 120/600 [00:45<02:10, 2.61it/s]`` from a reported bar state."""
    n, total, elapsed, rate = bar.get("n", 0), bar.get("total"), bar.get("elapsed", 0.0), bar.get("rate")
    rate = rate or (n / elapsed if elapsed else None)
    unit = bar.get("unit") or "it"
    timing = _std_tqdm.format_interval(elapsed)
    if total and rate:
        timing += "<" + _std_tqdm.format_interval(max(total - n, 0) / rate)
    if rate:
        timing += f", {rate:.2f}{unit}/s" if rate >= 1 else f", {1 / rate:.2f}s/{unit}"
    count = f"{n}/{total}" if total else f"{n}{unit}"
    return f"{bar.get('desc') or 'working'} {count} [{timing}]"


class ProgressMonitor:
    """Shows one chapter's progress while papermill runs it (see the module docstring).

    ``label`` is the chapter with its place in the book (``[2/3] ch04_didgen``); ``expected_s`` is the
    wall time of the chapter's last record (the estimate); ``state_file`` is what the kernel's bars write.
    """

    def __init__(self, label: str, state_file: Path, stream: TextIO | None = None, expected_s: float | None = None,
                 interval_s: float | None = None, poll_s: float = 0.5):
        self.label = label
        self.state_file = Path(state_file)
        self.stream = stream or sys.stderr
        self.expected_s = expected_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        env_interval = os.environ.get(INTERVAL_ENV)
        self.interval_s = interval_s if interval_s is not None else (
            float(env_interval) if env_interval else DEFAULT_LOG_INTERVAL_S)
        self.poll_s = poll_s
        self.cell: tuple[int, int, str] | None = None
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_key: str | None = None
        self._last_emit = float("-inf")
        self._width = 0

    def set_cell(self, index: int, total: int, section: str = "") -> None:
        """Called when cell ``index`` (1-based, code cells only) of ``total`` starts."""
        self.cell = (index, total, section)

    def status(self) -> tuple[str, str]:
        """``(line, key)``: the status line, and the same without the clocks (what counts as a change)."""
        parts = [self.label]
        if self.cell:
            index, total, section = self.cell
            parts.append(f"cell {index}/{total}" + (f" ({section})" if section else ""))
        bars = read_state(self.state_file).get("bars", [])
        key = " · ".join(parts + [f"{b.get('desc')} {b.get('n')}/{b.get('total')}" for b in bars])
        parts += [format_bar(b) for b in bars]
        elapsed = time.perf_counter() - self._start
        clock = f"{format_seconds(elapsed)} elapsed"
        if self.expected_s:
            left = self.expected_s - elapsed
            clock += (f", ~{format_seconds(left)} left (last run {format_seconds(self.expected_s)})" if left > 0
                      else f", past the last run's {format_seconds(self.expected_s)}")
        return " · ".join(parts + [clock]), key

    def tick(self, final: bool = False) -> None:
        """Show the status if it is due: redrawn in place on a TTY, else on change at most every interval."""
        line, key = self.status()
        now = time.perf_counter()
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
            self._width = len(line)
        elif key != self._last_key and (now - self._last_emit >= self.interval_s or final):
            self.stream.write(line + "\n")
            self._last_key, self._last_emit = key, now
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.tick()

    def __enter__(self) -> "ProgressMonitor":
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="ctrlgen-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.tty:  # leave the terminal on a clean line
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
