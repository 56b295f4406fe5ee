"""Words of a run's data that its backbone's tokenizer does not know (see
:mod:`fedumm.data.vocabulary` and the optional ``Backbone.unknown_words``).

* :func:`check_answers_known`: a run stops before training when training answers use unknown
  words (the backbone could never produce them), unless ``data.allow_unknown_answers``.
* :func:`vocabulary_report`: what the start of a local run prints and writes to ``data.json``.
* :func:`data_check_vocabulary`: what ``fedumm data check`` reports, with the backbone built
  here (a failure to build it is reported, not raised).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedumm.config import Config
from fedumm.data.records import Sample
from fedumm.data.vocabulary import UnknownAnswersError, check_answers, unknown_word_report
from fedumm.fl.client import ClientData
from fedumm.models.kinds import build_backbone
from fedumm.models.protocol import Backbone


def check_answers_known(cfg: Config, backbone: Backbone, train: Sequence[Sample]) -> None:
    """Refuse (:class:`~fedumm.data.vocabulary.UnknownAnswersError`) training answers with
    words the backbone's tokenizer does not know, unless ``data.allow_unknown_answers``; a
    backbone without ``unknown_words`` is not checked."""
    unknown = getattr(backbone, "unknown_words", None)
    if unknown is None or cfg.data.allow_unknown_answers:
        return
    check_answers(unknown_word_report({"train": train}, unknown, fields=("answer",)), False)


def vocabulary_report(backbone: Backbone, clients: Sequence[ClientData], val: Sequence[Sample]
                      ) -> dict[str, Any] | None:
    """The unknown-word report of the training data as the clients hold it and of the
    held-out data; None for a backbone without ``unknown_words``."""
    unknown = getattr(backbone, "unknown_words", None)
    if unknown is None:
        return None
    train = [s for c in clients for s in (*c.train, *c.val)]
    return unknown_word_report({"train": train, "val": val}, unknown)


def data_check_vocabulary(cfg: Config, splits: Mapping[str, Sequence[Sample]]
                          ) -> dict[str, Any]:
    """``{"backbone": kind, "train": ..., "val": ..., "run_stops": message or None}`` with the
    config's backbone built here, or ``{"backbone": kind, "error": why}`` where it cannot be
    built or has no ``unknown_words``."""
    out: dict[str, Any] = {"backbone": cfg.backbone.kind}
    try:
        backbone = build_backbone(cfg.backbone)
    except Exception as exc:  # noqa: BLE001 - the data check goes on without it
        out["error"] = f"the backbone could not be built ({type(exc).__name__}: {exc})"
        return out
    unknown = getattr(backbone, "unknown_words", None)
    if unknown is None:
        out["error"] = f"backbone.kind={cfg.backbone.kind} has no unknown_words"
        return out
    out.update(unknown_word_report(splits, unknown))
    try:
        check_answers(out, cfg.data.allow_unknown_answers)
        out["run_stops"] = None
    except UnknownAnswersError as exc:
        out["run_stops"] = str(exc)
    return out
