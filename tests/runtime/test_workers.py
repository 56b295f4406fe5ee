"""Clients trained at once in forked workers give the sequential run's adapters."""

from __future__ import annotations

from safetensors.torch import load_file

from fedumm.config import config_from_dict
from fedumm.runtime.local import run_experiment
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
    """An endpoint that reports how a worker handles signals; its client 1 fails."""

    def handle(self, client, rnd, payload, client_config, state):
        import signal

        if client == 1:
            raise RuntimeError("client 1 broke")
        return (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)), {}


def test_workers_leave_signals_to_the_parent_and_errors_reach_it():
    import signal

    import pytest

    from fedumm.runtime.loop import LocalTransport

    def raise_interrupt(signum, frame):  # what the CLI installs; workers must not keep it
        raise KeyboardInterrupt(signum)

    old = signal.signal(signal.SIGTERM, raise_interrupt)
    transport = LocalTransport([0, 1, 2], _Probe(), workers=2, threads=1)
    try:
        replies = transport.train(0, {0: b"", 2: b""}, {}, lambda reply: None)
        # SIGTERM (Pool.terminate) ends a worker; Ctrl-C is the parent's to handle
        assert replies == [(signal.SIG_DFL, signal.SIG_IGN)] * 2
        with pytest.raises(RuntimeError, match="client 1 broke"):
            transport.train(1, {0: b"", 1: b""}, {}, lambda reply: None)
    finally:
        transport.close()
        signal.signal(signal.SIGTERM, old)
