"""FedMLLM's datasets in their published layouts, from small files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_readers import files_cfg, write_images, write_jsonl  # tests/data helpers

from fedumm.data.prompts import compose_prompt, has_text_modality
from fedumm.data.readers import DataFileError, read_samples
from fedumm.data.readers.fedmllm import HATEFUL_QUESTION


def test_hateful_memes_jsonl(tmp_path: Path):
    names = write_images(tmp_path / "img", 3)
    write_jsonl(tmp_path / "train.jsonl", [
        {"id": 42953 + i, "img": f"img/{n}", "label": i % 2, "text": f"meme text {i}"}
        for i, n in enumerate(names)])
    samples = read_samples(files_cfg(understanding=str(tmp_path / "train.jsonl")), "all")
    assert [s.answer for s in samples] == ["no", "yes", "no"]
    assert [s.context for s in samples] == ["meme text 0", "meme text 1", "meme text 2"]
    assert {s.text for s in samples} == {HATEFUL_QUESTION}
    assert {s.labels["family"] for s in samples} == {"hateful_memes"}
    assert samples[0].id == "hm42953" and samples[0].load_image().shape == (8, 8, 3)
    assert has_text_modality(samples)
    assert compose_prompt(samples[1]).text == \
        f"meme text 1 based on the text and the image , {HATEFUL_QUESTION}"


def test_hateful_memes_without_labels_is_refused(tmp_path: Path):
    names = write_images(tmp_path, 1)
    write_jsonl(tmp_path / "test.jsonl", [{"id": 1, "img": names[0], "text": "t"}])
    with pytest.raises(DataFileError, match=r"test.jsonl: line 1: label None"):
        read_samples(files_cfg(understanding=str(tmp_path / "test.jsonl")), "all")


def test_crisismmd_tsv(tmp_path: Path):
    names = write_images(tmp_path / "data_image", 2)
    header = "event_name\ttweet_id\timage_id\ttweet_text\timage\tlabel\tlabel_text\tlabel_image"
    rows = [f"harvey\t{900 + i}\t{900 + i}_0\tflooded road {i}\tdata_image/{n}\t{lab}\t{lab}\t{lab}"
            for i, (n, lab) in enumerate(zip(names, ["affected_individuals",
                                                    "not_humanitarian"], strict=True))]
    path = tmp_path / "task_humanitarian_text_img_train.tsv"
    path.write_text("\n".join([header, *rows]) + "\n")
    samples = read_samples(files_cfg(understanding=str(path)), "all")
    assert [s.answer for s in samples] == ["affected individuals", "not humanitarian"]
    assert [s.context for s in samples] == ["flooded road 0", "flooded road 1"]
    assert {s.labels["family"] for s in samples} == {"crisismmd_humanitarian"}
    assert samples[0].labels["domain"] == "harvey" and samples[0].id == "crisis900_0"
    bad = tmp_path / "task_informative_text_img_dev.tsv"
    bad.write_text("\n".join([header, "harvey\t1\t1_0\ttext\tnope.png\tinformative\tx\tx"]))
    with pytest.raises(DataFileError, match="row 2: image not found"):
        read_samples(files_cfg(understanding=str(bad)), "all")


def test_vqa_rad_json(tmp_path: Path):
    names = write_images(tmp_path / "images", 2)
    recs = [{"qid": 1, "image_name": names[0], "image_organ": "HEAD", "answer": "Yes",
             "answer_type": "CLOSED", "question_type": "PRES",
             "question": "Is there an infarct?"},
            {"qid": 2, "image_name": names[1], "image_organ": "CHEST", "answer": "Left lung",
             "answer_type": "OPEN", "question_type": "POS", "question": "Where is the mass?"}]
    path = tmp_path / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(recs))
    samples = read_samples(files_cfg(understanding=str(path), images=str(tmp_path / "images")),
                           "all")
    assert [s.answer for s in samples] == ["yes", "left lung"]
    assert [s.labels["family"] for s in samples] == ["vqa_rad_closed", "vqa_rad_open"]
    assert [s.labels["domain"] for s in samples] == ["head", "chest"]
    assert not has_text_modality(samples)
