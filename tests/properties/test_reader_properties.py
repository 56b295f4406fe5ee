"""Property tests of the data readers: generated conversation and text-image files (JSONL,
JSON list, CSV; valid records, broken ones, random bytes), VQA v2 folders and WebDataset shards
either read into well-formed samples with unique ids, or raise one ValueError naming the file
(and the record). Reading never writes anything."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from fedumm.config import load_config
from fedumm.data.readers import read_samples
from fedumm.data.scenarios import GENERATION, UNDERSTANDING


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> Path:
    """Good images, and image files that are not (a truncated PNG, a header declaring
    20000 x 20000 pixels, text named .png)."""
    root = tmp_path_factory.mktemp("pics")
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(root / f"ok{i}.png")
    whole = (root / "ok0.png").read_bytes()
    (root / "cut.png").write_bytes(whole[:20])
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (root / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR"
                                    + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    (root / "text.png").write_text("not an image")
    return root


IMAGE = st.sampled_from(["ok0.png", "ok1.png", "ok2.png", "ok0.png", "ok1.png", "cut.png",
                         "huge.png", "text.png", "missing.png", "", "../ok0.png"])
TEXT = st.one_of(st.sampled_from(["what colour?", "red", "<image>\nhow many?", "2", "yes"]),
                 st.text(max_size=8))
JUNK = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=6)),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.text(max_size=5), inner, max_size=3), max_leaves=8)
ID = st.one_of(st.sampled_from(["a", "b", "c", "d", "e", "f"]), st.integers(0, 5), JUNK)


def _maybe(draw, value, junk_weight: int = 8):
    """``value`` most of the time, sometimes junk of any JSON type."""
    # a middle value: Hypothesis draws the ends of a range (0 first) far more often
    return draw(JUNK) if draw(st.integers(0, junk_weight)) == junk_weight // 2 else value


@st.composite
def records(draw: st.DrawFn, layout: str) -> dict:
    q, a, img = draw(TEXT), draw(TEXT), draw(IMAGE)
    if layout == "llava":
        rec = {"id": draw(ID), "image": img, "conversations": [
            {"from": _maybe(draw, "human"), "value": _maybe(draw, f"<image>\n{q}")},
            {"from": _maybe(draw, "gpt"), "value": _maybe(draw, a)}]}
    elif layout == "sharegpt":
        rec = {"id": draw(ID), "images": _maybe(draw, [img]), "messages": [
            {"role": "user", "content": _maybe(draw, q)},
            {"role": _maybe(draw, "assistant"), "content": a}]}
    elif layout == "trl":
        rec = {"images": [img], "messages": [
            {"role": "user", "content": _maybe(draw, [{"type": "image"},
                                                      {"type": "text", "text": q}])},
            {"role": "assistant", "content": [{"type": "text", "text": _maybe(draw, a)}]}]}
    elif layout == "qa":
        rec = {"id": draw(ID), "image": img, "question": _maybe(draw, q),
               "answer": _maybe(draw, a)}
        if draw(st.booleans()):
            rec["answers"] = _maybe(draw, [a] * 3)
    else:  # a text-image row
        rec = {"id": draw(ID), draw(st.sampled_from(["file_name", "image", "path"])): img,
               draw(st.sampled_from(["text", "prompt", "caption"])): _maybe(draw, q)}
    for key in draw(st.lists(st.sampled_from(sorted(rec)), max_size=1)):
        del rec[key]  # a missing key now and then
    return _maybe(draw, rec, junk_weight=15)


def write(path: Path, recs: list, kind: str) -> Path:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif kind == "json":
        path.write_text(json.dumps(recs))
    else:  # csv: flat records only, as a spreadsheet would hold them
        buf = io.StringIO()
        keys = sorted({k for r in recs if isinstance(r, dict) for k in r})
        w = csv.writer(buf)
        w.writerow(keys or ["x"])
        for r in recs:
            w.writerow([json.dumps(r.get(k)) if isinstance(r, dict) and isinstance(
                r.get(k), (list, dict)) else (r.get(k, "") if isinstance(r, dict) else r)
                for k in keys] if keys else [r])
        path.write_text(buf.getvalue())
    return path


def read(modality: str, path: Path, images: Path | None = None) -> list:
    cfg = load_config(None, ["data.format=files", f"data.{modality}={path}",
                             "data.heldout_fraction=0",
                             *([f"data.images={images}"] if images else [])]).data
    return read_samples(cfg, "all")


def assert_samples(samples: list, task: str) -> None:
    assert samples, "a read that succeeds has samples"
    assert len({s.id for s in samples}) == len(samples)
    for s in samples:
        assert s.task == task and isinstance(s.id, str)
        assert s.text is None or isinstance(s.text, str)
        if task == UNDERSTANDING:
            assert isinstance(s.answer, str)
        if s.image is not None:
            assert Path(s.image.path).is_file()


LAYOUTS = {UNDERSTANDING: ["llava", "sharegpt", "trl", "qa"], GENERATION: ["table"]}


@pytest.mark.parametrize("modality", [UNDERSTANDING, GENERATION])
def test_generated_record_files_read_or_name_the_file(pics, tmp_path_factory, guard, clear,
                                                      modality):
    folder = tmp_path_factory.mktemp(modality)

    @given(st.sampled_from(LAYOUTS[modality]).flatmap(lambda lay: st.lists(records(lay),
                                                                         max_size=5)),
           st.sampled_from(["jsonl", "json", "csv"]))
    @settings(max_examples=80)
    def check(recs: list, kind: str) -> None:
        path = write(folder / f"data.{kind}", recs, kind)
        with guard(folder) as outside:
            try:
                samples = read(modality, path, pics)
            except Exception as exc:  # noqa: BLE001
                event("refused")
                clear(exc, path.name)
            else:
                event("read")
                assert_samples(samples, modality)
        assert not outside, outside

    check()


@given(st.binary(max_size=120), st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".tar",
                                                  ".parquet"]),
       st.sampled_from([UNDERSTANDING, GENERATION]))
@settings(max_examples=80)
def test_random_bytes_name_the_file(pics, tmp_path_factory, guard, clear, data, suffix,
                                    modality):
    folder = tmp_path_factory.mktemp("bytes")
    path = folder / f"data{suffix}"
    path.write_bytes(data)
    with guard(folder) as outside:
        try:
            samples = read(modality, path, pics)
        except Exception as exc:  # noqa: BLE001
            clear(exc, path.name)
        else:
            assert_samples(samples, modality)
    assert not outside, outside


PROMPT = st.one_of(st.sampled_from([b"a prompt", b'{"prompt": "p"}', b"text"]),
                   st.sampled_from([b"", b"[1]", b"\xff\xfe", b"{", b'{"x": 1}']))
MEMBER = st.one_of(  # mostly a complete sample (an image and its prompt), sometimes not
    st.tuples(st.sampled_from(["a", "b", "c/d", "e.f"]), st.just("png"), st.just(b"png"))
    .flatmap(lambda m: st.tuples(st.just(m), st.tuples(st.just(m[0]), st.sampled_from(
        ["txt", "json", "caption"]), PROMPT)).map(list)),
    st.tuples(st.sampled_from(["a", "g", "c/d"]), st.sampled_from(["jpg", "txt", "x", "json"]),
              PROMPT).map(lambda m: [m]))


@given(st.lists(MEMBER, max_size=4).map(lambda groups: [m for g in groups for m in g]),
       st.integers(min_value=0, max_value=2000))
@settings(max_examples=60)
def test_webdataset_shards_read_or_name_the_shard(pics, tmp_path_factory, guard, clear,
                                                  members, cut):
    folder = tmp_path_factory.mktemp("wds")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, ext, content in members:
            body = (pics / "ok1.png").read_bytes() if content == b"png" else content
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    data = buf.getvalue()
    shard = folder / "s.tar"
    shard.write_bytes(data[:cut] if cut < len(data) and cut % 3 == 0 else data)
    with guard(folder) as outside:
        try:
            samples = read(GENERATION, shard, pics)
            images = [s.load_image() for s in samples]  # decoded at training time
        except Exception as exc:  # noqa: BLE001
            event("refused")
            clear(exc, "s.tar")
        else:
            event("read")
            assert_samples(samples, GENERATION)
            assert all(im.dtype == np.uint8 and im.shape[2] == 3 for im in images)
    assert not outside, outside


def _vqa_files(draw: st.DrawFn) -> tuple[dict, dict]:
    n = draw(st.integers(min_value=1, max_value=3))
    qs = [{"question_id": i, "image_id": draw(st.sampled_from([0, 0, 0, 0, 1, 2, 7])),
           "question": draw(TEXT)} for i in range(n)]
    anns = [{"question_id": q["question_id"], "image_id": q["image_id"],
             "question_type": "what", "answer_type": "other",
             "multiple_choice_answer": draw(TEXT),
             "answers": [{"answer": draw(TEXT), "answer_id": j} for j in range(2)]}
            for q in qs]
    for entries in (qs, anns):  # damage an entry now and then
        if draw(st.integers(0, 4)) == 2:
            entry = draw(st.sampled_from(entries))
            key = draw(st.sampled_from(sorted(entry)))
            if draw(st.booleans()):
                del entry[key]
            else:
                entry[key] = draw(JUNK)
    return {"questions": _maybe(draw, qs, 10)}, {"annotations": _maybe(draw, anns, 10)}


@given(st.data())
@settings(max_examples=60)
def test_vqa_v2_folders_read_or_name_the_file(pics, tmp_path_factory, guard, clear, data):
    root = tmp_path_factory.mktemp("vqa")
    questions, annotations = _vqa_files(data.draw)
    (root / "v2_OpenEnded_mscoco_s_questions.json").write_text(json.dumps(questions))
    (root / "v2_mscoco_s_annotations.json").write_text(json.dumps(annotations))
    (root / "s").mkdir()
    for image_id, source in ((0, "ok0.png"), (1, "cut.png"), (2, "huge.png")):
        (root / "s" / f"COCO_s_{image_id:012d}.png").write_bytes((pics / source).read_bytes())
    with guard(root) as outside:
        try:
            samples = read(UNDERSTANDING, root)
        except Exception as exc:  # noqa: BLE001
            event("refused")
            clear(exc, str(root))
        else:
            event("read")
            assert_samples(samples, UNDERSTANDING)
    assert not outside, outside
