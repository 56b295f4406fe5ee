"""Registries: one per kind of name a config can give (backbone, strategy, codec, partitioner,
reader, update-pipeline stage). Adding one is one new module and a registration; config
validation asks the registry.

A registry sits at the bottom layer with the config so that validation can ask it without
importing upward. The built-in entries live in higher layers and register themselves on
import; a registry imports its ``builtins`` module (a dotted name, like an entry point) the
first time it is asked, so ``strategy.name=fedprox`` validates before anything else loaded
the strategies. A user's own entry registers the same way from their code::

    from fedumm.registry import STRATEGIES

    @STRATEGIES.register("mine")
    class Mine(FedAvg): ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names of one kind mapped to the object that implements each (a class or a builder)."""

    def __init__(self, kind: str, builtins: str) -> None:
        self.kind = kind  # what a name names, for error messages ("strategy", "codec", ...)
        self.builtins = builtins  # the module whose import registers the built-in entries
        self._entries: dict[str, T] = {}
        self._loaded = False
        self._loading = False
        self._resolver: Callable[[str], object] | None = None

    def _load(self) -> None:
        if self._loaded or self._loading:  # loading: its registrations call back into here
            return
        self._loading = True
        try:
            importlib.import_module(self.builtins)
            self._loaded = True  # not before: a failed import is tried again next time
        finally:
            self._loading = False

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, a decorator that does it.

        Raises ValueError if ``name`` is taken by another object (re-registering the same
        object, as a module reload does, is allowed)."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty word, got {name!r}")

        def add(o: T) -> T:
            old = self._entries.get(name)
            if old is not None and old is not o and getattr(old, "__qualname__", None) != \
                    getattr(o, "__qualname__", object()):
                raise ValueError(f"{self.kind} {name!r} is already registered ({old!r})")
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def set_resolver(self, resolver: Callable[[str], object]) -> None:
        """For names with arguments or composition (``topk:0.01+int8+zlib``): the provider's
        function that turns a spelling into the object it means, raising ValueError when it
        cannot (used by :meth:`resolve`)."""
        self._resolver = resolver

    def resolve(self, text: str) -> object:
        """What a spelling means: the provider's resolver where it installed one, else the
        entry of that name."""
        self._load()
        return self._resolver(text) if self._resolver is not None else self.get(text)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry ``name``; ValueError naming the valid ones when it is unknown."""
        self._load()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: "
                             f"{', '.join(self.names())}")
        return self._entries[name]


# One registry per kind of name. Each lists the module that registers its built-in entries.
BACKBONES: Registry = Registry("backbone kind", "fedumm.models.builtin")
STRATEGIES: Registry = Registry("strategy", "fedumm.fl.strategies")
CODECS: Registry = Registry("codec step", "fedumm.fl.codecs")
PARTITIONERS: Registry = Registry("partition method", "fedumm.data.partition")
READERS: Registry = Registry("reader", "fedumm.data.readers.builtin")
STAGES: Registry = Registry("pipeline stage", "fedumm.fl.stages")
