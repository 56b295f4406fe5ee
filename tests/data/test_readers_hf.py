"""Hugging Face dataset reader: save_to_disk folders and parquet files, built here from tiny
PNG images (lossless, so decoded pixels must equal the originals)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from datasets import Dataset, DatasetDict, Features, Image, List, Value  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from fedumm.config import load_config  # noqa: E402
from fedumm.data.readers import hf as hf_reader  # noqa: E402
from fedumm.data.readers import read_samples  # noqa: E402
from fedumm.data.readers.common import DataFileError, ImageResolver  # noqa: E402
from fedumm.data.readers.conversations import read_conversations  # noqa: E402
from fedumm.data.readers.hf import HFImages, is_hf_dataset, read_hf  # noqa: E402
from fedumm.data.scenarios import GENERATION, UNDERSTANDING  # noqa: E402

QA_FEATURES = Features({"question": Value("string"), "answer": Value("string"),
                        "answers": List(Value("string")), "domain": Value("string"),
                        "image": Image()})


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Parquet files are converted into the datasets cache: keep it in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _arrays(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8) for i in range(n)]


def _pil(arrays: list[np.ndarray]) -> list[PILImage.Image]:
    return [PILImage.fromarray(a) for a in arrays]  # no format: datasets stores them as PNG


def _qa_dataset(arrays: list[np.ndarray]) -> Dataset:
    n = len(arrays)
    return Dataset.from_dict(
        {"question": [f"What colour is thing {i}?" for i in range(n)],
         "answer": ["red", "2", "yes", "blue"][:n] + ["green"] * max(0, n - 4),
         "answers": [["red", "red", "pink"]] * n, "domain": ["a", "b"] * (n // 2) + ["a"] * (n % 2),
         "image": _pil(arrays)}, features=QA_FEATURES)


def test_qa_round_trip_never_decodes_while_reading(tmp_path, monkeypatch) -> None:
    arrays = _arrays(4)
    _qa_dataset(arrays).save_to_disk(str(tmp_path / "qa"))

    def no_decode(*_a, **_k):
        raise AssertionError("an image was decoded while indexing")

    monkeypatch.setattr(hf_reader, "decode_image", no_decode)
    samples = read_hf(tmp_path / "qa", UNDERSTANDING, "", 0)
    monkeypatch.undo()
    assert [s.id for s in samples] == [f"qa:{i}" for i in range(4)]
    assert [s.text for s in samples] == [f"What colour is thing {i}?" for i in range(4)]
    assert [s.answer for s in samples] == ["red", "2", "yes", "blue"]
    assert samples[0].answers == ("red", "red", "pink")
    assert samples[0].task == UNDERSTANDING
    assert samples[1].labels["answer_type"] == "number"
    assert samples[2].labels["answer_type"] == "yes/no"
    assert [s.labels["domain"] for s in samples] == ["a", "b", "a", "b"]
    assert isinstance(samples[0].image.table, HFImages)
    assert samples[3].image.describe() == f"{tmp_path / 'qa'}[3]"
    for s, a in zip(samples, arrays, strict=True):
        np.testing.assert_array_equal(s.load_image(), a)
    # a sample pickles (e.g. to a data-loader worker) and still loads its image
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(samples[2])).load_image(), arrays[2])


@pytest.mark.parametrize("style", ["sharegpt", "trl"])
def test_messages_layout_matches_jsonl(tmp_path, style) -> None:
    arrays = _arrays(2, seed=1)
    for i, a in enumerate(arrays):
        PILImage.fromarray(a).save(tmp_path / f"img{i}.png")

    def user(text):
        if style == "trl":
            return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        return {"role": "user", "content": f"<image>{text}"}

    def assistant(text):
        if style == "trl":
            return {"role": "assistant", "content": [{"type": "text", "text": text}]}
        return {"role": "assistant", "content": text}

    records = [
        {"id": "r0", "messages": [{"role": "system", "content": "Be brief."} if style == "sharegpt"
                                  else {"role": "system", "content": [
                                      {"type": "text", "text": "Be brief."}]},
                                  user("How many cats?"), assistant("3"),
                                  user("Is it day?"), assistant("no")],
         "images": ["img0.png"]},
        {"id": "r1", "messages": [user("What is this?"), assistant("a red square")],
         "images": ["img1.png"]},
    ]
    jsonl = tmp_path / "conv.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = read_conversations(jsonl, ImageResolver(tmp_path))

    rows = {"id": [r["id"] for r in records], "messages": [r["messages"] for r in records],
            "images": [[PILImage.open(tmp_path / p) for p in r["images"]] for r in records]}
    ds = Dataset.from_dict(rows)
    ds = ds.cast_column("images", List(Image()))
    ds.to_parquet(str(tmp_path / "conv.parquet"))
    got = read_hf(tmp_path / "conv.parquet", UNDERSTANDING, "", 0)

    assert [s.id for s in got] == [s.id for s in expected] == ["r0#0", "r0#1", "r1"]
    assert [(s.text, s.answer, s.answers, s.labels) for s in got] == \
           [(s.text, s.answer, s.answers, s.labels) for s in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g.load_image(), e.load_image())


def test_generation_from_parquet(tmp_path) -> None:
    arrays = _arrays(3, seed=2)
    ds = Dataset.from_dict({"prompt": ["a cat", "a dog", "two birds"], "tag": ["x", "y", "x"],
                            "image": _pil(arrays)},
                           features=Features({"prompt": Value("string"), "tag": Value("string"),
                                              "image": Image()}))
    ds.to_parquet(str(tmp_path / "gen.parquet"))
    samples = read_hf(tmp_path / "gen.parquet", GENERATION, "", 0)
    assert [s.text for s in samples] == ["a cat", "a dog", "two birds"]
    assert [s.task for s in samples] == [GENERATION] * 3
    assert [s.labels["tag"] for s in samples] == ["x", "y", "x"]
    assert samples[0].id == "gen.parquet:0"
    for s, a in zip(samples, arrays, strict=True):
        np.testing.assert_array_equal(s.load_image(), a)


def test_string_paths_resolved_and_missing_file_named(tmp_path) -> None:
    arrays = _arrays(2, seed=3)
    (tmp_path / "pics").mkdir()
    for i, a in enumerate(arrays):
        PILImage.fromarray(a).save(tmp_path / "pics" / f"{i}.png")
    Dataset.from_dict({"file_name": ["pics/0.png", "pics/1.png"], "text": ["zero", "one"]}
                      ).to_parquet(str(tmp_path / "paths.parquet"))
    samples = read_hf(tmp_path / "paths.parquet", GENERATION, "", 0)
    assert [s.image.path for s in samples] == [str(tmp_path / "pics" / f"{i}.png")
                                               for i in range(2)]
    np.testing.assert_array_equal(samples[1].load_image(), arrays[1])
    # data.images changes the root
    samples = read_hf(tmp_path / "paths.parquet", GENERATION, str(tmp_path), 0)
    assert samples[0].image.path == str(tmp_path / "pics" / "0.png")

    # an Image struct holding only a path (not embedded): resolved like a path string
    import pyarrow as pa
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"text": ["one"], "image": pa.array(
        [{"bytes": None, "path": "pics/1.png"}], struct)}), tmp_path / "refs.parquet")
    (ref,) = read_hf(tmp_path / "refs.parquet", GENERATION, "", 0)
    assert ref.image.path == str(tmp_path / "pics" / "1.png") and ref.image.table is None
    np.testing.assert_array_equal(ref.load_image(), arrays[1])

    Dataset.from_dict({"file_name": ["pics/0.png", "pics/gone.png"], "text": ["zero", "one"]}
                      ).save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(DataFileError, match=r"row 1: image not found: .*pics/gone\.png"):
        read_hf(tmp_path / "broken", GENERATION, str(tmp_path), 0)


def test_dataset_dict_splits(tmp_path) -> None:
    one = DatasetDict({"train": _qa_dataset(_arrays(2))})
    one.save_to_disk(str(tmp_path / "one"))
    samples = read_hf(tmp_path / "one", UNDERSTANDING, "", 0)
    assert len(samples) == 2 and samples[0].id == "one:0"

    two = DatasetDict({"train": _qa_dataset(_arrays(2)), "test": _qa_dataset(_arrays(1))})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataFileError, match=r"splits .*'train'.*give one split's folder, e\.g\. "
                                            r"data\.understanding=.*two/"):
        read_hf(tmp_path / "two", UNDERSTANDING, "", 0)
    assert len(read_hf(tmp_path / "two" / "test", UNDERSTANDING, "", 0)) == 1


def test_parquet_folder_of_several_splits_refused(tmp_path) -> None:
    folder = tmp_path / "hub"
    folder.mkdir()
    _qa_dataset(_arrays(2)).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    _qa_dataset(_arrays(1)).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    with pytest.raises(DataFileError, match=r"several splits \(test, train\)"):
        read_hf(folder, UNDERSTANDING, "", 0)
    (folder / "test-00000-of-00001.parquet").unlink()
    assert len(read_hf(folder, UNDERSTANDING, "", 0)) == 2


def test_missing_columns_named(tmp_path) -> None:
    Dataset.from_dict({"caption": ["x"], "score": [1]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataFileError, match=r"has \['caption', 'score'\].*'question' \+ "
                                            r"'answer'.*'messages'"):
        read_hf(tmp_path / "d", UNDERSTANDING, "", 0)
    with pytest.raises(DataFileError,
                       match=r"no image column \(one of file_name, image, image_path, path, img\)"):
        read_hf(tmp_path / "d", GENERATION, "", 0)
    Dataset.from_dict({"image": ["a.png"], "label": [1]}).save_to_disk(str(tmp_path / "e"))
    with pytest.raises(DataFileError, match=r"text column \(one of text, prompt, caption\)"):
        read_hf(tmp_path / "e", GENERATION, "", 0)
    # a row with an empty answer: the row is named
    Dataset.from_dict({"question": ["q0", "q1"], "answer": ["a", None]}).save_to_disk(
        str(tmp_path / "f"))
    with pytest.raises(DataFileError, match=r"row 1: no 'answer'"):
        read_hf(tmp_path / "f", UNDERSTANDING, "", 0)
    # an image column that holds no images
    Dataset.from_dict({"question": ["q"], "answer": ["a"], "image": [3]}).save_to_disk(
        str(tmp_path / "g"))
    with pytest.raises(DataFileError, match=r"column 'image' holds int64"):
        read_hf(tmp_path / "g", UNDERSTANDING, "", 0)


def test_two_images_per_row_refused_and_text_only_rows(tmp_path) -> None:
    a, b = _pil(_arrays(2))
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}]
    ds = Dataset.from_dict({"messages": [msgs, msgs, msgs], "images": [[a], [], [a, b]]},
                           features=Features({"messages": List({"role": Value("string"),
                                                                "content": Value("string")}),
                                              "images": List(Image())}))
    ds.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataFileError, match=r"row 2: 2 images in 'images'"):
        read_hf(tmp_path / "d", UNDERSTANDING, "", 0)
    samples = read_hf(tmp_path / "d", UNDERSTANDING, "", 2)  # stops before row 2
    assert samples[0].image is not None and samples[1].image is None


def test_max_samples(tmp_path) -> None:
    _qa_dataset(_arrays(5)).save_to_disk(str(tmp_path / "qa"))
    assert [s.id for s in read_hf(tmp_path / "qa", UNDERSTANDING, "", 2)] == ["qa:0", "qa:1"]
    assert len(read_hf(tmp_path / "qa", UNDERSTANDING, "", 0)) == 5


def test_is_hf_dataset(tmp_path) -> None:
    _qa_dataset(_arrays(1)).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": _qa_dataset(_arrays(1))}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq").mkdir()
    _qa_dataset(_arrays(1)).to_parquet(str(tmp_path / "pq" / "x.parquet"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "metadata.jsonl").write_text("{}\n")
    (tmp_path / "a.jsonl").write_text("{}\n")
    assert is_hf_dataset(tmp_path / "saved")
    assert is_hf_dataset(tmp_path / "dict")
    assert is_hf_dataset(tmp_path / "pq")
    assert is_hf_dataset(tmp_path / "pq" / "x.parquet")
    assert not is_hf_dataset(tmp_path / "folder")
    assert not is_hf_dataset(tmp_path / "a.jsonl")
    assert not is_hf_dataset(tmp_path / "nothing")
    assert not is_hf_dataset(Path(str(tmp_path / "saved" / "state.json")))


def test_missing_extra_says_how_to_install(tmp_path, monkeypatch) -> None:
    _qa_dataset(_arrays(1)).save_to_disk(str(tmp_path / "qa"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"optional 'hf' extra: pip install 'fedumm\[hf\]'"):
        read_hf(tmp_path / "qa", UNDERSTANDING, "", 0)


def test_read_samples_end_to_end(tmp_path) -> None:
    arrays = _arrays(3, seed=4)
    _qa_dataset(arrays).save_to_disk(str(tmp_path / "qa"))
    gen = Dataset.from_dict({"text": ["p0", "p1"], "image": _pil(arrays[:2])},
                            features=Features({"text": Value("string"), "image": Image()}))
    gen.to_parquet(str(tmp_path / "gen.parquet"))
    cfg = load_config(None, ["data.format=files", f"data.understanding={tmp_path / 'qa'}",
                             f"data.generation={tmp_path / 'gen.parquet'}",
                             "data.heldout_fraction=0"])
    samples = read_samples(cfg.data, "train")
    assert [s.task for s in samples] == [UNDERSTANDING] * 3 + [GENERATION] * 2
    assert [s.id for s in samples] == ["qa:0", "qa:1", "qa:2", "gen.parquet:0", "gen.parquet:1"]
    np.testing.assert_array_equal(samples[2].load_image(), arrays[2])
    np.testing.assert_array_equal(samples[4].load_image(), arrays[1])


@pytest.mark.parametrize("elsewhere", [False, True])
def test_metadata_folder_matches_imagefolder(tmp_path, elsewhere) -> None:
    """A metadata.jsonl folder names its images relative to itself, as datasets' imagefolder
    reads it, even when data.images (the LLaVA root) holds same-named different images."""
    arrays = _arrays(3, seed=5)
    folder = tmp_path / "t2i"
    (folder / "imgs").mkdir(parents=True)
    names = [f"imgs/{i}.png" for i in range(3)]
    for name, a in zip(names, arrays, strict=True):
        PILImage.fromarray(a).save(folder / name)
    texts = ["a cat", "a dog", "two birds"]
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": n, "text": t}) + "\n" for n, t in zip(names, texts, strict=True)))
    coco = tmp_path / "coco"
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "u0", "image": "imgs/0.png",
                                                      "conversations": [
                                                          {"from": "human", "value": "<image>q"},
                                                          {"from": "gpt", "value": "a"}]}]))
    if elsewhere:  # data.images holds an image of the same name but other pixels
        (coco / "imgs").mkdir(parents=True)
        decoy = _arrays(1, seed=6)[0]
        PILImage.fromarray(decoy).save(coco / "imgs" / "0.png")
    overrides = ["data.format=files", f"data.generation={folder}", "data.heldout_fraction=0"]
    if elsewhere:
        overrides += [f"data.understanding={tmp_path / 'llava.json'}", f"data.images={coco}"]
    samples = read_samples(load_config(None, overrides).data, "train")
    gen = [s for s in samples if s.task == GENERATION]
    if elsewhere:  # data.images still applies to the LLaVA file
        (und,) = [s for s in samples if s.task == UNDERSTANDING]
        assert und.image.path == str(coco / "imgs" / "0.png")
        np.testing.assert_array_equal(und.load_image(), decoy)

    reference = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert [s.text for s in gen] == reference["text"] == texts
    assert [s.image.path for s in gen] == [str(folder / n) for n in names]
    for s, row in zip(gen, reference, strict=True):
        np.testing.assert_array_equal(s.load_image(), np.asarray(row["image"]))
