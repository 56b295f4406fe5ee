"""The one server round loop, used by every runtime.

A round: the server state (:mod:`fedumm.runtime.modes`) picks clients and their settings; the
global adapters are encoded once per distinct download (:mod:`fedumm.fl.pipeline`); the
transport delivers them and brings back each client's reply; the pipeline's server halves
decode and check each reply (a bad one is logged with its reason and left out, the round goes
on; a client that dropped out or answered after ``faults.deadline_s`` is logged as such and
left out, :mod:`fedumm.runtime.faults`; a client that refuses the server's backbone fails the
run); the server state aggregates if at least ``strategy.min_clients`` updates are left, else
the round is skipped (each round record's ``outcome``); then evaluation, the log and a
checkpoint. With ``strategy.chain`` > 1 (:mod:`fedumm.fl.chains`) a round runs in hops: hop h
sends each chain's latest adapters to its h-th member, and the strategy aggregates one update
per chain. The runtime is
only the transport: ``local`` runs the clients in this process, ``flare`` sends the payloads
through NVIDIA FLARE. Bytes counted are the lengths of the payloads that travel.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from fedumm.config import Config, robust_min_clients
from fedumm.data.fingerprint import data_manifest, describe_change
from fedumm.fl.answer_calibration import ANSWER_SPACE, answer_space
from fedumm.fl.chains import draw_chains, hops, merge_chain
from fedumm.fl.downloads import OUT_OF_SYNC, Downloads
from fedumm.fl.endpoint import BACKBONE_MISMATCH
from fedumm.fl.lora_modes import LoraMode
from fedumm.fl.pipeline import BACKBONE_FINGERPRINT, SERVER_CONTROL, Pipeline, Reply
from fedumm.fl.secagg import upload_per_client
from fedumm.fl.secure_sum import SecAggParties
from fedumm.fl.updates import ClientUpdate
from fedumm.runtime.experiment import evaluate_states, finish_run, mid_run_eval, round_record
from fedumm.runtime.faults import AGGREGATED, SKIPPED, Arrivals, arrivals, outcome, with_faults
from fedumm.runtime.modes import FL, RoundAborted, State, run_mode, server_for
from fedumm.runtime.privacy import privacy_spent
from fedumm.runtime.run_dir import RunDirectory, RunDirError, RunFailedError


class Transport(Protocol):
    """Delivers payloads to clients and their replies back."""

    def train(self, rnd: int, jobs: dict[int, bytes], client_config: dict[str, Any],
              on_reply: Callable[[Reply], None]) -> list[Reply]:
        """Send ``jobs[k]`` to client k with ``client_config``; the replies, in any order."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Client-side state this process holds (checkpointed with the round)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def training_done(self) -> None:
        """The rounds are over: free what only training needs before the final evaluation."""
        ...

    def secagg_parties(self) -> SecAggParties | None:
        """How secure aggregation reaches the clients (:mod:`fedumm.fl.secure_sum`): None
        when they live in this process and hand their updates to the server's simulation."""
        ...


class RoundLoop:
    """The rounds of one experiment over any transport, with checkpoints after every round."""

    def __init__(self, cfg: Config, run_dir: RunDirectory, backbone, adapters, strategy,
                 val_data, num_clients: int, transport: Transport, fingerprint: str,
                 progress: Callable[[str], None] | None = None) -> None:
        self.cfg, self.dir = cfg, run_dir
        self.backbone, self.adapters = backbone, adapters
        self.val_data = val_data
        self.num_clients = num_clients
        # the simulated faults (runtime/faults.py) sit in front of whichever transport it is
        self.transport = with_faults(transport, cfg.faults, cfg.seed, num_clients)
        st = cfg.strategy  # a round aggregates at least st.least(K) updates
        self.least = st.least(num_clients)
        # a robust rule cannot aggregate fewer than it needs (config checked a full round;
        # dropouts, late replies and rejections can leave fewer): such a round is skipped
        self.robust = (robust_min_clients(st.robust, st.robust_malicious),
                       f"strategy.robust={st.robust} with strategy.robust_malicious="
                       f"{st.robust_malicious}") \
            if st.robust != "none" and run_mode(cfg) == FL else None
        self.fingerprint = fingerprint
        # clients per chain (fl/chains.py); the baselines' clients are never chained
        self.chain = st.chain if run_mode(cfg) == FL else 1
        self.secagg = cfg.secagg.enabled and run_mode(cfg) == FL
        self.progress = progress or (lambda _: None)
        self.server = server_for(cfg, strategy, adapters, adapters.state(), num_clients)
        self.pipeline = Pipeline.from_config(cfg)
        self.lora = LoraMode.from_config(cfg.lora)
        self.downloads = Downloads(cfg.codec.download, self.lora, self.server.states[0],
                                   lossy_allowed=self.server.counts_traffic)
        self.config_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()
                                          ).hexdigest()
        # what the data files are now (paths -> size, time or content): a resume refuses
        # data edited since the run started
        self.data = data_manifest(cfg.data, val_data)
        # answer calibration's classes: the answer tokens of the server's held-out answers
        # (a backbone without answer_token_ids was refused when the trainer was built)
        self.answer_space = answer_space(backbone, val_data) \
            if cfg.train.answer_calibration else []

    def selected(self, rnd: int) -> list[int]:
        return self.server.selected(rnd)

    def _evaluate(self, with_gen: bool, base: bool = False) -> dict[str, Any]:
        states = self.server.evaluated()[:1] if base else self.server.evaluated()
        return evaluate_states(self.cfg, self.adapters, self.val_data, states, with_gen)

    def _timed_eval(self, acc: dict, with_gen: bool, base: bool = False) -> dict[str, Any]:
        t = time.perf_counter()
        res = self._evaluate(with_gen, base)
        acc["eval_s"] += time.perf_counter() - t
        return res

    def _resume(self) -> tuple[int, dict] | None:
        """(first round, counters) of an interrupted run, after restoring its state."""
        ckpt = self.dir.load_checkpoint()
        if ckpt is None:
            self.dir.truncate_metrics(-2)  # interrupted before the first round: start over
            return None
        if ckpt["fingerprint"] != self.fingerprint:
            raise RunDirError("the backbone differs from the one this run started with")
        if ckpt.get("config_hash", self.config_hash) != self.config_hash:
            raise RunDirError(f"{self.dir.path / self.dir.CONFIG} changed since the run "
                              "started; resume needs the config it ran with (start a new run "
                              "to change settings)")
        if ckpt.get("data", self.data) != self.data:
            raise RunDirError(f"the data changed since the run started ("
                              f"{describe_change(ckpt['data'], self.data)}); resume needs the "
                              "data it ran with (start a new run to train on the new data)")
        self.server.load_state_dict(ckpt)
        self.downloads.load_state_dict(ckpt.get("downloads", {}))
        self.transport.load_state_dict(ckpt.get("transport", {}))
        self.dir.truncate_metrics(ckpt["round"])
        return ckpt["round"] + 1, ckpt["counters"]

    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg, d = self.cfg, self.dir
        t_start = time.perf_counter()
        resumed = self._resume() if resume else None
        start, acc = resumed or (0, {"upload": [], "download": [], "client_train_s": 0.0,
                                     "eval_s": 0.0, "wall_before_s": 0.0})
        acc.setdefault("accepted", 0)  # client updates aggregated / left out, all rounds
        acc.setdefault("rejected", 0)
        acc.setdefault("first_rejection", None)
        for key in ("dropped", "late", "skipped_rounds"):  # clients / rounds, all rounds
            acc.setdefault(key, 0)
        if resumed is None and cfg.eval.base:  # round -1: the frozen base on both tasks
            self.progress("evaluating the frozen base")
            res = self._timed_eval(acc, True, base=True)
            d.log({"type": "eval", "round": -1, **res})
            self.progress(f"base VQA {res.get('vqa_accuracy', math.nan):.1f}")
        for rnd in range(start, cfg.rounds):
            self._round(rnd, acc)
            gen = mid_run_eval(cfg, rnd)
            if gen is not None:
                res = self._timed_eval(acc, gen)
                d.log({"type": "eval", "round": rnd, **res})
                self.progress(f"VQA {res.get('vqa_accuracy', math.nan):.1f}")
            acc["wall_now_s"] = acc["wall_before_s"] + time.perf_counter() - t_start
            d.save_checkpoint({"round": rnd, **self.server.state_dict(),
                               "downloads": self.downloads.state_dict(),
                               "transport": self.transport.state_dict(),
                               "counters": {**acc, "wall_before_s": acc["wall_now_s"]},
                               "fingerprint": self.fingerprint,
                               "config_hash": self.config_hash, "data": self.data})
        self.transport.training_done()
        final = self._timed_eval(acc, True)
        summary = finish_run(cfg, d, self.backbone, self.adapters, self.fingerprint,
                             self.num_clients, self.server.states[0], final, acc,
                             acc["wall_before_s"] + time.perf_counter() - t_start,
                             residual=self.server.residual)
        # the run "finished" with the frozen base: say so, and fail
        if not acc["accepted"] and acc["rejected"] and not acc["dropped"] + acc["late"]:
            raise RunFailedError(f"no client update was accepted in the {cfg.rounds} round(s): "
                                 f"all {acc['rejected']} were rejected (first: "
                                 f"{acc['first_rejection']}); the adapters are the ones the run "
                                 f"started from (see the rejected records in "
                                 f"{d.path / d.METRICS})")
        if acc["skipped_rounds"] >= cfg.rounds:
            raise RunFailedError(
                f"no round was aggregated in the {cfg.rounds} round(s): client updates "
                f"{acc['accepted']} accepted, {acc['rejected']} rejected, {acc['dropped']} "
                f"dropped out, {acc['late']} late; the adapters are the ones the run started "
                f"from (each round record's outcome in {d.path / d.METRICS} says why)")
        return summary

    def _round(self, rnd: int, acc: dict) -> None:
        selected = self.server.selected(rnd)
        ccfg = dict(self.server.client_config(rnd))
        ccfg[BACKBONE_FINGERPRINT] = self.fingerprint  # every client checks the base it holds
        if self.answer_space:
            ccfg[ANSWER_SPACE] = self.answer_space
        if self.secagg:  # secure aggregation's key stages come before the clients train
            self.server.open_round(rnd, selected, self.transport.secagg_parties())
        # strategy.chain > 1: chains of clients trained one after another (fl/chains.py);
        # else one hop in which every client starts from the global adapters
        chains = draw_chains(selected, self.chain, self.cfg.seed, rnd)
        members, sent, came, replies, rejected = self._hops(rnd, chains, ccfg, acc)
        # by client id: a fixed aggregation order (a chain by its first member's)
        trained = sorted((u for m in members.values() for u in m), key=lambda u: u.client_id)
        acc["accepted"] += len(trained)
        updates = trained if self.chain <= 1 else \
            sorted((merge_chain(m) for m in members.values()), key=lambda u: u.client_id)
        seen = self.server.participation(rnd)  # online, sampled (or skipped)
        # too few updates left (dropouts, late replies, rejections): the global model stays
        result = outcome(len(trained), self.least, seen.get("skipped"), self.robust)
        absorbed: dict[str, Any] = {}
        if result == AGGREGATED:
            try:
                # a chain's first member started from the global adapters: its update and
                # so the chain's apply to them
                absorbed = self.server.absorb(rnd, updates, sent)
            except RoundAborted as exc:  # secure aggregation lost too many clients
                result = f"{SKIPPED}: {exc}"
        counted = self.server.counts_traffic
        record = {**round_record(rnd, selected, trained, count_upload=counted), **absorbed,
                  "outcome": result, **came.record()}
        uploads = [u.upload_bytes for u in trained]
        if "secagg" in absorbed:  # what a deployment sends: the protocol's messages
            uploads = upload_per_client(absorbed["secagg"])
            record["upload_bytes"] = sum(uploads) if counted else 0
        if counted:
            acc["upload"] += uploads
        if result != AGGREGATED:
            acc["skipped_rounds"] += 1
        if spent := privacy_spent(acc, replies, absorbed):
            record["privacy"] = spent
        if rejected:
            record["rejected"] = rejected
        if seen:
            record["participation"] = {**seen, "trained": len(trained)}
        if self.chain > 1:
            record["chains"] = chains
        self.dir.log(record)

    def _hops(self, rnd: int, chains: list[list[int]], ccfg: dict[str, Any], acc: dict
              ) -> tuple[dict[int, list[ClientUpdate]], dict[int, State], Arrivals,
                         list[Reply], list[dict[str, Any]]]:
        """Train round ``rnd``'s chains hop by hop. Returns each chain's accepted members'
        updates (by chain index), the server model each client was sent, the arrivals, the
        replies and the rejected ones."""
        control = ccfg.pop(SERVER_CONTROL, {})
        heads: dict[int, State] = {}  # chain -> the adapters its next member starts from
        members: dict[int, list[ClientUpdate]] = {}
        sent: dict[int, State] = {}
        came, replies, rejected = Arrivals([]), [], []
        for hop in hops(chains):
            chain_of = {k: i for i, k in hop}
            # a member starts from its chain's head; the first (or one after members who
            # sent nothing usable) from the server's adapters
            start_of = {k: heads.get(i, self.server.states[self.server.source(k)])
                        for i, k in hop}
            key_of = {k: (i if i in heads else None, self.server.source(k)) for i, k in hop}
            out = self.downloads.prepare(rnd, list(chain_of), start_of.__getitem__,
                                         key_of.__getitem__, control, self.server.residual)
            sent.update(out.references)
            hop_came, hop_replies = self._train(rnd, out.payloads, ccfg, acc)
            came, replies = came + hop_came, replies + hop_replies
            for reply in hop_came.on_time:  # by client id: a fixed aggregation order
                k = reply.client_id
                upd = self.pipeline.receive(reply, out.references[k], out.starts[k]) \
                    if k in out.references else "not selected"
                if isinstance(upd, str):
                    rejected.append(self._reject(rnd, k, upd, acc))
                    continue
                members.setdefault(chain_of[k], []).append(upd)
                heads[chain_of[k]] = {**heads.get(chain_of[k], out.references[k]),
                                      **upd.tensors}
        return members, sent, came, replies, rejected

    def _train(self, rnd: int, jobs: dict[int, bytes], ccfg: dict[str, Any], acc: dict
               ) -> tuple[Arrivals, list[Reply]]:
        """Send ``jobs`` and sort the replies (on time, late, dropped); count the time, the
        download bytes and the faults, and note who now holds which download."""
        t = time.perf_counter()
        replies = self.transport.train(rnd, jobs, ccfg, lambda _: self.progress(""))
        acc["client_train_s"] += time.perf_counter() - t
        self._check_backbones(rnd, replies)
        came = arrivals(jobs, replies, self.cfg.faults.deadline_s)  # late, dropped, on time
        if self.server.counts_traffic:  # a client that dropped out was sent nothing
            acc["download"] += [len(jobs[k]) for k in jobs if k not in came.dropped]
        self.downloads.delivered(rnd, [r.client_id for r in replies if r.client_id in jobs
                                       and not str(r.meta.error or "").startswith(OUT_OF_SYNC)])
        acc["dropped"] += len(came.dropped)
        acc["late"] += len(came.late)
        return came, replies

    def _reject(self, rnd: int, client: int, reason: str, acc: dict) -> dict[str, Any]:
        """Leave client ``client``'s reply out of round ``rnd``, logged with its reason."""
        entry = {"client": client, "reason": reason}
        self.dir.log({"type": "rejected", "round": rnd, **entry})
        acc["rejected"] += 1
        if acc["first_rejection"] is None:
            acc["first_rejection"] = f"client {client} in round {rnd}: {reason}"
        return entry

    def _check_backbones(self, rnd: int, replies: list[Reply]) -> None:
        """Fail the run on a client that refused the server's backbone: a different base is
        no per-client glitch to leave out but a site (or a server) holding weights the others
        do not, in every round; the last checkpoint stays, to resume once it is fixed."""
        for r in sorted(replies, key=lambda r: r.client_id):
            if str(r.meta.error or "").startswith(BACKBONE_MISMATCH):
                raise RunFailedError(
                    f"client {r.client_id} refused round {rnd}: {r.meta.error}. The run stops "
                    "(the last checkpoint is intact: fix the backbone, then continue with "
                    "`fedumm run --resume`)")
