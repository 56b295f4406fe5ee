"""What the property tests share: the error contract and a guard that records any write
outside the example's own folder (an audit hook sees every file opened for writing, every
folder made, renamed or removed, whoever does it)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_ROOTS: list[str] = []  # where writes are allowed while a guard is on (none: guard off)
_SEEN: list[str] = []  # writes elsewhere, recorded by the hook
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.mkdir": 0, "os.rename": 1, "os.remove": 0, "os.rmdir": 0,
                "shutil.rmtree": 0, "os.truncate": 0, "os.chmod": 0}


def _record(path: object, event: str) -> None:
    if isinstance(path, int) or path is None:
        return
    full = os.path.abspath(os.fsdecode(path))  # type: ignore[arg-type]
    if full.startswith("/dev/") or any(full == r or full.startswith(r + os.sep)
                                       for r in _ROOTS):
        return
    _SEEN.append(f"{event} {full}")


def _hook(event: str, args: tuple) -> None:
    if not _ROOTS:
        return
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing:
            _record(path, event)
    elif event in _PATH_EVENTS and args:
        _record(args[_PATH_EVENTS[event]], event)


sys.addaudithook(_hook)  # hooks cannot be removed: it does nothing while no guard is on


def _documented_caches() -> list[str]:
    """Where fedumm says it writes besides its outputs: the ``datasets`` cache that parquet
    files are converted into (fedumm.data.readers.hf)."""
    try:
        from datasets import config
    except ImportError:
        return []
    return [os.path.abspath(str(config.HF_DATASETS_CACHE))]


@contextmanager
def writes_only_under(root: Path) -> Iterator[list[str]]:
    """Run a block with writes allowed under ``root`` only (and the documented caches);
    yields the list of writes seen elsewhere (check it after the block)."""
    _SEEN.clear()
    _ROOTS.extend(_documented_caches())
    _ROOTS.append(os.path.realpath(root))
    _ROOTS.append(os.path.abspath(root))
    try:
        yield _SEEN
    finally:
        _ROOTS.clear()


def assert_clear(exc: BaseException, *names: str) -> None:
    """The error contract: a ValueError subclass with a one-line message naming one of
    ``names`` (the file, key or record) when any are given."""
    assert isinstance(exc, ValueError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    if names:
        assert any(n in message for n in names), f"{message!r} names none of {names}"


@pytest.fixture(scope="session")
def guard() -> Callable:
    return writes_only_under


@pytest.fixture(scope="session")
def clear() -> Callable:
    return assert_clear
