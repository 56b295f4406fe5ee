"""Pretraining batches of the reference model: a ShapesWorld dataset tokenised once, with the
ShapesWorld-specific pretraining labels (per-patch attributes, referred cells, generated-cell
attributes) that only pretraining uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedumm.data.readers.shapes import ShapesWorldData
from fedumm.data.render import COLORS, SHAPES, object_id_map
from fedumm.data.world import grounding_labels
from fedumm.models.batching import pad_sequences
from fedumm.models.reference.text_tokenizer import TextTokenizer
from fedumm.models.reference.vq import PatchCodebook

_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}




def patch_labels(objects, size: int, patch: int, min_cover: float = 0.25) -> np.ndarray:
    """(g*g, 2) per-patch (shape, colour) class of the object covering at least ``min_cover``
    of the patch (0 = background; 1 + index otherwise). Used for the auxiliary losses: the
    vision encoder's per patch, and per generated cell with ``min_cover=0`` (any pixel)."""
    ids = object_id_map(objects, size)
    g = size // patch
    blocks = ids.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    out = np.zeros((g * g, 2), dtype=np.int64)
    for k, obj in enumerate(objects):
        cover = (blocks == k).sum(1)
        sel = (cover >= min_cover * patch * patch) & (cover > 0)
        out[sel] = (1 + _SHAPE_INDEX[obj.shape], 1 + _COLOR_INDEX[obj.color])
    return out


@dataclass
class PreparedData:
    """Token ids, codes and probe labels of one dataset, ready to be indexed into batches."""

    data: ShapesWorldData
    questions: list[list[int]]  # question tokens + SEP
    answers: list[list[int]]  # answer tokens + EOS
    prompts: list[list[int]]  # prompt tokens + BOI
    codes: torch.Tensor  # (num_gen, L) image codes of the generation targets
    probe: torch.Tensor | None  # (num_images, g*g, 2) or None without scenes
    ground: torch.Tensor | None = None  # (num_vqa, cells) referred cells, or None
    gen_cells: torch.Tensor | None = None  # (num_gen, L, 2) shape/colour per code cell, or None


class SampleEncoder:
    """Tokenises text, quantises target images and builds padded batches."""

    def __init__(self, tokenizer: TextTokenizer, codebook: PatchCodebook, vision_patch: int = 4):
        self.tok = tokenizer
        self.codebook = codebook
        self.vision_patch = vision_patch

    def prepare(self, data: ShapesWorldData, with_probe: bool = False) -> PreparedData:
        """Tokenise and quantise ``data``; ``with_probe`` adds the pretraining labels (per-patch
        attributes for the vision probe, referred cells for grounding, the attributes of each
        generated cell) from its scenes."""
        t = self.tok
        questions = [t.encode(r.question) + [t.sep_id] for r in data.vqa]
        answers = [t.encode(r.multiple_choice_answer) + [t.eos_id] for r in data.vqa]
        prompts = [t.encode(g.prompt) + [t.boi_id] for g in data.gen]
        if data.gen:
            targets = np.stack([data.image(i) for i in data.gen_image])
            codes = torch.cat([self.codebook.encode(targets[i:i + 512])
                               for i in range(0, len(targets), 512)])
        else:
            codes = torch.zeros(0, 1, dtype=torch.long)
        probe = ground = gen_cells = None
        if with_probe and data.scenes:
            size = data.images.shape[1]
            probe = torch.from_numpy(np.stack(
                [patch_labels(objs, size, self.vision_patch) for objs in data.scenes]))
            if data.vqa:
                ground = torch.from_numpy(np.stack(
                    [grounding_labels(r.question, data.scene(r.image_id))
                     for r in data.vqa]))
            if data.gen:
                patch = self.codebook.patch
                gen_cells = torch.from_numpy(np.stack(
                    [patch_labels(data.scene(i), size, patch, min_cover=0.0)
                     for i in data.gen_image]))
        return PreparedData(data, questions, answers, prompts, codes, probe, ground, gen_cells)

    def understanding_batch(self, prep: PreparedData, idx: Sequence[int],
                            image_present: Sequence[bool] | None = None) -> dict:
        """Tensors for VQA samples ``idx`` (indices into ``prep.data.vqa``)."""
        d = prep.data
        rows = [d._row[d.vqa[i].image_id] for i in idx]
        q_ids, q_mask = pad_sequences([prep.questions[i] for i in idx], left=True)
        a_ids, a_mask = pad_sequences([prep.answers[i] for i in idx], left=False)
        batch = {"images": torch.from_numpy(d.images[rows]), "q_ids": q_ids, "q_mask": q_mask,
                 "a_ids": a_ids, "a_mask": a_mask}
        if image_present is not None:
            batch["image_present"] = torch.tensor(list(image_present), dtype=torch.bool)
        if prep.probe is not None:
            batch["probe"] = prep.probe[rows]
        if prep.ground is not None:
            batch["ground"] = prep.ground[list(idx)]
        return batch

    def qa_batch(self, images: np.ndarray, questions: Sequence[str],
                 answers: Sequence[str]) -> dict:
        """Tensors for free-form (question, answer) pairs, e.g. pretraining captions."""
        batch = self.question_batch(images, questions)
        batch["a_ids"], batch["a_mask"] = pad_sequences(
            [self.tok.encode(a) + [self.tok.eos_id] for a in answers], left=False)
        return batch

    def question_batch(self, images: np.ndarray, questions: Sequence[str]) -> dict:
        q_ids, q_mask = pad_sequences([self.tok.encode(q) + [self.tok.sep_id] for q in questions],
                                      True)
        return {"images": torch.from_numpy(np.ascontiguousarray(images)), "q_ids": q_ids,
                "q_mask": q_mask}

    def generation_batch(self, prep: PreparedData, idx: Sequence[int],
                         drop_prompt: Sequence[bool] | None = None) -> dict:
        """Tensors for generation samples ``idx``; dropped prompts train the unconditional
        branch used by classifier-free guidance."""
        drop = list(drop_prompt) if drop_prompt is not None else [False] * len(idx)
        seqs = [[self.tok.boi_id] if dr else prep.prompts[i] for i, dr in zip(idx, drop,
                                                                              strict=True)]
        p_ids, p_mask = pad_sequences(seqs, left=True)
        batch = {"p_ids": p_ids, "p_mask": p_mask, "codes": prep.codes[list(idx)]}
        if prep.gen_cells is not None:
            batch["cells"] = prep.gen_cells[list(idx)]
        return batch



def pretrain_encoder(backbone) -> SampleEncoder:
    """The pretraining encoder of a reference backbone (its tokenizer, codebook, patch)."""
    return SampleEncoder(backbone.tokenizer, backbone.codebook, backbone.config.vision_patch)
