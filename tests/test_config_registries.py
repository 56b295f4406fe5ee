"""Adding a strategy or a codec is one class and a registration: a toy strategy (with a client
side) and a toy codec registered from this module run through the config like built-in ones."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedumm.config import ConfigError, config_from_dict
from fedumm.fl.client_hooks import ClientHook, LocalRound
from fedumm.fl.codecs.base import BaseCodec
from fedumm.fl.strategies import FedAvg
from fedumm.registry import CODECS, STRATEGIES
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.run_dir import RunDirectory


class CountRounds(ClientHook):
    """The toy strategy's client side: counts the client-rounds it served."""

    calls: list[int] = []

    def begin(self, rnd: LocalRound) -> None:
        CountRounds.calls.append(len(rnd.params))


class HalfStep(FedAvg):
    """FedAvg that moves the global adapters half way to the clients' mean."""

    name = "half_step"

    def server_update(self, group, prev, avg, updates):
        return {k: prev[k] + 0.5 * (avg[k] - prev[k]) for k in prev}

    @classmethod
    def client_hooks(cls, client_config: dict) -> list[ClientHook]:
        return [CountRounds()]


class Sign(BaseCodec):
    """1-bit signs with one mean magnitude per tensor (signSGD with a scale)."""

    name = "sign"

    def stream_dtypes(self) -> dict[str, torch.dtype]:
        return {"codes": torch.uint8, "scales": torch.float32}

    def counts(self, n: int) -> dict[str, int]:
        return {"codes": n, "scales": 1}

    def encode(self, v: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
        scale = v.abs().mean().reshape(1) if v.numel() else torch.zeros(1)
        return {"codes": (v >= 0).to(torch.uint8), "scales": scale}

    def decode(self, n: int, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return (parts["codes"].to(torch.float32) * 2 - 1) * parts["scales"]


@pytest.fixture
def toys() -> Iterator[None]:
    STRATEGIES.register("half_step", HalfStep)
    CODECS.register("sign", Sign)
    CountRounds.calls.clear()
    yield
    STRATEGIES.unregister("half_step")
    CODECS.unregister("sign")


def _global(run) -> dict[str, torch.Tensor]:
    return RunDirectory(run).load_checkpoint()["states"][0]


def test_a_registered_strategy_and_codec_run_through_the_config(tmp_path, tiny_overrides, toys):
    common = [*tiny_overrides, "rounds=1", "eval.every=0", "eval.max_gen=0",
              "codec.upload=sign+zlib"]
    cfg = config_from_dict({"name": "toy"}, [*common, "strategy.name=half_step"])
    assert cfg.codec.upload == "sign+zlib"
    half = run_experiment(cfg, tmp_path / "half", progress=False)
    assert half["communication"]["codec"] == "sign+zlib up / float32 down"
    assert CountRounds.calls and all(n > 0 for n in CountRounds.calls)
    assert len(CountRounds.calls) == cfg.clients  # one client-round each
    run_experiment(config_from_dict({"name": "avg"}, common), tmp_path / "avg", progress=False)
    from fedumm.runtime.experiment import build_adapters, load_backbone

    start = build_adapters(cfg, load_backbone(cfg)).state()
    h, a = _global(tmp_path / "half"), _global(tmp_path / "avg")
    moved = [k for k in a if not torch.equal(a[k], start[k])]
    assert moved  # the clients' sign-coded updates moved the mean
    for k in moved:  # the same client updates (same seeds), half the server step
        torch.testing.assert_close(h[k], start[k] + 0.5 * (a[k] - start[k]))


def test_unknown_names_are_config_errors_that_list_the_registered_ones(toys):
    with pytest.raises(ConfigError, match="strategy.name.*half_step"):
        config_from_dict({}, ["strategy.name=halfstep"])
    with pytest.raises(ConfigError, match="codec.upload.*sign"):
        config_from_dict({}, ["codec=signs"])
    with pytest.raises(ConfigError, match="partition.method.*dirichlet"):
        config_from_dict({}, ["partition.method=pathological"])
    with pytest.raises(ConfigError, match="backbone.kind.*janus"):
        config_from_dict({}, ["backbone.kind=januspro"])
    config_from_dict({}, ["strategy.name=half_step", "codec=topk:0.1+sign"])  # registered
