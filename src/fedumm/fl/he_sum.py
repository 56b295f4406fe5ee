"""Homomorphic-encryption sums (``secagg.method=he``): NVIDIA FLARE's HE, for fedumm's round.

The keys are FLARE's: one TenSEAL CKKS context (poly modulus degree 8192, coefficient moduli
60/40/40 bits, scale 2^40, symmetric encryption) made by FLARE's provisioning builder
(``nvflare.lighter.impl.he.HEBuilder``), the sites' copy (``client_context.tenseal``) with
the secret key, the server's (``server_context.tenseal``) without it. A POC or production
deployment provisioned with that builder has them in every startup kit; for FLARE's simulator,
which provisions nothing, :func:`provision_contexts` makes a pair with the same builder.

A round. Every site that trained encrypts its scaled update z_k (the same z as SecAgg+'s,
:func:`fedumm.fl.secagg.client_input`, in float64 and not quantised) as CKKS vectors of
:data:`SLOTS` entries; the server adds the ciphertexts, which it cannot read; one site (the
lowest id among those that sent) decrypts the sum and returns it. CKKS is approximate: the
sum's error is about 1e-9 per entry at scale 2^40.

Trust. The server learns the sum, never one site's update, as long as no site gives it the
secret key: every site holds it, so a server that colludes with one site can read everyone's
ciphertexts. That is FLARE's own HE model (sites trusted with each other's updates, the
server not); SecAgg+ needs ``threshold`` colluding clients instead. Dropouts cost nothing:
the sum is over the ciphertexts that arrived.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts

from fedumm.fl.secure_sum import Message, SecAggAbort, SecAggParties, SecureSum, Site

HE_ENCRYPT, HE_DECRYPT = "he_encrypt", "he_decrypt"  # the stages (traffic keys too)
# FLARE's names for the provisioned contexts (nvflare.lighter.constants.ProvFileName)
SERVER_CONTEXT, CLIENT_CONTEXT = "server_context.tenseal", "client_context.tenseal"
SLOTS = 4096  # CKKS slots at poly modulus degree 8192: entries per ciphertext


def provision_contexts(folder: str | Path) -> tuple[Path, Path]:
    """The server's and the sites' contexts, made by FLARE's ``HEBuilder`` (its defaults) in
    ``folder``; existing ones are kept (a resumed run keeps its keys)."""
    from nvflare.lighter.impl.he import HEBuilder

    folder = Path(folder)
    server, client = folder / SERVER_CONTEXT, folder / CLIENT_CONTEXT
    if not (server.is_file() and client.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        builder = HEBuilder()
        builder.initialize(None, None)  # the context; project and provisioning unused
        server.write_bytes(builder.get_serialized_context())
        client.write_bytes(builder.get_serialized_context(is_client=True))
    return server, client


def load_context(path: str | Path, secret: bool) -> ts.Context:
    """A serialized TenSEAL context, refused when it holds the secret key and should not (the
    server's) or lacks it and should have it (a site's)."""
    context = ts.context_from(Path(path).read_bytes())
    if context.has_secret_key() != secret:
        whose = "a site's" if secret else "the server's"
        raise ValueError(f"{path}: {whose} HE context must {'hold' if secret else 'not hold'} "
                         f"the secret key")
    return context


def encode_vectors(vectors: Sequence[ts.CKKSVector]) -> bytes:
    """Serialized ciphertexts, each behind its length (4 bytes, little-endian)."""
    blobs = [v.serialize() for v in vectors]
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


def decode_vectors(blob: bytes, context: ts.Context) -> list[ts.CKKSVector]:
    out, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            raise SecAggAbort(f"a malformed ciphertext message ({len(blob)} bytes)")
        (size,) = struct.unpack_from("<I", blob, at)
        if at + 4 + size > len(blob):
            raise SecAggAbort(f"a malformed ciphertext message ({len(blob)} bytes)")
        out.append(ts.ckks_vector_from(context, blob[at + 4:at + 4 + size]))
        at += 4 + size
    return out


class HESite(Site):
    """One site's side: encrypt its input, decrypt the round's sum."""

    def __init__(self, client: int, context: ts.Context) -> None:
        super().__init__(client)
        if not context.has_secret_key():
            raise ValueError(f"client {client}: its HE context lacks the secret key")
        self.context = context

    def handle(self, rnd: int, stage: str, payload: bytes, meta: Mapping[str, Any]
               ) -> Message:
        if stage == HE_ENCRYPT:
            z, _ = self.take_input(rnd, meta.get("plan", {}))
            chunks = [ts.ckks_vector(self.context, z[i:i + SLOTS].tolist())
                      for i in range(0, len(z), SLOTS)]
            return encode_vectors(chunks), {}
        if stage == HE_DECRYPT:
            total = [np.asarray(v.decrypt(), dtype=np.float64)
                     for v in decode_vectors(payload, self.context)]
            return (np.concatenate(total) if total else np.zeros(0)).astype("<f8").tobytes(), {}
        raise SecAggAbort(f"client {self.id}: unknown HE stage {stage!r}")


class HESumRound:
    """The server's side of one HE round over ``parties`` with the server's ``context``
    (no secret key): nothing happens before the clients train; :meth:`finish` sums."""

    def __init__(self, rnd: int, clients: Sequence[int], length: int, parties: SecAggParties,
                 context: ts.Context) -> None:
        if context.has_secret_key():
            raise ValueError("the server's HE context holds the secret key: it could read "
                             "every update (give it server_context.tenseal)")
        self.rnd, self.clients, self.length = int(rnd), [int(k) for k in clients], int(length)
        self.parties, self.context = parties, context

    def finish(self, senders: Collection[int], meta_of: Callable[[int], dict[str, Any]]
               = lambda k: {}) -> SecureSum:
        """Ask ``senders`` for their encrypted inputs, add them, have one of them decrypt the
        sum: its float64 total (over the inputs that arrived)."""
        rnd, t0 = self.rnd, time.perf_counter()
        answers = self.parties.exchange(rnd, HE_ENCRYPT, {k: (b"", meta_of(k))
                                                          for k in senders})
        if not answers:
            raise SecAggAbort(f"round {rnd}: no encrypted input arrived")
        total: list[ts.CKKSVector] | None = None
        for k in sorted(answers):
            vectors = decode_vectors(answers[k][0], self.context)
            if sum(v.size() for v in vectors) != self.length:
                raise SecAggAbort(f"round {rnd}: client {k} sent {sum(v.size() for v in vectors)}"
                                  f" encrypted entries, expected {self.length}")
            total = vectors if total is None else [a + b for a, b in zip(total, vectors,
                                                                         strict=True)]
        summed = encode_vectors(total or [])
        seconds = {"encrypt_and_add": time.perf_counter() - t0}
        t0 = time.perf_counter()
        decryptor = min(answers)  # it sent its input: it is still there
        plain = self.parties.exchange(rnd, HE_DECRYPT, {decryptor: (summed, {})})
        if decryptor not in plain:
            raise SecAggAbort(f"round {rnd}: client {decryptor} did not decrypt the sum")
        values = np.frombuffer(plain[decryptor][0], dtype="<f8").astype(np.float64)
        if values.shape != (self.length,):
            raise SecAggAbort(f"round {rnd}: the decrypted sum has {values.size} entries, "
                              f"expected {self.length}")
        seconds["decrypt"] = time.perf_counter() - t0
        up = sum(len(b) for b, _ in answers.values())
        traffic = {HE_ENCRYPT: [up, 0], HE_DECRYPT: [len(plain[decryptor][0]), len(summed)]}
        inputs = frozenset(answers)
        dropped = {"before_input": sorted(set(self.clients) - inputs)}
        return SecureSum(values, inputs, traffic, seconds, dropped,
                         {k: dict(m) for k, (_, m) in answers.items()})
