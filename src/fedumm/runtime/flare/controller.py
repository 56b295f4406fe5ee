"""Server side of a FLARE run: a FLARE ``ModelController`` running fedumm's one round loop.

The controller builds the same backbone, adapters, strategy and evaluation data as the local
runtime and hands them to :class:`~fedumm.runtime.loop.RoundLoop`; FLARE is only the
transport. Each round the loop's encoded payload (the global adapters in the download codec)
travels to the selected sites as one uint8 tensor in an ``FLModel`` (pytorch exchange format),
and each site answers with its encoded update the same way, so the bytes counted are the bytes
in the FLARE messages' payloads. The run directory, checkpoints included, is the local
runtime's.
"""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from fedumm.config import config_from_dict
from fedumm.fl.he_sum import SERVER_CONTEXT, load_context
from fedumm.fl.pipeline import (
    CLIENT_CONFIG,
    CLIENT_ID,
    PAYLOAD,
    SECAGG_ANSWER,
    SECAGG_STAGE,
    Reply,
    ReplyMeta,
)
from fedumm.fl.secure_sum import Message
from fedumm.runtime.experiment import build_adapters, eval_samples, load_backbone
from fedumm.runtime.loop import RoundLoop
from fedumm.runtime.modes import num_clients, strategy_for
from fedumm.runtime.run_dir import RunDirectory


def to_tensor(payload: bytes) -> torch.Tensor:
    """Encoded bytes as the uint8 tensor that travels in an ``FLModel`` (an error reply's
    empty payload too: ``frombuffer`` refuses an empty buffer)."""
    if not payload:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().numpy().tobytes()


RUN_SUBDIR = "fedumm_run"  # inside FLARE's job workspace when no run_dir is given
# under the run directory (simulator / POC): one file per failed site (and the server's)
ERRORS_DIR = "site_errors"


SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def site_names(k_total: int, sites: list[str] | None = None) -> list[str]:
    """The job's site names, client k first: ``sites`` as given (any names FLARE accepts),
    else FLARE's defaults ``site-1`` .. ``site-K``."""
    if not sites:
        return [f"site-{k + 1}" for k in range(k_total)]
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad:
        raise ValueError(f"site name {bad[0]!r}: use letters, digits, '.', '_' and '-'")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names repeat: {sites}")
    if len(sites) != k_total:
        raise ValueError(f"{len(sites)} site names for {k_total} clients: give one per client "
                         "(or set clients)")
    return list(sites)


class FedUMMController(ModelController):
    def __init__(self, config: dict[str, Any], run_dir: str = "",
                 sites: list[str] | None = None, he_contexts: str = "") -> None:
        """``config``: the resolved fedumm config; ``run_dir``: where to write the run
        directory (empty: ``fedumm_run`` in the server's job workspace); ``sites``: the site
        name of every client (default ``site-1`` .. ``site-K``); ``he_contexts``: the folder
        of the HE contexts (``secagg.method=he``; empty: the server's startup kit, as FLARE
        provisions it)."""
        # strict: any site error stops the run (a failed client must fail the run)
        super().__init__(persistor_id="", ignore_result_error=False, task_check_period=0.05)
        fobs.register(TensorDecomposer)  # adapters travel as torch tensors (bf16 included)
        self.config = config
        self.run_dir = run_dir
        self.sites = sites
        self.he_contexts = he_contexts

    def run(self) -> None:
        cfg = config_from_dict(self.config)  # build_job refused strategy.name=local
        torch.set_num_threads(cfg.train.threads or 1)
        d = RunDirectory(self.run_dir or Path(self.get_run_dir()) / RUN_SUBDIR)
        if not (d.path / d.CONFIG).is_file():
            d.create(cfg)
        backbone = load_backbone(cfg)
        adapters = build_adapters(cfg, backbone)
        k_total = num_clients(cfg)
        strategy = strategy_for(cfg, backbone.groups)
        he = self._he_context() if cfg.secagg.uses_he else None
        transport = FlareTransport(self, site_names(k_total, self.sites), cfg.rounds, he)
        loop = RoundLoop(cfg, d, backbone, adapters, strategy, eval_samples(cfg),
                         k_total, transport, backbone.fingerprint())
        try:
            loop.run(resume=d.load_checkpoint() is not None)
        except Exception:
            if self.run_dir:  # the runner reports the server's reason (e.g. a refused backbone)
                errors = Path(self.run_dir) / ERRORS_DIR
                errors.mkdir(parents=True, exist_ok=True)
                (errors / "server.txt").write_text(traceback.format_exc())
            raise
        self.info(f"fedumm run directory: {d.path}")

    def _he_context(self):
        """The server's HE context (no secret key): from ``he_contexts``, or the startup kit
        through FLARE's own loader (which checks the kit's signature)."""
        if self.he_contexts:
            return load_context(Path(self.he_contexts) / SERVER_CONTEXT, secret=False)
        from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace

        return load_tenseal_context_from_workspace(SERVER_CONTEXT, self.fl_ctx)


class FlareTransport:
    """Payloads to sites and back through the controller's ``send_model_and_wait``."""

    def __init__(self, controller: FedUMMController, sites: list[str], rounds: int,
                 he_context=None) -> None:
        self.controller, self.sites, self.rounds = controller, sites, rounds
        self.he_context = he_context  # the server's, under secagg.method=he

    def train(self, rnd: int, jobs: dict[int, bytes], client_config: dict[str, Any],
              on_reply: Callable[[Reply], None]) -> list[Reply]:
        by_payload: dict[bytes, list[int]] = {}
        for k, payload in jobs.items():  # one message per distinct payload
            by_payload.setdefault(payload, []).append(k)
        replies = []
        for payload, clients in by_payload.items():
            self.controller.info(f"fedumm round {rnd + 1}/{self.rounds}: clients {clients}")
            model = FLModel(params={PAYLOAD: to_tensor(payload)}, current_round=rnd,
                            total_rounds=self.rounds, meta={CLIENT_CONFIG: client_config})
            results = self.controller.send_model_and_wait(
                targets=[self.sites[k] for k in clients], data=model)
            if len(results) != len(clients):
                raise RuntimeError(f"round {rnd}: {len(results)} of {len(clients)} sites "
                                   "answered")
            for r in results:
                reply = Reply(int(r.meta[CLIENT_ID]), to_bytes(r.params[PAYLOAD]),
                              ReplyMeta.from_dict(dict(r.meta)))
                on_reply(reply)
                replies.append(reply)
        return replies

    def state_dict(self) -> dict[str, Any]:
        return {}  # client state lives on the sites

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def training_done(self) -> None:
        pass  # the sites stay up until FLARE ends the job

    def secagg_parties(self) -> FlareParties:
        return FlareParties(self.controller, self.sites, self.rounds, he_context=self.he_context)


class FlareParties:
    """Secure aggregation's messages (:mod:`fedumm.fl.secure_sum`) to the sites and back:
    in each stage every site gets its own message as one task, all sent at once (FLARE's
    non-blocking ``send_model``) and awaited together. The bytes of a message travel as the
    FLModel's payload tensor; its public settings (a site's neighbours and threshold, the
    mask stage's plan) in its meta."""

    def __init__(self, controller: FedUMMController, sites: list[str], rounds: int,
                 poll_s: float = 0.002, he_context=None) -> None:
        self.controller, self.sites, self.rounds, self.poll_s = controller, sites, rounds, poll_s
        self.he_context = he_context  # the server's HE context (secagg.method=he)

    def exchange(self, rnd: int, stage: str, messages: Mapping[int, Message]
                 ) -> dict[int, Message]:
        got: dict[int, Message] = {}

        def take(result: FLModel) -> None:  # on FLARE's thread, once per site
            got[int(result.meta[CLIENT_ID])] = (to_bytes(result.params[PAYLOAD]),
                                                dict(result.meta.get(SECAGG_ANSWER, {})))

        for k, (payload, meta) in messages.items():
            model = FLModel(params={PAYLOAD: to_tensor(payload)}, current_round=rnd,
                            total_rounds=self.rounds, meta={SECAGG_STAGE: stage, **meta})
            self.controller.send_model(targets=[self.sites[k]], data=model, callback=take)
        while len(got) < len(messages):
            if self.controller.abort_signal is not None and \
                    self.controller.abort_signal.triggered:
                raise RuntimeError(f"round {rnd}: the FLARE job was aborted during secure "
                                   f"aggregation's {stage} stage ({len(got)} of "
                                   f"{len(messages)} sites answered)")
            time.sleep(self.poll_s)
        return got
