"""File readers: every format from small files written here, auto-detection, held-out split,
and a clear error (file, record, what was expected) for each kind of bad input."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedumm.config import ConfigError, load_config
from fedumm.data.official import VQARecord
from fedumm.data.readers import DataFileError, heldout_split, read_samples
from fedumm.data.readers.vqa_v2_files import write_vqa_v2
from fedumm.data.scenarios import GENERATION, UNDERSTANDING

QA = [("What color is the ball?", "red"), ("How many dogs are there?", "2"),
      ("Is it raining?", "yes")]


def image(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_images(folder: Path, n: int, prefix: str = "img") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{prefix}{i}.png"
        Image.fromarray(image(i)).save(folder / name)
        names.append(name)
    return names


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def files_cfg(**data):
    overrides = ["data.format=files", "data.heldout_fraction=0"]
    overrides += [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, overrides).data


def llava(names):
    return [{"id": f"r{i}", "image": n, "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
        for i, (n, (q, a)) in enumerate(zip(names, QA, strict=True))]


def test_conversation_layouts_give_the_same_samples(tmp_path):
    names = write_images(tmp_path, 3)
    layouts = {
        "llava.json": None,
        "sharegpt.jsonl": [{"id": f"r{i}", "images": [n], "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": a}]}
            for i, (n, (q, a)) in enumerate(zip(names, QA, strict=True))],
        "trl.jsonl": [{"id": f"r{i}", "images": [n], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]}]}
            for i, (n, (q, a)) in enumerate(zip(names, QA, strict=True))],
        "qa.jsonl": [{"id": f"r{i}", "image": n, "question": q, "answer": a}
                     for i, (n, (q, a)) in enumerate(zip(names, QA, strict=True))],
    }
    (tmp_path / "llava.json").write_text(json.dumps(llava(names)))  # a JSON list, as LLaVA's
    for name, recs in layouts.items():
        if recs is not None:
            write_jsonl(tmp_path / name, recs)
    with (tmp_path / "qa.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "question", "answer"])
        w.writerows([f"r{i}", n, q, a] for i, (n, (q, a)) in enumerate(zip(names, QA,
                                                                             strict=True)))
    results = {}
    for name in [*layouts, "qa.csv"]:
        samples = read_samples(files_cfg(understanding=tmp_path / name))
        results[name] = [(s.id, s.task, s.text, s.answer, s.labels) for s in samples]
        np.testing.assert_array_equal(samples[1].load_image(), image(1))
    expected = results["llava.json"]
    assert [(t[2], t[3]) for t in expected] == QA
    assert expected[0][4] == {"answer": "red", "answer_type": "other",
                              "question_type": "what color"}
    assert expected[1][4]["answer_type"] == "number" and expected[2][4]["answer_type"] == "yes/no"
    assert all(r == expected for r in results.values()), results


def test_multi_turn_is_split_into_turns_and_text_only_records_have_no_image(tmp_path):
    write_images(tmp_path, 1)
    write_jsonl(tmp_path / "u.jsonl", [
        {"id": "a", "image": "img0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"},
            {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "no"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Say hi"},
                                      {"from": "gpt", "value": "hi"}]}])
    samples = read_samples(files_cfg(understanding=tmp_path / "u.jsonl"))
    assert [(s.id, s.text, s.answer) for s in samples] == [
        ("a#0", "What is it?", "a cat"), ("a#1", "Is it big?", "no"), ("b", "Say hi", "hi")]
    assert samples[0].image is samples[1].image and samples[2].image is None


def test_vqa_v2_files_keep_ten_answers_and_annotation_labels(tmp_path):
    recs = [VQARecord(question_id=10 + i, image_id=i % 2, question=q, question_type="what",
                      answer_type="other", multiple_choice_answer=a, answers=[a] * 9 + ["x"])
            for i, (q, a) in enumerate(QA)]
    write_vqa_v2(tmp_path / "vqa", "val2014", recs, {0: image(0), 1: image(1)})
    for path in (tmp_path / "vqa", tmp_path / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"):
        samples = read_samples(files_cfg(understanding=path))
        assert [s.id for s in samples] == ["q10", "q11", "q12"]
        assert samples[0].answers == ("red",) * 9 + ("x",)
        assert samples[1].labels["question_type"] == "what"
        np.testing.assert_array_equal(samples[2].load_image(), image(0))
    (tmp_path / "vqa" / "val2014" / "COCO_val2014_000000000001.png").unlink()
    with pytest.raises(DataFileError, match=r"question 11: image 1 not found"):
        read_samples(files_cfg(understanding=tmp_path / "vqa"))


def test_vqa_v2_annotation_labels_are_each_records_own(tmp_path):
    """Records whose derived labels coincide (same first two words, same answer) keep their own
    annotated question and answer types: labels are shared between records, never edited."""
    types = ["what color is", "what color are", "what color"]
    recs = [VQARecord(question_id=i, image_id=0, question=f"what color {v} it", question_type=t,
                      answer_type=("other", "yes/no", "number")[i],
                      multiple_choice_answer="red", answers=["red"] * 10)
            for i, (v, t) in enumerate(zip(["is", "are", "was"], types, strict=True))]
    write_vqa_v2(tmp_path / "vqa", "val2014", recs, {0: image(0)})
    samples = read_samples(files_cfg(understanding=tmp_path / "vqa"))
    assert [s.labels["question_type"] for s in samples] == types
    assert [s.labels["answer_type"] for s in samples] == ["other", "yes/no", "number"]
    again = read_samples(files_cfg(understanding=tmp_path / "vqa"))  # the shared cache is intact
    assert [s.labels["question_type"] for s in again] == types


def write_shard(path: Path, items: list[tuple[str, np.ndarray | None, str | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, img, text in items:
            members = []
            if img is not None:
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                members.append((f"{key}.png", buf.getvalue()))
            if text is not None:
                members.append((f"{key}.txt", text.encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_generation_layouts(tmp_path):
    prompts = ["a red ball", "two dogs", "rain over a city"]
    folder = tmp_path / "folder"
    names = write_images(folder, 3)
    write_jsonl(folder / "metadata.jsonl",
                [{"file_name": n, "text": p} for n, p in zip(names, prompts, strict=True)])
    table = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image_path": f"folder/{n}", "caption": p, "domain": "web"}
        for n, p in zip(names, prompts, strict=True)])
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", [(f"k{i}", image(i), p)
                                       for i, p in enumerate(prompts[:2])])
    write_shard(shards / "00001.tar", [("k2", image(2), prompts[2])])
    for spec in (folder, table, shards, f"{shards}/*.tar"):
        samples = read_samples(files_cfg(generation=spec))
        assert [s.text for s in samples] == prompts, spec
        assert all(s.task == GENERATION and s.labels["tag"] == "image" for s in samples)
        for i, s in enumerate(samples):
            np.testing.assert_array_equal(s.load_image(), image(i))
    assert read_samples(files_cfg(generation=table))[0].labels["domain"] == "web"
    assert len(read_samples(files_cfg(generation=shards, max_samples=2))) == 2


def test_both_modalities_and_a_seeded_heldout_split(tmp_path):
    names = write_images(tmp_path / "imgs", 3)
    write_jsonl(tmp_path / "u.jsonl", [
        {"id": f"u{i}", "image": n, "question": q, "answer": a}
        for i, (n, (q, a)) in enumerate(zip(names, QA, strict=True))])
    write_jsonl(tmp_path / "g.jsonl", [{"id": f"g{i}", "file_name": n, "text": f"p{i}"}
                                       for i, n in enumerate(names)])
    cfg = files_cfg(understanding=tmp_path / "u.jsonl", generation=tmp_path / "g.jsonl",
                    images=tmp_path / "imgs", heldout_fraction=0.34, seed=3)
    train, val = read_samples(cfg, "train"), read_samples(cfg, "val")
    assert [s.task for s in train + val].count(UNDERSTANDING) == 3
    assert train[0].task == UNDERSTANDING and train[-1].task == GENERATION
    assert len(val) == 2 and {s.id for s in train}.isdisjoint(s.id for s in val)
    assert [s.id for s in read_samples(cfg, "val")] == [s.id for s in val]  # seeded
    assert len(read_samples(cfg, "all")) == 6
    # held-out files instead of a split
    write_jsonl(tmp_path / "v.jsonl", [
        {"id": f"v{i}", "image": n, "question": q, "answer": a}
        for i, (n, (q, a)) in enumerate(zip(names, QA, strict=True))])
    cfg2 = files_cfg(understanding=tmp_path / "u.jsonl", understanding_val=tmp_path / "v.jsonl",
                     images=tmp_path / "imgs")
    assert len(read_samples(cfg2, "train")) == len(read_samples(cfg2, "val")) == 3
    # the same records on both sides would score what was trained on: refused by id
    cfg3 = files_cfg(understanding=tmp_path / "u.jsonl", understanding_val=tmp_path / "u.jsonl",
                     images=tmp_path / "imgs")
    with pytest.raises(DataFileError, match=r"share the id 'u0' \(in .*u\.jsonl "
                       r"\(data\.understanding\) and in .*u\.jsonl \(data\.understanding_val\)"):
        read_samples(cfg3, "train")


def test_heldout_split_keeps_questions_about_one_image_together(tmp_path):
    names = write_images(tmp_path, 4)
    recs = [{"id": f"{i}", "image": names[i % 4], "question": f"q{i}", "answer": "a"}
            for i in range(20)]
    samples = read_samples(files_cfg(understanding=write_jsonl(tmp_path / "u.jsonl", recs)))
    train, val = heldout_split(samples, 0.25, seed=0)
    assert len(val) == 5 and len({s.image.path for s in val}) == 1
    assert {s.image.path for s in train}.isdisjoint(s.image.path for s in val)
    assert [s.id for s in train] == sorted((s.id for s in train), key=int)  # file order kept


@pytest.mark.parametrize("content, where, message", [
    ('{"image": "img0.png", "question": "q"}\n', "line 1", r"no 'answer'"),
    ('{"image": "img0.png", "question": "q", "answer": "a"}\n{"oops"\n', "line 2",
     "malformed JSON"),
    ('{"image": "nope.png", "question": "q", "answer": "a"}\n', "line 1", "image not found"),
    ('{"images": ["img0.png", "img0.png"], "messages": [{"role": "user", "content": "q"}]}\n',
     "line 1", "2 images"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}\n', "line 1", "unknown role 'bot'"),
    ('{"conversations": [{"from": "human", "value": "x"}]}\n', "line 1", "no user turn answered"),
    ('{"text": "hello"}\n', "line 1", "not a conversation record"),
    ('{"conversations": []}\n{"question": "q", "answer": "a"}\n', "line 1", "no user turn"),
])
def test_bad_understanding_records_name_file_and_record(tmp_path, content, where, message):
    write_images(tmp_path, 1)
    path = tmp_path / "u.jsonl"
    path.write_text(content)
    with pytest.raises(DataFileError, match=message) as err:
        read_samples(files_cfg(understanding=path))
    assert str(path) in str(err.value) and f": {where}:" in str(err.value)


def test_bad_generation_inputs(tmp_path):
    write_images(tmp_path, 1)
    with pytest.raises(DataFileError, match=r"line 1: no a text column \(one of text"):
        read_samples(files_cfg(generation=write_jsonl(tmp_path / "g.jsonl",
                                                      [{"file_name": "img0.png"}])))
    shard = write_shard(tmp_path / "s.tar", [("a", image(0), "ok"), ("b", image(1), None)])
    with pytest.raises(DataFileError, match=r"s.tar: sample b: has an image but no prompt"):
        read_samples(files_cfg(generation=shard))
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    with pytest.raises(DataFileError, match="not a readable tar archive"):
        read_samples(files_cfg(generation=tmp_path / "bad.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFileError, match="unknown generation data; expected an image folder"):
        read_samples(files_cfg(generation=tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="data.generation: no such file or folder"):
        read_samples(files_cfg(generation=tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        read_samples(files_cfg(generation=f"{tmp_path}/*.nothing"))


def test_duplicate_ids_and_config_errors(tmp_path):
    write_images(tmp_path, 1)
    rec = {"id": "x", "image": "img0.png", "question": "q", "answer": "a"}
    path = write_jsonl(tmp_path / "u.jsonl", [rec, rec])
    with pytest.raises(ValueError, match="two samples share the id 'x'"):
        read_samples(files_cfg(understanding=path))
    with pytest.raises(ConfigError, match="needs data.understanding and/or data.generation"):
        load_config(None, ["data.format=files"])
    with pytest.raises(ConfigError, match="data.understanding is set but data.format=shapes"):
        load_config(None, [f"data.understanding={path}"])


def test_shard_indexing_and_image_checks_report_progress(tmp_path, monkeypatch):
    from fedumm.data.progress import reporting
    from fedumm.data.readers import common

    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        write_shard(shards / f"{k:05d}.tar", [(f"k{k}", image(k), f"prompt {k}")])
    seen: list[tuple[str, int, int | None]] = []
    with reporting(lambda what, done, total: seen.append((what, done, total))):
        read_samples(files_cfg(generation=shards))
    assert seen == [("indexing shards", i, 3) for i in (1, 2, 3)]
    read_samples(files_cfg(generation=shards))  # outside `reporting`: nothing is reported
    assert len(seen) == 3

    monkeypatch.setattr(common, "_REPORT_EVERY", 2)
    resolver = common.ImageResolver(tmp_path / "imgs")
    (tmp_path / "imgs").mkdir()
    for k in range(5):
        Image.fromarray(image(k)).save(tmp_path / "imgs" / f"{k}.png")
    seen.clear()
    with reporting(lambda what, done, total: seen.append((what, done, total))):
        for k in [0, 1, 1, 2, 3, 4]:  # a repeated image is checked (and counted) once
            resolver(f"{k}.png", tmp_path / "data.json", f"record {k}")
    assert seen == [("checking images", 2, None), ("checking images", 4, None)]
