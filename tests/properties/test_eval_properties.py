"""Property tests of the official-format evaluators: random VQA results / annotation files
and GenEval metadata / image folders either score (numbers in range) or raise one ValueError
naming the file and the entry; through ``fedumm eval vqa`` the same is exit code 2 and
``fedumm: error:`` without a traceback."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from fedumm.eval.geneval import score_geneval_dir
from fedumm.eval.shapes_detector import ShapesDetector
from fedumm.eval.vqa_metric import evaluate_files
from makers import run_cli

JUNK = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(),
                              st.text(max_size=5)),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.text(max_size=4), inner, max_size=3), max_leaves=6)
ANSWER = st.sampled_from(["yes", "no", "2", "two", "red", "a dog", "Yes.", "3,000"])


def _damaged(draw: st.DrawFn, entries: list[dict]) -> list:
    """Now and then one entry loses a key, gets a value of another type (a list-typed id),
    or is replaced by junk."""
    if entries and draw(st.integers(0, 4)) == 2:
        i = draw(st.integers(0, len(entries) - 1))
        entry = entries[i]
        how = draw(st.sampled_from(["drop", "retype", "replace"]))
        key = draw(st.sampled_from(sorted(entry)))
        if how == "drop":
            del entry[key]
        elif how == "retype":
            entry[key] = draw(st.one_of(st.just([entry[key]]), JUNK))
        else:
            entries[i] = draw(JUNK)
    return entries


@st.composite
def vqa_files(draw: st.DrawFn) -> tuple[object, object, object]:
    n = draw(st.integers(min_value=1, max_value=4))
    qs = [{"question_id": i, "image_id": 1, "question": "q?"} for i in range(n)]
    anns = [{"question_id": i, "image_id": 1, "question_type": "what",
             "answer_type": draw(st.sampled_from(["yes/no", "number", "other"])),
             "answers": [{"answer": draw(ANSWER), "answer_id": j + 1}
                         for j in range(draw(st.integers(1, 10)))]} for i in range(n)]
    ids = draw(st.lists(st.integers(0, n), min_size=n, max_size=n + 1)) \
        if draw(st.integers(0, 3)) == 2 else list(range(n))
    results = [{"question_id": i, "answer": draw(ANSWER)} for i in ids]
    return ({"questions": _damaged(draw, qs)}, {"annotations": _damaged(draw, anns)},
            _damaged(draw, results))


def _write(folder: Path, files: tuple) -> tuple[Path, Path, Path]:
    paths = (folder / "q.json", folder / "a.json", folder / "r.json")
    for path, content in zip(paths, files, strict=True):
        path.write_text(json.dumps(content))
    return paths


@given(vqa_files())
@settings(max_examples=120)
def test_vqa_results_score_or_name_the_file_and_entry(tmp_path_factory, clear, files):
    paths = _write(tmp_path_factory.mktemp("vqa"), files)
    try:
        res = evaluate_files(*paths)
    except Exception as exc:  # noqa: BLE001
        event("refused")
        clear(exc, *(p.name for p in paths))
    else:
        event("scored")
        assert 0 <= res["overall"] <= 100
        assert all(0 <= v <= 100 for v in res["perAnswerType"].values())


@given(vqa_files(), st.sampled_from(["", "[", "\xff", "null", "{}", "[[]]"]))
@settings(max_examples=60)
def test_fedumm_eval_vqa_exits_cleanly(tmp_path_factory, files, raw_results):
    paths = _write(tmp_path_factory.mktemp("cli"), files)
    if raw_results:  # a results file that is not even a list of objects
        paths[2].write_text(raw_results)
    code, stderr = run_cli(["eval", "vqa", "--questions", str(paths[0]), "--annotations",
                         str(paths[1]), "--results", str(paths[2]), "--json"])
    assert "Traceback" not in stderr
    assert code == 0 or (code == 2 and stderr.startswith("fedumm: error:")
                         and stderr.count("\n") == 1), (code, stderr)


def test_list_typed_ids_are_named(tmp_path, clear):
    """The reported case: results whose question ids are lists."""
    q = {"questions": [{"question_id": 1, "image_id": 1, "question": "q?"}]}
    a = {"annotations": [{"question_id": 1, "image_id": 1, "question_type": "what",
                          "answer_type": "other", "answers": [{"answer": "x"}]}]}
    paths = _write(tmp_path, (q, a, [{"question_id": [1], "answer": "x"}]))
    with pytest.raises(ValueError) as info:
        evaluate_files(*paths)
    clear(info.value, "r.json entry 0: question_id is [1]")


# ---- GenEval: metadata lines and image folders

CLAUSE = st.fixed_dictionaries({"class": st.sampled_from(["circle", "square", "dog", ""]),
                                "count": st.integers(0, 3)},
                               optional={"color": st.sampled_from(["red", "blue", 3])})
LINE = st.one_of(
    st.builds(lambda tag, inc, prompt: json.dumps({"tag": tag, "include": inc,
                                                   "prompt": prompt}),
              st.sampled_from(["single_object", "counting", "colors", "position", "nope"]),
              st.lists(CLAUSE, max_size=2), st.text(max_size=8)),
    JUNK.map(json.dumps), st.text(max_size=10))


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    a = np.full((draw(st.integers(1, 24)), draw(st.integers(1, 24)), 3),
                draw(st.integers(0, 255)), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    data = buf.getvalue()
    cut = draw(st.sampled_from([len(data), len(data), len(data), 30, 8, 0]))
    return data[:cut]


@given(st.lists(LINE, min_size=0, max_size=3), st.lists(st.lists(image_bytes(), max_size=2),
                                                        max_size=3))
@settings(max_examples=60)
def test_geneval_folders_score_or_name_the_file(tmp_path_factory, clear, lines, folders):
    root = tmp_path_factory.mktemp("geneval")
    meta = root / "evaluation_metadata.jsonl"
    meta.write_text("".join(line.replace("\n", " ") + "\n" for line in lines))
    for i, images in enumerate(folders):
        (root / "imgs" / f"{i:05d}" / "samples").mkdir(parents=True)
        for j, data in enumerate(images):
            (root / "imgs" / f"{i:05d}" / "samples" / f"{j:04d}.png").write_bytes(data)
    try:
        res = score_geneval_dir(meta, root / "imgs", ShapesDetector())
    except FileNotFoundError as exc:  # a prompt without its images: named
        event("missing image")
        assert "missing GenEval image" in str(exc)
    except Exception as exc:  # noqa: BLE001
        event("refused")
        clear(exc, str(root))
    else:
        event("scored")
        assert 0 <= res["overall"] <= 1 and not math.isnan(res["overall"])
