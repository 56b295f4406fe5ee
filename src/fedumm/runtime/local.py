"""The built-in local runtime: a whole federated experiment in one process.

Clients run one after another over ONE shared frozen backbone, swapping only their adapter
tensors, so memory is one model plus the round's clients (not K models, nor K client states:
those live on disk, :mod:`fedumm.runtime.client_store`). The rounds are the one
round loop every runtime uses; every payload goes through the wire codec, so the bytes counted
are the bytes that would be sent.

    fedumm run configs/quickstart.yaml --out runs/quickstart
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedumm.config import Config
from fedumm.data.vocabulary import describe as describe_unknown
from fedumm.fl.client import ClientData
from fedumm.fl.endpoint import ClientEndpoint
from fedumm.fl.pipeline import Reply
from fedumm.runtime.allocator import fix_mmap_threshold
from fedumm.runtime.bars import count_bar, reading_bars
from fedumm.runtime.client_store import CLIENT_STATE, ClientStore
from fedumm.runtime.experiment import (
    build_adapters,
    client_datasets,
    client_endpoint,
    eval_samples,
    load_backbone,
)
from fedumm.runtime.loop import RoundLoop
from fedumm.runtime.modes import strategy_for
from fedumm.runtime.run_dir import RunDirectory
from fedumm.runtime.vocabulary import vocabulary_report
from fedumm.runtime.workers import WorkerPool


class LocalTransport:
    """Every client in this process over the one shared frozen backbone (memory: one model
    plus the round's clients' data and states; the rest of a population is an index and files
    in the client-state store): one after another, or ``workers`` at a time: this process and
    ``workers - 1`` worker processes forked after the backbone is built, which share its frozen
    weights copy-on-write. Each of them takes the round's next untrained client, largest first,
    until none is left, training with ``threads`` threads. A client's training depends only on
    its inputs (its RNG is seeded per client and round), so the results equal sequential
    training at the same per-client thread count."""

    def __init__(self, clients: Sequence[ClientData], endpoint: ClientEndpoint,
                 workers: int = 1, threads: int = 1, store: ClientStore | None = None) -> None:
        self.clients = clients  # a ClientPool builds only the selected clients' data
        self.endpoint = endpoint
        # what clients keep between rounds: on disk under the run folder (client_store.py),
        # read and written for the round's clients only
        self.store = store if store is not None else ClientStore()
        self.workers = workers
        self.threads = threads
        self._pool = None
        self._next = None  # the round's next unclaimed task, shared with the workers

    def _work(self, k: int, rnd: int, payload: bytes, client_config: dict[str, Any],
              state: dict | None) -> tuple[Reply, dict]:
        return self.endpoint.handle(self.clients[k], rnd, payload, client_config, state)

    def train(self, rnd: int, jobs: dict[int, bytes], client_config: dict[str, Any],
              on_reply: Callable[[Reply], None]) -> list[Reply]:
        self.store.begin(rnd)
        tasks = [(k, rnd, payload, client_config, self.store.get(k))
                 for k, payload in jobs.items()]
        if self.workers > 1 and len(tasks) > 1:
            results = self._parallel(tasks, on_reply)
        else:
            results = []
            for task in tasks:
                results.append(self._work(*task))
                on_reply(results[-1][0])
        for (k, *_), (_, state) in zip(tasks, results, strict=True):
            self.store.put(rnd, k, state)
        return [reply for reply, _ in results]

    def _claim(self) -> int:
        lock = self._next.get_lock()
        while True:  # the parent watches its workers between tasks and while it waits
            if self._pool is not None:  # (None in a worker: its copy is from before the fork)
                self._pool.check()  # a worker that died holding the lock would block us
            if lock.acquire(timeout=0.5):
                break
        try:
            i = self._next.value
            self._next.value += 1
        finally:
            lock.release()
        return i

    def largest_first(self, tasks: list[tuple]) -> list[int]:
        """The order the trainers take the tasks in: the clients with the most training samples
        first, so that the last ones to start are short and the trainers end close together
        (the quickstart's 4 clients: the round's longest trainer does 52 % of the samples
        instead of 57 % in task order)."""
        return sorted(range(len(tasks)), key=lambda i: -len(self.clients[tasks[i][0]].train))

    def drain(self, tasks: list[tuple], order: list[int]
              ) -> Iterator[tuple[int, tuple[Reply, dict]]]:
        """Train the round's unclaimed tasks, in ``order``, until none is left."""
        while (n := self._claim()) < len(order):
            yield order[n], self._work(*tasks[order[n]])

    def _parallel(self, tasks: list[tuple], on_reply: Callable[[Reply], None]
                  ) -> list[tuple[Reply, dict]]:
        pool = self._start_workers()
        order = self.largest_first(tasks)
        self._next.value = 0
        pool.send((tasks, order))
        results: dict[int, tuple[Reply, dict]] = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # this process trains like a worker meanwhile
        try:
            for i, result in self.drain(tasks, order):
                results[i] = result
                on_reply(result[0])
            theirs = pool.results()  # notices a worker that dies instead of waiting for it
        except BaseException:
            # a failed or stopped round ends its workers now (a deadline, no waiting for the
            # clients they train); the next round forks new ones
            self.close()
            raise
        finally:
            torch.set_num_threads(threads)
        for part in theirs:
            for i, result in part:
                results[i] = result
                on_reply(result[0])
        return [results[i] for i in range(len(tasks))]

    def _serve(self, msg: tuple[list[tuple], list[int]]) -> list[tuple[int, tuple[Reply, dict]]]:
        """A worker's part of a round (runs in the worker, on its forked copy of this)."""
        return list(self.drain(*msg))

    def _start_workers(self) -> WorkerPool:
        if self._pool is None:
            import multiprocessing

            # the round's next unclaimed task; new with each pool (a killed worker may have
            # died holding the old one's lock)
            self._next = multiprocessing.get_context("fork").Value("i", 0)
            # the collector would touch every object the parent built and copy its pages in
            # each worker: freeze them, so the frozen base and the data stay shared
            gc.collect()
            gc.freeze()
            self._pool = WorkerPool(self.workers - 1, self._serve,
                                    functools.partial(_worker_init, self.threads))
        return self._pool

    def training_done(self) -> None:
        self.store.finish()  # the last round is checkpointed
        self.close()  # the workers' memory is not the final evaluation's

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
            gc.unfreeze()

    def secagg_parties(self) -> None:
        return None  # the clients are in this process: the server simulates their side

    def state_dict(self) -> dict[str, Any]:
        return {"client_store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a checkpoint from before the store holds the states themselves
        self.store.load_state_dict(state.get("client_store") or
                                   {"round": -1, "client_states": state.get("client_states", {})})


def worker_signals() -> None:
    """In a forked worker process: the default SIGTERM and no Ctrl-C. It inherits the CLI's
    handlers, which turn SIGTERM into a clean exit of the *run*; a worker is stopped by its
    parent (SIGTERM) and leaves Ctrl-C to it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    worker_signals()
    fix_mmap_threshold()  # a worker's heap would grow to ~2x what it holds (allocator.py)


class LocalRuntime:
    """Builds everything a config describes and runs the rounds through the one round loop
    (:mod:`fedumm.runtime.loop`) over the in-process transport."""

    def __init__(self, cfg: Config, out: str | Path, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.dir = RunDirectory(out)
        self.show_progress = progress
        threads = cfg.train.threads or os.cpu_count() or 1
        per_worker = max(1, threads // cfg.workers)
        # sequential clients use every thread; clients trained at once split them
        torch.set_num_threads(threads)
        self.backbone = load_backbone(cfg)
        fingerprint = self.backbone.fingerprint()  # frozen: hash it once
        with reading_bars(progress):
            val_data = eval_samples(cfg)
            self.clients, self.partition_summary = client_datasets(
                cfg, self.backbone, progress=count_bar("preparing data", progress))
        self.vocabulary = vocabulary_report(self.backbone, self.clients, val_data)
        adapters = build_adapters(cfg, self.backbone)
        strategy = strategy_for(cfg, self.backbone.groups)
        self.transport = LocalTransport(self.clients, client_endpoint(cfg, adapters),
                                        workers=cfg.workers, threads=per_worker,
                                        store=ClientStore(self.dir.path / CLIENT_STATE))
        self.loop = RoundLoop(cfg, self.dir, self.backbone, adapters, strategy, val_data,
                              len(self.clients), self.transport, fingerprint,
                              progress=self._progress)
        self._bar: tqdm | None = None
        self._last_eval = ""

    def _progress(self, event: str) -> None:
        """A client finished (``""``) or an evaluation ran (its headline)."""
        if self._bar is None:
            return
        if event:
            self._last_eval = f" | {event}"
        else:
            self._bar.update(1)
        self._bar.set_postfix_str(f"done {self._bar.n}/{self._bar.total}{self._last_eval}")

    def run(self, resume: bool = False) -> dict[str, Any]:
        if self.partition_summary is not None:  # who holds what: the report's heat map
            self.dir.write_json(self.dir.PARTITION, self.partition_summary)
        if self.vocabulary is not None:  # words of the data the backbone does not know
            self.dir.write_json(self.dir.DATA, {"unknown_words": self.vocabulary})
            if self.show_progress:
                for line in describe_unknown(self.vocabulary):
                    tqdm.write(line, file=sys.stderr)
        ckpt_round = -1
        if resume and (ckpt := self.dir.load_checkpoint()) is not None:
            ckpt_round = ckpt["round"]
        per_round = len(self.loop.selected(ckpt_round + 1)) if ckpt_round + 1 < \
            self.cfg.rounds else 0
        self._bar = tqdm(total=(self.cfg.rounds - ckpt_round - 1) * per_round,
                         disable=not self.show_progress, desc="fedumm", dynamic_ncols=True)
        try:
            return self.loop.run(resume=resume)
        finally:
            self._bar.close()
            self.transport.close()
