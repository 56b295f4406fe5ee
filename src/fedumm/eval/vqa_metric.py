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

What is accepted is what ``vqa.py`` / ``vqaEval.py`` accept, and everything else is one
``ValueError`` naming the file and the entry (never a NaN score):

* question ids are integers, as in the official files; a JSON number with an integral value
  (``42.0``) is the same id, as it is for the official set / dict lookups. A results file whose
  ids are strings (``"42"``) against integer annotation ids is refused, with that named: the
  official ``loadRes`` asserts that the ids are exactly the annotated ones, and ``"42" != 42``;
* a result ``answer`` must be a string. A number (``2`` for "how many") is refused, not turned
  into ``"2"``: the official script calls ``resAns.replace`` and stops on it, so a file that
  scored here would fail on the evaluation server;
* results must answer exactly the annotated questions (an empty list, missing or extra ids are
  refused, as ``loadRes`` asserts); a repeated id keeps its last answer, as ``createIndex``
  does; extra keys (``image_id``, ``question``, scores) are ignored;
* with a questions file whose ``task_type`` is ``"Multiple Choice"``, each answer must be one of
  its question's ``multiple_choices`` (the official assertion);
* one check is stricter than the official: every annotated question must be in the questions
  file (the official reads it only for multiple choice), because a questions file of another
  split is a mistake worth naming.
"""

from __future__ import annotations

import json
import math
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


def _question_id(entry: Mapping, where: str, index: int) -> Any:
    """The entry's question id: an int or a str; an integral float (``42.0``) is the int
    (``42.0 == 42`` and hashes alike, so the official lookups take it too)."""
    value = entry["question_id"]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return _typed(entry, "question_id", *_ID, where, index)


def _result_answer(entry: Mapping, where: str, index: int) -> str:
    value = entry["answer"]
    if isinstance(value, str):
        return value
    hint = ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        hint = (f" (write it as the string {json.dumps(str(value))}: the official evaluator "
                "calls str methods on every answer and stops on a number)")
    raise ValueError(f"{where} entry {index} (question {entry.get('question_id')!r}): answer "
                     f"is {_show(value)}; expected a string{hint}")


def _ids_text(ids: Iterable[Any], limit: int = 20) -> str:
    ids = sorted(ids, key=repr)
    more = f" ... ({len(ids)} in all)" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in ids[:limit]) + more


def evaluate(
    questions: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    results: list[dict[str, Any]],
    sources: tuple[str, str, str] = ("questions", "annotations", "results"),
    multiple_choice: bool = False,
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
    multiple_choice : bool
        The questions file's ``task_type`` is ``"Multiple Choice"``: each answer must be one of
        its question's ``multiple_choices``.

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
        qid = _question_id(ann, a_src, i)
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
        question_ids.add(_question_id(q, q_src, i))
    unasked = set(ann_by_id) - question_ids
    if unasked:
        raise ValueError(f"annotated question ids missing from {q_src}: {_ids_text(unasked)}")

    if not isinstance(results, list):
        raise ValueError(_not_a_list(results, r_src))
    if not results:
        raise ValueError(f"{r_src}: no results (an empty list); the official evaluator needs "
                         f"one answer for each of the {len(ann_by_id)} annotated questions")
    choices = _choices(questions, q_src) if multiple_choice else {}
    res_by_id: dict[Any, str] = {}
    for i, r in enumerate(results):
        _require(r, ("question_id", "answer"), r_src, i)
        qid = _question_id(r, r_src, i)
        res_by_id[qid] = _result_answer(r, r_src, i)
        if multiple_choice and qid in choices and res_by_id[qid] not in choices[qid]:
            raise ValueError(f"{r_src} entry {i} (question {qid!r}): answer "
                             f"{_show(res_by_id[qid])} is not one of the question's "
                             f"multiple_choices in {q_src}")
    missing = set(ann_by_id) - set(res_by_id)
    extra = set(res_by_id) - set(ann_by_id)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no result for question ids {_ids_text(missing)}")
        if extra:
            parts.append(f"results for question ids not in the annotations {_ids_text(extra)}")
        if any(isinstance(q, str) for q in extra) and any(isinstance(q, int) for q in missing):
            parts.append("the results' question ids are strings and the annotations' are "
                         "integers: write them as JSON numbers")
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

    overall = pct(all_accs)
    if not math.isfinite(overall):  # cannot happen with the checks above; never print a NaN
        raise ValueError(f"{r_src}: the overall accuracy is {overall} (nothing was scored)")
    return {
        "overall": overall,
        "perAnswerType": {t: pct(a) for t, a in by_atype.items()},
        "perQuestionType": {t: pct(a) for t, a in by_qtype.items()},
        "perQuestion": per_question,
    }


def _not_a_list(data: Any, src: str) -> str:
    kind = {dict: "a JSON object", str: "a string", type(None): "null"}.get(
        type(data), type(data).__name__)
    return (f"{src}: results is {kind}, not an array of objects; expected "
            '[{"question_id": <int>, "answer": <str>}, ...] (the official loadRes asserts '
            "a list)")


def _choices(questions: list[dict[str, Any]], q_src: str) -> dict[Any, list[Any]]:
    """Question id -> its ``multiple_choices`` (a list) in a multiple-choice questions file."""
    out = {}
    for i, q in enumerate(questions):
        _require(q, ("multiple_choices",), q_src, i)
        if not isinstance(q["multiple_choices"], list):
            raise ValueError(f"{q_src} entry {i}: multiple_choices is "
                             f"{_show(q['multiple_choices'])}; expected a list")
        out[_question_id(q, q_src, i)] = q["multiple_choices"]
    return out


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
    q_doc = _load_json(questions_path)
    questions = _entries(q_doc, "questions", questions_path)
    annotations = _entries(_load_json(annotations_path), "annotations", annotations_path)
    results = _load_json(results_path)
    if not isinstance(results, list):
        raise ValueError(_not_a_list(results, str(results_path)))
    sources = (str(questions_path), str(annotations_path), str(results_path))
    multiple_choice = isinstance(q_doc, dict) and q_doc.get("task_type") == "Multiple Choice"
    return evaluate(questions, annotations, results, sources, multiple_choice)


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
