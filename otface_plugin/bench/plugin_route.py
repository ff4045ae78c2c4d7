"""The plugin route: each run trained by the plugin's own loop (:mod:`otface_plugin.bench.train`),
in this process (``jobs`` 1) or in ``jobs`` single-threaded worker processes."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from otface_plugin.bench.data import load_prepared
from otface_plugin.bench.route import RunDone
from otface_plugin.bench.scores import pair_scores
from otface_plugin.bench.spec import RunSpec, TrainConfig
from otface_plugin.bench.store import save_run
from otface_plugin.bench.train import train_run

__all__ = ["PluginRoute", "run_one"]


class PluginRoute:
    def __init__(self, rec_dir: Path, bin_path: Path, train: TrainConfig, jobs: int) -> None:
        self.job = {"rec_dir": str(rec_dir), "bin": str(bin_path), "train": train}
        self.jobs = jobs

    def train(self, todo: List[RunSpec], keys: Dict[str, str], runs_dir: Path, bar: Any,
              done: RunDone) -> None:
        if self.jobs > 1:
            _run_parallel(self.job, todo, runs_dir, keys, self.jobs, bar, done)
            return
        for spec in todo:
            bar.set_postfix_str(spec.name)
            done(spec, run_one(self.job, spec, str(runs_dir / spec.name), keys[spec.name],
                               bar.update, self.job["train"].threads))


def run_one(job: Dict[str, Any], spec: RunSpec, run_dir: str, key: str, report=None,
            threads: int = 0) -> Dict[str, float]:
    """Train, evaluate and store one run (in this process); returns its timings."""
    if threads:
        torch.set_num_threads(threads)
    train, (images, pairs, _) = load_prepared(job["rec_dir"], job["bin"])
    pending = [0]

    def on_step(step: int) -> None:
        pending[0] += 1
        if report and (pending[0] >= 10 or step == job["train"].steps - 1):
            report(pending[0])
            pending[0] = 0

    net, history, timing = train_run(spec, job["train"], train, on_step=on_step)
    t0 = time.perf_counter()
    scores = pair_scores(net, images, pairs)
    timing["eval_seconds"] = time.perf_counter() - t0
    timing["threads"] = torch.get_num_threads()
    save_run(Path(run_dir), key, spec, net, history, timing, scores)
    return timing


_QUEUE = None


def _init_worker(queue) -> None:
    """Pool initializer: keep the progress queue; leave Ctrl-C to the parent, which terminates
    the pool (a worker killed mid-run leaves no result.json, so the run restarts next time)."""
    import signal

    global _QUEUE
    _QUEUE = queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker(job, spec, run_dir, key, threads) -> Dict[str, float]:
    return run_one(job, spec, run_dir, key, _QUEUE.put, threads)


def _run_parallel(job, todo: List[RunSpec], runs_dir: Path, keys: Dict[str, str], jobs: int, bar,
                  done: RunDone) -> None:
    """Runs in ``jobs`` single-threaded processes. On a small CPU this beats one process with
    several threads (no OpenMP barriers per op) and degrades gracefully when the machine is
    shared: oversubscribed OpenMP threads spin-wait and can slow a step down tenfold."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # no fork of a process that already ran OpenMP regions
    threads = max(1, (os.cpu_count() or jobs) // jobs)
    q = ctx.Queue()
    pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(q,))
    try:
        pending = {s.name: (s, pool.apply_async(_worker, (job, s, str(runs_dir / s.name), keys[s.name], threads)))
                   for s in todo}
        while pending:
            try:
                bar.update(q.get(timeout=0.5))
                while True:
                    bar.update(q.get_nowait())
            except queue_mod.Empty:
                pass
            for name in [n for n, (_, r) in pending.items() if r.ready()]:
                spec, r = pending.pop(name)
                timing = r.get()  # a failed run stops the study with its error
                bar.set_postfix_str(f"{name} done")
                done(spec, timing)
        pool.close()
    except BaseException:
        pool.terminate()  # Ctrl-C or a failed run: stop the other workers now
        raise
    finally:
        pool.join()
