"""SCAFFOLD: Stochastic Controlled Averaging for Federated Learning.

Karimireddy et al., ICML 2020, arXiv:1910.06378.

Control variates estimate each client's drift from the global update direction and cancel it
during local training. The server keeps ``c`` (one tensor per adapter tensor, zeros at the
start); each client keeps its own ``c_i`` (zeros at the start, persisted across rounds in its
client state: on disk in the local runtime's client-state store, so the server holds nothing
per client and a population of 100,000 costs what 10 do).

Client side (:class:`ScaffoldCorrection`, run by the client trainer), per trained tensor:

1. receive ``x`` (global adapters) and ``c = client_config(rnd)["server_control"]``;
2. local steps from ``y = x``: correct each gradient ``g`` to ``g - c_i + c`` before the
   optimizer step;
3. after K local steps: ``c_i+ = mean_k g_k``, the mean of the K uncorrected local gradients;
4. send ``y`` as ``update.tensors`` and ``c_i+ - c_i`` as ``update.extra["control_delta"]``
   (same keys as the tensors trained), then store ``c_i = c_i+``.

Step 3 is the paper's option II, ``c_i+ = c_i - c + (x - y) / (K * eta)``, written without the
optimizer: with plain SGD of learning rate ``eta`` (no clipping, no weight decay) ``x - y =
eta * sum_k (g_k - c_i + c)``, so both give ``mean_k g_k``. Under AdamW or gradient clipping
``(x - y) / (K * eta)`` is no gradient at all (AdamW's steps have magnitude ~eta per coordinate
whatever the gradient), and option II then drives the corrections, and the model, off scale
(the quickstart's SCAFFOLD with AdamW clients ended at 3 VQA); the mean local gradient is the
quantity option II estimates, for any client optimizer.

Server side, per adapter group, over the clients S that trained it (weights as FedAvg's):
``x = prev + server_lr * sum_k w_k (y_k - prev)`` and
``c = c + |S| / N * mean_{k in S}(delta c_k)`` (a uniform mean; N = ``num_clients``).
"""

from __future__ import annotations

import torch

from fedumm.config import StrategyConfig
from fedumm.fl.client_hooks import ClientHook, LocalRound
from fedumm.fl.pipeline import CONTROL_DELTA, SERVER_CONTROL
from fedumm.fl.strategies.base import State, Strategy
from fedumm.fl.updates import ClientUpdate
from fedumm.models.protocol import AdapterGroup


def mean_gradient_control(c_local: State, grad_sum: State, num_steps: int
                          ) -> tuple[State, State]:
    """The client's new control variate ``c_i+ = grad_sum / K`` (the mean of its K local
    gradients) and the delta it sends, ``c_i+ - c_i``, for each key of ``grad_sum``."""
    if num_steps < 1:
        raise ValueError(f"need num_steps >= 1, got {num_steps}")
    new = {k: g / num_steps for k, g in grad_sum.items()}
    return new, {k: new[k] - c_local[k] for k in new}


class ScaffoldCorrection(ClientHook):
    """The client side: ``g <- g - c_i + c`` before every step, then the control update."""

    def __init__(self, c_server: State) -> None:
        self.c_server = c_server
        self.c_local: State = {}
        self.grad_sum: State = {}  # the uncorrected local gradients, on the params' devices

    def begin(self, rnd: LocalRound) -> None:
        c_local = rnd.client_state.get("control")
        self.c_local = c_local if c_local is not None else \
            {k: torch.zeros_like(rnd.start[k]) for k in rnd.params}
        self.grad_sum = {k: torch.zeros_like(p, dtype=self.c_local[k].dtype)
                         for k, p in rnd.params.items()}

    def correct(self, rnd: LocalRound) -> None:
        for k, p in rnd.params.items():
            if p.grad is not None:
                self.grad_sum[k] += p.grad.detach()
                p.grad.add_((self.c_server[k] - self.c_local[k]).to(p.device))

    def end(self, rnd: LocalRound, trained: State) -> None:
        if rnd.steps > 0:
            grads = {k: self.grad_sum[k].detach().cpu() for k in trained}
            rnd.client_state["control"], rnd.extra[CONTROL_DELTA] = mean_gradient_control(
                self.c_local, grads, rnd.steps)


class Scaffold(Strategy):
    """FedAvg with a server learning rate and server / client control variates."""

    name = "scaffold"

    def __init__(self, cfg: StrategyConfig, num_clients: int, seed: int,
                 groups: tuple[AdapterGroup, ...] = ()) -> None:
        super().__init__(cfg, num_clients, seed, groups)
        self.control: dict[str, torch.Tensor] | None = None

    def init_state(self, global_state: State) -> None:
        """Create zero control variates for the keys of ``global_state`` (existing ones kept).

        The runtime calls this once before round 0 with the initial adapters; ``aggregate``
        also calls it, so keys are never missing. It keeps restored state after a resume.
        """
        if self.control is None:
            self.control = {}
        for key, t in global_state.items():
            if key not in self.control:
                dtype = torch.promote_types(t.dtype, torch.float32)
                self.control[key] = torch.zeros(t.shape, dtype=dtype)

    def client_config(self, rnd: int) -> dict:
        if self.control is None:
            raise RuntimeError("Scaffold.init_state(global_state) must be called before the "
                               "first round")
        # Copies: a client in the same process must not be able to change the server's c.
        return {SERVER_CONTROL: {k: v.clone() for k, v in self.control.items()}}

    @classmethod
    def client_hooks(cls, client_config: dict) -> list[ClientHook]:
        return [ScaffoldCorrection(client_config[SERVER_CONTROL])]

    def aggregate(self, rnd: int, global_state: State, updates: list[ClientUpdate]) -> State:
        self.init_state(global_state)
        return super().aggregate(rnd, global_state, updates)

    def server_update(self, group: str, prev: State, avg: State,
                      updates: list[ClientUpdate]) -> State:
        deltas = []
        for u in updates:
            delta = u.extra.get(CONTROL_DELTA, {})
            missing = [k for k in prev if k not in delta]
            if missing:
                raise ValueError(f"client {u.client_id} trained group {group!r} but sent no "
                                 f"control_delta for {missing}")
            deltas.append(delta)
        assert self.control is not None  # set by aggregate
        new = {}
        for key, p in prev.items():
            # float64 so that server_lr = 1 gives back the mean exactly.
            x = p.double()
            new[key] = (x + self.server_lr * (avg[key].double() - x)).to(p.dtype)
            c = self.control[key]
            total = torch.zeros_like(c)
            for d in deltas:  # fixed client order: deterministic sum
                total += d[key].to(c.dtype)
            # |S| / N * (total / |S|) = total / N
            self.control[key] = c + total / self.num_clients
        return new

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["control"] = (None if self.control is None
                        else {k: v.clone() for k, v in self.control.items()})
        return d

    def load_state_dict(self, d: dict) -> None:
        super().load_state_dict(d)
        control = d.get("control")
        self.control = None if control is None else {k: v.clone() for k, v in control.items()}
