"""The BLIP3o-style backbone: flow matching, guided sampling, the published checkpoint layout,
clear errors for folders it cannot use, and a federated run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedumm.config import BackboneConfig, config_from_dict
from fedumm.models.blip3o.backbone import Blip3oBackbone
from fedumm.models.info import backbone_info
from fedumm.models.kinds import build_backbone
from fedumm.models.lora import LoraAdapters
from fedumm.models.protocol import GENERATION, UNDERSTANDING, base_state_dict
from fedumm.runtime.dispatch import run_experiment
from makers import blip3o_samples, blip3o_tiny

tiny = blip3o_tiny


@pytest.fixture(scope="module")
def samples():
    return blip3o_samples()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny().save(tmp_path_factory.mktemp("blip3o") / "ck")


def test_flow_matching_loss_is_the_hand_computed_mse(samples):
    bb = tiny()
    g = bb.collate([s for s in samples if s.task == GENERATION]).parts[GENERATION]
    x0 = g["x0"]
    assert x0.shape == (4, bb.dims.feature_dim, bb.dims.grid, bb.dims.grid)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    loss, zero = bb._flow_loss(g, sigma, noise)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    v = bb._velocity(x_t, sigma, bb._condition(g["input_ids"], g["attention_mask"], g["keep"]))
    torch.testing.assert_close(loss, ((v - (noise - x0)) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(zero, ((noise - x0) ** 2).flatten(1).mean(1))


def test_a_dropped_prompt_gives_the_null_condition_and_guidance_changes_samples(samples):
    bb = tiny()
    gen = [s for s in samples if s.task == GENERATION][:2]
    g = bb.collate(gen, [True, False]).parts[GENERATION]
    cond = bb._condition(g["input_ids"], g["attention_mask"], g["keep"])
    null = bb.model.caption_projection(torch.zeros(bb.dims.n_query,
                                                   bb.dims.text["hidden_size"]))
    torch.testing.assert_close(cond[0], null)  # test_blip3o_conformance.py: BLIP3o's mask_drop
    assert not torch.allclose(cond[1], null)
    prompts = [s.text for s in gen]
    guided = bb.generate(prompts, seed=0)
    bb.cfg_scale = 0.0  # the unconditional branch alone
    plain = bb.generate(prompts, seed=0)
    assert guided.shape == plain.shape == (2, bb.image_size, bb.image_size, 3)
    assert not np.array_equal(guided, plain)


def test_the_sampling_scheduler_is_a_component_the_backbone_is_given():
    from diffusers import FlowMatchEulerDiscreteScheduler

    bb = tiny()
    assert isinstance(bb.scheduler, FlowMatchEulerDiscreteScheduler)
    default = bb.generate(["a red circle"], seed=2)
    given = Blip3oBackbone(bb.model, bb.tokenizer, bb.processor,
                           scheduler=FlowMatchEulerDiscreteScheduler())
    assert np.array_equal(given.generate(["a red circle"], seed=2), default)
    shifted = Blip3oBackbone(bb.model, bb.tokenizer, bb.processor,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert not np.array_equal(shifted.generate(["a red circle"], seed=2), default)
    # sampling runs on copies: the given scheduler keeps its initial state
    assert bb.scheduler.step_index is None
    assert torch.equal(bb.scheduler.timesteps, FlowMatchEulerDiscreteScheduler().timesteps)
    assert np.array_equal(bb.generate(["a red circle"], seed=2), default)


def test_generation_training_lowers_the_heldout_flow_loss(samples):
    bb = tiny()
    ad = LoraAdapters(bb, r=4, alpha=8, groups=["generation", "alignment"], seed=0)
    gen = [s for s in samples if s.task == GENERATION]
    before = bb.generation_quality(gen)
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=1e-2)
    batch = bb.collate(gen)
    for step in range(15):
        torch.manual_seed(step)
        loss = bb.loss(batch)[GENERATION]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bb.generation_quality(gen) > before


def test_checkpoint_folder_is_in_the_published_layout_and_loads_back(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
        queries = st.get_tensor("model.latent_queries")
    assert queries.shape == (1, 8, 64)
    assert any(k.startswith("visual.blocks.") for k in keys)
    assert any(k.startswith("model.layers.") for k in keys)
    assert "model.dit.model.caption_projection.linear_1.weight" in keys
    assert "model.dit.model.layers.0.attn2.to_q.weight" in keys
    assert not any(k.startswith(("qwen.", "model.language_model.", "dit.")) for k in keys)
    config = json.loads((folder / "config.json").read_text())
    assert config["n_query"] == 8 and config["gen_pooling"] == "early_pool2d_2"
    original, loaded = tiny(), build_backbone(BackboneConfig(kind="blip3o", path=str(folder),
                                                             device="cpu"))
    a, b = base_state_dict(original.model), base_state_dict(loaded.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.fingerprint() == original.fingerprint()
    assert np.array_equal(loaded.generate(["a red circle"], seed=2),
                          original.generate(["a red circle"], seed=2))


def test_a_folder_without_fedumms_generation_parts_trains_understanding_only(folder, tmp_path,
                                                                              samples):
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    shutil.rmtree(bare / "target_encoder")
    (bare / "patch_decoder.safetensors").unlink()
    (bare / "SHA256SUMS.json").unlink()  # BLIP3o's published folders have none
    with safe_open(str(bare / "model.safetensors"), framework="pt") as st:  # as BLIP3o ships
        state = {k: st.get_tensor(k) for k in st.keys()  # noqa: SIM118
                 if k != "model.dit.model.pad_token"}
    save_file(state, str(bare / "model.safetensors"), metadata={"format": "pt"})
    bb = build_backbone(BackboneConfig(kind="blip3o", path=str(bare), device="cpu"))
    und = [s for s in samples if s.task == UNDERSTANDING]
    assert bb.loss(bb.collate(und))[UNDERSTANDING].isfinite()
    assert len(bb.answer([s.load_image() for s in und], [s.text for s in und])) == len(und)
    with pytest.raises(ValueError, match="understanding only"):
        bb.collate(samples)
    with pytest.raises(ValueError, match="understanding only"):
        bb.generate(["a red circle"])


def test_bad_folders_are_refused_by_name(folder, tmp_path):
    def load(path):
        return build_backbone(BackboneConfig(kind="blip3o", path=str(path), device="cpu"))

    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load(tmp_path / "nothing")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(folder / "config.json", partial)
    with pytest.raises(FileNotFoundError, match=r"missing the weights .*the tokenizer"):
        load(partial)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "SHA256SUMS.json").unlink()  # a folder edited by hand
    config = json.loads((other / "config.json").read_text())
    del config["n_query"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a BLIP3o config"):
        load(other)
    config["n_query"] = 8
    (other / "config.json").write_text(json.dumps(config))
    with safe_open(str(other / "model.safetensors"), framework="pt") as st:
        state = {k: st.get_tensor(k) for k in st.keys()  # noqa: SIM118
                 if k != "model.latent_queries"}
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no 'model.latent_queries'"):
        load(other)


def test_backbone_info_of_the_published_sizes():
    for preset, hidden, layers, inter, kv_dim in (("blip3o-8b", 3584, 28, 18944, 512),
                                                  ("blip3o-4b", 2048, 36, 11008, 256)):
        info = backbone_info(BackboneConfig(kind="blip3o", preset=preset), r=16)
        # LoRA r=16 on q, k, v, o, gate, up, down of every decoder layer: r * (in + out)
        per_layer = 16 * ((hidden + hidden) * 2 + (hidden + kv_dim) * 2 + (hidden + inter) * 3)
        assert info["adapter_params"]["language"] == layers * per_layer
        assert info["adapter_params"]["alignment"] == 64 * hidden  # the queries, in full
        assert info["full_model_bytes"]["bfloat16"] == 2 * info["params_total"]


def test_two_clients_one_round_of_blip3o_tiny(tmp_path):
    cfg = config_from_dict({}, [
        "backbone.kind=blip3o", "backbone.preset=tiny", "backbone.device=cpu", "clients=2",
        "rounds=1", "data.train_scenes=16", "data.val_scenes=4", "train.max_steps=2",
        "train.batch_size=4", "eval.max_vqa=4", "eval.max_gen=2", "lora.r=4",
        "partition.alpha=1.0", "train.threads=1"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    run_experiment(cfg, tmp_path / "again", progress=False)
    assert summary["clients"] == 2 and summary["adapters"]["alignment"] == 8 * 64
    assert 0 <= summary["final"]["geneval_overall"] <= 1
    a = (tmp_path / "run" / "adapters" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "adapters" / "adapter_model.safetensors").read_bytes()


def test_a_flipped_byte_in_a_saved_folder_is_refused(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "patch_decoder.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "patch_decoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="patch_decoder.safetensors is corrupt"):
        build_backbone(BackboneConfig(kind="blip3o", path=str(bad), device="cpu"))
