"""The client trainer: local LoRA training on whatever modalities a client holds.

Used unchanged by every runtime. A round on a client: load the global adapters into the shared
frozen backbone, train ``local_epochs`` (or ``train.max_steps``) on mixed understanding and
generation batches, measure quality on the client's own held-out samples, and return a
:class:`~fedumm.fl.updates.ClientUpdate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedumm.config import TrainConfig
from fedumm.data.prompts import compose_prompt
from fedumm.data.records import Sample
from fedumm.data.scenarios import IMAGE_MISSING, TEXT_MISSING
from fedumm.fl.answer_calibration import (
    ANSWER_SPACE,
    AnswerCalibration,
    answer_token_counts,
    check_backbone,
)
from fedumm.fl.client_hooks import ClientHook, LocalRound
from fedumm.fl.dp_sgd import PrivateRound, SampleDP, poisson_batches
from fedumm.fl.strategies.fedprox import ProxTerm, middle_layer_keys
from fedumm.fl.updates import GENERATION, UNDERSTANDING, ClientUpdate
from fedumm.models.lora import LoraAdapters
from fedumm.models.protocol import IMAGE_INPUTS

QualityScorer = Callable[[object, Sequence[Sample]], dict[str, float]]


@dataclass
class ClientData:
    """A client's share of the training data: its training samples (understanding first, then
    generation) and its own held-out samples, as :class:`~fedumm.data.records.Sample` records."""

    client_id: int
    train: list[Sample]
    val: list[Sample] = field(default_factory=list)

    @property
    def num_samples(self) -> dict[str, int]:
        """Training samples per modality, and the understanding ones holding their image."""
        und = [s for s in self.train if s.task == UNDERSTANDING]
        return {UNDERSTANDING: len(und), GENERATION: len(self.train) - len(und),
                IMAGE_INPUTS: sum(s.image is not None for s in und)}

    def groups_with_data(self, adapters: LoraAdapters) -> list[str]:
        """The groups this client's data trains (e.g. no image encoder for text-only data)."""
        n = self.num_samples
        return [g for g in adapters.groups
                if any(n.get(m, 0) > 0 for m in adapters.layout.sample_keys(g))]


def make_client_data(client_id: int, samples: Sequence[Sample], sample_idx: np.ndarray,
                     missing: np.ndarray, val_fraction: float, seed: int, *,
                     text_modality: bool = False, agnostic: bool = False) -> ClientData:
    """Split a client's samples (indices into ``samples``) into local train / held-out parts
    and apply the modality mask (bit flags, see :mod:`fedumm.data.scenarios`) to the training
    part. Understanding: a missing image is the backbone's placeholder; a missing text drops
    the sample's text modality where the data has one (``text_modality``: then every question
    is asked with the prompt that names the modalities it has, or the modality-agnostic one
    with ``agnostic``, see :mod:`fedumm.data.prompts`), else the sample, which has no question
    left. Generation: a sample without its image has no target and is dropped; a prompt
    without text trains the unconditional (guidance) branch. The local held-out part stays
    complete and is asked with the full-modality prompt."""
    idx = np.asarray(sample_idx, dtype=np.int64)
    image_gone = (np.asarray(missing) & IMAGE_MISSING) > 0
    text_gone = (np.asarray(missing) & TEXT_MISSING) > 0
    und = [int(i) for i in idx if samples[i].task == UNDERSTANDING
           and (text_modality or not text_gone[i])]
    gen = [int(i) for i in idx if samples[i].task == GENERATION and not image_gone[i]]
    rng = np.random.default_rng([seed, 7, client_id])

    def split(items: list[int]) -> tuple[list[int], list[int]]:
        items = [int(i) for i in rng.permutation(items)] if items else []
        n_val = int(round(len(items) * val_fraction)) if len(items) >= 2 else 0
        if val_fraction > 0 and len(items) >= 2:
            n_val = max(1, n_val)
        return sorted(items[n_val:]), items[:n_val]

    def understanding(i: int) -> Sample:
        s = samples[i]
        if image_gone[i]:
            s = replace(s, image=None)
        if text_gone[i]:
            s = replace(s, context=None)
        return compose_prompt(s, agnostic) if text_modality else s

    tu, vu = split(und)
    tg, vg = split(gen)
    train = [understanding(i) for i in tu]
    train += [replace(samples[i], text=None) if text_gone[i] else samples[i] for i in tg]
    held = [compose_prompt(samples[i]) if text_modality else samples[i] for i in vu]
    return ClientData(client_id, train, held + [samples[i] for i in vg])


class ClientTrainer:
    """Trains one client's adapters for one round. Holds no per-client state itself: what must
    persist between rounds (optimizer, the algorithms' state) comes in and goes out in
    ``client_state``. The federated algorithm's client side comes in as hooks
    (:mod:`fedumm.fl.client_hooks`); the trainer does not know which algorithm it serves.
    ``quality``: the held-out scorer (backbone, samples) -> quality per modality in [0, 1].
    ``dp``: sample-level DP-SGD (:mod:`fedumm.fl.dp_sgd`; Poisson batches, per-sample
    clipping in place of ``train.grad_clip``, noise), or None."""

    def __init__(self, adapters: LoraAdapters, cfg: TrainConfig, local_epochs: int,
                 seed: int, quality: QualityScorer, dp: SampleDP | None = None) -> None:
        self.adapters = adapters
        self.cfg = cfg
        self.dp = dp
        self.local_epochs = local_epochs
        self.seed = seed
        self.scorer = quality
        self.backbone = adapters.backbone
        self.model = adapters.model
        # FedMLLM's layer-adaptive proximal term: its adapter tensors (checked here, before
        # any training, that the backbone has middle layers for it)
        self.layer_prox_keys: set[str] = set()
        if cfg.answer_calibration:  # the backbone can be calibrated: said before training
            check_backbone(self.backbone, cfg.answer_calibration)
        if cfg.adaptive_prox:
            self.layer_prox_keys = set(middle_layer_keys(
                list(adapters.params), self.backbone.decoder_layers, cfg.adaptive_prox_skip))

    def config_hooks(self, client: ClientData, client_config: dict | None = None
                     ) -> list[ClientHook]:
        """Hooks the training config asks for beside any strategy's: FedMLLM's layer-adaptive
        proximal term; the answer head calibrated by the client's answers (over the task's
        answer tokens the server sent in ``client_config``)."""
        cfg, hooks = self.cfg, []
        if cfg.adaptive_prox:
            hooks.append(ProxTerm(cfg.adaptive_prox_mu * cfg.adaptive_prox_weight,
                                  self.layer_prox_keys))
        if cfg.answer_calibration:
            hooks.append(AnswerCalibration(
                self.backbone, answer_token_counts(self.backbone, client.train),
                cfg.answer_calibration, cfg.answer_calibration_alpha,
                cfg.answer_calibration_tau, (client_config or {}).get(ANSWER_SPACE)))
        return hooks

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _batches(self, client: ClientData, rng: np.random.Generator) -> list[np.ndarray]:
        """Mixed batches over the client's samples (positions in ``client.train``), one epoch;
        under DP-SGD Poisson batches, as its accountant assumes."""
        if self.dp is not None:
            return poisson_batches(len(client.train), self.cfg.batch_size, rng)
        items = rng.permutation(len(client.train))
        b = self.cfg.batch_size
        return [items[s:s + b] for s in range(0, len(items), b)]

    def _ordered(self, client: ClientData, batch: np.ndarray, rng: np.random.Generator
                 ) -> tuple[list[Sample], list[bool] | None]:
        """The batch's samples, understanding first, and which generation prompts drop."""
        samples = [client.train[i] for i in batch]
        und = [s for s in samples if s.task == UNDERSTANDING]
        gen = [s for s in samples if s.task == GENERATION]
        drop = None
        if gen:  # prompt dropout trains the unconditional branch (classifier-free guidance)
            draw = rng.random(len(gen)) < self.cfg.prompt_dropout
            drop = [False] * len(und) + [bool(d) or s.text is None
                                         for d, s in zip(draw, gen, strict=True)]
        return und + gen, drop

    def batch_loss(self, samples: Sequence[Sample], drop: Sequence[bool] | None):
        """The loss of ``samples``: per-modality mean losses weighted by their share."""
        collated = self.backbone.collate(samples, drop)
        losses = self.backbone.loss(collated)
        total, parts = 0.0, {}
        for m, key in ((UNDERSTANDING, "und_loss"), (GENERATION, "gen_loss")):
            if m in losses:
                total = total + losses[m] * collated.counts[m] / len(samples)
                parts[key] = float(losses[m].detach())
        return total, parts

    def train(self, client: ClientData, global_state: dict[str, torch.Tensor], rnd: int,
              hooks: Sequence[ClientHook] = (),
              client_state: dict | None = None) -> tuple[ClientUpdate, dict]:
        """One round of local training from ``global_state``, with the algorithm's ``hooks``.
        Returns the update and the new client state."""
        ad = self.adapters
        ad.load_state(global_state)
        groups = client.groups_with_data(ad)
        ad.set_trainable(groups)
        names = [k for k in ad.params if ad.group_of(k) in groups
                 and all(h.trains(k) for h in hooks)]
        for k in set(ad.keys()) - set(names):
            ad.params[k].requires_grad_(False)
        local = LocalRound({k: ad.params[k] for k in names}, global_state,
                           dict(client_state or {}))
        opt = self._optimizer(list(local.params.values()))
        if self.cfg.persistent_optimizer and "optimizer" in local.client_state:
            opt.load_state_dict(local.client_state["optimizer"])
        try:
            for h in hooks:
                h.begin(local)
            private = None if self.dp is None else PrivateRound(  # wrapped after placement
                self.dp.plan(len(client.train), self.cfg.batch_size, self.local_epochs,
                             self.cfg.max_steps),
                opt, list(local.params.values()), local.client_state,
                (self.seed, rnd, client.client_id), self.model)
            metrics = self._steps(client, rnd, opt, local, hooks, private)
            if private is not None:  # its epsilon; the losses are not private: not reported
                metrics = private.finish(local.client_state)
            trained = {k: v for k, v in ad.state(groups).items() if k in local.params}
            for h in hooks:
                h.end(local, trained)
        finally:
            for h in hooks:
                h.close()
        if self.cfg.persistent_optimizer:
            local.client_state["optimizer"] = opt.state_dict()
        update = ClientUpdate(client.client_id, trained, client.num_samples,
                              self.quality(client), local.steps, metrics, local.extra)
        return update, local.client_state

    def _steps(self, client: ClientData, rnd: int, opt: torch.optim.Optimizer,
               local: LocalRound, hooks: Sequence[ClientHook],
               private: PrivateRound | None = None) -> dict[str, float]:
        """The local steps; their mean losses. The data order and torch's randomness (LoRA
        dropout, flow-matching noise) are functions of (seed, round, client), whatever ran
        before: runtimes and resumed runs agree. ``private``: DP-SGD's per-sample gradients,
        clipped and noised, then the hooks' terms (they hold no data) and corrections."""
        rng = np.random.default_rng([self.seed, rnd, client.client_id])
        torch_seed = int(np.random.SeedSequence([self.seed, rnd, client.client_id, 1])
                         .generate_state(1)[0])
        devices = [self.backbone.device] if self.backbone.device.type == "cuda" else []
        params = list(local.params.values())
        budget = self.cfg.max_steps or math.inf
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        self.model.train()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(torch_seed)
            for _ in range(self.local_epochs):
                for batch in self._batches(client, rng):
                    if local.steps >= budget:
                        break
                    samples, drop = self._ordered(client, batch, rng)
                    opt.zero_grad(set_to_none=True)
                    if private is None:
                        loss, parts = self.batch_loss(samples, drop)
                    else:
                        private.per_sample_grads(samples, drop, self.batch_loss)
                        loss, parts = 0.0, {}
                    for h in hooks:
                        term = h.loss(local)
                        if term is not None:
                            loss = loss + term
                    if torch.is_tensor(loss):
                        loss.backward()
                    if private is not None:
                        private.privatize()
                    for h in hooks:
                        h.correct(local)
                    if self.cfg.grad_clip > 0 and private is None:
                        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                    opt.step()
                    local.steps += 1
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
        self.model.eval()
        return {k: sums[k] / counts[k] for k in sums}

    @torch.no_grad()
    def quality(self, client: ClientData) -> dict[str, float]:
        """Held-out quality per modality on the client's own validation samples (0-1)."""
        return self.scorer(self.backbone, client.val) if client.val else {}
