"""From a config to client datasets: build the data, partition it, apply a modality scenario."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedumm.config import PartitionConfig
from fedumm.data.partition import heterogeneity, label_counts, partition
from fedumm.data.population import SUMMARY_ROWS_MAX, Population, population_summary
from fedumm.data.records import Sample
from fedumm.data.scenarios import (
    COMPLETE,
    GENERATION,
    UNDERSTANDING,
    cross_modal_clients,
    hybrid_clients,
    hybrid_modality_clients,
    missing_modality,
    single_modality_clients,
)

# Keys that only understanding samples carry; generation samples are labelled by their tag
UNDERSTANDING_KEYS = ("answer", "question_type", "answer_type", "family")


def sample_labels(samples: Sequence[Sample], key: str) -> list[str]:
    """One partition label per sample. A key that belongs to the other modality labels a
    sample by that modality's coarse label (``gen/<tag>``, ``vqa/<answer type>``)."""
    if key == "modality":
        return [s.task for s in samples]
    out = []
    for s in samples:
        value = s.labels.get(key)
        if value is None and s.task == GENERATION and key in UNDERSTANDING_KEYS:
            value = f"gen/{s.labels.get('tag', 'image')}"
        elif value is None and s.task == UNDERSTANDING and key == "tag":
            value = f"vqa/{s.labels.get('answer_type', 'other')}"
        if value is None:
            raise ValueError(f"partition.label={key!r}: sample {s.id} has no such label "
                             f"(it has {sorted(s.labels)})")
        out.append(value)
    return out


@dataclass
class ClientSplit:
    """Which samples each client holds (global sample numbering of the dataset), as one index."""

    population: Population
    labels: list[str]  # the partition label of every sample
    missing: np.ndarray  # per sample: 0 complete, 1 image dropped, 2 text dropped, 3 both

    @property
    def parts(self) -> list[np.ndarray]:
        """Each client's sample indices (views into the index)."""
        return list(self.population)

    def summary(self) -> dict:
        """The ``fedumm partition --json`` contract: per-client counts and heterogeneity; past
        :data:`SUMMARY_ROWS_MAX` clients, distributions over the clients instead of rows
        (:func:`~fedumm.data.population.population_summary`)."""
        parts = self.parts
        het = heterogeneity(self.labels, parts)
        if len(parts) > SUMMARY_ROWS_MAX:
            classes, codes = np.unique(np.asarray(self.labels, dtype=object).astype(str),
                                       return_inverse=True)
            return {**population_summary(self.population, classes.tolist(), codes),
                    "heterogeneity": het}
        counts = label_counts(self.labels, parts)
        clients = [
            {"id": k, "num_samples": int(len(p)),
             "label_counts": {str(lab): int(n) for lab, n in sorted(c.items(), key=str)}}
            for k, (p, c) in enumerate(zip(parts, counts, strict=True))
        ]
        return {"clients": clients, "heterogeneity": het}


def split_clients(samples: Sequence[Sample], cfg: PartitionConfig, num_clients: int,
                  seed: int) -> ClientSplit:
    """Partition ``samples`` over ``num_clients`` as ``cfg`` says; deterministic in ``seed``."""
    labels = sample_labels(samples, cfg.label)
    domains = [s.labels.get("domain", "") for s in samples]
    parts = partition(
        cfg.method, labels=labels, domains=domains, num_samples=len(samples),
        num_clients=num_clients, seed=seed, alpha=cfg.alpha, beta=cfg.beta,
        min_per_client=cfg.min_per_client,
    )
    modality = [s.task for s in samples]
    n = len(samples)
    if cfg.scenario in ("cross_modal", "hybrid") and not any(
            s.context is not None for s in samples if s.task == UNDERSTANDING):
        raise ValueError(f"partition.scenario={cfg.scenario} needs understanding samples with "
                         "a text modality (e.g. data.scene_text > 0, or memes with their "
                         "text); the task scenario is task_hybrid")
    if cfg.scenario == "task_split":
        parts = single_modality_clients(parts, modality, cfg.understanding_clients, seed)
    elif cfg.scenario == "task_hybrid":
        parts = hybrid_clients(parts, modality, cfg.hybrid_q, seed)
    if cfg.scenario == "missing_modality":
        missing = missing_modality(n, cfg.missing_rate, seed)
    elif cfg.scenario == "cross_modal":
        missing = cross_modal_clients(parts, n, cfg.image_only_clients, seed)
    elif cfg.scenario == "hybrid":
        missing = hybrid_modality_clients(parts, n, cfg.hybrid_q, seed)
    else:
        missing = np.full(n, COMPLETE, dtype=np.int8)
    if cfg.scenario in ("cross_modal", "hybrid"):  # input modalities of understanding only
        missing[np.array([s.task != UNDERSTANDING for s in samples], dtype=bool)] = COMPLETE
    return ClientSplit(Population.from_parts(parts), labels, missing)

