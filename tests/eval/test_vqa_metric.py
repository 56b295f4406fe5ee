"""Hand-computed cases for the re-implemented official VQA v2 evaluator."""

from __future__ import annotations

import copy
import json

import pytest

from fedumm.data.official import VQARecord
from fedumm.eval.vqa_metric import evaluate, evaluate_files, normalize_answer, score_answers


def _ann(qid: int, answers: list[str], qtype: str = "what", atype: str = "other") -> dict:
    return {
        "question_id": qid,
        "image_id": qid,
        "question_type": qtype,
        "answer_type": atype,
        "multiple_choice_answer": answers[0],
        "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)
        ],
    }


def _score(answers: list[str], result: str) -> float:
    """Percent accuracy of one question."""
    out = evaluate([{"question_id": 1}], [_ann(1, answers)], [{"question_id": 1, "answer": result}])
    return out["perQuestion"][1]


# ---------------------------------------------------------------- normalisation rules


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("dont", "don't"),  # contraction map
        ("isnt it", "isn't it"),
        ("Im", "im"),  # capitalised keys never fire: words are lower-cased first
        ("Ive", "ive"),
        ("somebody'd", "somebodyd"),  # the map's one reversed entry
        ("two", "2"),  # number words
        ("Ten dogs", "10 dogs"),
        ("none", "0"),
        ("zero", "0"),
        ("eleven", "eleven"),  # not in the map
        ("the red ball", "red ball"),  # articles removed
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("another", "another"),
        ("red,blue", "red blue"),  # no ", " in the input: comma -> space
        ("yes, it is", "yes it is"),  # ", " in the input: comma deleted
        ("hi-there", "hi there"),
        ("red-white - blue", "redwhite blue"),  # " -" in the input: every "-" deleted
        ("what?", "what"),
        ("1,000", "1000"),  # digit,digit: all punctuation deleted
        ("1,000-5", "10005"),  # ... including the dash
        ("a/b 1,2", "ab 12"),  # ... wherever it is; then article "a" is not a word any more
        ("12:30", "12:30"),  # ':' is not in the punctuation list
        ("it's", "it's"),  # nor is the apostrophe
        ("3.5", "3.5"),  # period followed by a digit kept
        (".5", ".5"),
        ("3.", "3"),  # other periods deleted (not replaced by a space)
        ("mr. smith.", "mr smith"),
        ("a.b", "ab"),
        ("x" + "." * 40, "x" + "." * 8),  # re.UNICODE passed as count: only 32 removed
        ("two\tdogs\n", "2 dogs"),  # tab/newline become spaces, then strip
        ("  Yes  ", "yes"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------- per-question accuracy


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        (0, 0.0),
        # m GT answers equal the result. A matching GT sees m-1 other matches, a non-matching
        # one sees m: acc = (m*min(1,(m-1)/3) + (10-m)*min(1,m/3)) / 10.
        (1, 30.0),  # (1*0 + 9*1/3)/10 = 0.3
        (2, 60.0),  # (2*1/3 + 8*2/3)/10 = 0.6
        (3, 90.0),  # (3*2/3 + 7*1)/10 = 0.9
        (4, 100.0),  # (4*1 + 6*1)/10 = 1
        (10, 100.0),
    ],
)
def test_leave_one_out(matching: int, expected: float) -> None:
    answers = ["cat"] * matching + ["dog", "cow"] * 5
    assert _score(answers[:10], "cat") == expected


def test_normalisation_applies_to_gt_and_result() -> None:
    # GT not all identical: "two"/"Two." -> "2" -> 4 matches for "2" -> 100
    assert _score(["2", "two", "Two.", "2", "3", "3", "3", "3", "3", "3"], "2") == 100.0
    # "dont" -> "don't": 3 matches -> 90
    assert _score(["don't"] * 3 + ["no"] * 7, "dont") == 90.0
    # "Yes." -> "yes": 9 matches -> 100
    assert _score(["yes"] * 9 + ["no"], "Yes.") == 100.0


def test_identical_answers_are_not_normalised() -> None:
    # All 10 GT identical: raw comparison, so case, number words and periods all matter.
    assert _score(["yes"] * 10, "Yes") == 0.0
    assert _score(["two"] * 10, "2") == 0.0
    assert _score(["yes"] * 10, "yes.") == 0.0
    assert _score(["two"] * 10, "two") == 100.0
    # ... but newline/tab replacement and strip still apply, before the identity test:
    assert _score(["yes"] * 10, "\tyes\n") == 100.0
    # "yes\n" and "yes" become identical after stripping, so "Yes" stays unnormalised -> 0
    assert _score(["yes\n"] * 5 + ["yes"] * 5, "Yes") == 0.0


def test_identical_answer_dicts_all_excluded() -> None:
    # The official excludes every GT dict *equal* to the current one. Without answer_id,
    # the three {"answer": "yes"} dicts are equal: each "yes" sees 0 other matches, each
    # "no" sees 3 -> 7/10 = 70 (90 with distinct answer ids).
    ann = _ann(1, ["yes"] * 3 + ["no"] * 7)
    for a in ann["answers"]:
        del a["answer_id"]
    out = evaluate([{"question_id": 1}], [ann], [{"question_id": 1, "answer": "yes"}])
    assert out["perQuestion"][1] == 70.0


# ---------------------------------------------------------------- aggregation


def test_per_type_aggregation_and_rounding() -> None:
    anns = [
        _ann(1, ["3"] * 10, "how many", "number"),  # result "3": 1.0
        _ann(2, ["4"] + ["5"] * 9, "how many", "number"),  # result "4": 1 match -> 0.3
        _ann(3, ["red"] * 2 + ["blue"] * 8, "what color is the", "other"),  # "red": 0.6
    ]
    res = [
        {"question_id": 1, "answer": "3"},
        {"question_id": 2, "answer": "4"},
        {"question_id": 3, "answer": "red"},
    ]
    out = evaluate([{"question_id": i} for i in (1, 2, 3)], anns, res)
    assert out["perQuestion"] == {1: 100.0, 2: 30.0, 3: 60.0}
    assert out["perQuestionType"] == {"how many": 65.0, "what color is the": 60.0}  # 1.3/2
    assert out["perAnswerType"] == {"number": 65.0, "other": 60.0}
    assert out["overall"] == 63.33  # 100 * 1.9 / 3 = 63.333...


def test_rounding_is_python2_half_away_from_zero() -> None:
    # 1 correct of 32: 100 * 1 / 32 = 3.125 exactly; Python 2's round -> 3.13
    # (Python 3's round would give 3.12). 2 of 3 correct: 66.666... -> 66.67.
    anns = [_ann(i, ["yes"] * 10, "is there a", "yes/no") for i in range(32)]
    res = [{"question_id": i, "answer": "yes" if i == 0 else "no"} for i in range(32)]
    anns += [_ann(100 + i, ["a"] * 10, "what", "other") for i in range(3)]
    res += [{"question_id": 100 + i, "answer": "a" if i else "b"} for i in range(3)]
    out = evaluate([{"question_id": a["question_id"]} for a in anns], anns, res)
    assert out["perAnswerType"] == {"yes/no": 3.13, "other": 66.67}
    assert out["overall"] == 8.57  # 3/35 = 8.5714...


def test_inputs_not_mutated_and_last_duplicate_result_wins() -> None:
    anns = [_ann(1, ["Two."] * 9 + ["x"])]
    before = copy.deepcopy(anns)
    res = [{"question_id": 1, "answer": "nope"}, {"question_id": 1, "answer": "two"}]
    assert evaluate([{"question_id": 1}], anns, res)["overall"] == 100.0
    assert anns == before


# ---------------------------------------------------------------- errors and wrappers


def test_missing_and_extra_results_are_named() -> None:
    anns = [_ann(7, ["a"] * 10), _ann(8, ["b"] * 10)]
    qs = [{"question_id": 7}, {"question_id": 8}]
    with pytest.raises(ValueError, match=r"no result for question ids 8"):
        evaluate(qs, anns, [{"question_id": 7, "answer": "a"}])
    res = [{"question_id": i, "answer": "a"} for i in (7, 8, 9)]
    with pytest.raises(ValueError, match=r"not in the annotations 9"):
        evaluate(qs, anns, res)


def test_malformed_inputs() -> None:
    with pytest.raises(ValueError, match="no key 'answer_type'"):
        bad = {"question_id": 1, "question_type": "x", "answers": []}
        evaluate([{"question_id": 1}], [bad], [])
    with pytest.raises(ValueError, match="missing from questions: 1"):
        evaluate([], [_ann(1, ["a"] * 10)], [{"question_id": 1, "answer": "a"}])
    with pytest.raises(ValueError, match="more than once"):
        evaluate([{"question_id": 1}], [_ann(1, ["a"] * 10)] * 2, [])


def test_score_answers_and_files(tmp_path) -> None:
    recs = [
        VQARecord(1, 10, "How many circles?", "how many", "number", "2", ["2"] * 8 + ["3"] * 2),
        VQARecord(2, 10, "Is there a cube?", "is there a", "yes/no", "no", ["no"] * 10),
    ]
    # "two" -> "2" (GT not identical): 8 matches -> 100; "No" vs identical "no" -> 0
    out = score_answers({1: "two", 2: "No"}, recs)
    assert out["overall"] == 50.0
    assert out["perQuestionType"] == {"how many": 100.0, "is there a": 0.0}

    qp, ap, rp = tmp_path / "q.json", tmp_path / "a.json", tmp_path / "r.json"
    qp.write_text(json.dumps({"questions": [r.question_entry() for r in recs]}))
    ap.write_text(json.dumps({"annotations": [r.annotation() for r in recs]}))
    rp.write_text(json.dumps([{"question_id": i, "answer": a} for i, a in ((1, "2"), (2, "no"))]))
    assert evaluate_files(qp, ap, rp)["overall"] == 100.0
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        evaluate_files(qp, ap, tmp_path / "nothere.json")
    rp.write_text("[{")
    with pytest.raises(ValueError, match="malformed JSON"):
        evaluate_files(qp, ap, rp)
    with pytest.raises(ValueError, match="'annotations'"):
        evaluate_files(qp, qp, rp)
