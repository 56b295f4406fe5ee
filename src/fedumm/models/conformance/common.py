"""What every backbone's checks share: the report's records, and readers that take a
checkpoint folder's facts from its small files and safetensors headers (no weights read)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

OK, WARN, FAIL = "OK", "WARN", "FAIL"
INDEX = "model.safetensors.index.json"
# the files a listing names when present, in this order (weights are listed apart)
LISTED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
          "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
          "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
          "chat_template.json", "SHA256SUMS.json")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    check: str
    status: str  # OK, WARN or FAIL
    message: str

    def line(self) -> str:
        return f"{self.status:<5} {self.check}: {self.message}"


@dataclass
class Report:
    """The checks of one folder, and the backbone kind they were made for."""

    path: str
    kind: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "ok": not self.failed,
                "checks": [asdict(c) for c in self.checks]}

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]


def guarded(name: str, fn: Callable[[], Iterable[Check]]) -> Iterator[Check]:
    """``fn``'s checks; anything it raises (a file cut short, a header that does not parse)
    becomes a FAIL of check ``name`` instead of stopping the report."""
    try:
        yield from fn()
    except Exception as exc:  # noqa: BLE001 (every failure is a finding of the report)
        yield Check(name, FAIL, f"{type(exc).__name__}: {exc}")


def read_json(file: Path) -> dict[str, Any]:
    data = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{file.name} does not hold a JSON object")
    return data


def listing(path: Path, weights: WeightIndex | None, extra: Iterable[str] = ()) -> str:
    """``config.json, model.safetensors (2 shards), tokenizer.json, ...``: what is there."""
    names = [n for n in LISTED if (path / n).is_file()]
    if weights is not None:
        names.insert(1, weights.describe())
    return ", ".join([*names, *(n for n in extra if (path / n.rstrip("/")).exists())])


@dataclass(frozen=True)
class WeightIndex:
    """The tensors of a folder's safetensors weights: name -> file, from the index or the
    file's header."""

    files: tuple[Path, ...]
    where: Mapping[str, Path]
    sharded: bool

    def describe(self) -> str:
        if self.sharded:
            return f"{INDEX.rsplit('.', 2)[0]} ({len(self.files)} shards)"
        return self.files[0].name

    def shape(self, key: str) -> list[int]:
        with safe_open(str(self.where[key]), framework="pt") as st:
            return list(st.get_slice(key).get_shape())

    def shapes(self, keys: Iterable[str]) -> dict[str, list[int]]:
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                out.update({k: list(st.get_slice(k).get_shape()) for k in ks})
        return out

    def dtypes(self) -> list[str]:
        """The dtypes of the tensors, most frequent first."""
        counts: dict[str, int] = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    d = st.get_slice(k).get_dtype()
                    counts[d] = counts.get(d, 0) + 1
        return sorted(counts, key=lambda d: -counts[d])

    def tensor(self, key: str):
        """One tensor, read alone (the rest of its file stays on disk)."""
        with safe_open(str(self.where[key]), framework="pt") as st:
            return st.get_tensor(key)


def weight_index(path: Path) -> WeightIndex | None:
    """The folder's safetensors weights (None: it has none); a listed shard that is missing or
    a header that does not parse is an error naming the file."""
    if (path / INDEX).is_file():
        weight_map = read_json(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{INDEX} has no weight_map")
        files = tuple(sorted({path / f for f in weight_map.values()}))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{INDEX} lists shards that are missing: "
                                    + ", ".join(missing))
        for f in files:  # every header parses
            with safe_open(str(f), framework="pt"):
                pass
        return WeightIndex(files, {k: path / f for k, f in weight_map.items()}, True)
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(str(single), framework="pt") as st:
        keys = list(st.keys())  # noqa: SIM118
    return WeightIndex((single,), dict.fromkeys(keys, single), False)


def weights_check(index: WeightIndex | None, what: str) -> Check:
    if index is None:
        return Check("weights", FAIL, f"no model.safetensors or {INDEX}: {what}")
    size = sum(f.stat().st_size for f in index.files)
    return Check("weights", OK, f"{len(index.where):,} tensors ({', '.join(index.dtypes())}) "
                 f"in {len(index.files)} file{'s' if len(index.files) > 1 else ''}, "
                 f"{size / 2**20:,.1f} MiB")


def vocabulary(path: Path) -> dict[str, int] | None:
    """token -> id of the folder's tokenizer (its model's vocabulary and its added tokens),
    from ``tokenizer.json`` or ``vocab.json`` + ``tokenizer_config.json``; None: neither is
    there (a sentencepiece ``tokenizer.model`` alone is not read)."""
    vocab: dict[str, int] = {}
    if (path / "tokenizer.json").is_file():
        tok = read_json(path / "tokenizer.json")
        model_vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):  # BPE, WordLevel, WordPiece
            vocab.update({str(k): int(v) for k, v in model_vocab.items()})
        elif isinstance(model_vocab, list):  # Unigram: [piece, score] rows
            vocab.update({str(row[0]): i for i, row in enumerate(model_vocab)})
        vocab.update({a["content"]: int(a["id"]) for a in tok.get("added_tokens") or ()})
    elif (path / "vocab.json").is_file():
        vocab.update({str(k): int(v) for k, v in read_json(path / "vocab.json").items()})
    else:
        return None
    if (path / "tokenizer_config.json").is_file():
        added = read_json(path / "tokenizer_config.json").get("added_tokens_decoder") or {}
        vocab.update({a["content"]: int(i) for i, a in added.items() if isinstance(a, dict)})
    return vocab


def tokens_check(vocab: dict[str, int] | None, needed: Mapping[str, str],
                 vocab_size: int | None) -> Check:
    """The tokens ``needed`` (token -> what it is for) are in ``vocab``, whose ids fit the
    model's embedding of ``vocab_size`` rows."""
    if vocab is None:
        return Check("tokenizer", FAIL, "no tokenizer.json (or vocab.json): the tokenizer "
                     "cannot be read")
    missing = [f"{t} ({why})" for t, why in needed.items() if t not in vocab]
    if missing:
        return Check("tokenizer", FAIL, "lacks " + "; ".join(missing))
    top = max(vocab.values(), default=-1)
    if vocab_size is not None and top >= vocab_size:
        return Check("tokenizer", FAIL, f"token ids go up to {top}, but the model's embedding "
                     f"has {vocab_size} rows (config vocab_size)")
    size = f" (config vocab_size {vocab_size})" if vocab_size is not None else ""
    return Check("tokenizer", OK, f"{len(vocab):,} tokens{size}; has "
                 + ", ".join(needed))


def chat_template(path: Path) -> tuple[str, str] | None:
    """(template, the file it is in), from where transformers looks for it."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        if (path / name).is_file():
            t = read_json(path / name).get("chat_template")
            if isinstance(t, list):  # named templates: the default one
                t = next((x.get("template") for x in t if x.get("name") == "default"), None)
            if isinstance(t, str) and t:
                return t, name
    return None


def template_check(path: Path, needed: Iterable[str], what: str) -> Check:
    found = chat_template(path)
    if found is None:
        return Check("chat template", FAIL, "none (no chat_template.jinja, and no "
                     "chat_template key in tokenizer_config.json / processor_config.json)")
    text, where = found
    missing = [t for t in needed if t not in text]
    if missing:
        return Check("chat template", WARN, f"{where} does not write {', '.join(missing)}: "
                     f"not {what}, so prompts differ from the backbone's")
    return Check("chat template", OK, f"{where}: {what}")


def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def preset_check(actual: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]],
                 kind: str) -> Check:
    """OK naming the preset whose keys all match ``actual`` (flat), or a WARN naming the
    nearest preset and the keys that differ from it (an unknown size is no error)."""
    diffs = {name: [(k, actual.get(k, "absent"), v) for k, v in want.items()
                    if actual.get(k, "absent") != v]
             for name, want in presets.items()}
    name = min(diffs, key=lambda n: len(diffs[n]))  # the first of equals: the presets' order
    if not diffs[name]:
        return Check("config", OK, f"matches {name} ({len(presets[name])} keys compared)")
    shown = ", ".join(f"{k}={a} ({name}: {b})" for k, a, b in diffs[name][:6])
    more = f" and {len(diffs[name]) - 6} more" if len(diffs[name]) > 6 else ""
    return Check("config", WARN, f"no {kind} preset matches; nearest {name}, which differs in "
                 f"{shown}{more}")
