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
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
        return ID_BYTES * (len(self.inputs) + len(self.dropped))


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
            nonce = self._entropy(12)
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
                plain = self._aead(v).decrypt(blob[:12], blob[12:], self._header(v, self.id))
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
        self._enough(len(self._keys), "advertise_keys")
        out = {u: {v: self._keys[v] for v in self.graph[u] if v in self._keys}
               for u in self._keys}
        self._count("advertise_keys", sum(m.nbytes for m in msgs),
                    sum(m.nbytes for d in out.values() for m in d.values()))
        return out

    def receive_shares(self, msgs: Sequence[Shares]) -> dict[int, dict[int, bytes]]:
        """Stage 2: the sealed shares, by recipient ({recipient: {sender: blob}})."""
        self._shared = {m.client for m in msgs}
        self._enough(len(self._shared), "share_keys")
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in self._shared}
        for m in msgs:
            for v, blob in m.sealed.items():
                if v in inbox:  # holders that dropped meanwhile get nothing
                    inbox[v][m.client] = blob
        self._count("share_keys", sum(m.nbytes for m in msgs),
                    sum(ID_BYTES + len(b) for d in inbox.values() for b in d.values()))
        return inbox

    def receive_masked(self, msgs: Sequence[MaskedInput]) -> UnmaskRequest:
        """Stage 3: the masked inputs; the request that goes to every survivor."""
        for m in msgs:
            if m.client not in self._shared or m.vector.shape != (self.length,):
                raise SecAggAbort(f"round {self.rnd}: unexpected masked input from client "
                                  f"{m.client}")
        self._masked = {m.client: m.vector for m in msgs}
        self._enough(len(self._masked), "masked_input")
        self._request = UnmaskRequest(frozenset(self._masked),
                                      frozenset(self._shared - set(self._masked)))
        self._count("masked_input", sum(m.nbytes for m in msgs), 0)
        return self._request

    def unmask(self, msgs: Sequence[Unmask]) -> np.ndarray:
        """Stage 4: the sum of the inputs in U3 (uint32, mod 2^32)."""
        req = self._request
        assert req is not None, "receive_masked comes first"
        self._enough(len(msgs), "unmask")
        self._count("unmask", sum(m.nbytes for m in msgs),
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
