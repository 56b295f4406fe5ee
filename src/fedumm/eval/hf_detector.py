"""GenEval's detector (Mask2Former instances + CLIP colours) rebuilt with ``transformers`` only.

The official GenEval evaluator (djghosh13/geneval ``evaluation/evaluate_images.py``) runs the
mmdetection Mask2Former Swin-S COCO instance model
(``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``) and names colours zero-shot with open_clip
ViT-L/14 (``openai`` weights). :class:`HFDetector` reproduces that pipeline from two local
``save_pretrained`` folders:

* a ``transformers`` Mask2Former COCO instance checkpoint (``Mask2FormerForUniversalSegmentation``,
  e.g. a local copy of ``facebook/mask2former-swin-small-coco-instance``);
* a ``transformers`` CLIP checkpoint (``CLIPModel``, e.g. ``openai/clip-vit-large-patch14``, the
  same weights as open_clip's ``ViT-L-14`` / ``openai``).

Scores computed with it are labelled **"GenEval (HF detectors)"** (:data:`DETECTOR_NAME`). The HF
Mask2Former weights are not the mmdetection weights the official scorer loads, so its detections
and hence its scores differ: never mix or compare them with official (mmdet) GenEval numbers.

What is reproduced, step by step:

1. **Pre-processing** as mmdetection's test pipeline: resize keeping the aspect ratio to
   shortest edge 800 / longest edge 1333 (:data:`MMDET_TEST_SIZE`, overriding the 384 of the HF
   processor config; ``segmenter_size=None`` keeps the folder's), ImageNet mean/std. The HF
   processor rounds the resized size up to a multiple of 32 (mmdet pads instead); the mapping
   back below undoes either.
2. **Instances** as mmdetection's ``MaskFormerFusionHead.instance_postprocess`` (not HF's
   ``post_process_instance_segmentation``, which resamples every mask through a fixed 384x384
   grid): class probabilities = softmax without the no-object column; the top ``num_queries``
   (query, class) pairs; mask logits upsampled bilinearly to the network input, cropped to the
   resized image, resized bilinearly to the original image; binary mask = logit > 0; score =
   class probability x mean sigmoid over the binary mask; box = mmdet ``mask2bbox``:
   ``(x_min, y_min, x_max + 1, y_max + 1)`` of the mask pixels (:func:`mask_to_box`).
3. **Labels** are mapped from ``config.id2label`` to GenEval's class names
   (:data:`GENEVAL_CLASSES`, its ``object_names.txt``) by name, through :data:`LABEL_ALIASES`
   for the COCO names GenEval renamed ("mouse" -> "computer mouse", "remote" -> "tv remote",
   "keyboard" -> "computer keyboard") and common variants ("motorbike", "sofa", "diningtable",
   "tvmonitor", "hair dryer", ...). Labels with no GenEval class (e.g. panoptic "stuff") are
   dropped, as mmdet drops non-"thing" classes; every GenEval class must be reachable.
4. **Thresholding**: only detections with ``score > threshold`` (0.3, the lowest of GenEval's
   thresholds) are returned, at most ``max_objects`` (16) per class by descending score.
   :func:`fedumm.eval.geneval.evaluate_image` applies the rules again (0.3, or 0.9 for
   ``counting``; 16 per class), which gives the same kept set as long as this detector's
   ``threshold`` and ``max_objects`` are no stricter than the rules'.
5. **Colour** of every returned detection (the official evaluator classifies only the objects a
   ``color`` clause looks at; CLIP classifies each crop on its own, so those objects get the same
   colour here and the others are unused by the rules): the image with pixels outside the mask
   set to grey ``#999999`` (:data:`CROP_BACKGROUND`), cropped to the box (:func:`masked_crop`);
   zero-shot over GenEval's 10 colours (:data:`GENEVAL_COLORS`) with its three templates
   (:data:`COLOR_TEMPLATES`, the class name filled in): each colour's text embedding is the
   re-normalised mean of the normalised template embeddings (clip_benchmark's
   ``zero_shot_classifier``), the colour is the argmax of the cosine similarity.

Known numerical differences besides the weights: PIL instead of OpenCV resizing for the
segmenter, HF's CLIP image processor (bicubic resize 224 + centre crop, as open_clip's
transform) and fp32 instead of CUDA autocast.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedumm.eval.geneval import Box, Detection

DETECTOR_NAME = "GenEval (HF detectors)"

#: GenEval's ``evaluation/object_names.txt``: the 80 COCO classes in COCO order, with GenEval's
#: names for three of them ("computer mouse", "tv remote", "computer keyboard").
GENEVAL_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)

#: GenEval's colours (``COLORS`` in ``evaluate_images.py``), in its order.
GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)

#: GenEval's colour prompts; ``{object}`` is the GenEval class name, ``{color}`` the colour.
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)

#: Background of the colour crops: GenEval's default ``bgcolor`` "#999".
CROP_BACKGROUND: tuple[int, int, int] = (153, 153, 153)

#: mmdetection's test resize for GenEval's Mask2Former config (``img_scale=(1333, 800)``).
MMDET_TEST_SIZE: dict[str, int] = {"shortest_edge": 800, "longest_edge": 1333}

#: Other spellings of COCO class names (lower case, "_"/"-" read as spaces) -> GenEval's name.
LABEL_ALIASES: dict[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "cellphone": "cell phone",
    "mobile phone": "cell phone",
    "hair dryer": "hair drier",
    "hairdryer": "hair drier",
    "doughnut": "donut",
    "brocolli": "broccoli",
    "hotdog": "hot dog",
    "teddybear": "teddy bear",
    "wineglass": "wine glass",
    "firehydrant": "fire hydrant",
    "stopsign": "stop sign",
    "trafficlight": "traffic light",
    "sportsball": "sports ball",
}

_CLIP_BATCH = 16  # GenEval's colour DataLoader batch size


def geneval_class_name(label: str) -> str | None:
    """GenEval's class name for a COCO label (any common spelling), or None if it is not one."""
    key = " ".join(str(label).lower().replace("_", " ").replace("-", " ").split())
    if key in _CLASS_SET:
        return key
    return LABEL_ALIASES.get(key) or LABEL_ALIASES.get(key.replace(" ", ""))


_CLASS_SET = frozenset(GENEVAL_CLASSES)


def geneval_label_map(id2label: dict[Any, str]) -> dict[int, str | None]:
    """Map a model's ``id2label`` to GenEval class names (None for labels that are not COCO's).

    Raises ``ValueError`` when some GenEval class is reachable from no label, naming them.
    """
    out = {int(k): geneval_class_name(v) for k, v in id2label.items()}
    missing = [c for c in GENEVAL_CLASSES if c not in set(out.values())]
    if missing:
        unknown = sorted({str(v) for k, v in id2label.items() if out[int(k)] is None})
        raise ValueError(
            f"id2label does not cover GenEval's COCO classes: missing {missing}; labels with no "
            f"COCO class: {unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    return out


def color_prompts(classname: str) -> list[list[str]]:
    """Per colour of :data:`GENEVAL_COLORS`, GenEval's prompts for an object of ``classname``."""
    return [[t.format(color=c, object=classname) for t in COLOR_TEMPLATES] for c in GENEVAL_COLORS]


def mask_to_box(mask: np.ndarray) -> Box:
    """mmdetection's ``mask2bbox``: ``(x_min, y_min, x_max + 1, y_max + 1)`` of the mask pixels.

    An empty mask gives ``(0, 0, 0, 0)``.
    """
    mask = np.asarray(mask, dtype=bool)
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(cols) or not len(rows):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def masked_crop(
    image: np.ndarray,
    mask: np.ndarray | None,
    box: Sequence[float],
    background: Sequence[int] = CROP_BACKGROUND,
) -> np.ndarray:
    """GenEval's colour crop: pixels outside ``mask`` set to ``background``, then cut to ``box``.

    As ``Image.composite(image, blank, mask).crop(box)``: box corners rounded, ``x1``/``y1``
    exclusive, parts of the box outside the image filled with black (PIL's crop).
    """
    img = _as_rgb_uint8(image)
    h, w = img.shape[:2]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (h, w):
            raise ValueError(f"mask shape {mask.shape} does not match image shape {(h, w)}")
        img = np.where(mask[..., None], img, np.asarray(background, dtype=np.uint8))
    x0, y0, x1, y1 = (int(round(float(v))) for v in box[:4])
    out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), dtype=np.uint8)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


@dataclass
class Instance:
    """One segmented object before colour classification."""

    label: str  # GenEval class name
    score: float
    box: Box
    mask: np.ndarray  # HxW bool, the original image's size


def instances_from_logits(
    class_logits: Any,
    mask_logits: Any,
    *,
    labels: Sequence[str | None],
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
    valid_size: tuple[int, int] | None = None,
    threshold: float = 0.3,
    max_objects: int | None = 16,
    max_per_image: int | None = None,
) -> list[Instance]:
    """Instances of one image from Mask2Former's outputs, as mmdetection post-processes them.

    Parameters
    ----------
    class_logits
        ``(num_queries, num_labels + 1)`` tensor, the last column "no object".
    mask_logits
        ``(num_queries, h, w)`` tensor (a quarter of the network input).
    labels
        GenEval class name per label id (None: dropped).
    image_size
        ``(H, W)`` of the original image.
    input_size
        ``(h, w)`` of the network input (``pixel_values``); default ``4 x`` the mask size.
    valid_size
        ``(h, w)`` of the resized image inside the (padded) input; default ``input_size``.
    threshold
        Kept when ``score > threshold``.
    max_objects
        Per class, at most this many kept (highest scores first); None: all.
    max_per_image
        (query, class) pairs considered, mmdet's ``max_per_image``; default ``num_queries``.

    Returns
    -------
    list of Instance
        By descending score.
    """
    import torch
    import torch.nn.functional as F

    cls = torch.as_tensor(class_logits).detach().float().cpu()
    masks = torch.as_tensor(mask_logits).detach()
    num_queries, num_labels = cls.shape[0], cls.shape[1] - 1
    if len(labels) != num_labels:
        raise ValueError(f"{len(labels)} label names for {num_labels} classes")
    if input_size is None:
        input_size = (4 * masks.shape[-2], 4 * masks.shape[-1])
    if valid_size is None:
        valid_size = input_size
    probs = torch.softmax(cls, dim=-1)[:, :-1]
    k = min(max_per_image or num_queries, probs.numel())
    top, idx = probs.flatten().topk(k)  # sorted: ties broken the same way on every run
    label_ids, query_ids = idx % num_labels, idx // num_labels
    known = torch.tensor([name is not None for name in labels], dtype=torch.bool)
    # score = probability x mask score <= probability: pairs at or below the threshold can go
    keep = (top > threshold) & known[label_ids]
    if not bool(keep.any()):
        return []
    top, label_ids, query_ids = top[keep], label_ids[keep], query_ids[keep]
    m = masks[query_ids.to(masks.device)].float()[None]
    m = F.interpolate(m, size=tuple(input_size), mode="bilinear", align_corners=False)
    m = m[..., : valid_size[0], : valid_size[1]]
    m = F.interpolate(m, size=tuple(image_size), mode="bilinear", align_corners=False)[0]
    binary = m > 0
    mask_scores = (m.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = (top * mask_scores.cpu()).tolist()
    binary_np = binary.cpu().numpy()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    out: list[Instance] = []
    per_class: dict[str, int] = {}
    for i in order:
        if not scores[i] > threshold:
            continue
        name = labels[int(label_ids[i])]
        assert name is not None
        if max_objects is not None and per_class.get(name, 0) >= max_objects:
            continue
        per_class[name] = per_class.get(name, 0) + 1
        out.append(Instance(name, float(scores[i]), mask_to_box(binary_np[i]), binary_np[i]))
    return out


class ClipProcessor(NamedTuple):
    """CLIP's image processor and tokenizer (a ``CLIPProcessor`` has the same two attributes)."""

    image_processor: Any
    tokenizer: Any


class HFDetector:
    """GenEval's detector with ``transformers`` models: Mask2Former instances, CLIP colours.

    Implements :class:`fedumm.eval.geneval.Detector`; see the module docstring for the exact
    pipeline and :data:`DETECTOR_NAME` for how its scores must be labelled.

    Parameters
    ----------
    segmenter
        A ``Mask2FormerForUniversalSegmentation`` trained on COCO instances (its
        ``config.id2label`` must cover :data:`GENEVAL_CLASSES`).
    segmenter_processor
        Its image processor (``Mask2FormerImageProcessorPil`` or ``Mask2FormerImageProcessor``).
    clip_model
        A ``CLIPModel``.
    clip_processor
        Anything with ``image_processor`` and ``tokenizer`` (``CLIPProcessor``,
        :class:`ClipProcessor`).
    device
        Torch device the models are moved to.
    threshold
        Detections with ``score > threshold`` are returned (GenEval's lowest threshold, 0.3).
    max_objects
        At most this many detections per class (GenEval's 16); None: no cap.
    segmenter_size
        Resize of the segmenter input; default mmdetection's test size (:data:`MMDET_TEST_SIZE`);
        None keeps the processor's own.
    classify_colors
        False leaves ``Detection.color`` None (no CLIP pass).
    batch_size
        Images per segmenter forward pass in :meth:`detect_batch` (only images of one size are
        batched together, so no padding enters the network).
    """

    name = DETECTOR_NAME

    def __init__(
        self,
        segmenter: Any,
        segmenter_processor: Any,
        clip_model: Any,
        clip_processor: Any,
        *,
        device: str | Any = "cpu",
        threshold: float = 0.3,
        max_objects: int | None = 16,
        segmenter_size: dict[str, int] | None = MMDET_TEST_SIZE,
        classify_colors: bool = True,
        batch_size: int = 4,
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.segmenter = segmenter.to(self.device).eval()
        self.segmenter_processor = segmenter_processor
        self.clip_model = clip_model.to(self.device).eval()
        self.clip_processor = clip_processor
        self.threshold = float(threshold)
        self.max_objects = max_objects
        self.segmenter_size = _resolve_size(segmenter_processor, segmenter_size)
        self.classify_colors = bool(classify_colors)
        self.batch_size = max(int(batch_size), 1)
        id2label = getattr(segmenter.config, "id2label", None) or {}
        mapping = geneval_label_map(id2label)
        num_labels = int(getattr(segmenter.config, "num_labels", len(mapping)))
        self.labels: list[str | None] = [mapping.get(i) for i in range(num_labels)]
        self._text_embeddings: dict[str, Any] = {}

    # ------------------------------------------------------------------------- loading
    @classmethod
    def from_paths(
        cls,
        segmenter: str | Path,
        clip: str | Path,
        device: str = "cpu",
        threshold: float = 0.3,
        **kwargs: Any,
    ) -> HFDetector:
        """Load both models from local ``save_pretrained`` folders (never from the Hub).

        ``segmenter``: a Mask2Former COCO instance checkpoint (``config.json`` with
        ``model_type`` "mask2former"); ``clip``: a CLIP checkpoint (``model_type`` "clip") with
        its tokenizer files. A folder without ``preprocessor_config.json`` gets the default
        processor. Raises ``FileNotFoundError`` for a missing folder or ``config.json`` and
        ``ValueError`` for another model type, naming the folder. ``kwargs`` go to the
        constructor.
        """
        from transformers import (
            AutoTokenizer,
            CLIPImageProcessorPil,
            CLIPModel,
            Mask2FormerForUniversalSegmentation,
            Mask2FormerImageProcessorPil,
        )

        seg_dir = _check_folder(
            segmenter, "segmenter", "mask2former", "Mask2FormerForUniversalSegmentation",
            "a Mask2Former COCO instance segmentation checkpoint such as "
            "facebook/mask2former-swin-small-coco-instance",
        )
        clip_dir = _check_folder(
            clip, "CLIP", "clip", "CLIPModel",
            "a CLIP checkpoint such as openai/clip-vit-large-patch14",
        )
        seg_model = Mask2FormerForUniversalSegmentation.from_pretrained(
            seg_dir, local_files_only=True
        )
        if (seg_dir / "preprocessor_config.json").is_file():
            seg_proc = Mask2FormerImageProcessorPil.from_pretrained(seg_dir, local_files_only=True)
        else:
            seg_proc = Mask2FormerImageProcessorPil()
        clip_model = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
        if (clip_dir / "preprocessor_config.json").is_file():
            image_proc = CLIPImageProcessorPil.from_pretrained(clip_dir, local_files_only=True)
        else:
            side = int(clip_model.config.vision_config.image_size)
            image_proc = CLIPImageProcessorPil(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - reported with the folder's name
            raise ValueError(
                f"CLIP folder {clip_dir} has no usable tokenizer (expected the tokenizer files "
                f"saved with the CLIP checkpoint): {err}"
            ) from err
        return cls(
            seg_model, seg_proc, clip_model, ClipProcessor(image_proc, tokenizer),
            device=device, threshold=threshold, **kwargs,
        )

    # ------------------------------------------------------------------------- public API
    def __call__(self, image: np.ndarray) -> list[Detection]:
        """Detections of one image (HxWx3 uint8; HxW, HxWx4 and floats in [0, 1] accepted)."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Iterable[np.ndarray]) -> list[list[Detection]]:
        """Detections of each image of a batch (a sequence or an NxHxWx3 array)."""
        imgs = [_as_rgb_uint8(im) for im in images]
        out: list[list[Detection]] = []
        for inst, img in zip(self.segment(imgs), imgs, strict=True):
            colors: list[str | None] = [None] * len(inst)
            if self.classify_colors:
                colors = list(self.colors(img, inst))
            out.append([
                Detection(i.label, c, i.box, i.score) for i, c in zip(inst, colors, strict=True)
            ])
        return out

    def segment(self, images: Sequence[np.ndarray]) -> list[list[Instance]]:
        """Mask2Former instances of each image (GenEval class names, scores, masks, boxes)."""
        import torch

        imgs = [_as_rgb_uint8(im) for im in images]
        out: list[list[Instance]] = []
        start = 0
        while start < len(imgs):
            stop = start + 1
            while (
                stop < len(imgs) and stop - start < self.batch_size
                and imgs[stop].shape == imgs[start].shape
            ):
                stop += 1
            chunk = imgs[start:stop]
            kwargs: dict[str, Any] = {"return_tensors": "pt"}
            if self.segmenter_size is not None:
                kwargs["size"] = dict(self.segmenter_size)
            inputs = self.segmenter_processor(images=chunk, **kwargs)
            pixel_values = inputs["pixel_values"].to(self.device)
            pixel_mask = inputs.get("pixel_mask")
            with torch.no_grad():
                outputs = self.segmenter(pixel_values=pixel_values)
            for j, img in enumerate(chunk):
                valid = None
                if pixel_mask is not None:
                    pm = pixel_mask[j].bool()
                    valid = (int(pm.any(dim=1).sum()), int(pm.any(dim=0).sum()))
                out.append(instances_from_logits(
                    outputs.class_queries_logits[j],
                    outputs.masks_queries_logits[j],
                    labels=self.labels,
                    image_size=img.shape[:2],
                    input_size=tuple(pixel_values.shape[-2:]),
                    valid_size=valid,
                    threshold=self.threshold,
                    max_objects=self.max_objects,
                ))
            start = stop
        return out

    def colors(self, image: np.ndarray, instances: Sequence[Instance]) -> list[str]:
        """GenEval colour of each instance: CLIP zero-shot on its grey-background crop."""
        import torch

        if not instances:
            return []
        img = _as_rgb_uint8(image)
        feats = self.image_embeddings(
            [masked_crop(img, inst.mask, inst.box) for inst in instances]
        )
        out = []
        for inst, feat in zip(instances, feats, strict=True):
            sims = self.color_embeddings(inst.label) @ feat
            out.append(GENEVAL_COLORS[int(torch.argmax(sims))])
        return out

    def image_embeddings(self, crops: Sequence[np.ndarray]) -> Any:
        """L2-normalised CLIP image embeddings, ``(len(crops), dim)`` on the CPU, fp32."""
        import torch
        from PIL import Image

        feats = []
        for start in range(0, len(crops), _CLIP_BATCH):
            pil = [Image.fromarray(_as_rgb_uint8(c)) for c in crops[start:start + _CLIP_BATCH]]
            inputs = self.clip_processor.image_processor(images=pil, return_tensors="pt")
            with torch.no_grad():
                f = self.clip_model.get_image_features(
                    pixel_values=inputs["pixel_values"].to(self.device)
                )
            feats.append(_features(f))
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    def color_embeddings(self, classname: str) -> Any:
        """Per colour, the normalised mean of its normalised template embeddings (cached)."""
        import torch

        if classname not in self._text_embeddings:
            prompts = color_prompts(classname)
            flat = [p for per_color in prompts for p in per_color]
            tok = self.clip_processor.tokenizer(flat, padding=True, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items()
                   if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                f = _features(self.clip_model.get_text_features(**tok))
            f = torch.nn.functional.normalize(f, dim=-1).reshape(len(prompts), len(prompts[0]), -1)
            self._text_embeddings[classname] = torch.nn.functional.normalize(f.mean(1), dim=-1)
        return self._text_embeddings[classname]


# ----------------------------------------------------------------------------- helpers
def _features(out: Any) -> Any:
    """Projected embeddings from ``get_*_features`` (a tensor, or an output's pooler_output)."""
    f = out if hasattr(out, "dim") else out.pooler_output
    return f.detach().float().cpu()


def _resolve_size(processor: Any, size: dict[str, int] | None) -> dict[str, int] | None:
    """The resize passed to the segmenter processor (None: the processor's own)."""
    if size is not None:
        return dict(size)
    own = getattr(processor, "size", None)
    short = getattr(own, "shortest_edge", None)
    if short is None and isinstance(own, dict):
        short = own.get("shortest_edge")
    longest = getattr(own, "longest_edge", None)
    if longest is None and isinstance(own, dict):
        longest = own.get("longest_edge")
    if short and not longest:  # old configs ("size": 384) store no longest edge
        longest = int(getattr(processor, "_max_size", 1333))
        return {"shortest_edge": int(short), "longest_edge": longest}
    return None


def _check_folder(path: str | Path, what: str, model_type: str, arch: str, example: str) -> Path:
    """The folder as a Path, after checking it holds a ``model_type`` checkpoint."""
    p = Path(path).expanduser()
    expected = f"expected a local save_pretrained folder of {example}"
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder {p} does not exist or is not a folder; {expected}")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{what} folder {p} has no config.json; {expected}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{what} folder {p}: unreadable config.json ({err}); {expected}") from err
    found = cfg.get("model_type") if isinstance(cfg, dict) else None
    if found != model_type:
        raise ValueError(
            f"{what} folder {p} holds a {found!r} model, not {model_type!r}; {expected}"
        )
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs and arch not in archs and model_type == "mask2former":
        raise ValueError(
            f"{what} folder {p} holds {archs}, not {arch} (the segmentation heads are needed); "
            f"{expected}"
        )
    return p


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """HxWx3 uint8 from HxW, HxWx1/3/4 (alpha dropped, as PIL's convert) uint8 or [0, 1] floats."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = img[..., :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating):
            img = np.clip(np.round(img * 255.0), 0, 255)
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)
