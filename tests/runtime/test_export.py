"""``fedumm export RUN --merged OUT`` (:func:`fedumm.runtime.saved_run.export_merged`): the
run's model with its adapters merged (PEFT) and an exact run's residual folded, in the
backbone's own format. A Janus export loads with transformers alone and gives the logits of
fedumm's adapted model; a reference export loads through the base-model loader (no adapters)
and gives the adapted model's outputs."""

from __future__ import annotations

import pytest
import torch

from fedumm.config import config_from_dict
from fedumm.data.readers.shapes import generate_shapes, shapes_samples
from fedumm.models.kinds import build_backbone
from fedumm.models.loading import load_for_eval, load_run_model
from fedumm.models.protocol import GENERATION, UNDERSTANDING
from fedumm.models.reference.micro import MICRO_IMAGE_SIZE
from fedumm.outputs import OutputError
from fedumm.runtime.experiment import build_adapters, finish_run, load_backbone
from fedumm.runtime.run_dir import RunDirectory
from fedumm.runtime.saved_run import export_merged


def finished_run(path, cfg):
    """A finished run folder of ``cfg`` whose adapters and exact residual are random (every
    adapted module changed), written by the runtime's own ``finish_run``."""
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    gen = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
             for k, v in adapters.state().items()}
    residual = {}
    if cfg.lora.aggregation == "exact":
        for m in adapters.adapted_modules():
            w = adapters.model.get_submodule(m).base_layer.weight
            residual[m] = 0.02 * torch.randn(w.shape, generator=gen)
    run_dir = RunDirectory(path)
    run_dir.create(cfg)
    acc = {"upload": [], "download": [], "client_train_s": 0.0, "eval_s": 0.0}
    finish_run(cfg, run_dir, backbone, adapters, backbone.fingerprint(), 1, state, {}, acc,
               0.0, residual=residual)
    return path


def _samples(image_size):
    return shapes_samples(generate_shapes("downstream", 6, seed=3, image_size=image_size))


def _image_logits(model, codes):
    """Janus's next-image-token logits for image ``codes`` (transformers' own modules)."""
    embeds = model.prepare_embeddings_for_image_generation(codes)
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    return model.model.generation_head(hidden)


@pytest.fixture()
def janus_run(tmp_path):
    cfg = config_from_dict({"name": "janus"}, [
        "backbone.kind=janus", "backbone.preset=tiny", "backbone.device=cpu", "lora.r=4",
        "lora.aggregation=exact", "train.threads=1"])
    return finished_run(tmp_path / "run", cfg)


def test_a_janus_export_loads_with_transformers_alone(tmp_path, janus_run):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    out = export_merged(janus_run, tmp_path / "merged")
    plain = JanusForConditionalGeneration.from_pretrained(str(out), local_files_only=True)
    JanusProcessor.from_pretrained(str(out), local_files_only=True)  # the processor too
    plain.eval()
    ours = load_run_model(janus_run).backbone  # PEFT adapters on, residual folded
    samples = _samples(ours.image_size)
    und = ours.collate(samples).parts[UNDERSTANDING]
    inputs = {k: und[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        want = ours.model(**inputs).logits
        got = plain(**inputs).logits
        # image-token logits (the generation group: aligner and head) of the same codes
        codes = torch.randint(0, plain.config.vq_config.num_embeddings, (2, 5),
                              generator=torch.Generator().manual_seed(0))
        gen_want, gen_got = (_image_logits(m, codes) for m in (ours.model, plain))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gen_got, gen_want, atol=1e-5, rtol=1e-5)
    # the adapters did change the model: the comparison is not trivially of the base
    base = build_backbone(config_from_dict({}, ["backbone.kind=janus",
                                                "backbone.preset=tiny"]).backbone)
    with torch.no_grad():
        assert not torch.allclose(base.model(**inputs).logits, want, atol=1e-3)


def test_a_reference_export_is_a_plain_checkpoint_with_the_adapted_outputs(
        tmp_path, micro_checkpoint):
    cfg = config_from_dict({"name": "ref"}, [
        f"backbone.path={micro_checkpoint}", f"data.image_size={MICRO_IMAGE_SIZE}",
        "lora.aggregation=exact", "train.threads=1"])
    run = finished_run(tmp_path / "run", cfg)
    out = export_merged(run, tmp_path / "merged")
    plain = load_for_eval(out)  # the base-model loader: checksums and fingerprint verified
    ours = load_run_model(run).backbone
    samples = _samples(MICRO_IMAGE_SIZE)
    batch = ours.collate(samples)
    with torch.no_grad():
        want, got = ours.loss(batch), plain.loss(plain.collate(samples))
    for modality in (UNDERSTANDING, GENERATION):
        assert torch.allclose(got[modality], want[modality], rtol=1e-5)
    und = [s for s in samples if s.task == UNDERSTANDING]
    images, questions = [s.load_image() for s in und], [s.text for s in und]
    assert plain.answer(images, questions) == ours.answer(images, questions)
    base = load_for_eval(micro_checkpoint)
    with torch.no_grad():
        assert not torch.allclose(base.loss(base.collate(samples))[GENERATION],
                                  want[GENERATION], rtol=1e-3)


def test_an_export_rewrites_its_own_folder_and_refuses_anything_else(tmp_path,
                                                                      micro_checkpoint):
    cfg = config_from_dict({"name": "ref"}, [
        f"backbone.path={micro_checkpoint}", f"data.image_size={MICRO_IMAGE_SIZE}"])
    run = finished_run(tmp_path / "run", cfg)
    out = export_merged(run, tmp_path / "merged")
    first = (out / "model.safetensors").read_bytes()
    export_merged(run, out)  # an earlier export is rewritten, to the same bytes
    assert (out / "model.safetensors").read_bytes() == first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not empty"):
        export_merged(run, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
