"""SecAgg+: the sum of the clients' integer vectors, and nothing else, for one server.

Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020 (IACR ePrint 2020/704); it refines SecAgg (Bonawitz et
al., CCS 2017, ePrint 2017/281) by letting each client mask against its neighbours in a sparse
k-regular graph instead of against everyone. Vectors are ``uint32``: every sum is mod 2^32.

Masking. Client u holds two X25519 key pairs, (c_u, C_u) to encrypt what it sends to other
clients and (s_u, S_u) to agree masks, and a random 32-byte self-mask seed b_u. With its
neighbours N(u) it sends::

    y_u = x_u + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)

where s_uv = HKDF(X25519(s_u, S_v)) = s_vu. Summed over the clients whose y arrived (U3), the
pairwise masks between two of them cancel; what is left is every b-mask and the pairwise masks
towards neighbours that shared keys (U2) and dropped before sending y. PRG is the ChaCha20
keystream under the seed, read as little-endian uint32 words: uniform mod 2^32, so y_u alone
is uniform whatever x_u is.

Unmasking. Before masking, u Shamir-shares b_u and s_u among its holders (itself and N(u)),
any ``threshold`` of which rebuild a secret, each share encrypted (ChaCha20-Poly1305 under
HKDF(X25519(c_u, C_v)), bound to the round and both ids) for its holder and routed by the
server. Once the inputs are in, every surviving client answers with its shares of b_u for the
clients in U3 and of s_u for those in U2 \\ U3; the server rebuilds them and removes PRG(b_u)
and the dangling pairwise masks. A client never reveals both secrets of one client (it refuses
a request that names a client in both lists), so with threshold above half the holders even a
server that lies about who dropped cannot unmask an individual input. Each stage aborts
(:class:`SecAggAbort`) when fewer than ``threshold`` clients are left.

Shamir sharing is pycryptodome's (GF(2^128), 16-byte secrets): a 32-byte secret is shared as
two 16-byte halves with the same holders.

Transport. The server reaches the clients only through :class:`SecAggParties`: one call per
stage sends each client its message as bytes (the wire formats below) and returns the answers
of those that answered. :class:`SecAggSite` is one client's side of it, the same in every
runtime: :class:`InProcessParties` holds one per client in this process (the local runtime,
tests), and a FLARE site holds its own. :class:`SecureSumRound` is the server's side: the key
stages when it is built (before the clients train), the masked inputs and their sum in
:meth:`SecureSumRound.finish`.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODULUS_BITS = 32  # vectors are uint32; sums wrap mod 2^32
KEY_BYTES = 32  # X25519 keys, seeds, derived keys
ID_BYTES = 4  # a client id on the wire
NONCE_BYTES, TAG_BYTES, INDEX_BYTES = 12, 16, 8
# one encrypted share on the wire: nonce, then (share index, share of b_u, share of s_u) + tag
SEALED_BYTES = NONCE_BYTES + INDEX_BYTES + 2 * KEY_BYTES + TAG_BYTES
# the stages, in order; also the keys of SecAggServer.traffic
ADVERTISE, SHARE, MASK, UNMASK = "advertise_keys", "share_keys", "masked_input", "unmask"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecAggAbort(RuntimeError):
    """The round cannot finish securely: too few clients are left, or a message is forged."""


# ----------------------------------------------------------------------------- primitives

def kdf(secret: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for ``purpose`` from a Diffie-Hellman secret (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"fedumm secagg+ " + purpose).derive(secret)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 words: the ChaCha20 keystream under ``seed`` (nonce 0; a
    seed masks one vector only)."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of ``secret`` (a multiple of 16 bytes), one per holder, in order: the
    i-th share has index i + 1 and is the i-th share of each 16-byte half, joined."""
    halves = [Shamir.split(threshold, holders, secret[i:i + 16])
              for i in range(0, len(secret), 16)]
    return [b"".join(h[i][1] for h in halves) for i in range(holders)]


def combine_secret(shares: Mapping[int, bytes]) -> bytes:
    """The secret from shares ``{index: share}`` (at least the threshold of them)."""
    size = len(next(iter(shares.values())))
    return b"".join(Shamir.combine([(i, s[j:j + 16]) for i, s in shares.items()])
                    for j in range(0, size, 16))


def neighbour_graph(clients: Sequence[int], k: int, seed: int, rnd: int
                    ) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours (itself excluded): the Harary graph H(k, n) (a ring where each
    client links to the k/2 nearest on either side, k rounded up to even) over a permutation
    drawn from (seed, round), as SecAgg+ prescribes; the complete graph when k = 0 or
    k >= n - 1. The graph is public: every client and the server can rebuild it."""
    ids = sorted(clients)
    n, k = len(ids), k + k % 2
    if k == 0 or k >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    ring = [ids[i] for i in np.random.default_rng([seed, rnd]).permutation(n)]
    return {u: tuple(sorted(ring[(i + j) % n] for j in range(-k // 2, k // 2 + 1) if j))
            for i, u in enumerate(ring)}


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


# ----------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class Keys:
    """Stage 1, client -> server -> neighbours: a client's two public keys."""

    client: int
    encrypt_pk: bytes
    mask_pk: bytes

    @property
    def nbytes(self) -> int:
        return ID_BYTES + len(self.encrypt_pk) + len(self.mask_pk)


@dataclass(frozen=True)
class Shares:
    """Stage 2, client -> server: its encrypted shares, by recipient (routed one by one)."""

    client: int
    sealed: dict[int, bytes]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + sum(ID_BYTES + len(c) for c in self.sealed.values())


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3, client -> server: y_u."""

    client: int
    vector: np.ndarray

    @property
    def nbytes(self) -> int:
        return ID_BYTES + self.vector.nbytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4, server -> survivors: whose input arrived (U3) and who dropped after sharing
    keys (U2 \\ U3)."""

    inputs: frozenset[int]
    dropped: frozenset[int]

    @property
    def nbytes(self) -> int:
        return ID_BYTES * (1 + len(self.inputs) + len(self.dropped))  # a count, then the ids


@dataclass(frozen=True)
class Unmask:
    """Stage 4, survivor -> server: its shares of b_u (u in U3) and of s_u (u dropped)."""

    client: int
    seed_shares: dict[int, tuple[int, bytes]]  # u -> (share index, share)
    key_shares: dict[int, tuple[int, bytes]]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + sum(2 * ID_BYTES + len(s) for d in (self.seed_shares, self.key_shares)
                              for _, s in d.values())


# ----------------------------------------------------------------------------- the client

class SecAggClient:
    """One client's side: its secrets, and the shares others entrusted to it.

    ``neighbours`` are u's neighbours in the round's graph; ``entropy`` gives random bytes
    (the OS's; tests pass a seeded source to repeat a round)."""

    def __init__(self, client: int, rnd: int, neighbours: Sequence[int], threshold: int,
                 entropy: Callable[[int], bytes] = os.urandom) -> None:
        self.id, self.rnd, self.threshold = int(client), int(rnd), int(threshold)
        self.neighbours = tuple(sorted(neighbours))
        self.holders = tuple(sorted((*self.neighbours, self.id)))
        self._entropy = entropy
        self._encrypt_sk = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
        self._mask_sk = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
        self._seed = entropy(KEY_BYTES)  # b_u
        self._keys: dict[int, Keys] = {}
        # shares held for each client that shared with us (ourselves included): (index, b, s)
        self._held: dict[int, tuple[int, bytes, bytes]] = {}

    def advertise_keys(self) -> Keys:
        return Keys(self.id, _public(self._encrypt_sk), _public(self._mask_sk))

    def _aead(self, other: int) -> ChaCha20Poly1305:
        peer = X25519PublicKey.from_public_bytes(self._keys[other].encrypt_pk)
        return ChaCha20Poly1305(kdf(self._encrypt_sk.exchange(peer), b"share"))

    def _header(self, sender: int, recipient: int) -> bytes:
        return struct.pack("<qqq", self.rnd, sender, recipient)

    def share_keys(self, keys: Mapping[int, Keys]) -> Shares:
        """Stage 2: share b_u and s_u among the holders whose keys the server forwarded."""
        if set(keys) != set(self.neighbours) or any(m.client != v for v, m in keys.items()):
            raise SecAggAbort(f"client {self.id}: the server forwarded keys of {sorted(keys)}, "
                              f"not of its neighbours {list(self.neighbours)}")
        pks = [m.encrypt_pk for m in keys.values()] + [m.mask_pk for m in keys.values()]
        if len(set(pks)) != len(pks):  # a repeated key would make two masks cancel
            raise SecAggAbort(f"client {self.id}: two advertised public keys are equal")
        self._keys = dict(keys)
        mask_sk = self._mask_sk.private_bytes_raw()
        b = split_secret(self._seed, self.threshold, len(self.holders))
        s = split_secret(mask_sk, self.threshold, len(self.holders))
        sealed = {}
        for i, v in enumerate(self.holders):
            if v == self.id:  # our own share stays here
                self._held[v] = (i + 1, b[i], s[i])
                continue
            nonce = self._entropy(NONCE_BYTES)
            plain = struct.pack("<q", i + 1) + b[i] + s[i]
            sealed[v] = nonce + self._aead(v).encrypt(nonce, plain, self._header(self.id, v))
        return Shares(self.id, sealed)

    def masked_input(self, vector: np.ndarray, sealed: Mapping[int, bytes]) -> MaskedInput:
        """Stage 3: open the shares addressed to us (from the neighbours that shared, U2) and
        send y_u for the uint32 ``vector``."""
        for v, blob in sealed.items():
            if v not in self._keys:
                raise SecAggAbort(f"client {self.id}: a share from non-neighbour {v}")
            try:
                plain = self._aead(v).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                              self._header(v, self.id))
            except InvalidTag as e:
                raise SecAggAbort(f"client {self.id}: the share from client {v} does not "
                                  f"authenticate") from e
            half = (len(plain) - 8) // 2
            self._held[v] = (struct.unpack("<q", plain[:8])[0], plain[8:8 + half],
                             plain[8 + half:])
        if len(self._held) < self.threshold:
            raise SecAggAbort(f"client {self.id}: only {len(self._held)} of its holders shared "
                              f"keys, fewer than the threshold {self.threshold}")
        x = np.asarray(vector, dtype=np.uint32)
        y = x + prg(self._seed, x.size)  # uint32 arithmetic wraps: everything is mod 2^32
        for v in sealed:
            pair = pair_mask(self._mask_sk, self._keys[v].mask_pk, self.rnd, self.id, v, x.size)
            y = y + pair if self.id < v else y - pair
        return MaskedInput(self.id, y)

    def unmask(self, request: UnmaskRequest) -> Unmask:
        """Stage 4: our shares of b_u for inputs that arrived and of s_u for clients that
        dropped, never both for one client."""
        if request.inputs & request.dropped:
            raise SecAggAbort(f"client {self.id}: the server asks for both secrets of clients "
                              f"{sorted(request.inputs & request.dropped)}")
        if len(request.inputs) < self.threshold:
            raise SecAggAbort(f"client {self.id}: only {len(request.inputs)} inputs arrived, "
                              f"fewer than the threshold {self.threshold}")
        seeds = {u: (h[0], h[1]) for u, h in self._held.items() if u in request.inputs}
        keys = {u: (h[0], h[2]) for u, h in self._held.items() if u in request.dropped}
        return Unmask(self.id, seeds, keys)


def pair_mask(own: X25519PrivateKey, peer_pk: bytes, rnd: int, u: int, v: int,
              length: int) -> np.ndarray:
    """PRG(s_uv), the same for (u, v) and (v, u)."""
    secret = own.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    lo, hi = sorted((u, v))
    return prg(kdf(secret, b"mask" + struct.pack("<qqq", rnd, lo, hi)), length)


# ----------------------------------------------------------------------------- the server

class SecAggServer:
    """The server's side: it routes messages, sees masked vectors and shares, and returns
    the sum of the inputs that arrived. ``traffic[stage] = [up, down]``: the bytes clients
    sent it and it sent them in each stage."""

    def __init__(self, rnd: int, graph: Mapping[int, Sequence[int]], threshold: int,
                 length: int) -> None:
        self.rnd, self.threshold, self.length = int(rnd), int(threshold), int(length)
        self.graph = {u: tuple(vs) for u, vs in graph.items()}
        self.traffic: dict[str, list[int]] = {}
        self._keys: dict[int, Keys] = {}
        self._shared: set[int] = set()  # U2
        self._masked: dict[int, np.ndarray] = {}  # U3's y_u
        self._request: UnmaskRequest | None = None

    @property
    def advertised(self) -> frozenset[int]:
        """U1: the clients whose keys arrived."""
        return frozenset(self._keys)

    @property
    def shared(self) -> frozenset[int]:
        """U2: the clients whose shares arrived."""
        return frozenset(self._shared)

    def _enough(self, alive: int, stage: str) -> None:
        if alive < self.threshold:
            raise SecAggAbort(f"secure aggregation aborted in round {self.rnd} at {stage}: "
                              f"{alive} clients left, fewer than the threshold "
                              f"{self.threshold}")

    def _count(self, stage: str, up: int, down: int) -> None:
        self.traffic[stage] = [up, down]

    def receive_keys(self, msgs: Sequence[Keys]) -> dict[int, dict[int, Keys]]:
        """Stage 1: each client's neighbours' keys to forward to it."""
        self._keys = {m.client: m for m in msgs}
        self._enough(len(self._keys), ADVERTISE)
        out = {u: {v: self._keys[v] for v in self.graph[u] if v in self._keys}
               for u in self._keys}
        self._count(ADVERTISE, sum(m.nbytes for m in msgs),
                    sum(m.nbytes for d in out.values() for m in d.values()))
        return out

    def receive_shares(self, msgs: Sequence[Shares]) -> dict[int, dict[int, bytes]]:
        """Stage 2: the sealed shares, by recipient ({recipient: {sender: blob}})."""
        self._shared = {m.client for m in msgs}
        self._enough(len(self._shared), SHARE)
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in self._shared}
        for m in msgs:
            for v, blob in m.sealed.items():
                if v in inbox:  # holders that dropped meanwhile get nothing
                    inbox[v][m.client] = blob
        self._count(SHARE, sum(m.nbytes for m in msgs),
                    sum(ID_BYTES + len(b) for d in inbox.values() for b in d.values()))
        return inbox

    def receive_masked(self, msgs: Sequence[MaskedInput]) -> UnmaskRequest:
        """Stage 3: the masked inputs; the request that goes to every survivor."""
        for m in msgs:
            if m.client not in self._shared or m.vector.shape != (self.length,):
                raise SecAggAbort(f"round {self.rnd}: unexpected masked input from client "
                                  f"{m.client}")
        self._masked = {m.client: m.vector for m in msgs}
        self._enough(len(self._masked), MASK)
        self._request = UnmaskRequest(frozenset(self._masked),
                                      frozenset(self._shared - set(self._masked)))
        self._count(MASK, sum(m.nbytes for m in msgs), 0)
        return self._request

    def unmask(self, msgs: Sequence[Unmask]) -> np.ndarray:
        """Stage 4: the sum of the inputs in U3 (uint32, mod 2^32)."""
        req = self._request
        assert req is not None, "receive_masked comes first"
        self._enough(len(msgs), UNMASK)
        self._count(UNMASK, sum(m.nbytes for m in msgs),
                    req.nbytes * len(msgs))
        total = np.zeros(self.length, dtype=np.uint32)
        for y in self._masked.values():
            total += y
        for u in sorted(req.inputs):
            total -= prg(self._rebuild(u, [m.seed_shares for m in msgs], "b"), self.length)
        for u in sorted(req.dropped):  # the masks u's neighbours in U3 added towards it
            sk = X25519PrivateKey.from_private_bytes(
                self._rebuild(u, [m.key_shares for m in msgs], "s"))
            for v in self.graph[u]:
                if v in req.inputs:
                    pair = pair_mask(sk, self._keys[v].mask_pk, self.rnd, u, v, self.length)
                    total = total - pair if v < u else total + pair
        return total

    def _rebuild(self, u: int, answers: list[dict[int, tuple[int, bytes]]], what: str
                 ) -> bytes:
        shares = dict(a[u] for a in answers if u in a)
        if len(shares) < self.threshold:
            raise SecAggAbort(f"secure aggregation aborted in round {self.rnd}: {len(shares)} "
                              f"shares of client {u}'s {what} came back, fewer than the "
                              f"threshold {self.threshold}")
        return combine_secret(dict(list(shares.items())[:self.threshold]))


# ----------------------------------------------------------------------------- the wire
# Little-endian. Every message's ``nbytes`` is the length of its encoding, so the traffic
# the server counts is the bytes that travel.

def _ids(ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(ids)}i", *ids)


def _read_ids(blob: bytes, n: int, at: int = 0) -> list[int]:
    return list(struct.unpack_from(f"<{n}i", blob, at))


def _check_length(blob: bytes, head: int, item: int, what: str) -> int:
    """How many ``item``-byte records follow a ``head``-byte header in ``blob``."""
    if len(blob) < head or (len(blob) - head) % item:
        raise SecAggAbort(f"a malformed {what} message ({len(blob)} bytes)")
    return (len(blob) - head) // item


def encode_keys(msgs: Collection[Keys]) -> bytes:
    """Stage 1: one client's keys (up), or its neighbours' (down)."""
    return b"".join(struct.pack("<i", m.client) + m.encrypt_pk + m.mask_pk for m in msgs)


def decode_keys(blob: bytes) -> dict[int, Keys]:
    size = ID_BYTES + 2 * KEY_BYTES
    out = {}
    for i in range(_check_length(blob, 0, size, "keys")):
        rec = blob[i * size:(i + 1) * size]
        (client,) = struct.unpack_from("<i", rec)
        out[client] = Keys(client, rec[ID_BYTES:ID_BYTES + KEY_BYTES], rec[ID_BYTES + KEY_BYTES:])
    return out


def encode_sealed(sealed: Mapping[int, bytes]) -> bytes:
    """Encrypted shares by client id (a client's to everyone, or everyone's to a client)."""
    return b"".join(struct.pack("<i", v) + blob for v, blob in sealed.items())


def decode_sealed(blob: bytes, at: int = 0) -> dict[int, bytes]:
    size = ID_BYTES + SEALED_BYTES
    n = _check_length(blob, at, size, "shares")
    return {struct.unpack_from("<i", blob, at + i * size)[0]:
            blob[at + i * size + ID_BYTES:at + (i + 1) * size] for i in range(n)}


def encode_shares(m: Shares) -> bytes:
    return struct.pack("<i", m.client) + encode_sealed(m.sealed)


def decode_shares(blob: bytes) -> Shares:
    return Shares(struct.unpack_from("<i", blob)[0], decode_sealed(blob, ID_BYTES))


def encode_masked(m: MaskedInput) -> bytes:
    return struct.pack("<i", m.client) + np.asarray(m.vector, dtype="<u4").tobytes()


def decode_masked(blob: bytes) -> MaskedInput:
    n = _check_length(blob, ID_BYTES, 4, "masked input")
    vector = np.frombuffer(blob, dtype="<u4", count=n, offset=ID_BYTES).astype(np.uint32)
    return MaskedInput(struct.unpack_from("<i", blob)[0], vector)


def encode_request(r: UnmaskRequest) -> bytes:
    return struct.pack("<i", len(r.inputs)) + _ids(sorted(r.inputs)) + _ids(sorted(r.dropped))


def decode_request(blob: bytes) -> UnmaskRequest:
    n = _check_length(blob, ID_BYTES, ID_BYTES, "unmask request")
    (inputs,) = struct.unpack_from("<i", blob)
    if not 0 <= inputs <= n:
        raise SecAggAbort(f"a malformed unmask request ({len(blob)} bytes)")
    ids = _read_ids(blob, n, ID_BYTES)
    return UnmaskRequest(frozenset(ids[:inputs]), frozenset(ids[inputs:]))


def encode_unmask(m: Unmask) -> bytes:
    """Its shares: (client, index, share) each; whether one is of b_u or of s_u follows
    from the request (b_u for clients whose input arrived, s_u for those that dropped)."""
    entries = [*m.seed_shares.items(), *m.key_shares.items()]
    return struct.pack("<i", m.client) + b"".join(
        struct.pack("<ii", u, index) + share for u, (index, share) in entries)


def decode_unmask(blob: bytes, request: UnmaskRequest) -> Unmask:
    size = 2 * ID_BYTES + KEY_BYTES
    n = _check_length(blob, ID_BYTES, size, "unmask")
    seeds: dict[int, tuple[int, bytes]] = {}
    keys: dict[int, tuple[int, bytes]] = {}
    for i in range(n):
        at = ID_BYTES + i * size
        u, index = struct.unpack_from("<ii", blob, at)
        if u not in request.inputs | request.dropped:
            raise SecAggAbort(f"an unmask answer holds a share of client {u}, not asked for")
        (seeds if u in request.inputs else keys)[u] = (index, blob[at + 2 * ID_BYTES:at + size])
    return Unmask(struct.unpack_from("<i", blob)[0], seeds, keys)


# ----------------------------------------------------------------------------- the parties

Message = tuple[bytes, dict[str, Any]]  # a stage message: its bytes, and public settings


class SecAggParties(Protocol):
    """How the server reaches the clients: the transport's one job in SecAgg+."""

    def exchange(self, rnd: int, stage: str, messages: Mapping[int, Message]
                 ) -> dict[int, Message]:
        """Send client k ``messages[k]`` for ``stage`` of round ``rnd``; the answers of the
        clients that answered (a client that dropped out is missing)."""
        ...


InputOf = Callable[[Mapping[str, Any]], tuple[np.ndarray, int]]


class Site:
    """One client's side of a secure sum, in any runtime: the input it will contribute.
    :meth:`hold` gives it as a function of the round's public plan (the weights of the
    round, :meth:`fedumm.fl.secagg.SecureRound.plan_for`) that returns the vector and how
    many entries it clipped; a round's stage handler takes it once."""

    def __init__(self, client: int) -> None:
        self.id = int(client)
        self.input_of: tuple[int, InputOf] | None = None  # (round, input)

    def hold(self, rnd: int, input_of: InputOf) -> None:
        """The input to contribute in round ``rnd``."""
        self.input_of = (int(rnd), input_of)

    def take_input(self, rnd: int, plan: Mapping[str, Any]) -> tuple[np.ndarray, int]:
        """Round ``rnd``'s input under ``plan``; refused if this client holds none for it."""
        if self.input_of is None or self.input_of[0] != rnd:
            raise SecAggAbort(f"client {self.id}: asked to mask an input for round {rnd}, "
                              f"which it does not hold")
        input_of, self.input_of = self.input_of[1], None  # one input per round
        return input_of(plan)

    def handle(self, rnd: int, stage: str, payload: bytes, meta: Mapping[str, Any]
               ) -> Message:
        """Answer the server's ``stage`` message of round ``rnd``."""
        raise NotImplementedError


class SecAggSite(Site):
    """One client's side of SecAgg+ over the wire: its secrets for the round (a
    :class:`SecAggClient`) and the input it will mask."""

    def __init__(self, client: int, entropy: Callable[[int], bytes] = os.urandom) -> None:
        super().__init__(client)
        self.entropy = entropy
        self.party: SecAggClient | None = None

    def handle(self, rnd: int, stage: str, payload: bytes, meta: Mapping[str, Any]
               ) -> Message:
        """Answer the server's ``stage`` message of round ``rnd``."""
        if stage == ADVERTISE:  # a new round: new secrets, no input yet
            self.party = SecAggClient(self.id, rnd, [int(v) for v in meta["neighbours"]],
                                      int(meta["threshold"]), self.entropy)
            return encode_keys([self.party.advertise_keys()]), {}
        party = self.party
        if party is None or party.rnd != rnd:
            raise SecAggAbort(f"client {self.id}: a {stage} message for round {rnd} before "
                              f"its keys for that round")
        if stage == SHARE:
            return encode_shares(party.share_keys(decode_keys(payload))), {}
        if stage == MASK:
            vector, clipped = self.take_input(rnd, meta.get("plan", {}))
            return encode_masked(party.masked_input(vector, decode_sealed(payload))), \
                {"clipped": clipped}
        if stage == UNMASK:
            return encode_unmask(party.unmask(decode_request(payload))), {}
        raise SecAggAbort(f"client {self.id}: unknown secure aggregation stage {stage!r}")


@dataclass
class InProcessParties:
    """Every client's site (:class:`SecAggSite`) in this process (the local runtime, tests). Clients
    drop out (stop answering) after advertising keys (``dropped_before_shares``), after
    sharing them (``dropped_before_input``) or after sending their input
    (``dropped_after_input``)."""

    sites: Mapping[int, Site]
    dropped_before_shares: frozenset[int] = frozenset()
    dropped_before_input: frozenset[int] = frozenset()
    dropped_after_input: frozenset[int] = frozenset()
    he_context: Any = None  # the server's, for sites that are HESites (fl/he_sum.py)

    def exchange(self, rnd: int, stage: str, messages: Mapping[int, Message]
                 ) -> dict[int, Message]:
        gone = {SHARE: self.dropped_before_shares,
                MASK: self.dropped_before_shares | self.dropped_before_input,
                UNMASK: self.dropped_before_shares | self.dropped_before_input
                | self.dropped_after_input}.get(stage, frozenset())
        return {k: self.sites[k].handle(rnd, stage, payload, meta)
                for k, (payload, meta) in messages.items() if k not in gone}


def _from(k: int, msg, stage: str):
    """``msg``, if client ``k`` sent it about itself."""
    if msg.client != k:
        raise SecAggAbort(f"client {k}'s {stage} message claims to come from {msg.client}")
    return msg


@dataclass
class SecureSum:
    """What one SecAgg+ round gives the server: the sum of U3's vectors, who took part in
    which stage, the clients' public answers to the mask stage, and the cost."""

    total: np.ndarray  # SecAgg+: uint32, mod 2^32; HE (fl/he_sum.py): float64
    inputs: frozenset[int]  # U3: the clients whose vector is in the total
    traffic: dict[str, list[int]]  # stage -> [bytes up, bytes down]
    seconds: dict[str, float]
    dropped: dict[str, list[int]] = field(default_factory=dict)  # seen dropping, by stage
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)  # mask-stage meta


class SecureSumRound:
    """The server's side of one SecAgg+ round over ``parties``. Building it runs the key
    stages (advertise and share keys) with ``clients``; :meth:`finish` collects the masked
    inputs and returns their sum. Raises :class:`SecAggAbort` when a stage is left with fewer
    than ``threshold`` clients or a message is forged."""

    def __init__(self, rnd: int, clients: Sequence[int], graph: Mapping[int, Sequence[int]],
                 threshold: int, length: int, parties: SecAggParties) -> None:
        self.rnd, self.parties = int(rnd), parties
        self.server = SecAggServer(rnd, graph, threshold, length)
        t0 = time.perf_counter()
        keys = parties.exchange(rnd, ADVERTISE, {
            int(k): (b"", {"neighbours": list(graph[k]), "threshold": int(threshold)})
            for k in clients})
        routed = self.server.receive_keys([_from(k, one, ADVERTISE) for k, (b, _) in
                                           keys.items() for one in decode_keys(b).values()])
        shares = parties.exchange(rnd, SHARE, {k: (encode_keys(list(ks.values())), {})
                                               for k, ks in routed.items()})
        self.inbox = self.server.receive_shares([_from(k, decode_shares(b), SHARE)
                                                 for k, (b, _) in shares.items()])
        self.seconds = {"key_agreement": time.perf_counter() - t0}

    def finish(self, senders: Collection[int], meta_of: Callable[[int], dict[str, Any]]
               = lambda k: {}) -> SecureSum:
        """Ask ``senders`` (those of the clients that shared keys) for their masked inputs,
        each with its public ``meta_of(k)``; then the survivors for their shares; the sum."""
        rnd, t0 = self.rnd, time.perf_counter()
        answers = self.parties.exchange(rnd, MASK, {
            k: (encode_sealed(self.inbox[k]), meta_of(k)) for k in senders if k in self.inbox})
        request = self.server.receive_masked([_from(k, decode_masked(b), MASK)
                                              for k, (b, _) in answers.items()])
        self.seconds["masking"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        unmasks = self.parties.exchange(rnd, UNMASK, {k: (encode_request(request), {})
                                                      for k in sorted(request.inputs)})
        total = self.server.unmask([_from(k, decode_unmask(b, request), UNMASK)
                                    for k, (b, _) in unmasks.items()])
        self.seconds["unmasking"] = time.perf_counter() - t0
        advertised, shared = self.server.advertised, self.server.shared
        dropped = {"before_shares": sorted(advertised - shared),
                   "before_input": sorted(shared - request.inputs),
                   "after_input": sorted(request.inputs - set(unmasks))}
        return SecureSum(total, request.inputs, self.server.traffic, self.seconds, dropped,
                         {k: dict(m) for k, (_, m) in answers.items()})
