"""The one output policy of every fedumm command that writes, and the writer every write uses.

Where a command may write:

* a **folder output** (a run, a sweep, a report, a data export, a preview, a pretrained
  checkpoint, a FLARE job) goes into a new or empty folder, or into a folder the same command
  made: :class:`OutputFolder` marks it with ``.fedumm-<command>``. A folder holding anything
  else, or made by another command, is refused with one line naming it and what to do.
* the marker lists every file fedumm wrote there (names are recorded *before* the file is
  written), so a marked folder may be rewritten by its command while a file fedumm did not
  write is never replaced or deleted (a user's notes beside a run stay untouched).
* a **file output** (``generate --out x.png``) must have its suffix (a path is never silently
  turned into another: no ``x`` -> ``x.png``), must not be a folder, and replaces only a file
  fedumm wrote (its PNGs carry ``Software: fedumm``).

How it writes: every file goes to ``<name>.tmp`` beside its target and is renamed into place,
the temporary removed on any failure; appends are cut back to their old length when they fail.
An OS error while writing (a full disk, a read-only folder) becomes :class:`OutputWriteError`,
one line naming the file; nothing half-written is left looking complete. All bytes pass
:func:`_write`, the one low-level writer (tests inject faults there).

Writes find their folder by path: :func:`write_file` checks against the marked folder this
process claimed that holds the path, so code that only gets a path (a plot) follows the policy.
At the bottom layer: it imports nothing of fedumm, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

MARKER_PREFIX = ".fedumm-"
TMP = ".tmp"
STAGING = ".fedumm-staging.tmp"  # where a library's folder writer writes before the copy
# fedumm's own transient files: a folder holding only these counts as empty
TRANSIENT = re.compile(r"^(\.lock|\.fedumm-.*\.tmp)$")
# an output folder named like a file is a mix-up (``--out report.md`` for a report folder)
FILE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf", ".json", ".jsonl",
                           ".csv", ".md", ".html", ".txt", ".yaml", ".yml", ".pt", ".pth",
                           ".safetensors", ".zip", ".tar", ".gz"})
SIGNATURE = "fedumm"  # the PNG ``Software`` text of every figure fedumm writes

Fill = Callable[[BinaryIO], object]
Content = bytes | str | Fill


class OutputError(ValueError):
    """An output fedumm will not write as asked; the message names the path and what to do."""


class OutputExistsError(OutputError, FileExistsError):
    """The path holds something fedumm did not write (or a finished result it keeps)."""


class OutputWriteError(OutputError, OSError):
    """Writing failed (a full disk, no permission); the file named was left as it was."""


# ---------------------------------------------------------------- the one low-level writer
def _write(path: Path, fill: Fill, mode: str) -> None:
    """Open ``path`` (``wb`` or ``ab``) and let ``fill`` write into it."""
    with open(path, mode) as f:
        fill(f)


def _as_fill(content: Content) -> Fill:
    if isinstance(content, str):
        content = content.encode()
    if isinstance(content, bytes):
        data = content
        return lambda f: f.write(data)
    return content


def _disk_error(exc: BaseException) -> OSError | None:
    """The OS error behind ``exc``: itself, its cause or context (torch wraps a failed write in a
    RuntimeError), or a Rust library's ``(os error N)`` (safetensors)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _write_error(path: Path, exc: BaseException) -> BaseException:
    """``exc`` as one clear line naming ``path`` when the OS refused the write, else itself."""
    if isinstance(exc, OutputError):
        return exc
    os_err = _disk_error(exc)
    if os_err is None:
        return exc
    todo = ("free some space" if os_err.errno in (errno.ENOSPC, errno.EDQUOT) else
            "check the folder's permissions")
    err = OutputWriteError(f"cannot write {path}: {os_err.strerror or os_err} (nothing was left "
                           f"half-written; {todo} or choose another --out, then run the command "
                           "again)")
    err.errno = os_err.errno
    return err


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _atomic(path: Path, content: Content) -> None:
    """``path`` replaced in one step by a complete new version, or left as it was."""
    tmp = path.with_name(path.name + TMP)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(tmp, _as_fill(content), "wb")
        os.replace(tmp, path)
    except BaseException as exc:
        _discard(tmp)
        err = _write_error(path, exc)
        if err is exc:
            raise
        raise err from exc


# ---------------------------------------------------------------- public writers
def write_atomic(path: str | Path, content: Content) -> Path:
    """Write one file atomically, with the one-line error of a full disk, but outside the
    claimed folder's record: for a subtree a command keeps whole and rewrites often (the
    run's client-state store), whose files would otherwise grow the marker without end."""
    path = Path(path)
    _atomic(path, content)
    return path


def write_file(path: str | Path, content: Content) -> Path:
    """Write one file atomically (bytes, text, or a function writing to a binary file), inside
    the folder this process claimed for it (checked and recorded there first)."""
    path = Path(path)
    owner = _owner(path)
    if owner is not None:
        owner.reserve(path)
    _atomic(path, content)
    if owner is not None:
        owner.written.add(owner.relative(path))
    return path


def append_text(path: str | Path, text: str) -> None:
    """Append to a log file; a failed append is cut back, so no torn line is left."""
    path = Path(path)
    owner = _owner(path)
    if owner is not None:
        owner.reserve(path)
    existed = path.is_file()
    size = path.stat().st_size if existed else 0
    try:
        _write(path, _as_fill(text), "ab")
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if existed:
                os.truncate(path, size)
            else:
                path.unlink(missing_ok=True)
        err = _write_error(path, exc)
        if err is exc:
            raise
        raise err from exc
    if owner is not None:
        owner.written.add(owner.relative(path))


def write_tree(dest: str | Path, save: Callable[[Path], object], *,
               last: Sequence[str] = ()) -> list[Path]:
    """A folder written by code that takes a folder path (``save_pretrained``, a format
    writer): ``save`` writes into a staging folder inside ``dest``, then every file is copied
    into place with :func:`write_file` (names in ``last``, e.g. a checksum file, after the
    rest, so a copy cut short never looks complete). The staging folder is always removed."""
    dest = Path(dest)
    staging = dest / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # a kill's leftover
    try:
        try:
            staging.mkdir(parents=True)
            save(staging)
        except BaseException as exc:
            err = _write_error(dest, exc)
            if err is exc:
                raise
            raise err from exc
        files = sorted((p for p in staging.rglob("*") if p.is_file()),
                       key=lambda p: (p.name in last, str(p)))
        targets = [dest / p.relative_to(staging) for p in files]
        owner = _owner(dest / "x")
        if owner is not None:
            owner.reserve(*targets)  # one marker write for the whole folder
        for src, target in zip(files, targets, strict=True):
            write_file(target, _copy_from(src))
        return targets
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_from(src: Path) -> Fill:
    def fill(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    return fill


def save_png(fig, path: str | Path, **kwargs) -> Path:
    """A matplotlib figure as a PNG signed ``Software: fedumm`` (so a later run may replace it)."""
    def fill(f: BinaryIO) -> None:
        fig.savefig(f, format="png", metadata={"Software": SIGNATURE}, **kwargs)
    return write_file(path, fill)


# ---------------------------------------------------------------- file outputs
def _signed_by_fedumm(path: Path) -> bool:
    """Whether ``path`` is a PNG fedumm wrote (its ``Software`` text)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == SIGNATURE
    except Exception:  # not an image at all: not ours
        return False


def claim_file(path: str | Path, suffix: str, *, command: str, option: str = "--out") -> Path:
    """Check a file output before any work: it ends in ``suffix``, is not a folder, and is new
    or a file fedumm wrote. Returns the path."""
    path = Path(path)
    if path.suffix.lower() != suffix:
        example = (path.name or "out") + suffix
        raise OutputError(f"{option} {path}: `fedumm {command}` writes one {suffix} file; give a "
                          f"path ending in {suffix} (e.g. {example})")
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; `fedumm {command}` writes one {suffix} "
                          f"file: give a file path such as {path / ('out' + suffix)}")
    if path.exists() and not _signed_by_fedumm(path):
        raise OutputExistsError(f"{path} exists and was not written by fedumm; it is left as it "
                                f"is: choose another {option} or move it away")
    return path


# ---------------------------------------------------------------- folder outputs
_CLAIMED: dict[Path, OutputFolder] = {}  # folders this process claimed, by resolved path


def _owner(path: Path) -> OutputFolder | None:
    """The claimed folder nearest above ``path`` (None: a file output of its own)."""
    if not _CLAIMED:
        return None
    parent = path.parent.resolve()
    for folder in (parent, *parent.parents):
        if folder in _CLAIMED:
            return _CLAIMED[folder]
    return None


def marker_name(command: str) -> str:
    return MARKER_PREFIX + command


def _markers(path: Path) -> list[str]:
    return sorted(p.name[len(MARKER_PREFIX):] for p in path.glob(MARKER_PREFIX + "*")
                  if p.is_file() and not p.name.endswith(TMP))


class OutputFolder:
    """The folder a command writes into: checked, marked, and the files written recorded.

    ``command`` names the marker (``run`` -> ``.fedumm-run``); ``option`` is the command-line
    option that chose the folder, for messages. ``file_like_ok``: a name such as ``x.json`` is
    no mix-up (sweep cells are named after grid values, which may be file names)."""

    def __init__(self, path: str | Path, command: str, *, option: str = "--out",
                 file_like_ok: bool = False) -> None:
        self.path = Path(path)
        self.command = command
        self.option = option
        self.file_like_ok = file_like_ok
        self.marker = self.path / marker_name(command)
        self.written: set[str] = set()  # files written since :meth:`claim`
        self._files: set[str] | None = set()  # the marker's list; None: an old marker

    # ---------------------------------------------------------------- checks
    def entries(self) -> list[str]:
        """What the folder holds, fedumm's transient files left out."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if not TRANSIENT.match(p.name))

    def is_marked(self) -> bool:
        return self.marker.is_file()

    def check(self) -> None:
        """Refuse unless the folder is new, empty, or marked by this command."""
        what = self.command.replace("-", " ")
        if (self.path.suffix.lower() in FILE_SUFFIXES and not self.file_like_ok
                and not self.is_marked()):
            raise OutputError(f"{self.option} {self.path} looks like a file name; `fedumm {what}` "
                              "writes a folder: give a folder path")
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path} is a file, not a folder; choose another "
                              f"{self.option} (fedumm writes a folder there)")
        entries = self.entries()
        if not entries or self.is_marked():
            return
        others = [c for c in _markers(self.path) if c != self.command]
        if others:
            raise OutputExistsError(f"{self.path} is a fedumm {others[0].replace('-', ' ')} "
                                    f"folder, not a {what} folder; choose another {self.option}")
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise OutputExistsError(
            f"{self.path} exists and is not empty: it is not a fedumm {what} folder (it holds "
            f"{shown}); choose a new {self.option}: fedumm writes only into a new or empty "
            f"folder or one it made for `fedumm {what}`")

    def claim(self, paths: Iterable[Path] = ()) -> OutputFolder:
        """Check, create and mark the folder (recording ``paths`` in it, the files the command
        will write, in one go), and route this process's writes under it through it."""
        self.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputWriteError(f"cannot create the folder {self.path}: "
                                   f"{exc.strerror or exc}; choose another {self.option}"
                                   ) from exc
        paths = list(paths)
        if self.is_marked():
            self._files = self._read_marker()
            self.reserve(*paths)  # a file put there since is not taken over
        else:  # new or empty: nothing there to take over
            self._files = set()
            self._save_marker({self.relative(p) for p in paths})
        self.written = set()
        _CLAIMED[self.path.resolve()] = self
        return self

    # ---------------------------------------------------------------- the record
    def relative(self, path: Path) -> str:
        path = Path(path)
        base = self.path.resolve()
        full = path.parent.resolve() / path.name
        try:
            return full.relative_to(base).as_posix()
        except ValueError:
            raise OutputError(f"{path} is outside the output folder {self.path}") from None

    def _read_marker(self) -> set[str] | None:
        try:
            data = json.loads(self.marker.read_text())
            return set(data["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a marker from before the record: every file was fedumm's

    def _save_marker(self, add: set[str]) -> None:
        on_disk = self._read_marker() if self.is_marked() else set()
        if on_disk is None:  # an old marker stays as it is
            self._files = None
            return
        files = on_disk | (self._files or set()) | add
        text = json.dumps({"command": self.command, "files": sorted(files)}, indent=1) + "\n"
        _atomic(self.marker, text)
        self._files = files

    def is_ours(self, path: Path) -> bool:
        """Whether fedumm wrote ``path`` (or may: an old marker trusts every file)."""
        return self._files is None or self.relative(path) in self._files

    def reserve(self, *paths: Path) -> None:
        """Record ``paths`` as fedumm's before they are written; refuse one that exists and
        fedumm did not write."""
        if self._files is None:
            return
        new = {}
        for p in paths:
            rel = self.relative(p)
            if rel in self._files or rel in new:
                continue
            if Path(p).exists() or Path(p).is_symlink():
                raise OutputExistsError(f"{p} was not written by fedumm and is left as it is; "
                                        f"move it away or choose another {self.option}")
            new[rel] = p
        if new:
            self._save_marker(set(new))

    def remove(self, path: Path) -> None:
        """Delete a file fedumm wrote here (a file it did not write is never deleted)."""
        if Path(path).is_file() and self.is_ours(Path(path)):
            Path(path).unlink()

    def prune(self) -> None:
        """After a complete rewrite: delete the files fedumm wrote here before and not this
        time (a re-export with fewer items leaves none of the old ones behind)."""
        if self._files is None:
            return
        stale = sorted(self._files - self.written)
        for rel in stale:
            target = self.path / rel
            with contextlib.suppress(OSError):
                target.unlink(missing_ok=True)
                for parent in target.parents:  # folders only fedumm's files were in
                    if parent == self.path or any(parent.iterdir()):
                        break
                    parent.rmdir()
        if stale:
            self._files = set(self.written)
            text = json.dumps({"command": self.command, "files": sorted(self._files)},
                              indent=1) + "\n"
            _atomic(self.marker, text)

