"""The update pipeline: the message a client sends back, every wire and meta key, and the
ordered stages an update passes through on its way to the server and back out of the wire.

Each stage (:mod:`fedumm.fl.stages`) is a small object with a client half and a server half,
in the spirit of NVIDIA FLARE's filter pairs and Flower's mods. The client runs the halves in
:data:`STAGE_ORDER`; the server runs them in reverse, so each one undoes or checks what its
client half did::

    client: delta -> validate -> rank -> codec
                                           ==bytes==>
    server:                                codec -> rank -> validate -> delta

A stage that is not configured (e.g. ``rank`` without ``lora.client_ranks``, or ``attack``, a
simulated malicious client before ``delta``, without ``attack.kind``) is left out of both
sides. The download is the global adapters (truncated to the client's rank) with the
tensors the strategy sends beside them and the exact-aggregation residuals, in the download
codec; a lossy download carries the change of the global adapters with the server's error
feedback instead (:mod:`fedumm.fl.downloads`), and the server applies every update to its own
model, never to what a client decoded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from fedumm.fl.codecs import decode, encode
from fedumm.fl.updates import ClientUpdate
from fedumm.registry import STAGES

if TYPE_CHECKING:
    from fedumm.config import Config

State = dict[str, torch.Tensor]

# ------------------------------------------------------------------ wire and meta keys
CONTROL = "control/"  # payload key prefix of control variates (down: the server's, up: deltas)
RESIDUAL = "residual/"  # download key prefix of the folded residuals (exact LoRA aggregation)
SERVER_CONTROL = "server_control"  # client_config key whose tensors travel in the download
CONTROL_DELTA = "control_delta"  # ClientUpdate.extra key of the tensors sent beside the update
PAYLOAD = "payload"  # the FLARE FLModel params key holding the encoded bytes
CLIENT_ID = "client_id"  # the FLARE reply meta key naming the client
CLIENT_CONFIG = "client_config"  # the FLARE task meta key of the strategy's client settings
# client_config key: the server's frozen-backbone fingerprint, which every client checks
BACKBONE_FINGERPRINT = "backbone_fingerprint"
VALUES, DELTA = "values", "delta"  # the forms an update travels in (ReplyMeta.form)
# ReplyMeta.form of an update that stays on the client (secure aggregation over a transport)
SEALED = "sealed"
SECAGG_STAGE = "secagg_stage"  # the FLARE task meta key of a secure aggregation stage
SECAGG_ANSWER = "secagg_answer"  # the FLARE reply meta key of a stage answer's settings

# the client-side order of the stages; the server runs them in reverse. ``attack`` (a
# simulated malicious client, fedumm.fl.attacks) comes first: it changes the update as formed;
# ``client_dp`` (privacy.client.side=client, fedumm.fl.client_dp) clips and noises it next, so
# nothing unnoised leaves the client
STAGE_ORDER: tuple[str, ...] = ("attack", "client_dp", "delta", "validate", "rank", "codec")


@dataclass
class ReplyMeta:
    """What travels beside a client's payload: the numbers the strategy needs and how to read
    the payload. ``error`` set: no payload, the server leaves the client out and logs why."""

    num_samples: dict[str, int] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)
    num_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0
    has_control: bool = False  # the payload carries CONTROL tensors
    form: str = VALUES  # VALUES: trained adapter values; DELTA: trained minus received
    rank: int | None = None  # a lower-rank client: its LoRA tensors are truncated
    keys: list[str] | None = None  # SEALED: the tensor keys of the update the client holds
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a transport's meta (FLARE's); unset optional keys left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplyMeta:
        """From a transport's meta; keys the transport added itself are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Reply:
    """What a client sends back: its encoded update and the meta the strategy needs."""

    client_id: int
    payload: bytes
    meta: ReplyMeta = field(default_factory=ReplyMeta)


@dataclass
class Upload:
    """An update in flight through the stages. Client side: ``tensors`` start as the trained
    adapter values and ``payload`` ends as the bytes sent. Server side: ``payload`` is what
    arrived and ``tensors`` end as the adapter values to aggregate. ``reference``: the
    adapters the client started from (full rank)."""

    client_id: int
    tensors: State
    control: State
    reference: State
    meta: ReplyMeta
    client_state: dict = field(default_factory=dict)
    rank: int | None = None  # this client's LoRA rank when ranks differ
    payload: bytes = b""
    # server side: what the client started from when it is not ``reference`` (a lossy
    # download's copy; the update is applied to ``reference``, the server's own model)
    start: State | None = None
    round: int = 0  # the round the update was trained in (seeds simulated client noise)


class Stage:
    """One step of the pipeline. ``client`` changes the outgoing upload in place (setting
    ``meta.error`` stops it); ``server`` undoes or checks it on the way in and returns why
    the update must be left out, or None."""

    name = "stage"

    @classmethod
    def from_config(cls, cfg: Config) -> Stage | None:
        """The stage a config asks for, or None when it is not active."""
        return cls()

    def client(self, up: Upload) -> None:
        pass

    def server(self, up: Upload) -> str | None:
        return None


class Pipeline:
    """The configured stages, in client order."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages

    @classmethod
    def from_config(cls, cfg: Config) -> Pipeline:
        built = (STAGES.get(name).from_config(cfg) for name in STAGE_ORDER)
        return cls([s for s in built if s is not None])

    def send(self, up: Upload) -> Reply:
        """The client halves in order: the reply carrying the payload, or the error."""
        for stage in self.stages:
            stage.client(up)
            if up.meta.error:
                return Reply(up.client_id, b"", up.meta)
        return Reply(up.client_id, up.payload, up.meta)

    def receive(self, reply: Reply, reference: State, start: State | None = None
                ) -> ClientUpdate | str:
        """The server halves in reverse: a :class:`ClientUpdate` of adapter values (the
        client's change applied to ``reference``, the server's model; ``start``: what the
        client started from, when it differs), or the reason the reply is left out."""
        meta = reply.meta
        if meta.error:
            return str(meta.error)
        if meta.form == SEALED:  # the client checked it and keeps the values for SecAgg+
            return ClientUpdate(reply.client_id, sealed_tensors(meta.keys or []),
                                dict(meta.num_samples), dict(meta.quality),
                                int(meta.num_steps), dict(meta.metrics), {}, len(reply.payload))
        up = Upload(reply.client_id, {}, {}, reference, meta, payload=reply.payload,
                    start=None if start is reference else start)
        for stage in reversed(self.stages):
            why = stage.server(up)
            if why is not None:
                return why
        extra: dict[str, Any] = {CONTROL_DELTA: up.control} if meta.has_control else {}
        return ClientUpdate(reply.client_id, up.tensors, dict(meta.num_samples),
                            dict(meta.quality), int(meta.num_steps), dict(meta.metrics), extra,
                            len(reply.payload))


def sealed_tensors(keys: list[str]) -> State:
    """A sealed update's tensors as the server holds them: its keys only, each an empty
    tensor on the ``meta`` device, so that reading a value fails loudly instead of
    aggregating zeros."""
    return {k: torch.empty(0, device="meta") for k in keys}


# ------------------------------------------------------------------ payload layout

def pack(state: State, control: State) -> State:
    """One payload's tensors: adapter tensors plus control variates under :data:`CONTROL`."""
    return {**state, **{CONTROL + n: v for n, v in control.items()}}


def unpack(tensors: State) -> tuple[State, State]:
    """Inverse of :func:`pack`: (adapter tensors, control variates)."""
    state = {n: v for n, v in tensors.items() if not n.startswith(CONTROL)}
    control = {n[len(CONTROL):]: v for n, v in tensors.items() if n.startswith(CONTROL)}
    return state, control


@dataclass
class Download:
    """What a client receives: the global adapters (maybe truncated to its rank), the tensors
    the strategy sends (SCAFFOLD's server control) and the residuals folded so far. A lossy
    download (:mod:`fedumm.fl.downloads`) also says which round's copy it is (``round``) and,
    when ``state`` is the change of a copy, the round of the copy it changes (``base``, -1:
    the initial adapters) and a hash of that copy (``check``)."""

    state: State
    control: State
    residual: State
    round: int | None = None
    base: int | None = None
    check: str | None = None  # a hash of the copy ``state`` changes


# a download with a round: FRAME, the header's length (4 bytes, little-endian), the header's
# JSON, then the container; a lossless download is the container alone
FRAME = b"FUMD"


def encode_download(down: Download, spec: str) -> bytes:
    residual = {RESIDUAL + m: r for m, r in down.residual.items()}
    body = encode({**pack(down.state, down.control), **residual}, spec)
    if down.round is None:
        return body
    header = json.dumps({"round": down.round, "base": down.base, "check": down.check}).encode()
    return FRAME + struct.pack("<I", len(header)) + header + body


def decode_download(payload: bytes) -> Download:
    rnd = base = check = None
    if payload[:len(FRAME)] == FRAME:
        start = len(FRAME) + 4
        (size,) = struct.unpack("<I", payload[len(FRAME):start])
        header = json.loads(payload[start:start + size])
        rnd, base, check = int(header["round"]), header["base"], header.get("check")
        payload = payload[start + size:]
    tensors = decode(payload)
    residual = {k[len(RESIDUAL):]: v for k, v in tensors.items() if k.startswith(RESIDUAL)}
    state, control = unpack({k: v for k, v in tensors.items() if not k.startswith(RESIDUAL)})
    return Download(state, control, residual, rnd, None if base is None else int(base), check)
