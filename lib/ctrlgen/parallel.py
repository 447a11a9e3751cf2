"""Independent cached jobs, several at a time, in forked worker processes (the profile's ``jobs``).

A chapter trains many models that do not depend on each other (chapter 6's four stage-1 BARTs, chapter 4's 28
classifiers). On a small CPU box one job per core beats one job on every core: the mini models are too small
for torch's intra-op threads to keep two cores busy (``benchmarks``: the ``parallel`` ratio). :func:`run_all`
therefore

1. runs the jobs ``jobs`` at a time in forked worker processes, each on one torch (and BLAS) thread; every job
   is a call of a result-cache backed function (``result_cache.cached``), so a worker's only output is the entry
   it stores;
2. then calls every job again in this process, in order: each call reads the entry its worker stored, so the
   caller gets exactly what a warm cache gives it, whatever the number of workers.

A job that failed in its worker is simply run again here, so its error reaches the caller as the job's own
exception, not as a worker's traceback text. With ``jobs: 1``, on a GPU (CUDA does not survive ``fork``), with
``$CTRLGEN_NO_RESULT_CACHE=1`` (workers could not hand anything over), inside a worker, or where ``fork`` does not
exist, the jobs run here one after the other, on torch's default threads.

Determinism: a job must draw its randomness from its own seed (as every cached job must, for a warm and an empty
cache to agree). On a CPU a job always runs on one thread, in a worker and here alike (:func:`one_thread`): the
thread count changes a float result's last bits and training amplifies them (measured: a ResNet18's second-epoch
loss 2.07 on two threads, 2.17 on one), so the numbers depend neither on ``jobs`` nor on the machine's cores.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Any, TypeVar

from ctrlgen import progress, result_cache
from ctrlgen.progress import tqdm
from ctrlgen.runtime import resolve_device

K = TypeVar("K")
V = TypeVar("V")

JOBS_ENV = "CTRLGEN_JOBS"   # overrides the profile's ``jobs`` (e.g. CTRLGEN_JOBS=1 to debug a job in-process)
_IN_WORKER = False


def job_count(cfg: Mapping[str, Any]) -> int:
    """How many jobs run at once: ``$CTRLGEN_JOBS`` or the profile's ``jobs``, at most the machine's cores, and 1
    wherever forked workers cannot help (see the module docstring)."""
    wanted = os.environ.get(JOBS_ENV) or cfg["jobs"]
    try:
        n = int(wanted)
    except ValueError:
        raise ValueError(f"${JOBS_ENV} = {wanted!r}: expected a whole number of parallel jobs (1 = none)") from None
    if n < 1:
        raise ValueError(f"jobs = {n}: expected at least 1 (1 = one job at a time)")
    if (_IN_WORKER or resolve_device(cfg) != "cpu" or os.environ.get(result_cache.DISABLE_ENV, "") == "1"
            or "fork" not in multiprocessing.get_all_start_methods()):
        return 1
    return max(1, min(n, os.cpu_count() or 1))


def run_all(jobs: Mapping[K, Callable[[], V]], cfg: Mapping[str, Any], desc: str = "jobs") -> dict[K, V]:
    """``{key: job()}`` for result-cache backed zero-argument ``jobs``, computed :func:`job_count` at a time.

    Each job must store what it computes with ``result_cache.cached`` (directly or through a cached helper):
    a worker's result reaches this process only through the cache. On a CPU every job runs on one thread, in a
    worker or here, so its numbers do not depend on ``jobs``, on the machine's cores or on the cache's state.
    """
    workers = job_count(cfg)
    if workers > 1 and len(jobs) > 1:
        _fill_cache(list(jobs.items()), workers, desc)
    with one_thread(resolve_device(cfg) == "cpu"):
        return {key: job() for key, job in jobs.items()}


@contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """Torch and the BLAS/OpenMP pools on one thread inside the block (restored after it)."""
    if not active:
        yield
        return
    import torch  # heavy: this layer-1 module is imported by the CLI's help
    from threadpoolctl import threadpool_limits  # heavy: scikit-learn's BLAS/OpenMP thread control

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def _fill_cache(jobs: list[tuple[Any, Callable[[], Any]]], workers: int, desc: str) -> None:
    context = multiprocessing.get_context("fork")
    pending, running, failed = list(jobs), {}, []
    bar = tqdm(total=len(jobs), desc=f"{desc} ({workers} at a time)", leave=False)
    try:
        while pending or running:
            while pending and len(running) < workers and not failed:
                key, job = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_work, args=(job, send), name=f"ctrlgen-job-{key}")
                process.start()
                send.close()  # the worker holds the only sending end: its death reads as end-of-file here
                running[receive] = (key, process)
            if not running:
                break
            # wait on the pipes, not on the processes: a worker blocks on sending a long traceback until it is read
            for receive in wait(list(running)):
                key, process = running.pop(receive)
                try:
                    error = receive.recv()
                except EOFError:
                    error = "the worker died before reporting"
                receive.close()
                process.join()
                if error:
                    failed.append(key)
                    warnings.warn(f"{desc}: job {key!r} failed in its worker (exit code {process.exitcode}); it runs "
                                  f"again in this process (its error follows there). Worker said:\n{error}",
                                  RuntimeWarning, stacklevel=3)
                bar.update(1)
    finally:
        for _, process in running.values():
            process.terminate()
        bar.close()


def _work(job: Callable[[], Any], send) -> None:
    """A worker: one thread, no output of its own (the kernel's streams belong to the parent), the job, its error."""
    global _IN_WORKER
    _IN_WORKER = True
    error = None
    try:
        progress.in_worker()
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the worker ends with os._exit)
        with one_thread():
            job()
    except BaseException:  # noqa: BLE001 (everything is reported to the parent, which reruns the job)
        error = traceback.format_exc()
    try:
        send.send(error)
        send.close()
    finally:
        os._exit(0 if error is None else 1)  # no atexit handlers of the parent (a test run's temp-folder cleanup)


__all__ = ["JOBS_ENV", "job_count", "run_all", "one_thread"]
