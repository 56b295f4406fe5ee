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


def test_unpaired_questions(written) -> None:
    root, _, _ = written
    path = root / annotations_filename(SPLIT)
    data = json.loads(path.read_text())
    data["annotations"].pop()
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="1 questions have no annotation.*\\[13\\]"):
        load_vqa_v2(root, SPLIT)


def test_writer_checks(tmp_path: Path) -> None:
    records, images = _records(), _images(np.random.default_rng(1))
    with pytest.raises(ValueError, match="no image given for image ids \\[2\\]"):
        write_vqa_v2(tmp_path, SPLIT, records, {1: images[1]})
    with pytest.raises(ValueError, match="image 1: expected uint8"):
        write_vqa_v2(tmp_path, SPLIT, records, {**images, 1: images[1].astype(np.float32)})
    with pytest.raises(ValueError, match="repeated question ids"):
        write_vqa_v2(tmp_path, SPLIT, records + records[:1], images)
