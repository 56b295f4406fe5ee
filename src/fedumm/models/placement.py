"""Where a backbone's model lives (device, dtype, train/eval mode) and what its frozen weights
are (the base state dict and its fingerprint): the parts every backbone shares."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


class ModelPlacement:
    """``device`` and ``dtype`` of a backbone, read off its model's parameters, and the
    fingerprint of its frozen weights (hashed once: the base does not change)."""

    model: nn.Module
    _fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(base_state_dict(self.model))
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The model in eval mode inside the block (answering, scoring, generating between
        training steps), and back in the mode it had after it, also when the block raises."""
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)


def in_eval_mode(method: Callable) -> Callable:
    """A backbone method that answers, scores or generates: it runs inside
    :meth:`ModelPlacement.evaluating`."""
    @functools.wraps(method)
    def wrapper(self: ModelPlacement, *args: Any, **kwargs: Any) -> Any:
        with self.evaluating():
            return method(self, *args, **kwargs)
    return wrapper


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"backbone.device={name!r} but this machine has no CUDA device")
    return dev


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights, named as in the plain model, whether or not PEFT wraps it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".modules_to_save." in name or "trainable_tokens_delta" in name:
            continue
        for wrapper in (".token_adapter.base_layer.", ".base_layer.", ".original_module."):
            name = name.replace(wrapper, ".")
        out[name] = tensor
    return out
