"""The client's half of a round, the same under every transport: decode what the server sent,
train with the algorithm's client hooks, and send the update through the pipeline's stages."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fedumm.fl.client import ClientData, ClientTrainer
from fedumm.fl.client_hooks import ClientHook
from fedumm.fl.downloads import OutOfSync, receive
from fedumm.fl.lora_modes import LoraMode
from fedumm.fl.pipeline import (
    BACKBONE_FINGERPRINT,
    CONTROL_DELTA,
    SEALED,
    SERVER_CONTROL,
    Pipeline,
    Reply,
    ReplyMeta,
    State,
    Upload,
)
from fedumm.fl.strategies import Strategy

# how a client's refusal to train on another backbone begins (the server fails the run on it)
BACKBONE_MISMATCH = "backbone mismatch"


def short(fingerprint: str) -> str:
    """A fingerprint's short form for messages (12 hex digits, as git shortens hashes)."""
    return fingerprint[:12]


class ClientEndpoint:
    """One client process's endpoint: ``handle`` serves one round for one client.

    ``fingerprint``: that of the frozen backbone this client loaded (default: hashed here, from
    the trainer's backbone, as the server hashes its own). It is taken at construction, before
    any round folds a residual into the frozen weights; a round whose job names another
    backbone is refused (:data:`BACKBONE_MISMATCH`): the client trains on the base it holds or
    not at all."""

    def __init__(self, trainer: ClientTrainer, strategy: type[Strategy], lora: LoraMode,
                 pipeline: Pipeline, keep_initial: bool = False,
                 fingerprint: str | None = None) -> None:
        self.trainer = trainer
        self.strategy = strategy  # its client hooks are the algorithm's client side
        self.lora = lora
        self.pipeline = pipeline
        self.fingerprint = fingerprint if fingerprint is not None \
            else trainer.backbone.fingerprint()
        # a lossy download's first copy is the initial adapters, built here from the seed
        self.initial = {k: p.detach().float().clone()
                        for k, p in trainer.adapters.params.items()} if keep_initial else None

    def hooks(self, client: ClientData, client_config: dict[str, Any]) -> list[ClientHook]:
        """This round's client hooks: the LoRA mode's first, then the strategy's, then the
        trainer config's (FedMLLM's layer-adaptive proximal term, answer calibration)."""
        return [*self.lora.client_hooks(client.client_id),
                *self.strategy.client_hooks(client_config),
                *self.trainer.config_hooks(client, client_config)]

    def mismatch(self, wanted: str) -> str:
        """Why this client refuses a job for the backbone ``wanted``: both fingerprints and
        the fix."""
        return (f"{BACKBONE_MISMATCH}: the job is for the frozen backbone {short(wanted)}, "
                f"this client loaded {short(self.fingerprint)}; it trains only on the base "
                "it holds. Give every site the same base weights (backbone.kind, "
                "backbone.preset or backbone.path, unaltered files), or start the run from the "
                "backbone the sites hold")

    def handle(self, client: ClientData, rnd: int, payload: bytes,
               client_config: dict[str, Any], client_state: dict | None
               ) -> tuple[Reply, dict]:
        reply, client_state, _ = self._serve(client, rnd, payload, client_config, client_state)
        return reply, client_state

    def handle_sealed(self, client: ClientData, rnd: int, payload: bytes,
                      client_config: dict[str, Any], client_state: dict | None,
                      hold: Callable[[State, State], None]) -> tuple[Reply, dict]:
        """:meth:`handle` for secure aggregation over a real transport (:mod:`fedumm.fl.secagg`):
        the update stays here. The pipeline's server halves run on this client, against the
        adapters it started from, so it is checked and decoded as the server would; its values
        and that start go to ``hold``, and the reply carries its meta and tensor keys only
        (:data:`SEALED`), or the reason the update is left out."""
        reply, client_state, start = self._serve(client, rnd, payload, client_config,
                                                 client_state)
        if reply.meta.error or start is None:
            return reply, client_state
        upd = self.pipeline.receive(reply, start)
        if isinstance(upd, str):
            return Reply(client.client_id, b"", replace(reply.meta, error=upd)), client_state
        hold(upd.tensors, start)
        meta = replace(reply.meta, form=SEALED, keys=sorted(upd.tensors), has_control=False)
        return Reply(client.client_id, b"", meta), client_state

    def _serve(self, client: ClientData, rnd: int, payload: bytes,
               client_config: dict[str, Any], client_state: dict | None
               ) -> tuple[Reply, dict, State | None]:
        """The round's reply, the client state after it and the adapters the client started
        from (None when it did not train)."""
        client_state = dict(client_state or {})
        wanted = client_config.get(BACKBONE_FINGERPRINT)
        if wanted is not None and wanted != self.fingerprint:  # before anything is touched
            meta = ReplyMeta(num_samples=client.num_samples, error=self.mismatch(wanted))
            return Reply(client.client_id, b"", meta), client_state, None
        try:  # a lossy download is a change of the copy this client holds
            down = receive(payload, client_state, self.initial)
        except OutOfSync as exc:
            meta = ReplyMeta(num_samples=client.num_samples, error=str(exc))
            return Reply(client.client_id, b"", meta), client_state, None
        ad = self.trainer.adapters
        if down.residual:  # exact LoRA aggregation: the frozen weights carry the residual
            ad.fold_residuals(down.residual)
        ccfg = {**client_config, SERVER_CONTROL: down.control} if down.control \
            else dict(client_config)
        state = self.lora.restore(down.state, {k: p.detach() for k, p in ad.params.items()})
        if not client.groups_with_data(ad):  # nothing it could train
            meta = ReplyMeta(num_samples=client.num_samples, error="no training data")
            return Reply(client.client_id, b"", meta), client_state, None
        t = time.perf_counter()
        upd, client_state = self.trainer.train(client, state, rnd,
                                               self.hooks(client, ccfg), client_state)
        meta = ReplyMeta(num_samples=upd.num_samples, quality=upd.quality,
                         num_steps=upd.num_steps, metrics=upd.metrics,
                         train_s=time.perf_counter() - t)
        up = Upload(client.client_id, upd.tensors, upd.extra.get(CONTROL_DELTA, {}), state,
                    meta, client_state, rank=self.lora.rank_of(client.client_id), round=rnd)
        return self.pipeline.send(up), up.client_state, state
