from __future__ import annotations

import pytest
import torch

from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.fl import codecs
from fedumm.models.lora import LoraAdapters
from fedumm.models.reference import REFERENCE_GROUPS
from fedumm.models.reference.micro import MICRO_IMAGE_SIZE, micro_backbone

GROUPS = [g.name for g in REFERENCE_GROUPS]


@pytest.fixture()
def adapters() -> LoraAdapters:
    return LoraAdapters(micro_backbone(0), r=4, alpha=8, seed=0)


def test_each_group_holds_the_expected_tensors(adapters):
    keys = {g: adapters.keys(g) for g in GROUPS}
    assert all(keys[g] for g in GROUPS)
    assert all("vision_model" in k or "aligner" in k for k in keys["vision"])
    assert all("language_model.layers" in k for k in keys["language"])
    assert {k.split(".")[2] for k in keys["generation"]} == {"gen_embed", "gen_head"}
    assert keys["alignment"] == ["base_model.model.alignment.tokens"]
    assert sum(map(len, keys.values())) == len(adapters.params)


def test_only_selected_groups_train_and_the_backbone_stays_frozen(adapters):
    bb = adapters.backbone
    before_fp = bb.fingerprint()
    before = adapters.state()
    adapters.set_trainable(["language", "generation"])
    assert {adapters.group_of(k) for k, p in adapters.params.items() if p.requires_grad} == {
        "language", "generation"}
    assert all(not p.requires_grad for n, p in adapters.model.named_parameters()
               if "lora_" not in n and "modules_to_save" not in n)
    samples = shapes_samples(generate_shapes("base", 8, seed=0, image_size=MICRO_IMAGE_SIZE))
    batch = bb.collate(samples[:8] + samples[-8:])
    assert set(batch.counts) == {"understanding", "generation"}
    opt = torch.optim.SGD(adapters.trainable_parameters(), lr=0.5)
    for _ in range(2):
        loss = sum(bb.loss(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = adapters.state()
    changed = {adapters.group_of(k) for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"language", "generation"}
    assert bb.fingerprint() == before_fp


def test_group_state_round_trip_through_the_wire_is_bit_exact(adapters):
    with torch.no_grad():
        for p in adapters.params.values():
            p.add_(torch.randn_like(p))
    state = adapters.state(["vision", "alignment"])
    received, nbytes = codecs.roundtrip(state)
    assert nbytes == len(codecs.encode(state))
    other = LoraAdapters(micro_backbone(0), r=4, alpha=8, seed=1)
    other.load_state(received)
    for k, v in state.items():
        assert torch.equal(other.params[k], v)


def test_peft_loads_the_exported_folder(adapters, tmp_path):
    from peft import PeftModel

    with torch.no_grad():
        for p in adapters.params.values():
            p.add_(0.1)
    adapters.export(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(micro_backbone(0).model, str(tmp_path / "adapters"))
    params = dict(loaded.named_parameters())
    for k, v in adapters.params.items():
        name = next(n for n in params if n.replace(".default", "").replace(
            ".modules_to_save", "") == k)
        assert torch.equal(params[name], v)


def test_bad_groups_and_unknown_tensors_are_errors(adapters):
    with pytest.raises(ValueError, match="lora.groups"):
        LoraAdapters(micro_backbone(0), groups=["vision", "audio"])
    with pytest.raises(KeyError, match="unknown adapter tensors"):
        adapters.load_state({"nope": torch.zeros(1)})
