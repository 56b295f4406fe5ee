"""Write a generated dataset in the file formats users bring: the official benchmark files
(VQA v2 + GenEval), or a LLaVA conversation file with a ``metadata.jsonl`` image folder.

Both follow the output policy (:mod:`fedumm.outputs`): ``out`` is a new or empty folder or an
earlier export (``.fedumm-data-export``), every file is written atomically, and a re-export
removes the files of the earlier one it does not write again (never a file of the user's)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from fedumm.data.readers.geneval_files import write_geneval_metadata, write_geneval_sample_dir
from fedumm.data.readers.shapes import ShapesWorldData
from fedumm.data.readers.vqa_v2_files import write_vqa_v2
from fedumm.outputs import OutputFolder, write_file, write_tree

COMMAND = "data-export"  # the marker: .fedumm-data-export


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def export_official(data: ShapesWorldData, out: str | Path, vqa_split: str) -> dict[str, Path]:
    """Write ``out/vqa`` (questions, annotations, COCO-named images) and ``out/geneval``
    (``evaluation_metadata.jsonl`` and the target renders in GenEval's sample layout)."""
    out = Path(out)
    folder = OutputFolder(out, COMMAND).claim()

    def save(root: Path) -> None:  # the format writers take a folder: staged, then copied
        used = {r.image_id for r in data.vqa}
        write_vqa_v2(root / "vqa", vqa_split, data.vqa, {i: data.image(i) for i in sorted(used)})
        write_geneval_metadata(root / "geneval" / "evaluation_metadata.jsonl", data.gen)
        for k, (record, image_id) in enumerate(zip(data.gen, data.gen_image, strict=True)):
            write_geneval_sample_dir(root / "geneval" / "targets", k, record,
                                     [data.image(image_id)])

    write_tree(out, save)
    folder.prune()
    return {"vqa": out / "vqa", "geneval": out / "geneval"}


def export_conversation_files(data: ShapesWorldData, out: str | Path) -> dict[str, Path]:
    """Write ``out/llava.json`` (LLaVA layout, one record per question, image paths relative
    to ``out``) with its images in ``out/images``, and ``out/t2i`` (an image folder with
    ``metadata.jsonl``: ``file_name`` + ``text``) of the prompts and their target images."""
    out = Path(out)
    t2i = out / "t2i"
    und = {out / "images" / f"{i}.png": i for i in sorted({r.image_id for r in data.vqa})}
    gen = {t2i / f"{i}.png": i for i in data.gen_image}
    files = [*und, out / "llava.json", *gen, t2i / "metadata.jsonl"]
    folder = OutputFolder(out, COMMAND).claim(files)  # every name recorded in one go
    for path, image_id in und.items():
        write_file(path, _png(data.image(image_id)))
    records = [{"id": str(r.question_id), "image": f"images/{r.image_id}.png",
                "conversations": [{"from": "human", "value": f"<image>\n{r.question}"},
                                  {"from": "gpt", "value": r.multiple_choice_answer}]}
               for r in data.vqa]
    write_file(out / "llava.json", json.dumps(records, indent=1))
    for path, image_id in gen.items():
        write_file(path, _png(data.image(image_id)))
    lines = [json.dumps({"file_name": f"{i}.png", "text": g.prompt}) + "\n"
             for g, i in zip(data.gen, data.gen_image, strict=True)]
    write_file(t2i / "metadata.jsonl", "".join(lines))  # last: it names the images
    folder.prune()
    return {"understanding": out / "llava.json", "generation": t2i}
