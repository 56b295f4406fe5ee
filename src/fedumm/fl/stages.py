"""The built-in stages of the update pipeline (:mod:`fedumm.fl.pipeline`), registered by name.

``delta``: quantising and sparsifying codecs carry the update (trained minus received), whose
error feedback and sparsity are what make them work; plain casts carry the trained values, as
exact as the cast. ``validate``: a diverged client says so instead of sending numbers; the
server checks names, shapes and values before anything is aggregated. ``rank``: a lower-rank
client sends its first ``r_k`` LoRA components only (HetLoRA); the server zero-pads them.
``codec``: the upload codec, with the client's error-feedback residual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedumm.fl.attacks import Attack
from fedumm.fl.client_dp import ClientNoise
from fedumm.fl.codecs import ErrorFeedback, carries_values, decode, encode
from fedumm.fl.lora_aggregation import pad_ranks, truncate_ranks
from fedumm.fl.pipeline import DELTA, VALUES, Stage, Upload, pack, unpack
from fedumm.registry import STAGES

if TYPE_CHECKING:
    from fedumm.config import Config

EF_STATE = "error_feedback"  # the client_state entry of the error-feedback residual

STAGES.register("attack", Attack)  # simulated malicious clients (attack.*), off by default
STAGES.register("client_dp", ClientNoise)  # privacy.client.side=client, off by default


@STAGES.register("delta")
class Delta(Stage):
    name = "delta"

    def __init__(self, values: bool) -> None:
        self.values = values  # True: the codec carries values, no delta is taken

    @classmethod
    def from_config(cls, cfg: Config) -> Delta:
        return cls(carries_values(cfg.codec.upload))

    def client(self, up: Upload) -> None:
        up.meta.form = VALUES if self.values else DELTA
        if not self.values:
            up.tensors = {k: v - up.reference[k] for k, v in up.tensors.items()}

    def server(self, up: Upload) -> str | None:
        if up.meta.form == DELTA:
            up.tensors = {k: up.reference[k] + v for k, v in up.tensors.items()}
        elif up.start is not None:  # values trained from a lossy download's copy: their
            # change, applied to the server's own model
            up.tensors = {k: up.reference[k] + (v - up.start[k]) for k, v in up.tensors.items()}
        return None


@STAGES.register("validate")
class Validate(Stage):
    name = "validate"

    def client(self, up: Upload) -> None:
        bad = [k for k, v in {**up.tensors, **up.control}.items()
               if not bool(torch.isfinite(v).all())]
        if bad:  # diverged: say so instead of sending numbers (the server leaves it out)
            up.meta.error = f"{bad[0]}: non-finite values after local training"

    def server(self, up: Upload) -> str | None:
        return validate(up.tensors, up.reference)


def validate(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """Why an update cannot be aggregated (None when it can): unknown keys, shapes that differ
    from the global adapters', non-float or non-finite values."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        return f"unknown adapter tensors {unknown[:3]}"
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            return f"{k}: shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
        if not v.is_floating_point():
            return f"{k}: dtype {v.dtype}, expected a float tensor"
        if not bool(torch.isfinite(v).all()):
            return f"{k}: non-finite values"
    return None


@STAGES.register("rank")
class Rank(Stage):
    name = "rank"

    @classmethod
    def from_config(cls, cfg: Config) -> Rank | None:
        return cls() if cfg.lora.client_ranks else None

    def client(self, up: Upload) -> None:
        if up.rank is not None:  # only this client's rank components travel
            up.tensors = truncate_ranks(up.tensors, up.rank)
            up.meta.rank = up.rank

    def server(self, up: Upload) -> str | None:
        if up.meta.rank is None:
            return None
        unknown = sorted(set(up.tensors) - set(up.reference))
        if unknown:
            return f"unknown adapter tensors {unknown[:3]}"
        up.tensors = pad_ranks(up.tensors, up.reference)
        return None


@STAGES.register("codec")
class Codec(Stage):
    name = "codec"

    def __init__(self, spec: str, error_feedback: bool) -> None:
        self.spec, self.error_feedback = spec, error_feedback

    @classmethod
    def from_config(cls, cfg: Config) -> Codec:
        return cls(cfg.codec.upload, cfg.codec.error_feedback)

    def client(self, up: Upload) -> None:
        up.meta.has_control = bool(up.control)
        tensors = pack(up.tensors, up.control)
        if up.meta.form == DELTA and self.error_feedback:
            ef = ErrorFeedback()
            ef.load_state_dict(up.client_state.get(EF_STATE, {}))
            up.payload, _ = ef.compress(tensors, self.spec)
            up.client_state[EF_STATE] = ef.state_dict()
        else:
            up.payload = encode(tensors, self.spec)

    def server(self, up: Upload) -> str | None:
        try:
            up.tensors, up.control = unpack(decode(up.payload))
        except Exception as exc:  # any malformed payload is a rejection, not a crash
            return f"undecodable payload ({type(exc).__name__}: {exc})"
        return None
