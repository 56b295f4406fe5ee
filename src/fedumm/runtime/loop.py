"""The one server round loop, used by every runtime, and the client side every transport runs.

A round: the strategy picks clients and their settings; the global adapters (and SCAFFOLD's
server control) are encoded once with the download codec; the transport delivers the payload
and brings back each client's encoded update; the server decodes, validates (a malformed update
is logged with its reason and left out, the round goes on), aggregates, evaluates, logs and
checkpoints. The runtime is only the transport: ``local`` runs the clients in this process,
``flare`` sends the payloads through NVIDIA FLARE. Bytes counted are the lengths of the
payloads that travel.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from fedumm.config import Config
from fedumm.fl import codec
from fedumm.fl.client import ClientData, ClientTrainer
from fedumm.fl.lora_aggregation import (
    aggregation_error,
    exact_residuals,
    is_lora_a,
    lora_modules,
    mean_products,
    pad_ranks,
    truncate_ranks,
)
from fedumm.fl.updates import ClientUpdate
from fedumm.fl.validate import validate
from fedumm.runtime.allocator import fix_mmap_threshold
from fedumm.runtime.experiment import (
    evaluate_states,
    finish_run,
    mid_run_eval,
    pack,
    round_record,
    run_mode,
    unpack,
)
from fedumm.runtime.run_dir import RunDirectory, RunDirError


@dataclass
class Reply:
    """What a client sends back: its encoded update and the numbers the strategy needs."""

    client_id: int
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)


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


# --------------------------------------------------------------------------- the wire

def encode(tensors: dict[str, torch.Tensor], spec: str) -> bytes:
    return codec.encode(tensors, spec)


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    return codec.decode(payload)


RESIDUAL = "residual/"  # download keys of the folded residuals (exact LoRA aggregation)


def split_residual(tensors: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the other tensors, the residuals by module) of a download payload."""
    residual = {k[len(RESIDUAL):]: v for k, v in tensors.items() if k.startswith(RESIDUAL)}
    return {k: v for k, v in tensors.items() if not k.startswith(RESIDUAL)}, residual


def sends_values(spec: str) -> bool:
    """Plain casts (float32 / bfloat16 / float16, dense) carry the trained adapter values, as
    exact as the cast; quantising and sparsifying codecs carry the update (trained minus
    received), whose error feedback and sparsity are what make them work."""
    s = codec.parse_codec(spec)
    return not s.sparse and s.base in codec.DTYPES


# --------------------------------------------------------------------------- client side

# (trained adapter tensors, the adapters received, the client's state) -> tensors to send
UpdateTransform = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], dict],
                           dict[str, torch.Tensor]]

class ClientEndpoint:
    """The client's half of a round, the same under every transport: decode what the server
    sent, train, encode the update with the upload codec (keeping the error-feedback residual
    in the client's state)."""

    def __init__(self, trainer: ClientTrainer, cfg: Config,
                 transforms: list[UpdateTransform] | None = None) -> None:
        self.trainer = trainer
        self.cfg = cfg
        # the client pipeline's slot between the update and the codec (e.g. clipping and
        # noise for differential privacy): each maps (update tensors, client state) -> tensors
        self.transforms = list(transforms or [])

    def handle(self, client: ClientData, rnd: int, payload: bytes,
               client_config: dict[str, Any], client_state: dict | None
               ) -> tuple[Reply, dict]:
        tensors, residual = split_residual(decode(payload))
        if residual:  # exact LoRA aggregation: the frozen weights carry the residual
            self.trainer.adapters.fold_residuals(residual)
        state, control = unpack(tensors)
        ccfg = dict(client_config)
        if control:
            ccfg["server_control"] = control
        rank = self.cfg.lora.rank_of(client.client_id)
        if self.cfg.lora.client_ranks:  # it arrived truncated to this client's rank
            full = {k: p.detach() for k, p in self.trainer.adapters.params.items()}
            state = pad_ranks(state, full)
            ccfg["lora_rank"] = rank
        if not client.groups_with_data(self.trainer.adapters):  # nothing it could train
            return Reply(client.client_id, b"", {"num_samples": client.num_samples,
                                                 "error": "no training data"}), \
                dict(client_state or {})
        t = time.perf_counter()
        upd, client_state = self.trainer.train(client, state, rnd, ccfg, client_state)
        train_s = time.perf_counter() - t
        control_delta = upd.extra.get("control_delta", {})
        spec = self.cfg.codec.upload
        meta = {"num_samples": upd.num_samples, "quality": upd.quality,
                "num_steps": upd.num_steps, "metrics": upd.metrics,
                "has_control": bool(control_delta), "train_s": train_s}
        for transform in self.transforms:
            upd.tensors = transform(upd.tensors, state, client_state)
        if self.cfg.lora.client_ranks:  # only this client's rank components travel
            upd.tensors = truncate_ranks(upd.tensors, rank)
            state = truncate_ranks(state, rank)
            meta["rank"] = rank
        bad = [k for k, v in {**upd.tensors, **control_delta}.items()
               if not bool(torch.isfinite(v).all())]
        if bad:  # diverged: say so instead of sending numbers (the server leaves it out)
            meta["error"] = f"{bad[0]}: non-finite values after local training"
            return Reply(client.client_id, b"", meta), client_state
        if sends_values(spec):
            form, body = "values", encode(pack(upd.tensors, control_delta), spec)
        else:
            form = "delta"
            delta = pack({k: v - state[k] for k, v in upd.tensors.items()}, control_delta)
            if self.cfg.codec.error_feedback:
                ef = codec.ErrorFeedback()
                ef.load_state_dict(client_state.get("error_feedback", {}))
                body, _ = ef.compress(delta, spec)
                client_state["error_feedback"] = ef.state_dict()
            else:
                body = encode(delta, spec)
        meta["form"] = form
        return Reply(client.client_id, body, meta), client_state


class LocalTransport:
    """Every client in this process over the one shared frozen backbone (memory: one model
    plus K adapter states): one after another, or ``workers`` at a time: this process and
    ``workers - 1`` worker processes forked after the backbone is built, which share its frozen
    weights copy-on-write. Each of them takes the round's next untrained client, largest first,
    until none is left, training with ``threads`` threads. A client's training depends only on
    its inputs (its RNG is seeded per client and round), so the results equal sequential
    training at the same per-client thread count."""

    def __init__(self, clients: list[ClientData], endpoint: ClientEndpoint, workers: int = 1,
                 threads: int = 1) -> None:
        self.clients = clients
        self.endpoint = endpoint
        self.client_states: dict[int, dict] = {}
        self.workers = workers
        self.threads = threads
        self._pool = None
        self._next = None  # the round's next unclaimed task, shared with the workers

    def _work(self, k: int, rnd: int, payload: bytes, client_config: dict[str, Any],
              state: dict | None) -> tuple[Reply, dict]:
        return self.endpoint.handle(self.clients[k], rnd, payload, client_config, state)

    def train(self, rnd: int, jobs: dict[int, bytes], client_config: dict[str, Any],
              on_reply: Callable[[Reply], None]) -> list[Reply]:
        tasks = [(k, rnd, payload, client_config, self.client_states.get(k))
                 for k, payload in jobs.items()]
        if self.workers > 1 and len(tasks) > 1:
            results = self._parallel(tasks, on_reply)
        else:
            results = []
            for task in tasks:
                results.append(self._work(*task))
                on_reply(results[-1][0])
        for (k, *_), (_, state) in zip(tasks, results, strict=True):
            self.client_states[k] = state
        return [reply for reply, _ in results]

    def _claim(self) -> int:
        with self._next.get_lock():
            i = self._next.value
            self._next.value += 1
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
        pending = [pool.apply_async(_pool_drain, (tasks, order))
                   for _ in range(self.workers - 1)]
        results: dict[int, tuple[Reply, dict]] = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # this process trains like a worker meanwhile
        try:
            for i, result in self.drain(tasks, order):
                results[i] = result
                on_reply(result[0])
        except BaseException:
            with self._next.get_lock():
                self._next.value = len(tasks)  # the workers take nothing more
            for p in pending:
                p.wait()
            raise
        finally:
            torch.set_num_threads(threads)
        for p in pending:
            for i, result in p.get():
                results[i] = result
                on_reply(result[0])
        return [results[i] for i in range(len(tasks))]

    def _start_workers(self):
        if self._pool is None:
            import multiprocessing

            global _POOL_TRANSPORT
            _POOL_TRANSPORT = self  # what the forked workers inherit
            ctx = multiprocessing.get_context("fork")
            self._next = ctx.Value("i", 0)
            # the collector would touch every object the parent built and copy its pages in
            # each worker: freeze them, so the frozen base and the data stay shared
            gc.collect()
            gc.freeze()
            self._pool = ctx.Pool(self.workers - 1, initializer=_worker_init,
                                  initargs=(self.threads,))
        return self._pool

    def training_done(self) -> None:
        self.close()  # the workers' memory is not the final evaluation's

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
            gc.unfreeze()

    def state_dict(self) -> dict[str, Any]:
        return {"client_states": self.client_states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.client_states = dict(state.get("client_states", {}))


_POOL_TRANSPORT: LocalTransport | None = None  # set in the parent before the workers fork


def worker_signals() -> None:
    """In a forked worker process: the default SIGTERM and no Ctrl-C. It inherits the CLI's
    handlers, which turn SIGTERM into a clean exit of the *run*; a worker is stopped by its
    parent (``Pool.terminate`` sends SIGTERM) and leaves Ctrl-C to it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    worker_signals()
    fix_mmap_threshold()  # a worker's heap would grow to ~2x what it holds (allocator.py)


def _pool_drain(tasks: list[tuple], order: list[int]) -> list[tuple[int, tuple[Reply, dict]]]:
    return list(_POOL_TRANSPORT.drain(tasks, order))


# --------------------------------------------------------------------------- server side

def receive(reply: Reply, received: dict[str, torch.Tensor]) -> ClientUpdate | str:
    """A reply as a :class:`ClientUpdate`, or the reason it is rejected. ``received``: the
    adapters the client started from (what it decoded), to which a delta is added."""
    if reply.meta.get("error"):
        return str(reply.meta["error"])
    try:
        tensors, control = unpack(decode(reply.payload))
    except Exception as exc:  # any malformed payload is a rejection, not a crash
        return f"undecodable payload ({type(exc).__name__}: {exc})"
    meta = reply.meta
    if meta.get("rank") is not None:  # a lower-rank client: zero-pad its components
        if any(k not in received for k in tensors):
            return f"unknown adapter tensors {sorted(set(tensors) - set(received))[:3]}"
        tensors = pad_ranks(tensors, received)
    why = validate(tensors, received)
    if why is not None:
        return why
    if meta.get("form") == "delta":
        tensors = {k: received[k] + v for k, v in tensors.items()}
    extra = {"control_delta": control} if meta.get("has_control") else {}
    if meta.get("rank") is not None:
        extra["rank"] = int(meta["rank"])
    return ClientUpdate(reply.client_id, tensors, dict(meta["num_samples"]),
                        dict(meta.get("quality", {})), int(meta.get("num_steps", 0)),
                        dict(meta.get("metrics", {})), extra, len(reply.payload))


class RoundLoop:
    """The rounds of one experiment over any transport, with checkpoints after every round."""

    def __init__(self, cfg: Config, run_dir: RunDirectory, backbone, adapters, strategy,
                 val_data, num_clients: int, transport: Transport, fingerprint: str,
                 progress: Callable[[str], None] | None = None) -> None:
        self.cfg, self.dir = cfg, run_dir
        self.backbone, self.adapters, self.strategy = backbone, adapters, strategy
        self.val_data = val_data
        self.num_clients = num_clients
        self.transport = transport
        self.fingerprint = fingerprint
        self.mode = run_mode(cfg)
        self.progress = progress or (lambda _: None)
        self.initial_state = adapters.state()
        if hasattr(strategy, "init_state"):
            strategy.init_state(self.initial_state)
        if cfg.lora.aggregation == "ffa":  # A stays at its seeded initialisation everywhere
            strategy.frozen = is_lora_a
        self.residual: dict[str, torch.Tensor] = {}  # exact aggregation: folded so far
        self.modules = lora_modules(self.initial_state)
        self.scaling = cfg.lora.alpha / cfg.lora.r

    def selected(self, rnd: int) -> list[int]:
        if self.mode == "fl":
            return self.strategy.sample_clients(rnd)
        return list(range(self.num_clients))

    def _evaluate(self, states: list[dict], with_gen: bool) -> dict[str, Any]:
        return evaluate_states(self.cfg, self.adapters, self.val_data, states, with_gen)

    def run(self, resume: bool = False) -> dict[str, Any]:
        cfg, d = self.cfg, self.dir
        t_start = time.perf_counter()
        ckpt = d.load_checkpoint() if resume else None
        if resume and ckpt is None:
            d.truncate_metrics(-2)  # interrupted before the first round: start over
        config_hash = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()
                                     ).hexdigest()
        if ckpt is not None:
            if ckpt["fingerprint"] != self.fingerprint:
                raise RunDirError("the backbone differs from the one this run started with")
            if ckpt.get("config_hash", config_hash) != config_hash:
                raise RunDirError(f"{d.path / d.CONFIG} changed since the run started; resume "
                                  "needs the config it ran with (start a new run to change "
                                  "settings)")
            start = ckpt["round"] + 1
            self.strategy.load_state_dict(ckpt["strategy"])
            states, acc = ckpt["states"], ckpt["counters"]
            self.transport.load_state_dict(ckpt.get("transport", {}))
            self.residual = dict(ckpt.get("residual", {}))
            if self.residual:
                self.adapters.fold_residuals(self.residual)
            d.truncate_metrics(ckpt["round"])
        else:
            start = 0
            n_states = self.num_clients if self.mode == "local" else 1
            states = [dict(self.initial_state) for _ in range(n_states)]
            acc = {"upload": [], "download": [], "client_train_s": 0.0, "eval_s": 0.0,
                   "wall_before_s": 0.0}
            if cfg.eval.every:  # round -1: the frozen base (LoRA B = 0), the curve's start
                t = time.perf_counter()
                d.log({"type": "eval", "round": -1, **self._evaluate(states[:1], False)})
                acc["eval_s"] += time.perf_counter() - t
        for rnd in range(start, cfg.rounds):
            states = self._round(rnd, states, acc)
            gen = mid_run_eval(cfg, rnd)
            if gen is not None:
                t = time.perf_counter()
                res = self._evaluate(states if self.mode == "local" else states[:1], gen)
                acc["eval_s"] += time.perf_counter() - t
                d.log({"type": "eval", "round": rnd, **res})
                self.progress(f"VQA {res.get('vqa_accuracy', math.nan):.1f}")
            acc["wall_now_s"] = acc["wall_before_s"] + time.perf_counter() - t_start
            d.save_checkpoint({"round": rnd, "states": states,
                               "strategy": self.strategy.state_dict(),
                               "transport": self.transport.state_dict(),
                               "residual": self.residual,
                               "counters": {**acc, "wall_before_s": acc["wall_now_s"]},
                               "fingerprint": self.fingerprint,
                               "config_hash": config_hash})
        self.transport.training_done()
        t = time.perf_counter()
        final = self._evaluate(states if self.mode == "local" else states[:1], True)
        acc["eval_s"] += time.perf_counter() - t
        if self.residual:  # exact aggregation: the adapters need these frozen-weight changes
            (d.path / d.ADAPTERS).mkdir(parents=True, exist_ok=True)
            save_file({m: r.contiguous() for m, r in self.residual.items()},
                      str(d.path / d.ADAPTERS / "base_residual.safetensors"))
        return finish_run(cfg, d, self.backbone, self.adapters, self.fingerprint,
                          self.num_clients, states[0], final, acc,
                          acc["wall_before_s"] + time.perf_counter() - t_start)

    def _round(self, rnd: int, states: list[dict], acc: dict) -> list[dict]:
        cfg = self.cfg
        selected = self.selected(rnd)
        ccfg = self.strategy.client_config(rnd) if self.mode == "fl" else {}
        control = ccfg.get("server_control", {})
        wire_cfg = {k: v for k, v in ccfg.items() if k != "server_control"}
        spec = cfg.codec.download
        residual = {RESIDUAL + m: r for m, r in self.residual.items()}
        by_rank: dict[tuple[int, int], bytes] = {}
        jobs = {}
        for k in selected:
            source = k if self.mode == "local" else 0
            rank = cfg.lora.rank_of(k)
            if (source, rank) not in by_rank:  # one payload per (state, rank)
                state = states[source]
                if cfg.lora.client_ranks:
                    state = truncate_ranks(state, rank)
                by_rank[(source, rank)] = encode({**pack(state, control), **residual}, spec)
            jobs[k] = by_rank[(source, rank)]
        if self.mode != "local":
            acc["download"] += [len(jobs[k]) for k in selected]
        # what each client starts from (full rank: a truncated state is zero-padded)
        decoded: dict[tuple[int, int], dict] = {}
        for (source, rank), payload in by_rank.items():  # each distinct payload once
            got = unpack(split_residual(decode(payload))[0])[0]
            decoded[(source, rank)] = pad_ranks(got, states[source]) if cfg.lora.client_ranks \
                else got
        received = {k: decoded[(k if self.mode == "local" else 0, cfg.lora.rank_of(k))]
                    for k in selected}
        t = time.perf_counter()
        replies = self.transport.train(rnd, jobs, wire_cfg, self._on_reply)
        acc["client_train_s"] += time.perf_counter() - t
        updates: list[ClientUpdate] = []
        rejected: list[dict] = []
        for reply in sorted(replies, key=lambda r: r.client_id):  # a fixed aggregation order
            if reply.client_id not in received:
                rejected.append({"client": reply.client_id, "reason": "not selected"})
                continue
            upd = receive(reply, received[reply.client_id])
            if isinstance(upd, str):
                rejected.append({"client": reply.client_id, "reason": upd})
                continue
            updates.append(upd)
        for r in rejected:
            self.dir.log({"type": "rejected", "round": rnd, **r})
        if self.mode == "local":
            for upd in updates:
                states[upd.client_id] = {**states[upd.client_id], **upd.tensors}
        else:
            acc["upload"] += [u.upload_bytes for u in updates]
            errors = {}
            if updates:
                new = self.strategy.aggregate(rnd, states[0], updates)
                errors = self._lora_aggregation(new, updates, received)
                states[0] = new
        record = round_record(rnd, selected, updates, count_upload=self.mode != "local")
        if self.mode != "local" and errors:
            record["aggregation_error"] = errors
        if rejected:
            record["rejected"] = rejected
        self.dir.log(record)
        return states

    def _lora_aggregation(self, new: dict, updates: list[ClientUpdate],
                          received: dict[int, dict]) -> dict[str, float]:
        """Per group with LoRA layers, ``||mean_k(B_k A_k) - B A|| / ||mean_k(B_k A_k)||`` of
        the model after aggregation; with ``lora.aggregation=exact`` the residual is folded
        into the frozen weights first, so the error is that of the folded model (~0)."""
        out = {}
        layout = self.strategy.layout
        for group in layout.names:
            modules = {m: ab for m, ab in self.modules.items()
                       if layout.group_of(ab[0]) == group}
            trained = [u for u in updates if any(ab[1] in u.tensors for ab in modules.values())]
            if not modules or not trained:
                continue
            weights = self.strategy.group_weights(group, trained)
            if sum(weights) <= 0:
                continue
            clients = [{**received[u.client_id], **u.tensors} for u in trained]
            target = mean_products(clients, weights, modules)
            effective = None
            if self.cfg.lora.aggregation == "exact":
                round_residual = exact_residuals(clients, weights, new, modules, self.scaling,
                                                 target)
                for m, r in round_residual.items():
                    self.residual[m] = self.residual.get(m, 0) + r
                self.adapters.fold_residuals(self.residual)
                effective = {m: r / self.scaling for m, r in round_residual.items()}
            out[group] = aggregation_error(clients, weights, new, modules, effective, target)
        return out

    def _on_reply(self, reply: Reply) -> None:
        self.progress("")
