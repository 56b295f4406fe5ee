"""A reader and a partitioner added from outside the package: one registration each, and
``read_samples`` / ``partition`` dispatch to them like to the built-in ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedumm.config import DataConfig
from fedumm.data.partition import partition, validate_partition
from fedumm.data.readers import Reader, detect_format, file_formats, read_samples, sources
from fedumm.data.records import Sample
from fedumm.data.scenarios import GENERATION, UNDERSTANDING
from fedumm.registry import PARTITIONERS, READERS


def halves(labels, num_clients: int) -> list[np.ndarray]:
    """Toy partitioner: client 0 the samples labelled ``a``, the rest shared round-robin."""
    idx = np.arange(len(labels))
    mine = np.array([lab == "a" for lab in labels])
    rest = [idx[~mine][k::num_clients - 1] for k in range(num_clients - 1)]
    return [idx[mine], *rest]


def read_toy(path: Path, modality: str, cfg: DataConfig) -> list[Sample]:
    """Toy file format: one question per line, ``question|answer``."""
    return [Sample(id=f"toy{i}", task=modality, text=q, image=None, answer=a)
            for i, (q, a) in enumerate(line.split("|") for line in path.read_text().split("\n")
                                       if line)]


def toy_source(cfg: DataConfig, role: str) -> list[Sample]:
    """Toy source: samples made from the config alone, like ShapesWorld."""
    return [Sample(id=f"{role}{i}", task=GENERATION, text=f"prompt {i}", image=None)
            for i in range(cfg.train_scenes)]


@pytest.fixture
def toys() -> Iterator[None]:
    PARTITIONERS.register("halves", halves)
    READERS.register("toy", Reader(read=read_toy, detect=lambda p: p.suffix == ".toy",
                                   modalities=(UNDERSTANDING,), order=15,
                                   expected="a .toy file"))
    READERS.register("toy_source", Reader(source=toy_source))
    yield
    PARTITIONERS.unregister("halves")
    READERS.unregister("toy")
    READERS.unregister("toy_source")


def test_a_registered_partitioner_is_dispatched_with_the_inputs_it_names(toys) -> None:
    labels = ["a", "b", "a", "c", "b", "a", "c"]
    parts = partition("halves", labels=labels, domains=["d"] * 7, num_clients=3, seed=0,
                      alpha=0.1)  # alpha, seed and domains are not the toy's: not passed
    validate_partition(parts, len(labels))
    assert [p.tolist() for p in parts] == [[0, 2, 5], [1, 4], [3, 6]]
    assert "halves" in PARTITIONERS.names()
    with pytest.raises(ValueError, match="'halves' requires the 'labels' argument"):
        partition("halves", num_clients=2, seed=0)


def test_a_registered_file_format_is_detected_and_read(toys, tmp_path: Path) -> None:
    path = tmp_path / "qa.toy"
    path.write_text("is it red?|yes\nhow many?|2\n")
    assert detect_format(UNDERSTANDING, path) == "toy"
    assert "toy" in file_formats(UNDERSTANDING) and "toy" not in file_formats(GENERATION)
    samples = read_samples(DataConfig(format="files", understanding=str(path)), "all")
    assert [(s.id, s.text, s.answer) for s in samples] == [("toy0", "is it red?", "yes"),
                                                          ("toy1", "how many?", "2")]
    unknown = tmp_path / "qa.nope"
    unknown.write_text("x")
    with pytest.raises(ValueError, match=r"unknown understanding data; expected .*a \.toy file"):
        detect_format(UNDERSTANDING, unknown)


def test_a_registered_source_is_what_data_format_names(toys) -> None:
    assert {"files", "shapes", "toy_source"} <= set(sources())
    samples = read_samples(DataConfig(format="toy_source", train_scenes=3), "val")
    assert [s.id for s in samples] == ["val0", "val1", "val2"]
    with pytest.raises(ValueError, match="'toy' is a file format"):
        read_samples(DataConfig(format="toy"))


def test_unknown_names_list_the_valid_ones(toys) -> None:
    with pytest.raises(ValueError, match=r"unknown partition method 'nope'; valid names: "
                                         r"dirichlet, domain, halves, iid, quantity_skew"):
        partition("nope", labels=["a"], num_clients=1, seed=0)
    with pytest.raises(ValueError, match=r"unknown reader 'nope'; valid names: .*files.*"
                                         r"shapes.*toy.*vqa_v2"):
        read_samples(DataConfig(format="nope"))


def test_a_reader_needs_a_source_or_a_way_to_detect_and_read() -> None:
    with pytest.raises(ValueError, match="a source, or both read and detect"):
        Reader(read=read_toy)
    with pytest.raises(ValueError, match="unknown modalities"):
        Reader(source=toy_source, modalities=("audio",))


def test_the_built_in_names() -> None:
    assert PARTITIONERS.names() == ["dirichlet", "domain", "iid", "quantity_skew"]
    assert READERS.names() == ["conversations", "fedmllm", "files", "hf", "image_folder",
                               "shapes", "text_image", "vqa_v2", "webdataset"]
    assert file_formats(UNDERSTANDING) == ["hf", "vqa_v2", "fedmllm", "conversations"]
    assert file_formats(GENERATION) == ["hf", "image_folder", "webdataset", "text_image"]
