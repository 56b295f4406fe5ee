"""Sample records shared by the generator, the readers and the partitioners.

The field names follow the official files: VQA v2 questions/annotations and GenEval's
``evaluation_metadata.jsonl``, so that generated and real data go through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ANSWER_TYPES = ("yes/no", "number", "other")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class VQARecord:
    """One understanding sample: a question about an image with 10 human-style answers."""

    question_id: int
    image_id: int
    question: str
    question_type: str
    answer_type: str
    multiple_choice_answer: str
    answers: list[str]
    family: str = ""  # ShapesWorld question family (existence, counting, ...); "" for real data

    def annotation(self) -> dict[str, Any]:
        """The record as an entry of VQA v2's ``annotations`` list."""
        return {
            "question_id": self.question_id,
            "image_id": self.image_id,
            "question_type": self.question_type,
            "answer_type": self.answer_type,
            "multiple_choice_answer": self.multiple_choice_answer,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(self.answers)
            ],
        }

    def question_entry(self) -> dict[str, Any]:
        """The record as an entry of VQA v2's ``questions`` list."""
        return {"question_id": self.question_id, "image_id": self.image_id,
                "question": self.question}


@dataclass
class GenEvalRecord:
    """One generation prompt in GenEval's structure (``include`` / ``exclude`` clauses)."""

    tag: str
    prompt: str
    include: list[dict[str, Any]]
    exclude: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tag": self.tag, "include": self.include}
        if self.exclude:
            out["exclude"] = self.exclude
        out["prompt"] = self.prompt
        return out


@dataclass(frozen=True, slots=True, eq=False)
class ImageRef:
    """Where a sample's image is: a file, a member of a tar archive, or an array in memory.

    Nothing is read until :meth:`load`, so a reader can index millions of records."""

    path: str = ""  # an image file, or the tar archive when ``member`` is set
    member: str = ""  # the member's name inside the tar archive
    array: Any = None  # uint8 (H, W, 3) in memory (generated data)
    offset: int = -1  # where the member's bytes start in the archive, when indexed
    size: int = 0  # and how many there are (a direct read instead of a scan of the archive)
    table: Any = None  # a table of images (``.image(row) -> array``), e.g. a HF dataset column
    row: int = -1

    def load(self) -> Any:
        """The image as a uint8 (H, W, 3) RGB array."""
        if self.array is not None:
            return self.array
        if self.table is not None:
            return self.table.image(self.row)
        from fedumm.data.images import load_image

        return load_image(self.path, self.member, self.offset, self.size)

    def describe(self) -> str:
        if self.array is not None:
            return "<in memory>"
        if self.table is not None:
            return f"{self.path}[{self.row}]"
        return f"{self.path}::{self.member}" if self.member else self.path


@dataclass(frozen=True, slots=True, eq=False)
class Sample:
    """One training or evaluation record, whatever file format it came from.

    ``task`` is ``understanding`` (``text`` is a question about ``image``, ``answer`` the
    target) or ``generation`` (``text`` is a prompt, ``image`` the target). ``text`` None or
    ``image`` None mark a missing modality. ``context`` is an understanding sample's text
    modality where its data has one (a meme's caption, a tweet, a scene description; None when
    missing), given to the model with the question. ``answers`` keeps the 10 human answers
    where known (the official VQA metric); ``labels`` holds what partitioners can split on
    (answer, question_type, answer_type, family, tag, domain, object_class, ...); ``spec``
    GenEval's metadata record (``GenEvalRecord.to_json``) where known, for scoring generated images.
    """

    id: str
    task: str
    text: str | None
    image: ImageRef | None
    answer: str = ""
    answers: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] | None = None
    context: str | None = None

    def load_image(self) -> Any:
        if self.image is None:
            raise ValueError(f"sample {self.id} has no image")
        return self.image.load()
