"""HFDetector on tiny random Mask2Former / CLIP models saved to local folders (no Hub)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessorPil,
    PreTrainedTokenizerFast,
    SwinConfig,
)

from fedumm.data.official import GenEvalRecord
from fedumm.eval.geneval import Detection, score_geneval
from fedumm.eval.hf_detector import (
    COLOR_TEMPLATES,
    CROP_BACKGROUND,
    DETECTOR_NAME,
    GENEVAL_CLASSES,
    GENEVAL_COLORS,
    ClipProcessor,
    HFDetector,
    Instance,
    color_prompts,
    geneval_class_name,
    geneval_label_map,
    instances_from_logits,
    mask_to_box,
    masked_crop,
)

# detectron2 / mmdetection spellings, as HF COCO checkpoints name the classes
HF_NAMES = [
    {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(c, c)
    for c in GENEVAL_CLASSES
]
SEG_SIZE = {"shortest_edge": 64, "longest_edge": 128}
DOG, REMOTE = GENEVAL_CLASSES.index("dog"), GENEVAL_CLASSES.index("tv remote")
NUM_QUERIES = 5


def _segmenter(id2label: dict[int, str] | None = None, dominant: int | None = DOG):
    """A ~0.1M-parameter Mask2Former; with ``dominant``, every query predicts that class."""
    torch.manual_seed(0)
    swin = SwinConfig(
        image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
        window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=16, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
        dim_feedforward=16, num_queries=NUM_QUERIES, num_labels=80,
        id2label=id2label or dict(enumerate(HF_NAMES)),
    )
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    if dominant is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[dominant] = 10.0
    return model


def _clip() -> tuple[CLIPModel, PreTrainedTokenizerFast, CLIPImageProcessorPil]:
    """A tiny CLIP with a word-level tokenizer knowing every word of GenEval's colour prompts."""
    torch.manual_seed(1)
    words = sorted({
        w for c in GENEVAL_CLASSES for per_color in color_prompts(c) for p in per_color
        for w in p.replace("-", " - ").split()
    })
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
        },
        projection_dim=8,
    )
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(cfg).eval(), tokenizer, proc


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hf_detector")
    seg_dir, clip_dir = root / "mask2former", root / "clip"
    _segmenter().save_pretrained(seg_dir)
    Mask2FormerImageProcessorPil(size=SEG_SIZE).save_pretrained(seg_dir)
    model, tokenizer, proc = _clip()
    model.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    proc.save_pretrained(clip_dir)
    return seg_dir, clip_dir


@pytest.fixture(scope="module")
def detector(folders) -> HFDetector:
    seg_dir, clip_dir = folders
    return HFDetector.from_paths(seg_dir, clip_dir, segmenter_size=None)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------- names and helpers
def test_names_match_official_geneval(geneval_metadata_path: Path) -> None:
    names = (geneval_metadata_path.parent / "object_names.txt").read_text().split("\n")
    assert list(GENEVAL_CLASSES) == [n.strip() for n in names if n.strip()]
    for line in geneval_metadata_path.read_text().splitlines():
        meta = json.loads(line)
        for clause in meta["include"] + meta.get("exclude", []):
            assert clause["class"] in GENEVAL_CLASSES
            assert clause.get("color", "red") in GENEVAL_COLORS
    assert DETECTOR_NAME == "GenEval (HF detectors)"


def test_label_mapping() -> None:
    cases = {
        "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
        "dining table": "dining table", "diningtable": "dining table", "tvmonitor": "tv",
        "motorbike": "motorcycle", "hair_drier": "hair drier", "Cell-Phone": "cell phone",
        "sofa": "couch", "brocolli": "broccoli", "potted plant": "potted plant",
        "wall-brick": None, "LABEL_3": None,
    }
    for label, name in cases.items():
        assert geneval_class_name(label) == name, label
    assert geneval_label_map(dict(enumerate(HF_NAMES))) == dict(enumerate(GENEVAL_CLASSES))
    # panoptic-style extra labels are dropped, but every GenEval class must be reachable
    extended = {**{str(i): n for i, n in enumerate(HF_NAMES)}, "80": "wall-brick"}
    assert geneval_label_map(extended)[80] is None
    with pytest.raises(ValueError, match=r"missing \['toothbrush'\]"):
        geneval_label_map(dict(enumerate(HF_NAMES[:-1])))


def test_mask_to_box() -> None:
    mask = np.zeros((12, 10), dtype=bool)
    mask[3:6, 2:8] = True
    mask[9, 1] = True
    # mmdetection's mask2bbox: (x_min, y_min, x_max + 1, y_max + 1)
    assert mask_to_box(mask) == (1.0, 3.0, 8.0, 10.0)
    assert mask_to_box(np.zeros((4, 4), dtype=bool)) == (0.0, 0.0, 0.0, 0.0)


def test_masked_crop_grey_background() -> None:
    img = _image(10, 12)
    mask = np.zeros((10, 12), dtype=bool)
    mask[4:7, 3:9] = True
    mask[2, 5] = True
    box = mask_to_box(mask)
    crop = masked_crop(img, mask, box)
    x0, y0, x1, y1 = map(int, box)
    assert crop.shape == (y1 - y0, x1 - x0, 3) == (5, 6, 3)
    inside = mask[y0:y1, x0:x1]
    assert (crop[~inside] == np.array(CROP_BACKGROUND)).all()
    assert CROP_BACKGROUND == (153, 153, 153)
    np.testing.assert_array_equal(crop[inside], img[y0:y1, x0:x1][inside])
    # GenEval's own operation: Image.composite onto a #999 canvas, then PIL's crop
    pil = Image.fromarray(img)
    ref = Image.composite(pil, Image.new("RGB", pil.size, "#999"), Image.fromarray(mask))
    np.testing.assert_array_equal(crop, np.asarray(ref.crop(box)))
    outside = (-2.0, 7.0, 5.0, 13.0)  # partly off the image: PIL pads with black
    np.testing.assert_array_equal(masked_crop(img, mask, outside), np.asarray(ref.crop(outside)))


def test_color_prompts_are_genevals() -> None:
    assert COLOR_TEMPLATES == (
        "a photo of a {color} {object}",
        "a photo of a {color}-colored {object}",
        "a photo of a {color} object",
    )
    prompts = color_prompts("tv remote")
    assert len(prompts) == 10
    assert prompts[0] == [
        "a photo of a red tv remote",
        "a photo of a red-colored tv remote",
        "a photo of a red object",
    ]
    assert prompts[-1][1] == "a photo of a white-colored tv remote"


# ------------------------------------------------------------------- post-processing
def _logits(spec: list[tuple[dict[int, float], tuple[slice, slice] | None]], size=(16, 16)):
    """Class logits (80 + no-object) and +-20 mask logits from ``(class logits, region)`` pairs."""
    cls = torch.zeros(len(spec), 81)
    masks = torch.full((len(spec), *size), -20.0)
    for q, (logits, region) in enumerate(spec):
        for c, v in logits.items():
            cls[q, c] = v
        if region is not None:
            masks[q][region] = 20.0
    return cls, masks


def test_instances_from_logits() -> None:
    labels = list(GENEVAL_CLASSES)
    cls, masks = _logits([
        ({DOG: 10.0}, (slice(2, 6), slice(1, 4))),  # low-res rows 2-5, cols 1-3
        ({DOG: 9.0}, (slice(10, 12), slice(10, 12))),
        ({DOG: 2.0, 80: 4.0}, (slice(0, 4), slice(0, 4))),  # p(dog) = 0.05: dropped
        ({DOG: 10.0}, None),  # empty mask: score 0, dropped
    ])
    out = instances_from_logits(cls, masks, labels=labels, image_size=(64, 64))
    assert [i.label for i in out] == ["dog", "dog"]
    # a 4x bilinear upsampling of a +-20 step keeps exactly the 4 x 4 pixels of each logit
    assert out[0].box == (4.0, 8.0, 16.0, 24.0)
    assert out[1].box == (40.0, 40.0, 48.0, 48.0)
    assert all(mask_to_box(i.mask) == i.box for i in out)
    p0 = float(torch.softmax(cls[0], -1)[DOG])
    assert p0 * 0.98 < out[0].score <= p0 and out[0].score > out[1].score
    capped = instances_from_logits(cls, masks, labels=labels, image_size=(64, 64), max_objects=1)
    assert [i.box for i in capped] == [out[0].box]
    # unmapped labels are dropped; the threshold is strict
    unmapped = [None if c == "dog" else c for c in labels]
    assert instances_from_logits(cls, masks, labels=unmapped, image_size=(64, 64)) == []
    high = instances_from_logits(
        cls, masks, labels=labels, image_size=(64, 64), threshold=out[1].score
    )
    assert len(high) == 1
    # padding at the bottom of the network input is cropped away before resizing
    cls2, masks2 = _logits([
        ({DOG: 10.0}, (slice(0, 2), slice(0, 8))), ({DOG: 10.0}, (slice(4, 8), slice(0, 8)))
    ], size=(8, 8))
    padded = instances_from_logits(
        cls2, masks2, labels=labels, image_size=(32, 64), input_size=(32, 32),
        valid_size=(16, 32),
    )
    assert [i.box for i in padded] == [(0.0, 0.0, 64.0, 16.0)]


def test_detector_post_processing_and_rules(detector: HFDetector, monkeypatch) -> None:
    """Hand-made Mask2Former outputs, through HFDetector and GenEval's rules."""
    cls, masks = _logits([
        ({DOG: 10.0}, (slice(2, 6), slice(1, 4))),
        ({REMOTE: 6.0}, (slice(2, 6), slice(10, 14))),  # p = 0.83: after the dog
        ({DOG: 2.0, 80: 4.0}, (slice(8, 12), slice(8, 12))),
        ({80: 10.0}, None),
    ])
    calls = []

    def fake_segmenter(pixel_values):
        calls.append(tuple(pixel_values.shape))
        return SimpleNamespace(class_queries_logits=cls[None], masks_queries_logits=masks[None])

    monkeypatch.setattr(detector, "segmenter", fake_segmenter)
    img = _image(64, 64, seed=3)
    inst = detector.segment([img])[0]
    assert calls == [(1, 3, 64, 64)]
    assert [(i.label, i.box) for i in inst] == [
        ("dog", (4.0, 8.0, 16.0, 24.0)), ("tv remote", (40.0, 8.0, 56.0, 24.0))
    ]
    # force the colours: green's text embedding = the dog crop's image embedding, etc.
    feats = detector.image_embeddings([masked_crop(img, i.mask, i.box) for i in inst])
    for i, feat, color in zip(inst, feats, ["green", "white"], strict=True):
        emb = -feat.repeat(len(GENEVAL_COLORS), 1)
        emb[GENEVAL_COLORS.index(color)] = feat
        monkeypatch.setitem(detector._text_embeddings, i.label, emb)
    dets = detector(img)
    assert dets == [
        Detection("dog", "green", (4.0, 8.0, 16.0, 24.0), inst[0].score),
        Detection("tv remote", "white", (40.0, 8.0, 56.0, 24.0), inst[1].score),
    ]

    def rec(tag, include, exclude=()):
        return GenEvalRecord(tag=tag, prompt=tag, include=include, exclude=list(exclude))

    dog, remote = {"class": "dog", "count": 1}, {"class": "tv remote", "count": 1}
    records = [
        rec("single_object", [dog]),
        rec("two_object", [dog, remote]),
        rec("counting", [{"class": "dog", "count": 2}], [{"class": "dog", "count": 3}]),
        rec("colors", [{**dog, "color": "green"}]),
        rec("colors", [{**dog, "color": "brown"}]),
        rec("position", [dog, {**remote, "position": ["right of", 0]}]),
        rec("position", [dog, {**remote, "position": ["left of", 0]}]),
        rec("color_attr", [{**dog, "color": "green"}, {**remote, "color": "white"}]),
        rec("single_object", [dog], [{"class": "tv remote", "count": 1}]),
    ]
    result = score_geneval(records, [img] * len(records), detector)
    assert result["per_prompt"] == [True, True, False, True, False, True, False, True, False]
    assert result["reasons"][4] == ["expected brown dog>=1, found 0 brown; and 1 green"]
    assert result["by_task"]["position"] == 0.5


# ------------------------------------------------------------------- real (tiny) models
def test_from_paths_end_to_end(detector: HFDetector) -> None:
    img = _image(40, 48, seed=1)
    dets = detector(img)
    assert dets and all(isinstance(d, Detection) for d in dets)
    inst = detector.segment([img])[0]
    assert [(d.label, d.box, d.score) for d in dets] == [(i.label, i.box, i.score) for i in inst]
    for d, i in zip(dets, inst, strict=True):
        assert d.label in GENEVAL_CLASSES and d.color in GENEVAL_COLORS
        assert d.score > 0.3
        assert i.mask.shape == (40, 48) and mask_to_box(i.mask) == d.box
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 40
    assert len(dets) <= NUM_QUERIES
    # batches (split by image size) give the per-image results; float images are accepted
    other = _image(32, 32, seed=2)
    batch = detector.detect_batch([img, other, img.astype(np.float32) / 255.0])
    assert batch == [dets, detector(other), dets]
    assert detector.detect_batch([]) == []


def test_color_is_most_similar_text(detector: HFDetector, monkeypatch) -> None:
    img = _image(24, 24, seed=4)
    mask = np.zeros((24, 24), dtype=bool)
    mask[5:15, 8:20] = True
    inst = Instance("dog", 0.9, mask_to_box(mask), mask)
    feat = detector.image_embeddings([masked_crop(img, mask, inst.box)])[0]
    emb = torch.nn.functional.normalize(torch.randn(len(GENEVAL_COLORS), feat.numel()), dim=-1)
    monkeypatch.setitem(detector._text_embeddings, "dog", emb)
    assert detector.colors(img, [inst]) == [GENEVAL_COLORS[int(torch.argmax(emb @ feat))]]
    emb = emb.clone()
    emb[GENEVAL_COLORS.index("purple")] = feat
    monkeypatch.setitem(detector._text_embeddings, "dog", emb)
    assert detector.colors(img, [inst]) == ["purple"]


def test_color_embeddings_average_templates(detector: HFDetector) -> None:
    """Normalised mean of the normalised template embeddings, each prompt encoded alone."""
    emb = detector.color_embeddings("tv remote")
    assert emb.shape == (len(GENEVAL_COLORS), detector.clip_model.config.projection_dim)
    tok = detector.clip_processor.tokenizer
    for c, prompts in enumerate(color_prompts("tv remote")):
        with torch.no_grad():
            feats = [
                detector.clip_model.get_text_features(**tok([p], return_tensors="pt")).pooler_output
                for p in prompts
            ]
        f = torch.nn.functional.normalize(torch.cat(feats), dim=-1).mean(0)
        torch.testing.assert_close(emb[c], f / f.norm(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- errors
def test_missing_folder_and_wrong_model_type(folders, tmp_path: Path) -> None:
    seg_dir, clip_dir = folders
    with pytest.raises(FileNotFoundError, match=r"segmenter folder .*nope.* does not exist"):
        HFDetector.from_paths(tmp_path / "nope", clip_dir)
    with pytest.raises(FileNotFoundError, match=r"CLIP folder .* does not exist"):
        HFDetector.from_paths(seg_dir, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFDetector.from_paths(tmp_path / "empty", clip_dir)
    with pytest.raises(ValueError, match=r"segmenter folder .* holds a 'clip' model.*mask2former"):
        HFDetector.from_paths(clip_dir, clip_dir)
    with pytest.raises(ValueError, match=r"CLIP folder .* holds a 'mask2former' model.*'clip'"):
        HFDetector.from_paths(seg_dir, seg_dir)
    model, tokenizer, proc = _clip()
    with pytest.raises(ValueError, match="missing"):
        HFDetector(
            _segmenter({i: f"LABEL_{i}" for i in range(80)}, dominant=None),
            Mask2FormerImageProcessorPil(size=SEG_SIZE), model, ClipProcessor(proc, tokenizer),
        )


def test_cli_scores_a_geneval_folder_with_the_hf_detectors(folders, tmp_path, capsys) -> None:
    import json

    from fedumm.cli import main
    from fedumm.data.export import export_official
    from fedumm.data.readers.shapes import generate_shapes

    seg_dir, clip_dir = folders
    data = generate_shapes("downstream", 3, seed=0, role="val", image_size=48)
    gen = export_official(data, tmp_path / "files", "val")["geneval"]
    args = ["eval", "geneval", "--metadata", str(gen / "evaluation_metadata.jsonl"),
            "--images", str(gen / "targets"), "--detector", "hf", "--json"]
    assert main([*args, "--segmenter", str(seg_dir), "--clip", str(clip_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["detector"] == "GenEval (HF detectors)" and 0.0 <= out["overall"] <= 1.0
    assert out["segmenter"] == str(seg_dir)
    assert main(args) == 2
    assert "--detector hf needs --segmenter" in capsys.readouterr().err
