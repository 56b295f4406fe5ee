"""The pieces of an experiment that every runtime builds the same way from a config.

The local runtime uses all of them in one process; under NVIDIA FLARE the server side
(evaluation, summary) and the client side (client data, trainer) run in different processes
but call these same functions, which is what makes the two runtimes give the same adapters.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from fedumm.config import Config
from fedumm.data.clients import split_clients
from fedumm.data.population import Population
from fedumm.data.prompts import compose_prompt, has_text_modality
from fedumm.data.readers import read_samples
from fedumm.data.records import Sample
from fedumm.eval.backdoor import BACKDOOR_SCORES, backdoor_scores
from fedumm.eval.model_eval import evaluate_backbone, heldout_quality
from fedumm.fl.client import ClientData, ClientTrainer, make_client_data
from fedumm.fl.client_pool import ClientPool
from fedumm.fl.codecs import bytes_per_value
from fedumm.fl.downloads import lossless
from fedumm.fl.dp_sgd import SampleDP
from fedumm.fl.endpoint import ClientEndpoint
from fedumm.fl.lora_modes import LoraMode
from fedumm.fl.pipeline import Pipeline
from fedumm.fl.poison import Poisoner
from fedumm.fl.strategies import strategy_class
from fedumm.fl.updates import ClientUpdate
from fedumm.models.kinds import build_backbone
from fedumm.models.lora import RESIDUAL_FILE, LoraAdapters
from fedumm.models.protocol import Backbone, prepare_samples
from fedumm.runtime.modes import CENTRALIZED, run_mode, strategy_name
from fedumm.runtime.privacy import guarantee
from fedumm.runtime.report import write_run_report
from fedumm.runtime.run_dir import RunDirectory
from fedumm.runtime.vocabulary import check_answers_known


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def load_backbone(cfg: Config) -> Backbone:
    """The frozen backbone the config names, checked against the generated data it will see."""
    backbone = build_backbone(cfg.backbone)
    fixed = getattr(backbone, "input_size", None)  # a model that takes one image size only
    if cfg.data.format == "shapes" and fixed and cfg.data.image_size != fixed:
        where = cfg.backbone.preset or cfg.backbone.path
        raise ValueError(f"data.image_size={cfg.data.image_size} but the backbone {where!r} "
                         f"takes {fixed} px images")
    return backbone


def build_adapters(cfg: Config, backbone: Backbone) -> LoraAdapters:
    """LoRA adapters on the frozen backbone, initialised from ``cfg.seed`` (same everywhere).
    A backbone whose generation has a network of its own conditioned on the language model
    (BLIP3o) learns first whether generation also trains the language adapters: it decides
    its groups' modalities (see the Backbone protocol)."""
    if hasattr(backbone, "generation_trains_language"):
        backbone.generation_trains_language = cfg.lora.generation_trains_language
    return LoraAdapters.from_config(backbone, cfg.lora, cfg.seed)


def client_endpoint(cfg: Config, adapters: LoraAdapters) -> ClientEndpoint:
    """A client process's endpoint: the trainer (held-out quality scored as evaluation
    scores it), the strategy's client side, the LoRA mode and the update pipeline."""
    trainer = ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed, heldout_quality,
                            dp=SampleDP.from_config(cfg.privacy, cfg.rounds))  # DP-SGD or None
    return ClientEndpoint(trainer, strategy_class(strategy_name(cfg)),
                          LoraMode.from_config(cfg.lora), Pipeline.from_config(cfg),
                          keep_initial=not lossless(cfg.codec.download))


def client_datasets(cfg: Config, backbone: Backbone,
                    progress: Callable[[int, int], None] | None = None
                    ) -> tuple[ClientPool, dict[str, Any] | None]:
    """Every client's training data (built when a client is first asked for) and the
    partition summary (None when centralized); ``progress(done, total)`` reports the
    backbone's preparation of the data."""
    train = read_samples(cfg.data, "train")
    check_answers_known(cfg, backbone, train)  # before any preparation: answers it can say
    # e.g. quantise generation targets once, in a fixed order
    prepare_samples(backbone, train, progress)
    n = len(train)
    if run_mode(cfg) == CENTRALIZED:  # one client holding all training data
        population = Population.from_parts([np.arange(n)])
        missing, summary = np.zeros(n, dtype=np.int8), None
    else:
        split = split_clients(train, cfg.partition, cfg.clients, cfg.seed)
        population, missing, summary = split.population, split.missing, split.summary()
    clients = ClientPool(train, population, missing, cfg.train.val_fraction, cfg.seed,
                         text_modality=has_text_modality(train),
                         agnostic=cfg.train.prompt_augmentation,
                         poison=Poisoner.from_config(cfg, train))  # attack: label_flip, backdoor
    return clients, summary


def eval_samples(cfg: Config) -> list[Sample]:
    """The held-out samples, asked with the full-modality prompt where the data has a text
    modality (as FedMLLM evaluates, with or without prompt augmentation in training)."""
    val = read_samples(cfg.data, "val")
    return [compose_prompt(s) for s in val] if has_text_modality(val) else val


def site_client_data(cfg: Config, backbone: Backbone, client_id: int) -> ClientData:
    """A site that brings its own data (a FLARE site with its own ``data.*`` paths): every
    record of its files, with no partition or modality scenario applied (its data is what it
    is); its local held-out part comes from ``train.val_fraction`` as for any client."""
    samples = read_samples(cfg.data, "all")
    check_answers_known(cfg, backbone, samples)
    backbone.prepare(samples)
    n = len(samples)
    return make_client_data(client_id, samples, np.arange(n), np.zeros(n, dtype=np.int8),
                            cfg.train.val_fraction, cfg.seed,
                            text_modality=has_text_modality(samples),
                            agnostic=cfg.train.prompt_augmentation)


def evaluate_states(cfg: Config, adapters: LoraAdapters, val_data: list[Sample],
                    states: list[dict[str, torch.Tensor]], with_gen: bool) -> dict[str, Any]:
    """Evaluate one state, or the mean over clients' own states (the ``local`` baseline)."""
    ev = cfg.eval
    results = []
    for s in states:
        adapters.load_state(s)
        results.append(evaluate_backbone(adapters.backbone, val_data, max_vqa=ev.max_vqa,
                                         max_gen=ev.max_gen if with_gen else 0, seed=cfg.seed,
                                         classification=ev.classification))
        if cfg.attack.kind == "backdoor":  # how often the model obeys the triggers
            results[-1].update(backdoor_scores(adapters.backbone, val_data, cfg.attack,
                                               max_vqa=ev.max_vqa, max_gen=ev.max_gen,
                                               seed=cfg.seed, with_gen=with_gen))
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    for key in ("vqa_accuracy", "geneval_overall", "generation_quality", "auc", "auc_hard",
                "macro_f1", *BACKDOOR_SCORES):
        vals = [r[key] for r in results if r.get(key) is not None]
        if key in out:
            out[key] = round(float(np.mean(vals)), 4) if vals else None
    for key in ("vqa_by_answer_type", "geneval_by_task"):
        if key in out:
            out[key] = {k: round(float(np.mean([r[key][k] for r in results])), 4)
                        for k in out[key]}
    out["per_client"] = [{k: r.get(k) for k in ("vqa_accuracy", "geneval_overall",
                                                 "generation_quality", "auc", "macro_f1")
                          if k in r}
                         for r in results]
    return out


def full_model_bytes(num_parameters: int, spec: str) -> int:
    """What full fine-tuning would send per client upload: every weight under the upload
    codec (counted from parameter counts and the codec's bytes per value; the model is never
    serialised for it)."""
    return int(round(int(num_parameters) * bytes_per_value(spec)))


# what summary.json keeps of an evaluation, for the frozen base and the final model alike
SCORES = ("vqa_accuracy", "vqa_by_answer_type", "vqa_by_family", "auc", "auc_hard", "macro_f1",
          "classification", "geneval_overall", "geneval_by_task", "generation_quality",
          "per_client", *BACKDOOR_SCORES)


def make_summary(cfg: Config, run_dir: RunDirectory, backbone: Backbone, adapters: LoraAdapters,
                 fingerprint: str, clients: int, final: dict, acc: dict, wall: float,
                 peak_rss: int | None = None) -> dict[str, Any]:
    """``summary.json`` (the DESIGN.md contract) from the counters a runtime kept."""
    full = full_model_bytes(adapters.num_parameters()["model"], cfg.codec.upload)
    up, down = acc["upload"], acc["download"]
    per_up = float(np.mean(up)) if up else 0.0
    base = next((m for m in run_dir.metrics() if m.get("round") == -1), None)
    return {
        "name": cfg.name, "strategy": cfg.strategy.name, "rounds": cfg.rounds,
        "clients": clients, "seed": cfg.seed, "runtime": cfg.runtime,
        "final": {k: final[k] for k in SCORES if k in final},
        "base": {k: base[k] for k in SCORES if base and k in base},
        "communication": {
            "upload_bytes_per_client_round": per_up,
            "download_bytes_per_client_round": float(np.mean(down)) if down else 0.0,
            "full_model_bytes": full,
            "total_bytes": int(sum(up) + sum(down)),
            "reduction_vs_full": round(full / per_up, 2) if per_up else None,
            "codec": cfg.codec.upload if cfg.codec.upload == cfg.codec.download else
            f"{cfg.codec.upload} up / {cfg.codec.download} down",
        },
        "updates": {"accepted": acc.get("accepted"), "rejected": acc.get("rejected"),
                    "first_rejection": acc.get("first_rejection"),
                    # faults (runtime/faults.py): clients that sent nothing or sent too late,
                    # and rounds left unaggregated
                    "dropped": acc.get("dropped", 0), "late": acc.get("late", 0),
                    "skipped_rounds": acc.get("skipped_rounds", 0)},
        **({"privacy": guarantee(acc["privacy"])} if acc.get("privacy") else {}),
        "time": {"wall_s": round(wall, 2), "client_train_s": round(acc["client_train_s"], 2),
                 "eval_s": round(acc["eval_s"], 2)},
        "memory": {"peak_rss_bytes": peak_rss if peak_rss is not None else peak_rss_bytes()},
        "adapters": adapters.num_parameters(),
        "fingerprint": fingerprint,
    }


def round_record(rnd: int, selected: list[int], updates: list[ClientUpdate],
                 count_upload: bool = True) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of one round (the same under every runtime)."""
    return {"type": "round", "round": rnd, "clients": selected,
            "num_samples": {u.client_id: u.num_samples for u in updates},
            "train_loss": {u.client_id: u.metrics for u in updates},
            "quality": {u.client_id: u.quality for u in updates},
            "steps": sum(u.num_steps for u in updates),
            "upload_bytes": sum(u.upload_bytes for u in updates) if count_upload else 0,
            "peak_rss_bytes": peak_rss_bytes()}


def mid_run_eval(cfg: Config, rnd: int) -> bool | None:
    """After round ``rnd``: None if no evaluation is due, else whether to include generation.
    The last round is evaluated (with generation) by :func:`finish_run`."""
    ev = cfg.eval
    if not ev.every or (rnd + 1) % ev.every or rnd == cfg.rounds - 1:
        return None
    return bool(ev.gen_every) and (rnd + 1) % ev.gen_every == 0


def finish_run(cfg: Config, run_dir: RunDirectory, backbone: Backbone, adapters: LoraAdapters,
               fingerprint: str, clients: int, state: dict[str, torch.Tensor], final: dict,
               acc: dict, wall: float, residual: dict[str, torch.Tensor] | None = None
               ) -> dict[str, Any]:
    """Log the final evaluation, export the global adapters (PEFT; with exact aggregation also
    the frozen-weight ``residual`` they need, as ``base_residual.safetensors``), write
    summary.json and report.md. Only adapters are persisted."""
    run_dir.log({"type": "eval", "round": cfg.rounds - 1, **final})
    adapters.load_state(state)

    def save(folder: Path) -> None:
        adapters.export(folder)
        if residual:
            save_file({m: r.contiguous() for m, r in residual.items()},
                      str(folder / RESIDUAL_FILE))

    run_dir.write_folder(run_dir.ADAPTERS, save)
    summary = make_summary(cfg, run_dir, backbone, adapters, fingerprint, clients, final, acc,
                           wall)
    run_dir.write_summary(summary)
    write_run_report(run_dir.path)
    return summary
