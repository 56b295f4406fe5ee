"""The official files' own record schemas: an entry of VQA v2's questions / annotations and
a line of GenEval's ``evaluation_metadata.jsonl``. Generated and real data both produce them,
their readers and writers (:mod:`fedumm.data.readers.vqa_v2_files`,
:mod:`fedumm.data.readers.geneval_files`) read and write them, and the official scorers take
them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
POSITION_RELATIONS = ("left of", "right of", "above", "below")


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
