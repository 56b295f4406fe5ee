"""Round trip and error cases of the VQA v2 reader/writer on tiny generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedumm.data.readers.vqa_v2_files import (
    VQARecord,
    annotations_filename,
    image_filename,
    load_vqa_v2,
    questions_filename,
    write_vqa_v2,
)

SPLIT = "val2014"


def _records() -> list[VQARecord]:
    return [
        VQARecord(11, 1, "Is there a red cube?", "is there a", "yes/no", "yes", ["yes"] * 10,
                  family="existence"),
        VQARecord(12, 1, "How many circles?", "how many", "number", "2", ["2"] * 9 + ["3"],
                  family="counting"),
        VQARecord(13, 2, "What color is the ball?", "what color is the", "other", "blue",
                  ["blue"] * 10),  # real-data style: no family
    ]


def _images(rng: np.random.Generator) -> dict[int, np.ndarray]:
    return {i: rng.integers(0, 256, size=(5 + i, 7, 3), dtype=np.uint8) for i in (1, 2)}


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, list[VQARecord], dict[int, np.ndarray]]:
    records, images = _records(), _images(np.random.default_rng(0))
    write_vqa_v2(tmp_path, SPLIT, records, images)
    return tmp_path, records, images


def test_round_trip(written) -> None:
    root, records, images = written
    ds = load_vqa_v2(root, SPLIT)
    assert len(ds) == 3
    assert ds.records == records  # family kept where set, "" where absent
    for image_id, arr in images.items():
        got = ds.image(image_id)
        assert got.dtype == np.uint8 and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)  # PNG is lossless
    assert ds.image_ids == [1, 2]


def test_official_format(written) -> None:
    root, records, _ = written
    q = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    a = json.loads((root / "v2_mscoco_val2014_annotations.json").read_text())
    assert {"info", "license", "data_type", "data_subtype", "task_type"} <= set(q)
    assert q["data_subtype"] == SPLIT and q["task_type"] == "Open-Ended"
    assert q["questions"][0] == {"question_id": 11, "image_id": 1,
                                 "question": "Is there a red cube?"}
    ann = a["annotations"][1]
    assert ann["question_type"] == "how many" and ann["answer_type"] == "number"
    assert ann["answers"][9] == {"answer": "3", "answer_confidence": "yes", "answer_id": 10}
    assert ann["family"] == "counting"
    assert "family" not in a["annotations"][2]
    assert (root / SPLIT / "COCO_val2014_000000000002.png").is_file()


def test_reads_jpg_and_official_subfolders(written) -> None:
    root, _, images = written
    (root / "Questions").mkdir()
    (root / "Annotations").mkdir()
    (root / questions_filename(SPLIT)).rename(root / "Questions" / questions_filename(SPLIT))
    (root / annotations_filename(SPLIT)).rename(root / "Annotations" / annotations_filename(SPLIT))
    png = root / SPLIT / image_filename(SPLIT, 2, ".png")
    png.rename(root / SPLIT / image_filename(SPLIT, 2, ".jpg"))  # PIL sniffs the content
    ds = load_vqa_v2(root, SPLIT, cache_images=True)
    np.testing.assert_array_equal(ds.image(2), images[2])
    assert ds.image(2) is ds.image(2)  # cached
    assert not ds.image(2).flags.writeable


def test_subset(written) -> None:
    root, records, _ = written
    ds = load_vqa_v2(root, SPLIT)
    assert [r.question_id for r in ds.subset(count=2)] == [11, 12]
    assert [r.question_id for r in ds.subset(question_ids=[13, 11])] == [11, 13]  # dataset order
    assert [r.question_id for r in ds.subset(count=1, question_ids={12, 13})] == [12]
    assert len(ds.subset()) == 3
    sub = ds.subset(question_ids=[13])
    assert sub.image(2).shape == (7, 7, 3)
    with pytest.raises(ValueError, match="unknown question ids: \\[99\\]"):
        ds.subset(question_ids=[11, 99])
    with pytest.raises(ValueError, match="count"):
        ds.subset(count=4)


def test_missing_files(written) -> None:
    root, _, _ = written
    with pytest.raises(FileNotFoundError, match="v2_OpenEnded_mscoco_test2015_questions.json"):
        load_vqa_v2(root, "test2015")
    (root / annotations_filename(SPLIT)).unlink()
    with pytest.raises(FileNotFoundError, match="v2_mscoco_val2014_annotations.json"):
        load_vqa_v2(root, SPLIT)


def test_missing_image(written) -> None:
    root, _, _ = written
    (root / SPLIT / image_filename(SPLIT, 1, ".png")).unlink()
    ds = load_vqa_v2(root, SPLIT)  # images are only looked for when requested
    with pytest.raises(FileNotFoundError, match="image 1 not found.*COCO_val2014_000000000001"):
        ds.image(1)


def test_malformed_json(written) -> None:
    root, _, _ = written
    (root / questions_filename(SPLIT)).write_text('{"questions": [')
    with pytest.raises(ValueError, match="questions.json: malformed JSON"):
        load_vqa_v2(root, SPLIT)


def test_missing_keys(written) -> None:
    root, _, _ = written
    path = root / annotations_filename(SPLIT)
    data = json.loads(path.read_text())
    del data["annotations"][1]["question_type"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotations entry 1 has no key 'question_type'"):
        load_vqa_v2(root, SPLIT)
    del data["annotations"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotations.json: missing top-level key 'annotations'"):
        load_vqa_v2(root, SPLIT)


def test_questions_without_annotation_are_left_out(written) -> None:
    # the official VQA API indexes the annotations and looks their questions up: a questions
    # file covering more (annotations filtered by type, subsampled) is fine
    root, records, _ = written
    path = root / annotations_filename(SPLIT)
    data = json.loads(path.read_text())
    data["annotations"].pop()
    path.write_text(json.dumps(data))
    assert [r.question_id for r in load_vqa_v2(root, SPLIT)] == [11, 12]
    data["annotations"] = []
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations.json: no annotations .* 3 questions"):
        load_vqa_v2(root, SPLIT)


def test_unpaired_and_repeated_annotations(written) -> None:
    root, _, _ = written
    path = root / annotations_filename(SPLIT)
    data = json.loads(path.read_text())
    data["annotations"].append(dict(data["annotations"][0]))
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"entry 3: question id 11 is annotated twice "
                                         r"\(also entry 0\)"):
        load_vqa_v2(root, SPLIT)
    data["annotations"][3]["question_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"entry 3: question id 99 is not in .*questions.json"):
        load_vqa_v2(root, SPLIT)


# Shaped like v2_OpenEnded_mscoco_val2014_questions.json / v2_mscoco_val2014_annotations.json
# (the same top-level keys, value types and answer_confidence values as the real files).
REAL_INFO = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org",
             "version": "2.0", "year": 2017, "contributor": "VQA Team",
             "date_created": "2017-04-26 17:07:13"}
REAL_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/",
                "name": "Creative Commons Attribution 4.0 International License"}


def real_shaped_files(root: Path) -> None:
    questions = {"info": REAL_INFO, "task_type": "Open-Ended", "data_type": "mscoco",
                 "license": REAL_LICENSE, "data_subtype": SPLIT, "questions": [
                     {"image_id": 1, "question": "How many cats are there?",
                      "question_id": 1000},
                     {"image_id": 1, "question": "Is the cat asleep?", "question_id": 1001},
                     {"image_id": 2, "question": "Qu'est-ce que c'est ?", "question_id": 2000}]}
    conf = ["yes", "yes", "maybe", "yes", "no", "yes", "yes", "yes", "maybe", "yes"]

    def ann(qid: int, image_id: int, qtype: str, atype: str, mc: str, answers: list[str]):
        return {"question_type": qtype, "multiple_choice_answer": mc, "answers": [
            {"answer": a, "answer_confidence": c, "answer_id": j + 1}
            for j, (a, c) in enumerate(zip(answers, conf, strict=True))],
            "image_id": image_id, "answer_type": atype, "question_id": qid}

    annotations = {"info": REAL_INFO, "license": REAL_LICENSE, "data_subtype": SPLIT,
                   "data_type": "mscoco", "annotations": [
                       ann(1000, 1, "how many", "number", "2", ["2"] * 7 + ["two", "3", "2"]),
                       ann(1001, 1, "is the", "yes/no", "yes", ["yes"] * 9 + ["no"]),
                       ann(2000, 2, "what", "other", "café", ["café"] * 6 + ["tasse"] * 4)]}
    (root / questions_filename(SPLIT)).write_text(json.dumps(questions), encoding="utf-8")
    (root / annotations_filename(SPLIT)).write_text(json.dumps(annotations, ensure_ascii=False),
                                                    encoding="utf-8")


def test_reads_real_shaped_files(tmp_path: Path) -> None:
    real_shaped_files(tmp_path)
    ds = load_vqa_v2(tmp_path, SPLIT)
    assert [r.question_id for r in ds] == [1000, 1001, 2000]
    first = ds[0]
    assert (first.question_type, first.answer_type, first.multiple_choice_answer) == (
        "how many", "number", "2")
    assert first.answers == ["2"] * 7 + ["two", "3", "2"] and first.family == ""
    assert ds[2].question == "Qu'est-ce que c'est ?" and ds[2].answers[0] == "café"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("question_id", "1000", "question_id is '1000'; expected an integer"),
    ("image_id", 1.5, "image_id is 1.5; expected an integer"),
    ("answer_type", None, "answer_type is None; expected a string"),
    ("answers", {"answer": "2"}, "'answers' is not a list"),
])
def test_real_shaped_files_with_a_wrong_type(tmp_path: Path, key, value, message) -> None:
    real_shaped_files(tmp_path)
    path = tmp_path / annotations_filename(SPLIT)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["annotations"][1][key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        load_vqa_v2(tmp_path, SPLIT)
    assert str(info.value).startswith(f"{path}: annotations entry 1")
    assert message in str(info.value)


def test_writer_checks(tmp_path: Path) -> None:
    records, images = _records(), _images(np.random.default_rng(1))
    with pytest.raises(ValueError, match="no image given for image ids \\[2\\]"):
        write_vqa_v2(tmp_path, SPLIT, records, {1: images[1]})
    with pytest.raises(ValueError, match="image 1: expected uint8"):
        write_vqa_v2(tmp_path, SPLIT, records, {**images, 1: images[1].astype(np.float32)})
    with pytest.raises(ValueError, match="repeated question ids"):
        write_vqa_v2(tmp_path, SPLIT, records + records[:1], images)
