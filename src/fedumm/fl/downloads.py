"""The download: what the server sends each client, what the client starts from, and why the
server's model never drifts from what it aggregated.

With a lossless download codec (a float32 base without top-k, any entropy step) the download
is the global adapters' values, and every client starts exactly from the server's model.

A lossy codec (bf16, int8, nf4, top-k, ...) applied to the *values* would do two harms: each
client would start from a model the server does not hold, and, since the clients' updates are
taken from where they started, the server would aggregate from what the clients decoded, so
what the codec dropped would be lost for good (top-k at 5 % leaves A mostly zero after two
rounds). Here a lossy download instead carries the *change* of the global adapters, with error
feedback on the server (as in double-compression schemes, e.g. DoubleSqueeze, Tang et al.
2019, arXiv:1905.05957):

* the server keeps the copy the clients hold (one per LoRA rank) and each round sends
  ``encode(global - copy)``; both sides add the decoded change to the copy, so what the codec
  dropped stays in ``global - copy`` and leaves with the next round's change: the clients'
  copy is the server's model up to one round's codec error, never more;
* the first copy is the initial adapters, which every client builds itself from the run's
  seed, so the first download is a change too (of zero); every change carries a hash of the
  copy it changes, so a client whose copy differs refuses it instead of training elsewhere;
* a client that did not receive the last download (partial participation, a restarted site)
  receives the copy itself, in float32, once (counted in the traffic);
* the server aggregates from its own global, never from a client's copy: an update is taken
  relative to the copy the client started from and added to the server's model
  (:class:`fedumm.fl.stages.Delta`).

Exact LoRA aggregation folds a residual into the frozen weights that clients and server must
hold alike, so it needs a lossless download codec (checked in the config).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedumm.fl.codecs import parse_codec
from fedumm.fl.lora_aggregation import rank_of, truncate_ranks
from fedumm.fl.lora_modes import LoraMode
from fedumm.fl.pipeline import Download, decode_download, encode_download

State = dict[str, torch.Tensor]
HELD = "download"  # the client_state entry of the copy a client holds (lossy downloads)
FULL_COPY_CODEC = "float32"  # how a client that missed a download receives the copy
OUT_OF_SYNC = "out of sync with the download"  # the start of such a client's error reply
INITIAL = -1  # the version of the initial adapters, the copy every client starts with


class OutOfSync(ValueError):
    """A change-coded download for a client that does not hold the copy it changes."""


@dataclass
class Outgoing:
    """One round's downloads. ``references``: the server's model as each client receives it
    (its rank, zero-padded to full shapes): what its update is applied to. ``starts``: what
    each client starts from (the same tensors when the download is lossless)."""

    payloads: dict[int, bytes]
    references: dict[int, State]
    starts: dict[int, State]


def lossless(spec: str) -> bool:
    return parse_codec(spec).lossless


def fingerprint(state: State) -> str:
    """A hash of a copy's float32 values (names in sorted order): what a change applies to."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Downloads:
    """The server side of the download, for one run."""

    def __init__(self, spec: str, lora: LoraMode, initial: State,
                 lossy_allowed: bool = True) -> None:
        # the local baseline keeps each client's own adapters: nothing travels, so nothing is
        # quantised either (lossy_allowed=False)
        self.spec = spec if lossy_allowed or lossless(spec) else FULL_COPY_CODEC
        self.lora = lora
        self.by_change = not lossless(self.spec)
        # LoRA rank -> the clients' copy; at first the initial adapters every client builds
        self.copies: dict[int | None, State] = {}
        if self.by_change:
            full = {n: v.detach().float().clone() for n, v in initial.items()}
            for rank in set(lora.client_ranks) or {None}:
                self.copies[rank] = full if rank is None else truncate_ranks(full, rank)
        self.version = INITIAL  # the round whose download the copies are
        self.synced: dict[int, int] = {}  # client -> the version of its copy (else INITIAL)

    # -- server ------------------------------------------------------------------------------

    def prepare(self, rnd: int, selected: list[int], state_of: Callable[[int], State],
                source_of: Callable[[int], Any], control: State, residual: State) -> Outgoing:
        """The payloads of round ``rnd`` for ``selected``; ``state_of(k)``: the server's
        adapters client k starts from (full rank); ``source_of(k)``: a key equal for clients
        that receive the same state; ``control``: the strategy's tensors for every client;
        ``residual``: the exact aggregation's folded residual (lossless downloads only)."""
        if self.by_change:
            if residual:
                raise ValueError("a residual cannot travel in a lossy download")
            return self._by_change(rnd, selected, state_of, control)
        payloads: dict[Any, bytes] = {}
        received: dict[Any, State] = {}
        out = Outgoing({}, {}, {})
        for k in selected:  # values, encoded once per distinct (state, rank)
            key = (source_of(k), self.lora.rank_of(k))
            if key not in payloads:
                state = state_of(k)
                down = Download(self.lora.cut(state, k), control, residual)
                payloads[key] = encode_download(down, self.spec)
                received[key] = self.lora.restore(decode_download(payloads[key]).state, state)
            out.payloads[k] = payloads[key]
            out.references[k] = out.starts[k] = received[key]
        return out

    def _by_change(self, rnd: int, selected: list[int], state_of: Callable[[int], State],
                   control: State) -> Outgoing:
        fresh = {k for k in selected if self.synced.get(k, INITIAL) == self.version}
        out = Outgoing({}, {}, {})
        ranks: dict[int | None, list[int]] = {}
        for k in selected:
            ranks.setdefault(self.lora.rank_of(k), []).append(k)
        for rank, clients in ranks.items():
            full = state_of(clients[0])
            want = self.lora.cut(full, clients[0])
            held = self.copies.get(rank)
            change_payload = None
            if held is not None and any(k in fresh for k in clients):
                change = {n: want[n].float() - held[n] for n in want}
                change_payload = encode_download(
                    Download(change, control, {}, rnd, self.version, fingerprint(held)),
                    self.spec)
                decoded = decode_download(change_payload).state
                copy = {n: held[n] + decoded[n] for n in want}
            else:  # nobody holds the last copy: start the copies from the server's model
                copy = {n: v.detach().float().clone() for n, v in want.items()}
            self.copies[rank] = copy
            full_payload = None
            if any(k not in fresh for k in clients):
                full_payload = encode_download(Download(copy, control, {}, rnd, None),
                                               FULL_COPY_CODEC)
            reference = self.lora.restore(want, full)
            start = self.lora.restore(copy, full)
            for k in clients:
                out.payloads[k] = change_payload if k in fresh else full_payload
                out.references[k], out.starts[k] = reference, start
        self.version = rnd
        return out

    def delivered(self, rnd: int, client_ids) -> None:
        """These clients replied in round ``rnd``: they hold the copy of that round."""
        if self.by_change:
            for k in client_ids:
                self.synced[int(k)] = rnd

    def state_dict(self) -> dict[str, Any]:
        return {"copies": self.copies, "version": self.version, "synced": self.synced}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if "copies" in d:
            self.copies = dict(d["copies"])
            self.version = int(d["version"])
            self.synced = {int(k): int(v) for k, v in d["synced"].items()}


# -- client ------------------------------------------------------------------------------------

def receive(payload: bytes, client_state: dict, initial: State | None = None) -> Download:
    """The download a client starts from, rebuilding a change-coded one on the copy it holds
    (``client_state[HELD]``, updated in place; before its first download, ``initial``: the
    adapters it built itself).

    Raises
    ------
    OutOfSync
        The download changes a copy this client does not hold (it missed a round the server
        believes it received, or its initial adapters differ from the server's).
    """
    down = decode_download(payload)
    if down.round is None:  # lossless: the values themselves
        return down
    if down.base is None:
        copy = {n: v.float() for n, v in down.state.items()}
    else:
        held = client_state.get(HELD)
        if held is None and down.base == INITIAL and initial is not None:
            rank = rank_of(down.state)
            base = {n: v.detach().float() for n, v in initial.items()}
            held = {"round": INITIAL, "state": base if rank is None or rank_of(base) == rank
                    else truncate_ranks(base, rank)}
        if held is None or held["round"] != down.base:
            have = "no copy" if held is None else f"the copy of round {held['round']}"
            raise OutOfSync(f"{OUT_OF_SYNC}: it changes the copy of round {down.base}, this "
                            f"client holds {have}; it receives the full copy next round")
        if down.check is not None and fingerprint(held["state"]) != down.check:
            raise OutOfSync(f"{OUT_OF_SYNC}: this client's copy of round {down.base} differs "
                            "from the server's (initial adapters built differently?); it "
                            "receives the full copy next round")
        copy = {n: held["state"][n] + v for n, v in down.state.items()}
    client_state[HELD] = {"round": down.round, "state": copy}
    return Download(copy, down.control, down.residual)
