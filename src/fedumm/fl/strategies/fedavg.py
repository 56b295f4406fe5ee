"""FedAvg: Communication-Efficient Learning of Deep Networks from Decentralized Data.

McMahan et al., AISTATS 2017, arXiv:1602.05629.

The new global model is the sample-weighted mean of the clients' models. Here it is done per
adapter group with the samples of the modalities that train that group (see ``Strategy``).
"""

from __future__ import annotations

from fedumm.fl.strategies.base import Strategy


class FedAvg(Strategy):
    """Per-group sample-weighted averaging; exactly the base behaviour."""

    name = "fedavg"
