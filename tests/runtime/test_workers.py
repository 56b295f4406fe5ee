"""Clients trained at once in forked workers give the sequential run's adapters."""

from __future__ import annotations

from safetensors.torch import load_file

from fedumm.config import config_from_dict
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.run_dir import RunDirectory


def test_parallel_workers_equal_sequential_training(tmp_path, tiny_overrides):
    # SCAFFOLD and error feedback keep client state; dropout draws from torch's RNG
    extra = ["clients=3", "strategy.name=scaffold", "codec.upload=topk:0.1+int8",
             "lora.dropout=0.1", "eval.every=0"]
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
