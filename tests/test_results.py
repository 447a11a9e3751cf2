"""Result records: atomic writes, complete JSON records, seeding determinism."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from ctrlgen import load_profile
from ctrlgen.results import ChapterRun, atomic_write_json, atomic_write_text, load_record
from ctrlgen.seeding import seed_everything


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]  # no temp file left behind


def test_atomic_write_json_refuses_objects_and_maps_nan_to_none(tmp_path):
    path = atomic_write_json(tmp_path / "a.json", {"x": np.float32(1.5), "bad": math.nan, "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"x": 1.5, "bad": None, "n": 3}
    with pytest.raises(TypeError, match="cannot store"):
        atomic_write_json(tmp_path / "b.json", {"x": object()})


def test_chapter_record_has_everything_a_reader_needs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import pandas as pd

    monkeypatch.delenv("CTRLGEN_OUTPUT_ROOT")
    cfg = load_profile("smoke", {"seed": 5, "paths.output_root": str(tmp_path)})
    run = ChapterRun("chXX_test", cfg)
    run.log_metric("4.1", "Mine-DermPrompt", "FID", 12.5)
    run.log_table("ch.local", pd.DataFrame({"IoU": [0.5, 0.75]}, index=["a", "b"]))
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    figure = run.save_figure(fig, "line")
    plt.close(fig)
    path = run.save()
    record = json.loads(path.read_text())
    assert record["profile"] == "smoke" and record["seed"] == 5 and record["overrides"] == {"seed": 5, "paths.output_root": str(tmp_path)}
    assert record["metrics"]["4.1"]["Mine-DermPrompt"]["FID"] == 12.5
    assert record["metrics"]["ch.local"] == {"a": {"IoU": 0.5}, "b": {"IoU": 0.75}}
    assert record["figures"] == ["figures/chXX_test/line.png"] and figure.read_bytes()[:4] == b"\x89PNG"
    assert record["wall_time_s"] >= 0 and record["git_commit"]
    assert path == tmp_path / "results" / "smoke" / "chXX_test.json"
    assert load_record("smoke", "chXX_test", cfg)["chapter"] == "chXX_test"


def test_chapter_start_seeds_and_sets_threads_and_keeps_timings_apart(tmp_path, monkeypatch):
    import random

    import matplotlib.pyplot as plt
    import torch

    monkeypatch.delenv("CTRLGEN_OUTPUT_ROOT", raising=False)
    threads = torch.get_num_threads()
    try:
        run = ChapterRun.start("chXX_start", "smoke", {"seed": 7, "paths.output_root": str(tmp_path)})
        drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
        assert torch.get_num_threads() == 1  # smoke: one thread
    finally:
        torch.set_num_threads(threads)
    seed_everything(7)
    assert drawn == (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert run.cfg.seed == 7 and run.chapter == "chXX_start"
    run.log_metric("t", "r", "IoU", 0.5)
    run.log_timing("t", "r", "seconds per pair", 0.25)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = run.show(fig, "line")
    assert path.read_bytes()[:4] == b"\x89PNG" and not plt.fignum_exists(fig.number)  # closed: shown once
    record = json.loads(run.save().read_text())
    assert record["metrics"] == {"t": {"r": {"IoU": 0.5}}}
    assert record["timings"] == {"t": {"r": {"seconds per pair": 0.25}}}
    assert record["figures"] == ["figures/chXX_start/line.png"]


def test_load_record_names_the_missing_path(tmp_path, monkeypatch):
    monkeypatch.delenv("CTRLGEN_OUTPUT_ROOT")
    cfg = load_profile("smoke", {"paths.output_root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"results/smoke/nothing\.json"):
        load_record("smoke", "nothing", cfg)


def test_seed_everything_is_deterministic():
    import torch

    g1 = seed_everything(11)
    a = (np.random.rand(3), torch.rand(3), torch.randn(3, generator=g1))
    g2 = seed_everything(11)
    b = (np.random.rand(3), torch.rand(3), torch.randn(3, generator=g2))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    seed_everything(12)
    assert not torch.equal(torch.rand(3), a[1])


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_published_records_and_figures_get_the_umask_permissions(tmp_path, umask, monkeypatch):
    from ctrlgen import paths

    assert paths.current_umask() == umask
    expected = 0o666 & ~umask  # 0644 under 022, 0640 under 027 (never mkstemp's 0600)
    written = atomic_write_text(tmp_path / "out" / "a.txt", "x")
    assert written.stat().st_mode & 0o777 == expected
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    monkeypatch.setenv("CTRLGEN_OUTPUT_ROOT", str(tmp_path / "build"))
    run = ChapterRun("ch99", load_profile("smoke"))
    run.log_metric("t", "r", "c", 1.0)
    record = run.save()
    assert record.stat().st_mode & 0o777 == expected
