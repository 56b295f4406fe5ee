"""The client trainer: local LoRA training on whatever modalities a client holds.

Used unchanged by every runtime. A round on a client: load the global adapters into the shared
frozen backbone, train ``local_epochs`` (or ``train.max_steps``) on mixed understanding and
generation batches, measure quality on the client's own held-out samples, and return a
:class:`~fedumm.fl.updates.ClientUpdate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedumm.config import TrainConfig
from fedumm.data.prompts import compose_prompt
from fedumm.data.records import Sample
from fedumm.data.scenarios import IMAGE_MISSING, TEXT_MISSING
from fedumm.fl.lora_aggregation import is_lora_a, is_lora_b
from fedumm.fl.strategies.scaffold import client_control_update
from fedumm.fl.updates import GENERATION, UNDERSTANDING, ClientUpdate
from fedumm.models.lora import LoraAdapters
from fedumm.models.protocol import IMAGE_INPUTS, DecoderLayers


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


def rank_masks(params: dict[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """0/1 gradient masks keeping the first ``rank`` components of each LoRA tensor (A's rows,
    B's columns); empty when the client trains the full rank."""
    masks = {}
    for k, p in params.items():
        full = p.shape[0] if is_lora_a(k) else p.shape[1] if is_lora_b(k) else None
        if full is None or rank is None or rank >= full:
            continue
        m = torch.zeros_like(p)
        if is_lora_a(k):
            m[:rank] = 1
        else:
            m[:, :rank] = 1
        masks[k] = m
    return masks


def middle_layer_keys(keys: Sequence[str], decoder: DecoderLayers, skip: int) -> list[str]:
    """The adapter keys of the middle decoder layers ``skip <= l <= L-1-skip`` (FedMLLM's
    layer-adaptive regulariser). Raises ValueError when that range is empty for depth L."""
    lo, hi = skip, decoder.count - 1 - skip
    if lo > hi:
        raise ValueError(f"train.adaptive_prox_skip={skip} leaves no middle layer of the "
                         f"backbone's {decoder.count} decoder layers (needs skip <= "
                         f"{(decoder.count - 1) // 2})")
    out = []
    for k in keys:
        i = decoder.index(k)
        if i is not None and lo <= i <= hi:
            out.append(k)
    return out


class ClientTrainer:
    """Trains one client's adapters for one round. Holds no per-client state itself: what must
    persist between rounds (optimizer, SCAFFOLD control variate) comes in and goes out in
    ``client_state``."""

    def __init__(self, adapters: LoraAdapters, cfg: TrainConfig, local_epochs: int,
                 seed: int, freeze_lora_a: bool = False) -> None:
        self.adapters = adapters
        self.cfg = cfg
        self.local_epochs = local_epochs
        self.seed = seed
        self.freeze_lora_a = freeze_lora_a  # FFA-LoRA: A keeps its shared initialisation
        self.backbone = adapters.backbone
        self.model = adapters.model
        # FedMLLM's layer-adaptive proximal term: which adapter tensors, and its weight
        self.layer_prox_keys: set[str] = set()
        self.layer_prox_mu = cfg.adaptive_prox_mu * cfg.adaptive_prox_weight
        if cfg.adaptive_prox:
            self.layer_prox_keys = set(middle_layer_keys(
                list(adapters.params), self.backbone.decoder_layers, cfg.adaptive_prox_skip))

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _batches(self, client: ClientData, rng: np.random.Generator) -> list[np.ndarray]:
        """Mixed batches over the client's samples (positions in ``client.train``), one epoch."""
        items = rng.permutation(len(client.train))
        b = self.cfg.batch_size
        return [items[s:s + b] for s in range(0, len(items), b)]

    def _loss(self, client: ClientData, batch: np.ndarray, rng: np.random.Generator):
        """The batch's loss: per-modality mean losses weighted by their share of the batch."""
        samples = [client.train[i] for i in batch]
        und = [s for s in samples if s.task == UNDERSTANDING]
        gen = [s for s in samples if s.task == GENERATION]
        drop = None
        if gen:  # prompt dropout trains the unconditional branch (classifier-free guidance)
            draw = rng.random(len(gen)) < self.cfg.prompt_dropout
            drop = [False] * len(und) + [bool(d) or s.text is None
                                         for d, s in zip(draw, gen, strict=True)]
        collated = self.backbone.collate(und + gen, drop)
        losses = self.backbone.loss(collated)
        total, parts = 0.0, {}
        for m, key in ((UNDERSTANDING, "und_loss"), (GENERATION, "gen_loss")):
            if m in losses:
                total = total + losses[m] * collated.counts[m] / len(batch)
                parts[key] = float(losses[m].detach())
        return total, parts

    def train(self, client: ClientData, global_state: dict[str, torch.Tensor], rnd: int,
              client_config: dict | None = None,
              client_state: dict | None = None) -> tuple[ClientUpdate, dict]:
        """One round of local training. Returns the update and the new client state."""
        client_config = client_config or {}
        client_state = dict(client_state or {})
        ad = self.adapters
        ad.load_state(global_state)
        groups = client.groups_with_data(ad)
        ad.set_trainable(groups)
        names = [k for k in ad.params if ad.group_of(k) in groups
                 and not (self.freeze_lora_a and is_lora_a(k))]
        for k in set(ad.keys()) - set(names):
            ad.params[k].requires_grad_(False)
        params = [ad.params[k] for k in names]
        # a client of rank r_k < r trains the first r_k LoRA components only (HetLoRA)
        masks = rank_masks({k: ad.params[k] for k in names}, client_config.get("lora_rank"))
        opt = self._optimizer(params)
        if self.cfg.persistent_optimizer and "optimizer" in client_state:
            opt.load_state_dict(client_state["optimizer"])
        mu = float(client_config.get("prox_mu", 0.0))
        dev = {k: ad.params[k].device for k in names}
        layer_keys = [k for k in names if k in self.layer_prox_keys]
        layer_mu = self.layer_prox_mu if layer_keys else 0.0
        anchor = ({k: global_state[k].to(dev[k]) for k in names}
                  if mu > 0 or layer_mu > 0 else None)
        c_server = client_config.get("server_control")
        c_local = client_state.get("control") if c_server is not None else None
        if c_server is not None and c_local is None:
            c_local = {k: torch.zeros_like(global_state[k]) for k in names}
        rng = np.random.default_rng([self.seed, rnd, client.client_id])
        # torch's randomness in training (LoRA dropout, flow-matching noise) is a function of
        # (seed, round, client) too, whatever ran before: runtimes and resumed runs agree
        torch_seed = int(np.random.SeedSequence([self.seed, rnd, client.client_id, 1])
                         .generate_state(1)[0])
        devices = [self.backbone.device] if self.backbone.device.type == "cuda" else []
        self.model.train()
        steps, sums, counts = 0, {}, {}
        budget = self.cfg.max_steps or math.inf
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(torch_seed)
            for _ in range(self.local_epochs):
                for batch in self._batches(client, rng):
                    if steps >= budget:
                        break
                    loss, parts = self._loss(client, batch, rng)
                    if mu > 0:  # FedProx proximal term on the trained adapters
                        loss = loss + 0.5 * mu * sum(((ad.params[k] - anchor[k]) ** 2).sum()
                                                     for k in names)
                    if layer_mu > 0:  # the layer-adaptive one, middle decoder layers only
                        loss = loss + 0.5 * layer_mu * sum(
                            ((ad.params[k] - anchor[k]) ** 2).sum() for k in layer_keys)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for k, m in masks.items():
                        if ad.params[k].grad is not None:
                            ad.params[k].grad.mul_(m)
                    if c_server is not None:  # SCAFFOLD: g <- g - c_i + c
                        for k in names:
                            if ad.params[k].grad is not None:
                                ad.params[k].grad.add_((c_server[k] - c_local[k]).to(dev[k]))
                    if self.cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                    opt.step()
                    steps += 1
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
        self.model.eval()
        trained = set(names)
        tensors = {k: v for k, v in ad.state(groups).items() if k in trained}
        extra = {}
        if c_server is not None and steps > 0:  # SCAFFOLD option II control update
            new_c, extra["control_delta"] = client_control_update(
                c_local, c_server, global_state, tensors, steps, self.cfg.lr)
            client_state["control"] = new_c
        if self.cfg.persistent_optimizer:
            client_state["optimizer"] = opt.state_dict()
        metrics = {k: sums[k] / counts[k] for k in sums}
        quality = self.quality(client)
        update = ClientUpdate(client.client_id, tensors, client.num_samples, quality, steps,
                              metrics, extra)
        return update, client_state

    @torch.no_grad()
    def quality(self, client: ClientData) -> dict[str, float]:
        """Held-out quality per modality on the client's own validation samples (0-1), as the
        backbone measures it."""
        return self.backbone.quality(client.val) if client.val else {}
