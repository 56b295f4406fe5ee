"""Write a generated dataset in the official file formats (VQA v2 + GenEval)."""

from __future__ import annotations

from pathlib import Path

from fedumm.data.dataset import MultimodalDataset
from fedumm.data.geneval import write_geneval_metadata, write_geneval_sample_dir
from fedumm.data.vqa_v2 import write_vqa_v2


def export_official(data: MultimodalDataset, out: str | Path, vqa_split: str) -> dict[str, Path]:
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
