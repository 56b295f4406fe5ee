"""``fedumm eval vqa`` / ``fedumm eval geneval`` on inputs shaped like the real files (the key
sets and value types of VQA v2's annotation / question files, of results files that others
write, of GenEval's ``evaluation_metadata.jsonl`` and its generator's folders): every variant
the official tools accept scores to a hand-computed number, every other one is exit code 2
with one ``fedumm: error:`` line naming the file and the entry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fedumm.eval.shapes_detector as shapes_detector
from fedumm.cli import main
from fedumm.eval.geneval import Detection
from fedumm.eval.vqa_metric import evaluate_files

# ---------------------------------------------------------------- VQA v2

INFO = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org",
        "version": "2.0", "year": 2017, "contributor": "VQA Team",
        "date_created": "2017-04-26 17:07:13"}
LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/",
           "name": "Creative Commons Attribution 4.0 International License"}
CONFIDENCE = ["yes", "yes", "maybe", "yes", "no", "yes", "yes", "yes", "maybe", "yes"]


def _ann(qid: int, image_id: int, qtype: str, atype: str, answers: list[str]) -> dict:
    """An entry of v2_mscoco_val2014_annotations.json, keys in the real files' order."""
    return {"question_type": qtype, "multiple_choice_answer": answers[0], "answers": [
        {"answer": a, "answer_confidence": c, "answer_id": j + 1}
        for j, (a, c) in enumerate(zip(answers, CONFIDENCE, strict=True))],
        "image_id": image_id, "answer_type": atype, "question_id": qid}


QUESTIONS = [{"image_id": 458752, "question": "How many people are in the picture?",
              "question_id": 458752000},
             {"image_id": 458752, "question": "Is this man wearing a hat?",
              "question_id": 458752001},
             {"image_id": 262146, "question": "What is on the plate?",
              "question_id": 262146000}]
ANNOTATIONS = [
    # not all identical: "two" is processed to "2": nine "2" and one "3"
    _ann(458752000, 458752, "how many", "number", ["2"] * 7 + ["two", "3", "2"]),
    _ann(458752001, 458752, "is this", "yes/no", ["yes"] * 9 + ["no"]),
    _ann(262146000, 262146, "what is on the", "other", ["café"] * 6 + ["tasse"] * 4),
]
# "2" -> 100; "no" -> the one "no" sees no other, the nine "yes" see one: 9 * 1/3 / 10 = 30;
# "café" -> 100: overall (100 + 30 + 100) / 3 = 76.67
RESULTS = [{"question_id": 458752000, "answer": "2"},
           {"question_id": 458752001, "answer": "no"},
           {"question_id": 262146000, "answer": "café"}]
SCORE = {"overall": 76.67, "perAnswerType": {"number": 100.0, "yes/no": 30.0, "other": 100.0}}


def _vqa_files(tmp_path: Path, results: object, questions: dict | None = None,
               annotations: dict | None = None) -> list[str]:
    q = questions or {"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco",
                      "license": LICENSE, "data_subtype": "val2014", "questions": QUESTIONS}
    a = annotations or {"info": INFO, "license": LICENSE, "data_subtype": "val2014",
                        "annotations": ANNOTATIONS, "data_type": "mscoco"}
    paths = [tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
             tmp_path / "v2_mscoco_val2014_annotations.json", tmp_path / "results.json"]
    for path, content in zip(paths, (q, a, results), strict=True):
        path.write_text(content if isinstance(content, str) else
                        json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return ["eval", "vqa", "--questions", str(paths[0]), "--annotations", str(paths[1]),
            "--results", str(paths[2]), "--json"]


def _ok(argv: list[str], capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert math.isfinite(out["overall"])
    return out


def _refused(argv: list[str], capsys, *parts: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedumm: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err
    return err


def _with(i: int, **change) -> list[dict]:
    out = [dict(r) for r in RESULTS]
    out[i].update(change)
    return out


@pytest.mark.parametrize(("name", "results", "score"), [
    ("real-shaped", RESULTS, SCORE),
    # a writer that emits JSON numbers as floats: 458752000.0 == 458752000 for the official too
    ("integral float ids", [{**r, "question_id": float(r["question_id"])} for r in RESULTS],
     SCORE),
    # extra keys written by some submission tools are ignored
    ("extra keys", [{**r, "image_id": 1, "question": "?", "score": 0.9} for r in RESULTS],
     SCORE),
    # a repeated id keeps its last answer (the official createIndex): "yes" -> 100
    ("duplicate id", [*RESULTS, {"question_id": 458752001, "answer": "yes"}],
     {"overall": 100.0, "perAnswerType": {"number": 100.0, "yes/no": 100.0, "other": 100.0}}),
    # unicode, case and a period: processed like the GT ("CAFÉ." -> "café"); "tasse" has 4
    # matches -> 100 too
    ("unicode answers", _with(2, answer="CAFÉ."), SCORE),
    ("unicode answers 2", _with(2, answer="tasse"), SCORE),
    ("unicode miss", _with(2, answer="cafe"),
     {"overall": 43.33, "perAnswerType": {"number": 100.0, "yes/no": 30.0, "other": 0.0}}),
    # tabs / newlines become spaces and are stripped, as in vqaEval.py
    ("whitespace", _with(0, answer="\ttwo\n"), SCORE),
])
def test_vqa_accepted_variants(tmp_path, capsys, name, results, score) -> None:
    out = _ok(_vqa_files(tmp_path, results), capsys)
    assert out["overall"] == score["overall"]
    assert out["perAnswerType"] == score["perAnswerType"]


def test_vqa_questions_file_may_cover_more(tmp_path, capsys) -> None:
    # an annotation file filtered to one answer type (the official API evaluates its ids)
    anns = {"annotations": ANNOTATIONS[1:2], "info": INFO, "license": LICENSE}
    out = _ok(_vqa_files(tmp_path, RESULTS[1:2], annotations=anns), capsys)
    assert out["overall"] == 30.0 and out["perQuestionType"] == {"is this": 30.0}


def test_vqa_string_ids_everywhere_are_consistent(tmp_path, capsys) -> None:
    qs = [{**q, "question_id": str(q["question_id"])} for q in QUESTIONS]
    anns = [{**a, "question_id": str(a["question_id"])} for a in ANNOTATIONS]
    res = [{**r, "question_id": str(r["question_id"])} for r in RESULTS]
    out = _ok(_vqa_files(tmp_path, res, {"questions": qs}, {"annotations": anns}), capsys)
    assert out["overall"] == SCORE["overall"]


def test_vqa_multiple_choice(tmp_path, capsys) -> None:
    qs = {"task_type": "Multiple Choice", "questions": [
        {**q, "multiple_choices": ["2", "3", "yes", "no", "café", "tasse"]} for q in QUESTIONS]}
    assert _ok(_vqa_files(tmp_path, RESULTS, qs), capsys)["overall"] == SCORE["overall"]
    _refused(_vqa_files(tmp_path, _with(1, answer="maybe"), qs), capsys, "results.json entry 1",
             "'maybe' is not one of the question's multiple_choices")


@pytest.mark.parametrize(("name", "results", "parts"), [
    # the official loadRes asserts set(result ids) == set(annotated ids)
    ("string ids", [{**r, "question_id": str(r["question_id"])} for r in RESULTS],
     ["results.json: results do not correspond", "are strings", "integers"]),
    # the official calls resAns.replace(...) on a number and stops: not coerced to "2"
    ("number answer", _with(0, answer=2),
     ["results.json entry 0 (question 458752000): answer is 2; expected a string",
      'write it as the string "2"']),
    ("float answer", _with(0, answer=2.0), ["answer is 2.0", 'the string "2.0"']),
    ("null answer", _with(1, answer=None), ["results.json entry 1", "answer is None"]),
    ("NaN answer", '[{"question_id": 458752000, "answer": NaN}]',
     ["results.json entry 0", "answer is nan"]),
    ("no answer key", [{"question_id": 458752000}], ["results.json entry 0 has no key 'answer'"]),
    ("no id key", [{"answer": "2"}], ["results.json entry 0 has no key 'question_id'"]),
    ("empty list", [], ["results.json: no results (an empty list)", "3 annotated questions"]),
    ("a dict", {"458752000": "2"}, ["results.json: results is a JSON object, not an array"]),
    ("wrapped", {"results": RESULTS}, ["results is a JSON object"]),
    ("null", None, ["results.json: results is null"]),
    ("unknown id", [*RESULTS, {"question_id": 1, "answer": "2"}],
     ["results for question ids not in the annotations 1"]),
    ("missing id", RESULTS[:2], ["no result for question ids 262146000"]),
    ("list id", _with(0, question_id=[458752000]), ["results.json entry 0: question_id is"]),
    ("fractional id", _with(0, question_id=458752000.5),
     ["results.json entry 0: question_id is 458752000.5"]),
    ("bool id", _with(0, question_id=True), ["entry 0: question_id is True"]),
    ("truncated", json.dumps(RESULTS)[:40], ["results.json: malformed JSON"]),
    ("garbage", "\u00ff\u00fe[]", ["results.json: malformed JSON"]),
])
def test_vqa_refused_results(tmp_path, capsys, name, results, parts) -> None:
    _refused(_vqa_files(tmp_path, results), capsys, *parts)


def test_vqa_refused_annotation_and_question_files(tmp_path, capsys) -> None:
    argv = _vqa_files(tmp_path, RESULTS)
    annotations, questions = Path(argv[5]), Path(argv[3])
    text = annotations.read_text(encoding="utf-8")
    annotations.write_text(text[: len(text) // 2], encoding="utf-8")
    _refused(argv, capsys, f"{annotations}: malformed JSON")
    bad = [dict(a) for a in ANNOTATIONS]
    bad[2] = {k: v for k, v in bad[2].items() if k != "answer_type"}
    _refused(_vqa_files(tmp_path, RESULTS, annotations={"annotations": bad}), capsys,
             f"{annotations} entry 2 has no key 'answer_type'")
    _refused(_vqa_files(tmp_path, RESULTS, annotations={"annotations": []}), capsys,
             f"{annotations}: no annotations")
    _refused(_vqa_files(tmp_path, RESULTS, annotations={"annotations": ANNOTATIONS * 2}),
             capsys, "question id 458752000 appears more than once")
    _refused(_vqa_files(tmp_path, RESULTS, {"questions": QUESTIONS[:2]}), capsys,
             f"annotated question ids missing from {questions}: 262146000")
    argv = _vqa_files(tmp_path, RESULTS)
    questions.unlink()
    _refused(argv, capsys, f"VQA file not found: {questions}")


def test_vqa_overall_is_never_nan(tmp_path) -> None:
    # every accepted shape scores a finite number; nothing to score is an error, not NaN
    argv = _vqa_files(tmp_path, RESULTS)
    for results in (RESULTS, RESULTS[::-1], [{**r, "answer": ""} for r in RESULTS]):
        Path(argv[7]).write_text(json.dumps(results))
        out = evaluate_files(argv[3], argv[5], argv[7])
        assert math.isfinite(out["overall"]) and 0 <= out["overall"] <= 100
    with pytest.raises(ValueError, match="no annotations"):
        _vqa_files(tmp_path, [], annotations={"annotations": []})
        evaluate_files(argv[3], argv[5], argv[7])


# ---------------------------------------------------------------- GenEval

# lines of djghosh13/geneval prompts/evaluation_metadata.jsonl
BENCH = {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
         "prompt": "a photo of a bench"}
CLOCKS = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
          "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}
HYDRANT = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}],
           "prompt": "a photo of a blue fire hydrant"}
DOG = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                      {"class": "dog", "count": 1,
                                       "position": ["right of", 0]}],
       "prompt": "a photo of a dog right of a teddy bear"}


def _det(label: str, color: str | None = None, x: float = 0.0) -> Detection:
    return Detection(label, color, (x, 0.0, x + 10.0, 10.0), 0.99)


# what the stand-in detector sees, keyed by the image's pixel value
SEEN = {
    0: [],
    1: [_det("bench")],
    2: [_det("clock"), _det("clock")],
    3: [_det("clock"), _det("clock"), _det("clock")],
    4: [_det("fire hydrant", "blue")],
    5: [_det("teddy bear"), _det("dog", x=100.0)],
}


class StandIn:
    """Replaces ShapesDetector in the CLI: detections by pixel value."""

    def __call__(self, image: np.ndarray) -> list[Detection]:
        return SEEN[int(np.asarray(image)[0, 0, 0])]


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(shapes_detector, "ShapesDetector", StandIn)


def _geneval(tmp_path: Path, rows: list[dict | str], samples: dict[int, list[int]],
             name=lambda i: f"{i:0>5}", own_metadata: bool = True) -> list[str]:
    """GenEval's generator layout: ``<index:0>5>/metadata.jsonl`` (one ``json.dump``) and
    ``samples/<n:05>.png`` (diffusers_generate.py), for the prompts in ``samples``."""
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    root = tmp_path / "outputs"
    root.mkdir(exist_ok=True)
    for i, values in samples.items():
        folder = root / name(i)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        if own_metadata:
            with (folder / "metadata.jsonl").open("w") as fp:
                json.dump(rows[i], fp)
        for n, v in enumerate(values):
            Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(
                folder / "samples" / f"{n:05}.png")
    return ["eval", "geneval", "--metadata", str(meta), "--images", str(root), "--json"]


ROWS = [BENCH, CLOCKS, HYDRANT, DOG]
# bench 2 of 4 samples; clocks [2, 3] -> [True, False] (3 >= the exclude count); hydrant 1 of
# 1; dog right of the teddy bear, 1 of 2: tasks 0.5, 0.5, 1.0, 0.5 -> overall 2.5 / 4
SAMPLES = {0: [1, 1, 0, 0], 1: [2, 3], 2: [4], 3: [5, 0]}
BY_TASK = {"single_object": 0.5, "counting": 0.5, "colors": 1.0, "position": 0.5}


def test_geneval_real_layout_with_varying_samples(tmp_path, capsys, stand_in) -> None:
    out = _ok(_geneval(tmp_path, ROWS, SAMPLES), capsys)
    assert out["by_task"] == BY_TASK and out["overall"] == 0.625


def test_geneval_unpadded_folders_and_no_own_metadata(tmp_path, capsys, stand_in) -> None:
    # evaluate_images.py takes any folder whose name isdigit(); its metadata.jsonl is the
    # line of the metadata file (fedumm reads the line, so the copy may be absent)
    out = _ok(_geneval(tmp_path, ROWS, SAMPLES, name=str, own_metadata=False), capsys)
    assert out["by_task"] == BY_TASK and out["overall"] == 0.625


def test_geneval_missing_prompts_score_the_rest(tmp_path, capsys, stand_in) -> None:
    # the official scorer scores the folders there are: bench 0.5, hydrant 1.0 -> 0.75
    argv = _geneval(tmp_path, ROWS, {0: SAMPLES[0], 2: SAMPLES[2]})
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["by_task"] == {"single_object": 0.5, "colors": 1.0} and out["overall"] == 0.75
    assert out["missing_prompts"] == [1, 3]
    assert "note: 2 of 4 prompts have no images" in captured.err


def test_geneval_unknown_tag_and_class(tmp_path, capsys, stand_in) -> None:
    # any tag is a task of its own (summary_scores.py groups by it); a class the detector does
    # not know is never found (include fails, exclude holds)
    unicorn = {"tag": "texture", "include": [{"class": "unicorn", "count": 1}],
               "prompt": "a photo of a unicorn"}
    no_unicorn = {"tag": "single_object", "include": [{"class": "bench", "count": 1}],
                  "exclude": [{"class": "unicorn", "count": 1}], "prompt": "a bench"}
    out = _ok(_geneval(tmp_path, [BENCH, unicorn, no_unicorn], {0: [1], 1: [1], 2: [1]}),
              capsys)
    assert out["by_task"] == {"single_object": 1.0, "texture": 0.0} and out["overall"] == 0.5


def test_geneval_refused(tmp_path, capsys, stand_in) -> None:
    argv = _geneval(tmp_path, ROWS, SAMPLES)
    root, meta = Path(argv[5]), Path(argv[3])
    # a folder's own metadata (what the official scorer reads) is another prompt
    (root / "00002" / "metadata.jsonl").write_text(json.dumps(BENCH))
    _refused(argv, capsys, f"{root / '00002' / 'metadata.jsonl'}: not prompt 2 of {meta}",
             "another metadata file")
    (root / "00002" / "metadata.jsonl").write_text('{"tag": ')
    _refused(argv, capsys, f"{root / '00002' / 'metadata.jsonl'}: malformed JSON")
    (root / "00002" / "metadata.jsonl").write_text(json.dumps(HYDRANT))
    # images for a prompt the metadata file does not have
    _geneval(tmp_path, ROWS[:3], SAMPLES, own_metadata=False)
    _refused(argv, capsys, f"{root / '00003'}: images for prompt 3", "has 3 prompts")
    # the same prompt twice
    _geneval(tmp_path, ROWS, {**SAMPLES, 1: [2]}, name=str)
    _refused(argv, capsys, "folders 0 and 00000 are both prompt 0")


@pytest.mark.parametrize(("line", "parts"), [
    ('{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exc',
     ["evaluation_metadata.jsonl:2: malformed JSON"]),
    ({**CLOCKS, "include": [{"class": "clock", "count": "2"}]},
     ["evaluation_metadata.jsonl:2: include[0]: 'count' must be a positive int, got '2'"]),
    ({**CLOCKS, "include": [{"class": "clock", "count": 2.0}]}, ["'count' must be a positive"]),
    ({k: v for k, v in CLOCKS.items() if k != "tag"},
     ["evaluation_metadata.jsonl:2: missing key 'tag'"]),
    ({**CLOCKS, "tag": None}, ["evaluation_metadata.jsonl:2: 'tag' must be a non-empty str"]),
    ({**CLOCKS, "exlude": []}, ["evaluation_metadata.jsonl:2: unknown key(s) ['exlude']"]),
    ({**DOG, "include": DOG["include"][::-1]}, ["include[0]", "earlier include clause"]),
])
def test_geneval_refused_metadata(tmp_path, capsys, stand_in, line, parts) -> None:
    _refused(_geneval(tmp_path, [BENCH, line], {0: [1]}, own_metadata=False), capsys, *parts)


def test_geneval_nothing_to_score_is_an_error_not_nan(tmp_path, capsys, stand_in) -> None:
    argv = _geneval(tmp_path, ROWS, {})
    _refused(argv, capsys, "missing GenEval image", "none of the 4 prompts")
    _refused([*argv[:5], str(tmp_path / "nowhere"), "--json"], capsys,
             f"missing GenEval image folder {tmp_path / 'nowhere'}")
    _refused(_geneval(tmp_path, [], {}), capsys, "evaluation_metadata.jsonl: no prompts")


@pytest.mark.parametrize(("exc", "shown"), [
    (KeyError("image id 3 is not in the val dataset"), "image id 3 is not in the val dataset"),
    (KeyError("answer"), "no key 'answer'"),
])
def test_key_errors_read_as_one_plain_line(tmp_path, capsys, monkeypatch, exc, shown) -> None:
    import fedumm.eval.vqa_metric as vqa_metric

    def boom(*args):
        raise exc

    monkeypatch.setattr(vqa_metric, "evaluate_files", boom)
    assert _refused(_vqa_files(tmp_path, RESULTS), capsys) == f"fedumm: error: {shown}\n"
