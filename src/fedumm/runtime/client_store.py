"""What each client keeps between rounds, on disk: one safetensors file per client.

A client's state (SCAFFOLD's control variate, the error-feedback residual, a persistent
optimizer, the copy a lossy download changes) is a nested dict of tensors and plain values.
Held in memory for every client of a population, it would grow with K; here it lives under the
run folder and only the round's selected clients are read and written::

    RUN/client_state/committed/<k>.safetensors    the states as of the last checkpoint
    RUN/client_state/staging/<r>/<k>.safetensors  what round r wrote

Each file holds the state's tensors and, in its safetensors metadata, the JSON of everything
else (the nesting, ints, floats, strings, tuples; no pickle). Files are written to a temporary
name and renamed. A round writes into its own staging folder; the checkpoint records the
round; the staging folder is folded into ``committed`` only once that checkpoint exists (at
the start of the next round, at the end of training, or when a resume finds it). A run killed
between the round's writes and its checkpoint resumes from the previous checkpoint and drops
that staging folder, so the store always matches the checkpoint's round.

Without a folder (a transport built by hand), the same store keeps the states in memory and
checkpoints them whole, as the transport always did.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from fedumm.outputs import write_atomic

CLIENT_STATE = "client_state"  # the store's folder in a run folder
_META = "fedumm_client_state"  # the safetensors metadata key of the non-tensor part
_SUFFIX = ".safetensors"


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree of ``obj`` whose tensors are moved into ``tensors`` (named t0, t1, ...)."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()  # no shared storage in a file
        return {"$t": name}
    if isinstance(obj, dict):  # keys may be ints (an optimizer's state): kept as they are
        return {"$d": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"client state holds a {type(obj).__name__}; the store keeps tensors, "
                    "numbers, strings and dicts / lists / tuples of them")


def _unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_unpack(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "$t" in tree:
            return tensors[tree["$t"]]
        if "$tuple" in tree:
            return tuple(_unpack(v, tensors) for v in tree["$tuple"])
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in tree["$d"]}
    return tree


def save_state(path: Path, state: dict) -> None:
    """Write one client's state to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_pack(state, tensors))
    write_atomic(path, save(tensors, metadata={_META: meta}))


def load_state(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()  # a safe_open handle is no mapping: it lists its names
        tensors = {k: f.get_tensor(k) for k in names}
        meta = f.metadata()[_META]
    return _unpack(json.loads(meta), tensors)


class ClientStore:
    """Client states by client id, as of the last checkpoint plus the round in progress."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.round = -1  # the last round whose states were staged
        self.reads = 0  # client files read (a round reads its selected clients' only)
        # without a folder: committed and staged states in memory
        self._committed: dict[int, dict] = {}
        self._staged: dict[int, dict[int, dict]] = {}

    # -- layout ----------------------------------------------------------------------------------

    def _committed_dir(self) -> Path:
        assert self.folder is not None
        return self.folder / "committed"

    def _staging_dir(self, rnd: int) -> Path:
        assert self.folder is not None
        return self.folder / "staging" / str(rnd)

    def _staged_rounds(self) -> list[int]:
        if self.folder is None:
            return sorted(self._staged)
        root = self.folder / "staging"
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) \
            if root.is_dir() else []

    # -- a round ---------------------------------------------------------------------------------

    def begin(self, rnd: int) -> None:
        """Round ``rnd`` starts: the previous rounds are checkpointed (fold them in) and what
        an interrupted attempt of this round wrote is dropped. Round 0 starts empty.
        Called again in the same round (its next hop of chained clients), nothing changes."""
        if rnd == self.round:
            return
        if rnd == 0:
            self.clear()
        for r in self._staged_rounds():
            if r < rnd:
                self._commit(r)
            else:
                self._drop(r)
        self.round = rnd

    def get(self, k: int) -> dict | None:
        """Client ``k``'s state as of the last checkpoint (None: it has none yet)."""
        if self.folder is None:
            return self._committed.get(k)
        path = self._committed_dir() / f"{k}{_SUFFIX}"
        if not path.is_file():
            return None
        self.reads += 1
        return load_state(path)

    def put(self, rnd: int, k: int, state: dict) -> None:
        """Client ``k``'s state after round ``rnd`` (visible once the round is committed)."""
        if self.folder is None:
            self._staged.setdefault(rnd, {})[k] = state
            return
        if not state and not (self._committed_dir() / f"{k}{_SUFFIX}").is_file():
            return  # nothing to keep (FedAvg without error feedback): no file at all
        folder = self._staging_dir(rnd)
        folder.mkdir(parents=True, exist_ok=True)
        save_state(folder / f"{k}{_SUFFIX}", state)

    def finish(self) -> None:
        """Training is over and its last round checkpointed: fold every staged round in."""
        for r in self._staged_rounds():
            self._commit(r)

    def _commit(self, rnd: int) -> None:
        """Move round ``rnd``'s states over the committed ones (file by file, so a commit
        interrupted half way is finished by the next one)."""
        if self.folder is None:
            self._committed.update(self._staged.pop(rnd, {}))
            return
        src = self._staging_dir(rnd)
        dst = self._committed_dir()
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.glob(f"*{_SUFFIX}")):
            os.replace(f, dst / f.name)
        shutil.rmtree(src, ignore_errors=True)

    def _drop(self, rnd: int) -> None:
        if self.folder is None:
            self._staged.pop(rnd, None)
        else:
            shutil.rmtree(self._staging_dir(rnd), ignore_errors=True)

    def clear(self) -> None:
        self._committed.clear()
        self._staged.clear()
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)

    # -- checkpoint ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint holds: the round the states are of (and, in memory, them)."""
        out: dict[str, Any] = {"round": self.round}
        if self.folder is None:
            states = dict(self._committed)
            for r in sorted(self._staged):
                states.update(self._staged[r])
            out["client_states"] = states
        return out

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume at the checkpoint's round: its staged states are folded in, later ones (a
        round that never checkpointed) dropped. A checkpoint from before the store (its
        ``client_states`` whole) is written into it."""
        rnd = int(d.get("round", -1))
        for r in self._staged_rounds():
            if r <= rnd:
                self._commit(r)
            else:
                self._drop(r)
        self.round = rnd
        states = d.get("client_states")
        if states is not None:
            if self.folder is None:
                self._committed = dict(states)
            else:
                self._committed_dir().mkdir(parents=True, exist_ok=True)
                for k, state in states.items():
                    save_state(self._committed_dir() / f"{int(k)}{_SUFFIX}", state)

    def items(self) -> Iterator[tuple[int, dict]]:
        """Every committed client state, by client id (reads them all: for inspection and
        tests, never in a round)."""
        if self.folder is None:
            yield from sorted(self._committed.items())
            return
        folder = self._committed_dir()
        if not folder.is_dir():
            return
        for k in sorted(int(f.name[:-len(_SUFFIX)]) for f in folder.glob(f"*{_SUFFIX}")):
            yield k, load_state(folder / f"{k}{_SUFFIX}")

    def disk_bytes(self) -> int:
        """Bytes the store's files take (0 in memory)."""
        if self.folder is None or not self.folder.exists():
            return 0
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())
