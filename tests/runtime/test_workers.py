"""Clients trained at once in forked workers give the sequential run's adapters."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from fedumm.config import config_from_dict
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.run_dir import RunDirectory


@pytest.mark.parametrize("extra", [
    # SCAFFOLD and error feedback keep client state; dropout draws from torch's RNG
    pytest.param(["clients=3", "strategy.name=scaffold", "codec.upload=topk:0.1+int8",
                  "lora.dropout=0.1", "eval.every=0"], id="scaffold-topk"),
    # chains: each hop's members trained at once, a round's client states kept across hops
    pytest.param(["clients=4", "strategy.chain=2", "codec.upload=topk:0.1+int8",
                  "lora.dropout=0.1", "eval.every=0"], id="chains-topk"),
])
def test_parallel_workers_equal_sequential_training(tmp_path, tiny_overrides, extra):
    seq = run_experiment(config_from_dict({"name": "s"}, [*tiny_overrides, *extra,
                                                          "train.threads=1"]),
                         tmp_path / "seq", progress=False)
    par = run_experiment(config_from_dict({"name": "p"}, [*tiny_overrides, *extra,
                                                          "train.threads=2", "workers=2"]),
                         tmp_path / "par", progress=False)
    a = load_file(str(tmp_path / "seq" / "adapters" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "par" / "adapters" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert seq["communication"] == par["communication"]
    losses = [[m["train_loss"] for m in RunDirectory(tmp_path / d).metrics()
               if m["type"] == "round"] for d in ("seq", "par")]
    assert losses[0] == losses[1]



class _Probe:
    """An endpoint that reports which process trained and how it handles signals; its client 1
    fails."""

    def handle(self, client, rnd, payload, client_config, state):
        import os
        import signal
        import time

        if client.client_id == 1:
            raise RuntimeError("client 1 broke")
        time.sleep(0.2)  # long enough for the forked worker to take some of the tasks
        return (os.getpid(), signal.getsignal(signal.SIGTERM),
                signal.getsignal(signal.SIGINT)), {}


def test_workers_leave_signals_to_the_parent_and_errors_reach_it():
    import os
    import signal

    import pytest

    from fedumm.runtime.local import LocalTransport

    def raise_interrupt(signum, frame):  # what the CLI installs; workers must not keep it
        raise KeyboardInterrupt(signum)

    old = signal.signal(signal.SIGTERM, raise_interrupt)
    parent_sigint = signal.getsignal(signal.SIGINT)  # pytest's, or ignored in a background job
    from types import SimpleNamespace

    clients = [SimpleNamespace(client_id=k, train=[None] * k) for k in range(8)]
    transport = LocalTransport(clients, _Probe(), workers=2, threads=1)
    try:
        jobs = {k: b"" for k in (0, 2, 3, 4, 5, 6, 7)}
        replies = transport.train(0, jobs, {}, lambda reply: None)
        assert len(replies) == len(jobs)
        # this process trains too, and its handlers stay; SIGTERM (Pool.terminate) ends a
        # worker, and Ctrl-C is the parent's to handle
        workers = {r[1:] for r in replies if r[0] != os.getpid()}
        ours = {r[1:] for r in replies if r[0] == os.getpid()}
        assert workers == {(signal.SIG_DFL, signal.SIG_IGN)}
        assert ours == {(raise_interrupt, parent_sigint)}  # as they were
        with pytest.raises(RuntimeError, match="client 1 broke"):
            transport.train(1, {0: b"", 1: b""}, {}, lambda reply: None)
        # and the next round still runs on both
        assert len(transport.train(2, jobs, {}, lambda reply: None)) == len(jobs)
    finally:
        transport.close()
        signal.signal(signal.SIGTERM, old)


def test_trainers_take_the_largest_clients_first():
    import multiprocessing
    from types import SimpleNamespace

    from fedumm.runtime.local import LocalTransport

    sizes = [3, 9, 1, 9, 5]
    clients = [SimpleNamespace(client_id=k, train=[None] * n) for k, n in enumerate(sizes)]
    seen = []

    class Record:
        def handle(self, client, rnd, payload, client_config, state):
            seen.append(client.client_id)
            return client.client_id, {}

    transport = LocalTransport(clients, Record(), workers=2)
    transport._next = multiprocessing.get_context("fork").Value("i", 0)
    tasks = [(k, 0, b"", {}, None) for k in (4, 3, 2, 1, 0)]  # the jobs' order: 4, 3, 2, 1, 0
    done = list(transport.drain(tasks, transport.largest_first(tasks)))
    assert seen == [3, 1, 4, 0, 2]  # 9, 9 (ties: job order), 5, 3, 1
    assert [tasks[i][0] for i, _ in done] == seen and [r for _, (r, _) in done] == seen


class _Dies:
    """Round 0: a worker that takes a client is killed (as the out-of-memory killer would), or
    this process is interrupted while the worker trains a long client; later rounds train."""

    def __init__(self, how: str) -> None:
        import os

        self.parent, self.how = os.getpid(), how

    def handle(self, client, rnd, payload, client_config, state):
        import os
        import signal
        import time

        if rnd == 0 and os.getpid() != self.parent:
            if self.how == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # a long client: the parent must not wait for it
        if rnd == 0 and self.how == "interrupted":
            time.sleep(0.5)  # the worker has taken its client
            raise KeyboardInterrupt
        time.sleep(0.05)
        return os.getpid(), {}


def _transport(how: str):
    from types import SimpleNamespace

    from fedumm.runtime.local import LocalTransport

    clients = [SimpleNamespace(client_id=k, train=[None]) for k in range(4)]
    return LocalTransport(clients, _Dies(how), workers=2, threads=1)


def test_a_worker_that_dies_fails_the_round_at_once_and_the_next_round_runs():
    import time

    import pytest

    from fedumm.runtime.workers import WorkerDiedError

    transport = _transport("killed")
    jobs = {k: b"" for k in range(4)}
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"worker process \d+ ended \(killed by "
                                                  "SIGKILL"):
            transport.train(0, jobs, {}, lambda reply: None)
        assert time.monotonic() - t0 < 10  # noticed, not waited for
        assert transport._pool is None  # the round's workers are gone
        assert len(transport.train(1, jobs, {}, lambda reply: None)) == 4  # new workers
    finally:
        transport.close()


def test_an_interrupted_round_stops_its_workers_without_waiting_for_their_clients():
    import multiprocessing
    import time

    import pytest

    transport = _transport("interrupted")
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            transport.train(0, {k: b"" for k in range(4)}, {}, lambda reply: None)
        assert time.monotonic() - t0 < 10  # the worker's 60 s client was not waited for
        assert transport._pool is None
        assert not multiprocessing.active_children()
    finally:
        transport.close()


def test_a_message_to_a_dead_worker_names_it_not_a_broken_pipe():
    """A worker killed between two messages (its pipe closed): the next send raises the
    worker's death, not the BrokenPipeError the CLI would print as 'Broken pipe'."""
    import os
    import signal

    import pytest

    from fedumm.runtime.workers import WorkerDiedError, WorkerPool

    pool = WorkerPool(1, serve=lambda msg: msg, init=lambda: None)
    try:
        pid = pool.pids[0]
        os.kill(pid, signal.SIGKILL)
        pool._procs[0].join(timeout=10)
        with pytest.raises(WorkerDiedError, match=f"worker process {pid} ended \\(killed by "
                                                  "SIGKILL"):
            for _ in range(100):  # the pipe's buffer takes a few messages before it breaks
                pool.send(b"x" * 65536)
    finally:
        pool.close()
