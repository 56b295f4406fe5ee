"""Write a generated dataset in the file formats users bring: the official benchmark files
(VQA v2 + GenEval), or a LLaVA conversation file with a ``metadata.jsonl`` image folder."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from fedumm.data.readers.geneval_files import write_geneval_metadata, write_geneval_sample_dir
from fedumm.data.readers.shapes import ShapesWorldData
from fedumm.data.readers.vqa_v2_files import write_vqa_v2


def export_official(data: ShapesWorldData, out: str | Path, vqa_split: str) -> dict[str, Path]:
    """Write ``out/vqa`` (questions, annotations, COCO-named images) and ``out/geneval``
    (``evaluation_metadata.jsonl`` and the target renders in GenEval's sample layout)."""
    out = Path(out)
    used = {r.image_id for r in data.vqa}
    write_vqa_v2(out / "vqa", vqa_split, data.vqa, {i: data.image(i) for i in sorted(used)})
    gen_dir = out / "geneval"
    gen_dir.mkdir(parents=True, exist_ok=True)
    write_geneval_metadata(gen_dir / "evaluation_metadata.jsonl", data.gen)
    for k, (record, image_id) in enumerate(zip(data.gen, data.gen_image, strict=True)):
        write_geneval_sample_dir(gen_dir / "targets", k, record, [data.image(image_id)])
    return {"vqa": out / "vqa", "geneval": gen_dir}


def export_conversation_files(data: ShapesWorldData, out: str | Path) -> dict[str, Path]:
    """Write ``out/llava.json`` (LLaVA layout, one record per question, image paths relative
    to ``out``) with its images in ``out/images``, and ``out/t2i`` (an image folder with
    ``metadata.jsonl``: ``file_name`` + ``text``) of the prompts and their target images."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    t2i = out / "t2i"
    t2i.mkdir(parents=True, exist_ok=True)
    for image_id in sorted({r.image_id for r in data.vqa}):
        Image.fromarray(data.image(image_id)).save(out / "images" / f"{image_id}.png")
    records = [{"id": str(r.question_id), "image": f"images/{r.image_id}.png",
                "conversations": [{"from": "human", "value": f"<image>\n{r.question}"},
                                  {"from": "gpt", "value": r.multiple_choice_answer}]}
               for r in data.vqa]
    (out / "llava.json").write_text(json.dumps(records, indent=1))
    with (t2i / "metadata.jsonl").open("w") as f:
        for g, image_id in zip(data.gen, data.gen_image, strict=True):
            name = f"{image_id}.png"
            Image.fromarray(data.image(image_id)).save(t2i / name)
            f.write(json.dumps({"file_name": name, "text": g.prompt}) + "\n")
    return {"understanding": out / "llava.json", "generation": t2i}
