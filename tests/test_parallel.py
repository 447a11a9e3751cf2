"""ctrlgen.parallel: cached jobs in forked workers give the caller exactly what a sequential run gives it."""
from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest
import torch

from ctrlgen import parallel, result_cache
from ctrlgen.config import ConfigError, load_profile


@pytest.fixture()
def cfg():
    return load_profile("smoke", {"jobs": 2})


def _seeded_job(cfg, run: str, seed: int):
    """A cached job whose value depends on its seed only, and says which process and how many threads made it."""
    def compute():
        start = time.time()
        time.sleep(0.6)  # long enough for the two workers' runs to overlap
        return {"value": np.random.default_rng(seed).normal(size=4).tolist(), "pid": os.getpid(),
                "threads": torch.get_num_threads(), "start": start, "end": time.time()}
    return lambda: result_cache.cached({"test": "parallel", "run": run, "seed": seed}, compute, "json", cfg=cfg)


def test_workers_compute_two_at_a_time_and_the_caller_reads_what_they_stored(cfg, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    run = uuid.uuid4().hex
    got = parallel.run_all({s: _seeded_job(cfg, run, s) for s in range(4)}, cfg)
    assert list(got) == [0, 1, 2, 3]
    for seed, value in got.items():  # independent reference: the same seeded draw made here
        np.testing.assert_allclose(value["value"], np.random.default_rng(seed).normal(size=4))
        assert value["pid"] != os.getpid() and value["threads"] == 1
    assert len({v["pid"] for v in got.values()}) == 4  # one forked worker per job
    # two at a time: job 1 started before job 0 ended; job 2 only after one of them ended
    assert got[1]["start"] < got[0]["end"]
    assert got[2]["start"] >= min(got[0]["end"], got[1]["end"]) - 0.05


def test_one_job_at_a_time_runs_here_and_gives_the_same_values(cfg):
    run = uuid.uuid4().hex
    here = parallel.run_all({s: _seeded_job(cfg, run, s) for s in range(2)}, load_profile("smoke", {"jobs": 1}))
    assert {v["pid"] for v in here.values()} == {os.getpid()}
    forked = parallel.run_all({s: _seeded_job(cfg, uuid.uuid4().hex, s) for s in range(2)}, cfg)
    assert [v["value"] for v in here.values()] == [v["value"] for v in forked.values()]


def test_a_job_that_fails_in_its_worker_raises_its_own_error_here(cfg):
    def bad():
        raise ValueError("lesion_0007.png: expected an RGB image")

    run = uuid.uuid4().hex
    with pytest.warns(RuntimeWarning, match="failed in its worker"), pytest.raises(ValueError, match="lesion_0007"):
        parallel.run_all({"good": _seeded_job(cfg, run, 0), "bad": bad}, cfg)


def test_job_count_follows_the_profile_the_environment_and_the_machine(cfg, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv(parallel.JOBS_ENV, raising=False)
    assert parallel.job_count(cfg) == 2
    assert parallel.job_count(load_profile("smoke", {"jobs": 8})) == 2          # at most the cores
    assert parallel.job_count(load_profile("smoke", {"jobs": 1})) == 1
    monkeypatch.setenv(parallel.JOBS_ENV, "1")
    assert parallel.job_count(cfg) == 1
    monkeypatch.setenv(parallel.JOBS_ENV, "two")
    with pytest.raises(ValueError, match="CTRLGEN_JOBS.*'two'"):
        parallel.job_count(cfg)
    monkeypatch.setenv(parallel.JOBS_ENV, "2")
    monkeypatch.setenv(result_cache.DISABLE_ENV, "1")   # workers could not hand their results over
    assert parallel.job_count(cfg) == 1


def test_the_profile_refuses_zero_jobs():
    with pytest.raises(ConfigError, match="jobs"):
        load_profile("smoke", {"jobs": 0})


def test_a_worker_that_dies_or_reports_a_long_error_does_not_hang_the_caller(cfg):
    """A traceback longer than a pipe's buffer (64 KiB) must not deadlock the worker against the caller, and a worker
    killed without reporting is seen as failed; both jobs then run here and raise their own errors."""
    def long_error():
        raise ValueError("x" * 200_000)

    def dies():
        if parallel._IN_WORKER:
            os._exit(3)   # killed without a word, as the OOM killer would
        raise RuntimeError("died in its worker")

    with pytest.warns(RuntimeWarning, match="failed in its worker"), pytest.raises(ValueError, match="xxxx"):
        parallel.run_all({"long": long_error, "other": long_error}, cfg)
    with pytest.warns(RuntimeWarning, match="died before reporting"), pytest.raises(RuntimeError, match="died"):
        parallel.run_all({"dies": dies, "again": dies}, cfg)
