"""Janus-Pro through transformers: a user's checkpoint folder, presets, and a federated run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedumm.config import BackboneConfig, config_from_dict
from fedumm.data.readers import read_samples
from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.models.info import backbone_info
from fedumm.models.janus import JanusBackbone
from fedumm.models.kinds import build_backbone
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.run_dir import RunDirectory


def tiny() -> JanusBackbone:
    return build_backbone(BackboneConfig(kind="janus", preset="tiny", device="cpu"))


def test_a_saved_folder_loads_back_through_backbone_path(tmp_path):
    bb = tiny()
    bb.save(tmp_path / "janus")
    again = build_backbone(BackboneConfig(kind="janus", path=str(tmp_path / "janus"),
                                          device="cpu"))
    assert again.fingerprint() == bb.fingerprint()
    data = shapes_samples(generate_shapes("base", 4, seed=0, image_size=32))
    und = [s for s in data if s.task == "understanding"][:3]
    images = [s.load_image() for s in und]
    assert again.answer(images, [s.text for s in und]) == bb.answer(images,
                                                                    [s.text for s in und])
    a, b = bb.collate(data[:3] + data[-2:]), again.collate(data[:3] + data[-2:])
    for m in a.parts:
        for k, v in a.parts[m].items():
            assert v is None or torch.equal(v, b.parts[m][k]), (m, k)
    la, lb = bb.loss(a), again.loss(b)
    assert all(torch.allclose(la[m], lb[m]) for m in la)


def test_a_folder_missing_files_is_refused_by_name(tmp_path):
    tiny().save(tmp_path / "ck")
    (tmp_path / "ck" / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="image processor config"):
        build_backbone(BackboneConfig(kind="janus", path=str(tmp_path / "ck")))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_backbone(BackboneConfig(kind="janus", path=str(tmp_path / "nope")))
    (tmp_path / "other").mkdir()
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (tmp_path / "other" / name).write_text("{}")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        build_backbone(BackboneConfig(kind="janus", path=str(tmp_path / "other")))


def test_unknown_kind_and_preset_are_config_errors():
    from fedumm.config import ConfigError

    with pytest.raises(ConfigError, match="backbone.kind"):
        config_from_dict({}, ["backbone.kind=blip9"])
    with pytest.raises(ValueError, match="presets"):
        build_backbone(BackboneConfig(kind="janus", preset="janus-pro-70b"))
    with pytest.raises(ValueError, match="fedumm backbone info"):
        build_backbone(BackboneConfig(kind="janus", preset="janus-pro-7b"))


def test_backbone_info_of_the_published_sizes():
    one = backbone_info(BackboneConfig(kind="janus", preset="janus-pro-1b"), r=16)
    seven = backbone_info(BackboneConfig(kind="janus", preset="janus-pro-7b"), r=16)
    # published sizes: about 2.09 B and 7.42 B parameters
    assert 2.0e9 < one["params_total"] < 2.2e9 and 7.3e9 < seven["params_total"] < 7.5e9
    # language LoRA by hand (7B): 30 layers x r=16 x (q,k,v,o: 4 x 2 x 4096 +
    # gate, up: 2 x (4096 + 11008) + down: 11008 + 4096)
    per_layer = 16 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert seven["adapter_params"]["language"] == 30 * per_layer
    assert seven["adapter_params"]["alignment"] == 2 * 4096  # BOI and EOI rows
    assert seven["full_model_bytes"]["bfloat16"] == 2 * seven["params_total"]
    assert seven["adapter_bytes_per_round"]["float32"] == 4 * seven["adapter_params_total"]


def test_two_clients_one_round_of_janus_tiny(tmp_path):
    cfg = config_from_dict({}, [
        "backbone.kind=janus", "backbone.preset=tiny", "backbone.device=cpu", "clients=2",
        "rounds=1", "data.train_scenes=16", "data.val_scenes=4", "train.max_steps=2",
        "train.batch_size=4", "eval.max_vqa=4", "eval.max_gen=2", "lora.r=4",
        "partition.alpha=1.0", "train.threads=1"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["clients"] == 2 and summary["adapters"]["alignment"] > 0
    comm = summary["communication"]
    assert comm["upload_bytes_per_client_round"] > 4 * summary["adapters"]["total_adapters"]
    assert comm["full_model_bytes"] == 4 * summary["adapters"]["model"]
    assert (tmp_path / "run" / "adapters" / "adapter_model.safetensors").is_file()
    assert np.isfinite(summary["final"]["vqa_accuracy"])


def test_two_clients_one_round_of_janus_tiny_on_llava_and_metadata_files(tmp_path):
    """The user's path: a LLaVA JSON and a metadata.jsonl image folder (images of another
    size than the model's, resized by its processor)."""
    from fedumm.data.export import export_conversation_files

    data = generate_shapes("downstream", 12, seed=4, role="train", image_size=40)
    files = export_conversation_files(data, tmp_path / "files")
    cfg = config_from_dict({}, [
        "backbone.kind=janus", "backbone.preset=tiny", "backbone.device=cpu", "clients=2",
        "rounds=1", "data.format=files", f"data.understanding={files['understanding']}",
        f"data.generation={files['generation']}", "data.heldout_fraction=0.25",
        "train.max_steps=2", "train.batch_size=4", "eval.max_vqa=4", "lora.r=4",
        "partition.alpha=1.0", "train.threads=1"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    rounds = [m for m in RunDirectory(tmp_path / "run").metrics() if m["type"] == "round"]
    train, held = read_samples(cfg.data, "train"), read_samples(cfg.data, "val")
    assert len(train) + len(held) == len(data.vqa) + len(data.gen)
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert sum(c["num_samples"] for c in partition["clients"]) == len(train)
    trained = sum(c["understanding"] + c["generation"] for c in rounds[0]["num_samples"].values())
    assert len(train) - 8 <= trained < len(train)  # less each client's own quality samples
    final = summary["final"]  # no GenEval clauses in the user's prompts: held-out quality
    assert "geneval_overall" not in final and 0 <= final["generation_quality"] <= 1
    last = [m for m in RunDirectory(tmp_path / "run").metrics() if m["type"] == "eval"][-1]
    assert last["num_vqa"] == 4
    assert last["num_generation_quality"] == sum(s.task == "generation" for s in held) > 0
    assert np.isfinite(final["vqa_accuracy"])

