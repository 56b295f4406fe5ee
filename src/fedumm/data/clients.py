"""From a config to client datasets: build the data, partition it, apply a modality scenario."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedumm.config import PartitionConfig
from fedumm.data.partition import heterogeneity, label_counts, partition
from fedumm.data.records import Sample
from fedumm.data.scenarios import (
    GENERATION,
    UNDERSTANDING,
    hybrid_clients,
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
    """Which samples each client holds (global sample numbering of the dataset)."""

    parts: list[np.ndarray]
    labels: list[str]  # the partition label of every sample
    missing: np.ndarray  # per sample: 0 complete, 1 image dropped, 2 text dropped

    def summary(self) -> dict:
        """The ``fedumm partition --json`` contract: per-client counts and heterogeneity."""
        counts = label_counts(self.labels, self.parts)
        clients = [
            {"id": k, "num_samples": int(len(p)),
             "label_counts": {str(lab): int(n) for lab, n in sorted(c.items(), key=str)}}
            for k, (p, c) in enumerate(zip(self.parts, counts, strict=True))
        ]
        return {"clients": clients, "heterogeneity": heterogeneity(self.labels, self.parts)}


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
    if cfg.scenario == "single_modality":
        parts = single_modality_clients(parts, modality, cfg.understanding_clients, seed)
    elif cfg.scenario == "hybrid":
        parts = hybrid_clients(parts, modality, cfg.hybrid_q, seed)
    rate = cfg.missing_rate if cfg.scenario == "missing_modality" else 0.0
    return ClientSplit(parts, labels, missing_modality(len(samples), rate, seed))

