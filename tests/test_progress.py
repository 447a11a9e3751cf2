"""Live progress: bars report to a file inside a chapter kernel; the parent prints a status line without flooding."""
from __future__ import annotations

import io
import json
import time

import pytest
from tqdm.auto import tqdm as auto_tqdm

from ctrlgen import progress
from ctrlgen.progress import ProgressMonitor, ReportingTqdm, format_bar, format_seconds, read_state


def test_outside_the_book_it_is_plain_tqdm(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    bar = progress.tqdm(total=3, disable=True)
    assert type(bar) is auto_tqdm and not isinstance(bar, ReportingTqdm)
    bar.close()


def test_inside_the_book_bars_report_to_the_file_and_draw_nothing(monkeypatch, tmp_path, capsys):
    state = tmp_path / "progress.json"
    monkeypatch.setenv(progress.PROGRESS_ENV, str(state))
    monkeypatch.setenv("TQDM_DISABLE", "1")  # the kernel's setting: reporting bars still report
    outer = progress.tqdm(total=4, desc="training", mininterval=0)
    assert isinstance(outer, ReportingTqdm)
    outer.update(3)
    inner = progress.tqdm(range(2), desc="sampling", mininterval=0)
    list(inner)  # iterating closes it: only the outer bar stays active
    reported = read_state(state)
    assert [(b["desc"], b["n"], b["total"]) for b in reported["bars"]] == [("training", 3, 4)]
    assert (reported["last"]["desc"], reported["last"]["n"]) == ("sampling", 2)
    outer.update(1)
    outer.close()
    reported = read_state(state)
    assert reported["bars"] == [] and (reported["last"]["n"], reported["last"]["total"]) == (4, 4)
    assert capsys.readouterr() == ("", "")  # nothing drawn in the notebook's streams


def test_format_seconds_and_bar():
    assert [format_seconds(s) for s in (7.3, 65, 3725)] == ["7s", "1m05s", "1h02m05s"]
    # 120 of 600 after 45 s: 2.67 it/s, 480 left → 180 s = 03:00
    bar = {"desc": "training", "n": 120, "total": 600, "elapsed": 45.0, "rate": None, "unit": "it"}
    assert format_bar(bar) == "training 120/600 [00:45<03:00, 2.67it/s]"
    slow = {"desc": "sampling", "n": 2, "total": None, "elapsed": 10.0, "rate": 0.2, "unit": "it"}
    assert format_bar(slow) == "sampling 2it [00:10, 5.00s/it]"


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _write(path, bars):
    path.write_text(json.dumps({"bars": bars, "last": bars[-1] if bars else {}, "time": time.time()}))


def test_log_output_is_throttled_and_only_on_change(tmp_path):
    state = tmp_path / "progress.json"
    stream = _Stream(tty=False)
    monitor = ProgressMonitor("[2/3] ch04_didgen", state, stream, expected_s=600, interval_s=1000)
    monitor.set_cell(3, 40, "Region-aware finetuning")
    monitor.tick()
    _write(state, [{"desc": "training", "n": 5, "total": 10, "elapsed": 5.0, "rate": 1.0, "unit": "it"}])
    monitor.tick()  # changed, but the interval has not passed: nothing
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[2/3] ch04_didgen · cell 3/40 (Region-aware finetuning) · ")
    assert "elapsed, ~" in lines[0] and "left (last run 10m00s)" in lines[0]
    monitor.interval_s = 0
    monitor.tick()
    monitor.tick()  # same state again: nothing new
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "training 5/10 [00:05<00:05, 1.00it/s]" in lines[1]


def test_terminal_output_redraws_one_line(tmp_path):
    stream = _Stream(tty=True)
    monitor = ProgressMonitor("[1/1] ch02_background", tmp_path / "none.json", stream, expected_s=1.0)
    monitor._start -= 5  # five seconds into a run that took one last time
    monitor.tick()
    monitor.tick()
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 2
    assert "past the last run's 1s" in text


def test_monitor_thread_polls_and_stops(tmp_path):
    stream = _Stream(tty=False)
    state = tmp_path / "progress.json"
    with ProgressMonitor("[1/1] fake", state, stream, interval_s=0, poll_s=0.05) as monitor:
        monitor.set_cell(1, 2)
        time.sleep(0.3)
        _write(state, [{"desc": "loop", "n": 1, "total": 2, "elapsed": 1.0, "rate": 1.0, "unit": "it"}])
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/1] fake · cell 1/2 · ") and any("loop 1/2" in line for line in lines)
    after = stream.getvalue()
    time.sleep(0.2)
    assert stream.getvalue() == after  # the thread has stopped


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("12.5", 12.5)])
def test_log_interval_from_the_environment(monkeypatch, tmp_path, value, expected):
    monkeypatch.setenv(progress.INTERVAL_ENV, value)
    assert ProgressMonitor("x", tmp_path / "s.json", _Stream(False)).interval_s == expected
