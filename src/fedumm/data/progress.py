"""Progress of long data reading (shard indexing, checking every image file), reported to
whoever asked for it without threading a callback through every reader.

A caller wraps the work in ``with reporting(callback):``; readers call
``report(what, done, total)`` as they advance (``total`` None where it is not known in
advance, e.g. the images of a JSON file being read). Outside ``reporting`` a report costs
one context-variable lookup and shows nothing, so library users see no output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Reporter = Callable[[str, int, "int | None"], None]

_REPORTER: ContextVar[Reporter | None] = ContextVar("fedumm_data_progress", default=None)


@contextmanager
def reporting(callback: Reporter | None) -> Iterator[None]:
    """Send the reports made inside the block to ``callback(what, done, total)``."""
    token = _REPORTER.set(callback)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def report(what: str, done: int, total: int | None = None) -> None:
    """``done`` of ``total`` units of ``what`` are finished (a no-op unless reporting)."""
    callback = _REPORTER.get()
    if callback is not None:
        callback(what, done, total)
