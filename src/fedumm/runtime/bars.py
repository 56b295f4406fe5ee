"""Progress bars (tqdm, on stderr) for the callbacks the library reports through."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

from fedumm.data.progress import reporting


def count_bar(desc: str, show: bool) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback drawing a tqdm bar, opened at the first report (a
    step that reports nothing shows nothing) and closed when done reaches total."""
    bar: tqdm | None = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, disable=not show, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report


@contextmanager
def reading_bars(show: bool) -> Iterator[None]:
    """Within the block, the data readers' reports (shard indexing, image checks) as one bar
    per kind of work, all closed when the block ends."""
    bars: dict[str, tqdm] = {}

    def report(what: str, done: int, total: int | None) -> None:
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = tqdm(total=total, desc=what, disable=not show,
                                    dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        with reporting(report):
            yield
    finally:
        for bar in bars.values():
            bar.close()
