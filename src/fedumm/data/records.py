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
