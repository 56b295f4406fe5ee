"""The one record type every data source becomes: a :class:`Sample` with its :class:`ImageRef`.

Readers (:mod:`fedumm.data.readers`, ShapesWorld included) produce them; partitioners, clients,
backbones and evaluation consume them, so no code past the readers depends on a file format.
The official files' own record types (VQA v2's, GenEval's) live with their formats, in
:mod:`fedumm.data.readers.vqa_v2` and :mod:`fedumm.data.readers.geneval_files`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
