"""Understanding samples from conversation files (JSON list or JSONL), in the layouts of the
tools users fine-tune with:

* LLaVA: ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``, the
  question holding an ``<image>`` placeholder;
* LLaMA-Factory sharegpt (OpenAI style): ``{"messages": [{"role": "user"|"assistant"|"system",
  "content": str}], "images": [path]}``;
* TRL: ``{"messages": [{"role", "content": [{"type": "image"} | {"type": "text", "text"}]}],
  "images": [path]}``;
* question/answer records: ``{"image", "question", "answer"}`` (JSONL or CSV), optionally with
  ``answers`` (the 10 human answers of VQA) and label columns.

A multi-turn conversation is split into its turns: each user turn with the assistant's reply is
one sample about the same image. Earlier turns are not given as context (every sample is one
question about one image, which is what the backbones train and the VQA metric scores). A
record with more than one image is refused: the backbones take one image per question.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fedumm.data.readers.common import (
    DataFileError,
    ImageResolver,
    iter_records,
    require,
    table_format,
    understanding_labels,
)
from fedumm.data.records import ImageRef, Sample
from fedumm.data.scenarios import UNDERSTANDING
from fedumm.registry import READERS

LAYOUTS = ("llava", "sharegpt", "trl", "qa")
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "model")
IMAGE_TOKEN = "<image>"


def detect_layout(rec: Any, path: Path, where: str) -> str:
    """Which conversation layout a record is in (from its keys)."""
    if isinstance(rec, dict):
        if "conversations" in rec:
            return "llava"
        if isinstance(rec.get("messages"), list) and rec["messages"]:
            content = rec["messages"][0].get("content") if isinstance(rec["messages"][0],
                                                                      dict) else None
            return "trl" if isinstance(content, list) else "sharegpt"
        if "question" in rec or "answer" in rec:
            return "qa"
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise DataFileError(path, where, f"not a conversation record (has {keys}); expected "
                        "LLaVA 'conversations', sharegpt/TRL 'messages', or 'question' + "
                        "'answer' (+ 'image')")


def _text(content: Any, path: Path, where: str) -> tuple[str, int]:
    """A message's text and how many images it refers to (TRL typed parts or a string with
    ``<image>`` placeholders)."""
    if isinstance(content, str):
        return content.replace(IMAGE_TOKEN, "").strip(), content.count(IMAGE_TOKEN)
    if isinstance(content, list):
        texts, n_images = [], 0
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind == "image":
                n_images += 1
            else:
                raise DataFileError(path, where, f"content part {part!r}: expected "
                                    "{'type': 'text', 'text': ...} or {'type': 'image'}")
        return " ".join(t.strip() for t in texts).strip(), n_images
    raise DataFileError(path, where, f"message content {content!r}: expected a string or a "
                        "list of typed parts")


def _turns(rec: dict, layout: str, path: Path, where: str) -> list[tuple[str, str]]:
    """(question, answer) for every user turn followed by an assistant turn."""
    if layout == "llava":
        msgs, role_key, text_key = rec["conversations"], "from", "value"
    else:
        msgs, role_key, text_key = rec["messages"], "role", "content"
    if not isinstance(msgs, list):
        raise DataFileError(path, where, f"{'conversations' if layout == 'llava' else 'messages'}"
                            " is not a list")
    out, question = [], None
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise DataFileError(path, where, f"message {j}: expected keys {role_key!r} and "
                                f"{text_key!r}, got {m!r}"[:300])
        role = str(m[role_key]).lower()
        if role == "system":
            continue
        text, _ = _text(m[text_key], path, f"{where} message {j}")
        if role in USER_ROLES:
            question = text
        elif role in ASSISTANT_ROLES:
            if question is None:
                raise DataFileError(path, where, f"message {j}: an assistant turn with no user "
                                    "turn before it")
            out.append((question, text))
            question = None
        else:
            raise DataFileError(path, where, f"message {j}: unknown role {role!r}; expected "
                                f"one of {USER_ROLES + ASSISTANT_ROLES + ('system',)}")
    if not out:
        raise DataFileError(path, where, "no user turn answered by an assistant turn")
    return out


def record_image(rec: dict, layout: str, path: Path, where: str) -> object:
    """The record's one image as stored (a path, or whatever a table holds; None for a
    text-only record)."""
    value = rec.get("image") if layout in ("llava", "qa") else rec.get("images")
    if isinstance(value, list):
        if len(value) > 1:
            raise DataFileError(path, where, f"{len(value)} images; fedumm trains one image "
                                "per question (split or filter such records)")
        value = value[0] if value else None
    if isinstance(value, dict) and "path" in value and not value.get("bytes"):
        value = value["path"]  # {"path": ...} as some exporters write
    return value if value not in ("", None) else None


def record_samples(rec: dict, layout: str, rid: str, image: ImageRef | None, path: Path,
                   where: str) -> list[Sample]:
    """The understanding samples of one record: one per answered user turn."""
    if layout == "qa":
        require(rec, ("question", "answer"), path, where, "question/answer record")
        answers = rec.get("answers") or ()
        if isinstance(answers, str):  # a CSV cell: answers separated by |
            answers = answers.split("|")
        turns = [(str(rec["question"]), str(rec["answer"]))]
    else:
        answers = ()
        turns = _turns(rec, layout, path, where)
    answers = tuple(str(x.get("answer", "") if isinstance(x, dict) else x) for x in answers)
    return [Sample(id=rid if len(turns) == 1 else f"{rid}#{t}", task=UNDERSTANDING, text=q,
                   image=image, answer=sys.intern(a) if len(a) <= 32 else a, answers=answers,
                   labels=understanding_labels(q, a, rec))
            for t, (q, a) in enumerate(turns)]


def read_conversations(path: Path, resolve: ImageResolver, max_samples: int = 0
                       ) -> list[Sample]:
    """Every turn of every record of one conversation file, as understanding samples."""
    out: list[Sample] = []
    layout = None
    for where, rec in iter_records(path):
        kind = detect_layout(rec, path, where)
        layout = layout or kind
        if kind != layout:
            raise DataFileError(path, where, f"a {kind} record in a file whose first record "
                                f"is {layout}")
        rid = str(rec.get("id", rec.get("question_id", f"{path.stem}:{where.split()[-1]}")))
        value = record_image(rec, layout, path, where)
        out += record_samples(rec, layout, rid, resolve(value, path, where) if value else None,
                              path, where)
        if max_samples and len(out) >= max_samples:
            return out[:max_samples]
    return out


READERS.register("conversations", table_format(
    read_conversations, UNDERSTANDING, "a .json/.jsonl/.csv conversation file"))
