"""Error feedback: what compression dropped in one round is added to the next one."""

from __future__ import annotations

import torch

from fedumm.fl.codecs.container import decode, encode
from fedumm.fl.codecs.spec import CodecSpec


class ErrorFeedback:
    """Carries what compression dropped into the next round (error feedback / EF-SGD style).

    ``compress`` encodes ``tensors + residual`` and keeps ``(tensors + residual) - decoded`` as
    the next residual, so the sum of everything decoded plus the final residual equals the sum of
    everything given. Keys absent from a round keep their residual. Residuals are float32 on CPU.
    """

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def compress(self, tensors: dict[str, torch.Tensor], spec: CodecSpec | str
                 ) -> tuple[bytes, dict[str, torch.Tensor]]:
        corrected = {}
        for key, t in tensors.items():
            x = t.detach().to(device="cpu", dtype=torch.float32)
            r = self.residual.get(key)
            if r is not None:
                if r.shape != x.shape:
                    raise ValueError(f"tensor {key!r}: shape {tuple(x.shape)} differs from its "
                                     f"residual {tuple(r.shape)}")
                x = x + r
            corrected[key] = x
        payload = encode(corrected, spec)
        decoded = decode(payload)
        for key, x in corrected.items():
            self.residual[key] = x - decoded[key]
        return payload, decoded

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in sorted(self.residual.items())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = {k: v.detach().to(device="cpu", dtype=torch.float32).clone()
                         for k, v in state.items()}

    def reset(self) -> None:
        self.residual = {}
