"""Pretrain the reference UMM on ShapesWorld's base split (the foundation model we ship).

    fedumm pretrain --out checkpoints/base --steps 1500 --seed 0

Each step trains on one batch of VQA samples and one batch of text-to-image samples (10% of
prompts dropped for classifier-free guidance); half of those prompts name the colour of what is
drawn, as only the ``colors`` prompts do. Two auxiliary losses make the CPU budget enough:
the vision encoder predicts each patch's shape and colour, and the decoder marks, at every image
token, whether that cell holds what the question names (grounding). Without grounding the
decoder stays at the majority answer of the existence and counting questions for thousands of
steps, even when it is handed the true attributes of every cell. Deterministic for a given
config and seed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedumm.data.readers.shapes import generate_shapes
from fedumm.data.world import CAPTION_QUESTION, describe_scene
from fedumm.models.checksums import SUMS
from fedumm.models.reference.backbone import ReferenceBackbone
from fedumm.models.reference.pretrain_batches import pretrain_encoder
from fedumm.models.reference.text_tokenizer import TextTokenizer
from fedumm.models.reference.umm import ReferenceUMM, UMMConfig
from fedumm.models.reference.vq import PatchCodebook
from fedumm.outputs import OutputExistsError, OutputFolder, write_tree

COMMAND = "pretrain"  # the marker of a checkpoint folder pretraining made: .fedumm-pretrain


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 2600
    batch_size: int = 32  # generation samples per step
    vqa_batch: int = 32  # VQA samples per step
    und_weight: float = 1.0  # weight of the VQA loss against the generation loss
    lr: float = 1e-3
    adam_beta2: float = 0.95
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    train_scenes: int = 8000
    image_size: int = 48
    image_codes: int = 256
    probe_weight: float = 0.5
    ground_weight: float = 1.0
    gen_cell_weight: float = 0.5
    prompt_dropout: float = 0.1
    # relative weight of each GenEval tag among the generation prompts (1 for a tag not named).
    # Colour prompts are the only ones whose words fix the colour of what is drawn; at the
    # even mix the decoder bound the named colour in 0.59 of them, with 3x it binds all of them
    gen_tag_weights: dict[str, float] = field(default_factory=lambda: {"colors": 3.0})
    caption_batch: int = 0  # scene captions per step (grounding made them unnecessary)
    max_minutes: float = 20.0


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def initial_backbone(cfg: PretrainConfig, train_images: np.ndarray) -> ReferenceBackbone:
    torch.manual_seed(cfg.seed)
    tok = TextTokenizer.default()
    mcfg = UMMConfig(image_size=cfg.image_size, text_vocab=tok.vocab_size,
                     image_codes=cfg.image_codes)
    codebook = PatchCodebook.fit(train_images, mcfg.gen_patch, cfg.image_codes, seed=cfg.seed)
    model = ReferenceUMM(mcfg)
    return ReferenceBackbone(model, tok, codebook)


def pretrain(cfg: PretrainConfig, out: str | Path, progress: bool = True) -> Path:
    """Train from scratch and save a checkpoint folder at ``out``: a new or empty folder, or
    one an earlier pretraining made that holds no checkpoint (it failed before writing one);
    an existing checkpoint is never replaced. Returns its path."""
    out = Path(out)
    folder = OutputFolder(out, COMMAND)
    folder.check()  # before the training, not after it
    if folder.is_marked() and (out / SUMS).is_file():
        raise OutputExistsError(f"{out} already holds a pretrained checkpoint; pretraining never "
                                "replaces one: choose another --out")
    folder.claim()
    t0 = time.time()
    data = generate_shapes("base", cfg.train_scenes, seed=cfg.seed, role="train",
                           image_size=cfg.image_size, annotator_noise=0.0,
                           tag_weights=cfg.gen_tag_weights)
    # The image tokenizer is generic (like a VQGAN trained on broad data): its codebook sees
    # renders of every shape, while the model itself only learns the base split's concepts.
    broad = generate_shapes("downstream", 1000, seed=cfg.seed, role="train",
                            image_size=cfg.image_size)
    targets = np.stack([data.image(i) for i in data.gen_image[:3000]]
                       + [broad.image(i) for i in broad.gen_image])
    bb = initial_backbone(cfg, targets)
    enc = pretrain_encoder(bb)
    prep = enc.prepare(data, with_probe=True)
    model = bb.model
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, cfg.adam_beta2))
    rng = np.random.default_rng(cfg.seed)
    n_vqa, n_gen = len(data.vqa), len(data.gen)
    n_scenes = cfg.train_scenes  # the first images are the VQA scenes
    captions = [describe_scene(objs) for objs in data.scenes[:n_scenes]]
    log = []
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ub = enc.understanding_batch(prep, rng.integers(0, n_vqa, cfg.vqa_batch))
        gi = rng.integers(0, n_gen, cfg.batch_size)
        gb = enc.generation_batch(prep, gi, rng.random(cfg.batch_size) < cfg.prompt_dropout)
        lu = model.understanding_loss(ub["images"], ub["q_ids"], ub["q_mask"], ub["a_ids"],
                                      ub["a_mask"], probe=ub["probe"],
                                      probe_weight=cfg.probe_weight,
                                      ground=ub["ground"] if cfg.ground_weight else None,
                                      ground_weight=cfg.ground_weight)
        lg = model.generation_loss(gb["p_ids"], gb["p_mask"], gb["codes"],
                                   cells=gb["cells"] if cfg.gen_cell_weight else None,
                                   cell_weight=cfg.gen_cell_weight)
        loss = cfg.und_weight * lu + lg
        if cfg.caption_batch:
            rows = rng.integers(0, n_scenes, cfg.caption_batch)
            cb = enc.qa_batch(data.images[rows], [CAPTION_QUESTION] * len(rows),
                                     [captions[r] for r in rows])
            loss = loss + model.understanding_loss(cb["images"], cb["q_ids"], cb["q_mask"],
                                                   cb["a_ids"], cb["a_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 10 == 0 or step == cfg.steps - 1:
            rec = {"step": step, "und_loss": round(lu.item(), 4), "gen_loss": round(lg.item(), 4),
                   "lr": lr_at(step, cfg), "elapsed_s": round(time.time() - t0, 1)}
            log.append(rec)
            bar.set_postfix(und=f"{rec['und_loss']:.3f}", gen=f"{rec['gen_loss']:.3f}")
        if (time.time() - t0) / 60 > cfg.max_minutes:
            tqdm.write(f"pretrain: time budget of {cfg.max_minutes} min reached at step {step}")
            break
    model.eval()
    bb.meta = {"pretrain": asdict(cfg), "steps_done": step + 1,
               "train_seconds": round(time.time() - t0, 1), "split": "base"}

    def save(folder: Path) -> None:
        bb.save(folder)
        (folder / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

    # staged, then copied with the checksums last: a copy cut short never looks complete
    write_tree(out, save, last=(SUMS,))
    return out
