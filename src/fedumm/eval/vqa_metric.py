"""Re-implementation of the official VQA v2 accuracy metric.

Mirrors ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA (master, after
the 2021 "Fixed processing answers bug" commit) rule for rule, including its quirks:

* answers (GT and result) get ``'\\n'``/``'\\t'`` replaced by a space and are stripped;
* punctuation / digit / article / contraction processing is applied to the GT answers *and*
  the result answer only when the GT answers are not all identical; otherwise the raw strings
  are compared (so a result ``"Yes"`` does not match ten GT ``"yes"``);
* ``periodStrip`` is written ``(?!<=\\d)(\\.)(?!\\d)``: the intended look-behind is a look-ahead,
  so every period not followed by a digit is removed, and ``re.UNICODE`` is passed where
  ``sub`` expects ``count``, so at most 32 periods are removed;
* ``processPunctuation`` tests its conditions on the *input* text, and any ``digit,digit`` in
  it makes every punctuation mark be deleted instead of replaced by a space;
* the contractions with capitals (``"Im"``, ``"Ive"``, ...) never fire because words are
  lower-cased first;
* the script runs under Python 2: ``\\d`` is ASCII-only (no ``re.UNICODE`` flag reaches the
  patterns) and ``round`` sends exact halves away from zero (``round(3.125, 2) == 3.13``).

The answer processing itself is :mod:`fedumm.data.answers` (the readers label answers with the
same rules); this module applies it the way ``vqaEval.py`` does.

Per-question accuracy is the mean, over the 10 GT answers, of ``min(1, #other GT answers equal
to the result / 3)``; the reported numbers are percentages rounded to 2 decimals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from fedumm.data.answers import (
    clean_whitespace,
    normalize_answer,
    process_digit_article,
    process_punctuation,
)
from fedumm.data.official import VQARecord
from fedumm.data.readers.vqa_v2_files import read_json

__all__ = ["evaluate", "evaluate_files", "normalize_answer", "score_answers"]

PRECISION = 2  # the official ``n``

def _py2_round(x: float, ndigits: int = PRECISION) -> float:
    """Python 2's ``round``: exact binary value, halfway cases away from zero."""
    # Python 3's round sends exact ties to even (3.125 -> 3.12); the official script ran on 2.7.
    return float(Decimal(x).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def _plain_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum (Python >= 3.12's ``sum`` compensates, Python 2's did not)."""
    total = 0.0
    for v in values:
        total += v
    return total


def _question_accuracy(gt_answers: list[dict[str, Any]], res_ans: str) -> float:
    """Accuracy in [0, 1] of one result answer against its GT answer dicts."""
    # Copies, because the official mutates the annotation dicts in place.
    gts = [dict(a, answer=clean_whitespace(a["answer"])) for a in gt_answers]
    res = clean_whitespace(res_ans)
    if len({a["answer"] for a in gts}) > 1:
        for a in gts:
            a["answer"] = process_digit_article(process_punctuation(a["answer"]))
        res = process_digit_article(process_punctuation(res))
    accs = []
    for gt in gts:
        # Whole-dict inequality as in the official (answer_id normally makes each dict unique).
        others = [o for o in gts if o != gt]
        matching = sum(1 for o in others if o["answer"] == res)
        accs.append(min(1.0, matching / 3))
    return _plain_sum(accs) / len(accs)


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require(entry: Any, keys: tuple[str, ...], where: str, index: int) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} entry {index} is not an object: {_show(entry)}")
    for key in keys:
        if key not in entry:
            raise ValueError(f"{where} entry {index} has no key {key!r}")


def _typed(entry: Mapping, key: str, kinds: tuple[type, ...], what: str, where: str,
           index: int) -> Any:
    """``entry[key]`` when it is one of ``kinds`` (never a bool), else a ValueError naming the
    file, the entry and the key. Ids and types key dicts, so a list there would otherwise be a
    TypeError deep inside the scoring."""
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{where} entry {index}: {key} is {_show(value)}; expected {what}")
    return value


_ID = ((int, str), "an integer (or string) question id")


def _ids_text(ids: Iterable[Any], limit: int = 20) -> str:
    ids = sorted(ids, key=repr)
    more = f" ... ({len(ids)} in all)" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in ids[:limit]) + more


def evaluate(
    questions: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    results: list[dict[str, Any]],
    sources: tuple[str, str, str] = ("questions", "annotations", "results"),
) -> dict[str, Any]:
    """Score results with the official VQA v2 accuracy.

    Parameters
    ----------
    questions : list of dict
        Entries of the official ``questions`` list; every annotated question must appear.
    annotations : list of dict
        Entries of the official ``annotations`` list; all of them are evaluated, in order.
    results : list of dict
        ``{"question_id": int, "answer": str}`` entries. As in the official ``loadRes``, their
        question ids must be exactly the annotated ones; a repeated id keeps its last answer.
    sources : (str, str, str)
        What errors call the questions, annotations and results (their files' paths).

    Returns
    -------
    dict
        ``overall`` (float), ``perAnswerType`` and ``perQuestionType`` (type -> float) and
        ``perQuestion`` (question id -> float, the official ``evalQA``); all in percent, rounded
        to 2 decimals like the official script.

    Raises
    ------
    ValueError
        On malformed entries, duplicated annotation ids, annotated questions absent from
        ``questions``, or results that do not cover exactly the annotated question ids.
    """
    q_src, a_src, r_src = sources
    if not isinstance(annotations, list) or not annotations:
        raise ValueError(f"{a_src}: no annotations to evaluate")
    ann_by_id: dict[Any, dict[str, Any]] = {}
    for i, ann in enumerate(annotations):
        _require(ann, ("question_id", "question_type", "answer_type", "answers"), a_src, i)
        qid = _typed(ann, "question_id", *_ID, a_src, i)
        _typed(ann, "question_type", (str,), "a string", a_src, i)
        _typed(ann, "answer_type", (str,), "a string", a_src, i)
        if qid in ann_by_id:
            raise ValueError(f"{a_src}: question id {qid!r} appears more than once")
        if not isinstance(ann["answers"], list) or not ann["answers"]:
            raise ValueError(f"{a_src} entry {i} (question {qid!r}) has no answers")
        for j, a in enumerate(ann["answers"]):
            _require(a, ("answer",), f"{a_src} entry {i} answers", j)
            _typed(a, "answer", (str,), "a string", f"{a_src} entry {i} answers", j)
        ann_by_id[qid] = ann
    if not isinstance(questions, list):
        raise ValueError(f"{q_src}: not a list of questions")
    question_ids = set()
    for i, q in enumerate(questions):
        _require(q, ("question_id",), q_src, i)
        question_ids.add(_typed(q, "question_id", *_ID, q_src, i))
    unasked = set(ann_by_id) - question_ids
    if unasked:
        raise ValueError(f"annotated question ids missing from {q_src}: {_ids_text(unasked)}")

    if not isinstance(results, list):
        raise ValueError(f"{r_src}: results is not an array of objects")
    res_by_id: dict[Any, str] = {}
    for i, r in enumerate(results):
        _require(r, ("question_id", "answer"), r_src, i)
        qid = _typed(r, "question_id", *_ID, r_src, i)
        res_by_id[qid] = _typed(r, "answer", (str,), "a string (the answer)", r_src, i)
    missing = set(ann_by_id) - set(res_by_id)
    extra = set(res_by_id) - set(ann_by_id)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no result for question ids {_ids_text(missing)}")
        if extra:
            parts.append(f"results for question ids not in the annotations {_ids_text(extra)}")
        raise ValueError(f"{r_src}: results do not correspond to the annotations: "
                         + "; ".join(parts))

    all_accs: list[float] = []
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    per_question: dict[Any, float] = {}
    for qid, ann in ann_by_id.items():
        acc = _question_accuracy(ann["answers"], res_by_id[qid])
        all_accs.append(acc)
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)
        per_question[qid] = _py2_round(100 * acc)

    def pct(accs: list[float]) -> float:
        return _py2_round(100 * _plain_sum(accs) / len(accs))  # official operation order

    return {
        "overall": pct(all_accs),
        "perAnswerType": {t: pct(a) for t, a in by_atype.items()},
        "perQuestionType": {t: pct(a) for t, a in by_qtype.items()},
        "perQuestion": per_question,
    }


def _load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQA file not found: {path}")
    return read_json(path)


def _entries(data: Any, key: str, path: str | Path) -> list[dict[str, Any]]:
    """The list under ``key`` of an official file (a bare list is accepted too)."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{path}: missing top-level key {key!r}")
    if not isinstance(data[key], list):
        raise ValueError(f"{path}: {key!r} is not a list")
    return data[key]


def evaluate_files(
    questions_path: str | Path, annotations_path: str | Path, results_path: str | Path
) -> dict[str, Any]:
    """:func:`evaluate` on the official questions / annotations files and a results file.

    Parameters
    ----------
    questions_path, annotations_path : str or Path
        ``v2_OpenEnded_mscoco_<split>_questions.json`` and ``v2_mscoco_<split>_annotations.json``.
    results_path : str or Path
        JSON array of ``{"question_id": int, "answer": str}``.

    Returns
    -------
    dict
        As :func:`evaluate`.
    """
    questions = _entries(_load_json(questions_path), "questions", questions_path)
    annotations = _entries(_load_json(annotations_path), "annotations", annotations_path)
    results = _load_json(results_path)
    if not isinstance(results, list):
        raise ValueError(f"{results_path}: results is not an array of objects")
    sources = (str(questions_path), str(annotations_path), str(results_path))
    return evaluate(questions, annotations, results, sources)


def score_answers(predictions: Mapping[int, str], records: list[VQARecord]) -> dict[str, Any]:
    """:func:`evaluate` on records and a ``question_id -> answer`` mapping.

    Parameters
    ----------
    predictions : mapping of int to str
        One answer per record; ids outside ``records`` are an error, as in the official script.
    records : list of VQARecord
        The evaluated questions with their 10 GT answers.

    Returns
    -------
    dict
        As :func:`evaluate`.
    """
    results = [{"question_id": qid, "answer": ans} for qid, ans in predictions.items()]
    return evaluate(
        [r.question_entry() for r in records], [r.annotation() for r in records], results
    )
