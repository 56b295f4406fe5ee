"""From a config to client datasets: build the data, partition it, apply a modality scenario."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedumm.config import DataConfig, PartitionConfig
from fedumm.data.dataset import MultimodalDataset, generate_shapes
from fedumm.data.partition import heterogeneity, label_counts, partition
from fedumm.data.scenarios import (
    hybrid_clients,
    missing_modality,
    modality_counts,
    single_modality_clients,
)


def build_dataset(cfg: DataConfig, role: str = "train") -> MultimodalDataset:
    """The training (or held-out) data a config describes."""
    if cfg.dataset != "shapes":
        raise ValueError(
            f"data.dataset={cfg.dataset!r} has no federated builder yet; load VQA v2 files with "
            "fedumm.data.vqa_v2.load_vqa_v2"
        )
    return generate_shapes(
        cfg.split, cfg.train_scenes if role == "train" else cfg.val_scenes, seed=cfg.seed,
        role=role, image_size=cfg.image_size, max_objects=cfg.max_objects,
        questions_per_image=cfg.questions_per_image,
        generation_fraction=cfg.generation_fraction, annotator_noise=cfg.annotator_noise,
    )


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


def split_clients(data: MultimodalDataset, cfg: PartitionConfig, num_clients: int,
                  seed: int) -> ClientSplit:
    """Partition ``data`` over ``num_clients`` as ``cfg`` says; deterministic in ``seed``."""
    labels = data.labels(cfg.label)
    parts = partition(
        cfg.method, labels=labels, domains=data.sample_domains(), num_samples=data.num_samples,
        num_clients=num_clients, seed=seed, alpha=cfg.alpha, beta=cfg.beta,
        min_per_client=cfg.min_per_client,
    )
    modality = data.modality()
    if cfg.scenario == "single_modality":
        parts = single_modality_clients(parts, modality, cfg.understanding_clients, seed)
    elif cfg.scenario == "hybrid":
        parts = hybrid_clients(parts, modality, cfg.hybrid_q, seed)
    rate = cfg.missing_rate if cfg.scenario == "missing_modality" else 0.0
    return ClientSplit(parts, labels, missing_modality(data.num_samples, rate, seed))


def client_modalities(split: ClientSplit, data: MultimodalDataset) -> list[dict[str, int]]:
    return modality_counts(split.parts, data.modality())
