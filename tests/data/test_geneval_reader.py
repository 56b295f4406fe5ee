"""GenEval metadata reader/writer on the real prompt file and on broken lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedumm.data.readers.geneval_files import (
    GenEvalFormatError,
    GenEvalRecord,
    geneval_image_path,
    list_geneval_samples,
    load_geneval_metadata,
    tag_counts,
    write_geneval_metadata,
    write_geneval_sample_dir,
)

GENEVAL_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "geneval"
METADATA = GENEVAL_DIR / "evaluation_metadata.jsonl"
EXPECTED = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}

needs_data = pytest.mark.skipif(not METADATA.is_file(), reason=f"{METADATA} not present")


@needs_data
def test_real_file_counts() -> None:
    records = load_geneval_metadata(METADATA)
    assert len(records) == 553
    assert tag_counts(records) == EXPECTED
    assert all(isinstance(r, GenEvalRecord) for r in records)
    counting = [r for r in records if r.tag == "counting"]
    assert all(r.exclude and r.exclude[0]["count"] == r.include[0]["count"] + 1 for r in counting)
    position = [r for r in records if r.tag == "position"]
    assert all(r.include[1]["position"][1] == 0 for r in position)


@needs_data
def test_round_trip(tmp_path: Path) -> None:
    records = load_geneval_metadata(METADATA)
    out = tmp_path / "meta.jsonl"
    write_geneval_metadata(out, records)
    assert load_geneval_metadata(out) == records
    # same text as the official file, key order included
    assert out.read_text().splitlines() == METADATA.read_text().splitlines()


def _write_lines(path: Path, objs: list[object | str]) -> Path:
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs]
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a cow"}


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "m.jsonl", [GOOD, GOOD, '{"tag": "colors", '])
    with pytest.raises(GenEvalFormatError, match=r"m\.jsonl:3: malformed JSON"):
        load_geneval_metadata(path)


def test_unknown_tag_is_kept_as_its_own_task(tmp_path: Path) -> None:
    # GenEval's evaluator reads any tag (only "counting" changes the threshold) and
    # summary_scores.py groups by it: a tag outside the six is a task of its own, not an error
    path = _write_lines(tmp_path / "t.jsonl", [GOOD, {**GOOD, "tag": "texture"}])
    records = load_geneval_metadata(path)
    assert [r.tag for r in records] == ["single_object", "texture"]
    assert tag_counts(records) == {"single_object": 1, "texture": 1}


@pytest.mark.parametrize("tag", [None, 3, "", ["colors"]])
def test_tag_must_be_a_string(tmp_path: Path, tag: object) -> None:
    path = _write_lines(tmp_path / "t.jsonl", [GOOD, {**GOOD, "tag": tag}])
    with pytest.raises(GenEvalFormatError, match=r"t\.jsonl:2: 'tag' must be a non-empty str"):
        load_geneval_metadata(path)


def test_missing_key(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "k.jsonl", [{"tag": "colors", "include": GOOD["include"]}])
    with pytest.raises(GenEvalFormatError, match=r"k\.jsonl:1: missing key 'prompt'"):
        load_geneval_metadata(path)


@pytest.mark.parametrize(
    ("clause", "message"),
    [
        ({"class": "dog", "count": 1, "position": ["right of", 1]}, "earlier include clause"),
        ({"class": "dog", "count": 1, "position": ["right of", -1]}, "earlier include clause"),
        ({"class": "dog", "count": 1, "position": ["near", 0]}, "unknown relation 'near'"),
        ({"class": "dog", "count": 1, "position": "right of"}, r"\[relation, index\]"),
        ({"class": "dog", "count": 0}, "positive int"),
        ({"class": "dog", "count": True}, "positive int"),
        ({"class": "dog", "count": 1.5}, "positive int"),
        ({"class": "dog", "count": 1, "color": 3}, "'color' must be"),
        ({"class": "dog"}, "missing key 'count'"),
    ],
)
def test_bad_clause(tmp_path: Path, clause: dict, message: str) -> None:
    rec = {"tag": "position", "include": [{"class": "cat", "count": 1}, clause], "prompt": "p"}
    path = _write_lines(tmp_path / "c.jsonl", [GOOD, GOOD, rec])
    with pytest.raises(GenEvalFormatError, match=rf"c\.jsonl:3: include\[1\].*{message}"):
        load_geneval_metadata(path)


def test_position_must_point_backwards(tmp_path: Path) -> None:
    rec = {
        "tag": "position",
        "include": [{"class": "dog", "count": 1, "position": ["above", 0]}],
        "prompt": "p",
    }
    path = _write_lines(tmp_path / "p.jsonl", [rec])
    with pytest.raises(GenEvalFormatError, match=r"p\.jsonl:1: include\[0\].*index 0"):
        load_geneval_metadata(path)


def test_exclude_rejects_color(tmp_path: Path) -> None:
    rec = {**GOOD, "exclude": [{"class": "cow", "count": 2, "color": "red"}]}
    path = _write_lines(tmp_path / "e.jsonl", [rec])
    with pytest.raises(GenEvalFormatError, match=r"e\.jsonl:1: exclude\[0\] has unknown key"):
        load_geneval_metadata(path)


def test_image_path_layout(tmp_path: Path) -> None:
    assert geneval_image_path("/x", 7) == Path("/x/00007/samples/0000.png")
    assert geneval_image_path(Path("/x"), 552, 3) == Path("/x/00552/samples/0003.png")


def test_write_sample_dir(tmp_path: Path) -> None:
    from PIL import Image

    rec = GenEvalRecord(
        tag="counting",
        prompt="a photo of two clocks",
        include=[{"class": "clock", "count": 2}],
        exclude=[{"class": "clock", "count": 3}],
    )
    imgs = [np.full((8, 6, 3), i * 40, dtype=np.uint8) for i in range(3)]
    paths = write_geneval_sample_dir(tmp_path, 12, rec, imgs)
    assert paths == [geneval_image_path(tmp_path, 12, i) for i in range(3)]
    assert list_geneval_samples(tmp_path, 12) == paths
    meta = json.loads((tmp_path / "00012" / "metadata.jsonl").read_text())
    assert meta == rec.to_json() and list(meta) == ["tag", "include", "exclude", "prompt"]
    back = np.asarray(Image.open(paths[2]))
    assert back.shape == (8, 6, 3) and (back == 80).all()
