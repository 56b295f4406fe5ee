"""The client trainer: local LoRA training on whatever modalities a client holds.

Used unchanged by every runtime. A round on a client: load the global adapters into the shared
frozen backbone, train ``local_epochs`` (or ``train.max_steps``) on mixed understanding and
generation batches, measure quality on the client's own held-out samples, and return a
:class:`~fedumm.fl.updates.ClientUpdate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedumm.config import TrainConfig
from fedumm.data.scenarios import IMAGE_MISSING, TEXT_MISSING
from fedumm.fl.strategies.scaffold import client_control_update
from fedumm.fl.updates import GENERATION, GROUP_MODALITIES, UNDERSTANDING, ClientUpdate
from fedumm.models.batching import PreparedData
from fedumm.models.lora import LoraAdapters, group_of


@dataclass
class ClientData:
    """A client's share of the training data: indices into ``prep.data.vqa`` / ``.gen``."""

    client_id: int
    prep: PreparedData
    vqa_idx: np.ndarray
    gen_idx: np.ndarray
    val_vqa_idx: np.ndarray
    val_gen_idx: np.ndarray
    image_present: dict[int, bool] = field(default_factory=dict)  # vqa index -> has image
    prompt_missing: set[int] = field(default_factory=set)  # gen indices trained unconditionally

    @property
    def num_samples(self) -> dict[str, int]:
        return {UNDERSTANDING: len(self.vqa_idx), GENERATION: len(self.gen_idx)}

    def groups_with_data(self, groups: list[str]) -> list[str]:
        n = self.num_samples
        return [g for g in groups if any(n[m] > 0 for m in GROUP_MODALITIES[g])]


def make_client_data(client_id: int, prep: PreparedData, sample_idx: np.ndarray,
                     missing: np.ndarray, val_fraction: float, seed: int) -> ClientData:
    """Split a client's samples (global numbering) into local train / held-out parts and apply
    the missing-modality mask: a VQA sample without text and a generation sample without image
    have no target and are dropped; a VQA sample without image sees a placeholder; a prompt
    without text trains the unconditional (guidance) branch."""
    nv = len(prep.data.vqa)
    idx = np.asarray(sample_idx, dtype=np.int64)
    vqa = [int(i) for i in idx[idx < nv] if missing[i] != TEXT_MISSING]
    gen = [int(i) - nv for i in idx[idx >= nv] if missing[i] != IMAGE_MISSING]
    rng = np.random.default_rng([seed, 7, client_id])

    def split(items: list[int]) -> tuple[np.ndarray, np.ndarray]:
        items = list(rng.permutation(items)) if items else []
        n_val = int(round(len(items) * val_fraction)) if len(items) >= 2 else 0
        if val_fraction > 0 and len(items) >= 2:
            n_val = max(1, n_val)
        return np.sort(np.array(items[n_val:], dtype=np.int64)), np.array(items[:n_val],
                                                                           dtype=np.int64)

    tv, vv = split(vqa)
    tg, vg = split(gen)
    present = {int(i): missing[i] != IMAGE_MISSING for i in tv}
    no_prompt = {int(i) for i in tg if missing[int(i) + nv] == TEXT_MISSING}
    return ClientData(client_id, prep, tv, tg, vv, vg, present, no_prompt)


class ClientTrainer:
    """Trains one client's adapters for one round. Holds no per-client state itself: what must
    persist between rounds (optimizer, SCAFFOLD control variate) comes in and goes out in
    ``client_state``."""

    def __init__(self, adapters: LoraAdapters, cfg: TrainConfig, local_epochs: int,
                 seed: int) -> None:
        self.adapters = adapters
        self.cfg = cfg
        self.local_epochs = local_epochs
        self.seed = seed
        self.encoder = adapters.backbone.encoder
        self.model = adapters.model

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _batches(self, client: ClientData, rng: np.random.Generator) -> list[np.ndarray]:
        """Mixed batches over the client's samples, one epoch (signed: gen indices are -1-i)."""
        items = np.concatenate([client.vqa_idx, -1 - client.gen_idx])
        items = rng.permutation(items)
        b = self.cfg.batch_size
        return [items[s:s + b] for s in range(0, len(items), b)]

    def _loss(self, client: ClientData, batch: np.ndarray, rng: np.random.Generator):
        vqa = [int(i) for i in batch if i >= 0]
        gen = [int(-1 - i) for i in batch if i < 0]
        total, parts = 0.0, {}
        enc, prep = self.encoder, client.prep
        if vqa:
            ub = enc.understanding_batch(prep, vqa, [client.image_present.get(i, True)
                                                     for i in vqa])
            lu = self.model.understanding_loss(ub["images"], ub["q_ids"], ub["q_mask"],
                                               ub["a_ids"], ub["a_mask"], ub["image_present"])
            total = total + lu * len(vqa) / len(batch)
            parts["und_loss"] = float(lu.detach())
        if gen:
            drop = (rng.random(len(gen)) < self.cfg.prompt_dropout) | np.array(
                [i in client.prompt_missing for i in gen])
            gb = enc.generation_batch(prep, gen, drop)
            lg = self.model.generation_loss(gb["p_ids"], gb["p_mask"], gb["codes"])
            total = total + lg * len(gen) / len(batch)
            parts["gen_loss"] = float(lg.detach())
        return total, parts

    def train(self, client: ClientData, global_state: dict[str, torch.Tensor], rnd: int,
              client_config: dict | None = None,
              client_state: dict | None = None) -> tuple[ClientUpdate, dict]:
        """One round of local training. Returns the update and the new client state."""
        client_config = client_config or {}
        client_state = dict(client_state or {})
        ad = self.adapters
        ad.load_state(global_state)
        groups = client.groups_with_data(ad.groups)
        ad.set_trainable(groups)
        names = [k for k in ad.params if group_of(k) in groups]
        params = [ad.params[k] for k in names]
        opt = self._optimizer(params)
        if self.cfg.persistent_optimizer and "optimizer" in client_state:
            opt.load_state_dict(client_state["optimizer"])
        mu = float(client_config.get("prox_mu", 0.0))
        anchor = {k: global_state[k] for k in names} if mu > 0 else None
        c_server = client_config.get("server_control")
        c_local = client_state.get("control") if c_server is not None else None
        if c_server is not None and c_local is None:
            c_local = {k: torch.zeros_like(global_state[k]) for k in names}
        rng = np.random.default_rng([self.seed, rnd, client.client_id])
        self.model.train()
        steps, sums, counts = 0, {}, {}
        budget = self.cfg.max_steps or math.inf
        for _ in range(self.local_epochs):
            for batch in self._batches(client, rng):
                if steps >= budget:
                    break
                loss, parts = self._loss(client, batch, rng)
                if anchor is not None:  # FedProx proximal term on the trained adapters
                    loss = loss + 0.5 * mu * sum(((ad.params[k] - anchor[k]) ** 2).sum()
                                                 for k in names)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if c_server is not None:  # SCAFFOLD: g <- g - c_i + c
                    for k in names:
                        if ad.params[k].grad is not None:
                            ad.params[k].grad.add_(c_server[k] - c_local[k])
                if self.cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                opt.step()
                steps += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        self.model.eval()
        tensors = ad.state(groups)
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
        """Held-out quality per modality on the client's own validation samples (0-1):
        exact-match answer accuracy; teacher-forced image-code accuracy."""
        from fedumm.eval.vqa_metric import normalize_answer

        out: dict[str, float] = {}
        prep, enc = client.prep, self.encoder
        if len(client.val_vqa_idx):
            recs = [prep.data.vqa[i] for i in client.val_vqa_idx]
            images = np.stack([prep.data.image(r.image_id) for r in recs])
            answers = self.adapters.backbone.answer(images, [r.question for r in recs])
            out[UNDERSTANDING] = float(np.mean([
                normalize_answer(a) == normalize_answer(r.multiple_choice_answer)
                for a, r in zip(answers, recs, strict=True)]))
        if len(client.val_gen_idx):
            gb = enc.generation_batch(prep, list(client.val_gen_idx))
            out[GENERATION] = float(self.model.generation_accuracy(
                gb["p_ids"], gb["p_mask"], gb["codes"]))
        return out
