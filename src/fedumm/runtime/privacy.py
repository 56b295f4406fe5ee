"""What a run's differential privacy has spent: the round records' ``privacy`` entry and
summary.json's (``privacy.epsilon``, ``privacy.delta``; docs/trust.md).

Sample-level DP-SGD (:mod:`fedumm.fl.dp_sgd`) is accounted on each client, which reports the
epsilon it has spent so far in every reply (``dp_epsilon`` at its ``dp_delta``); the run's
guarantee is the largest over clients, and a client's epsilon only grows, so the largest ever
reported is it. A late reply counts too: the server saw it. Client-level DP
(:mod:`fedumm.fl.client_dp`) is accounted on the server, per aggregated round. With both on,
``epsilon`` / ``delta`` are the sample-level ones (the unit most users ask about) and each
level's own figures are kept beside them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedumm.fl.dp_sgd import DP_DELTA, DP_EPSILON
from fedumm.fl.pipeline import Reply

SAMPLE, CLIENT = "sample", "client"


def privacy_spent(acc: dict[str, Any], replies: Iterable[Reply], absorbed: dict[str, Any]
                  ) -> dict[str, Any]:
    """Fold this round's privacy spending into the run's counters ``acc`` (checkpointed with
    them); the run's guarantee so far ({} when no DP runs)."""
    spent = acc.setdefault("privacy", {})
    reported = [(float(r.meta.metrics[DP_EPSILON]), float(r.meta.metrics.get(DP_DELTA, 0.0)))
                for r in replies if DP_EPSILON in (r.meta.metrics or {})]
    if reported:
        prev = spent.get(SAMPLE, {"epsilon": 0.0, "delta": 0.0})
        spent[SAMPLE] = {"epsilon": max(prev["epsilon"], *(e for e, _ in reported)),
                         "delta": max(prev["delta"], *(d for _, d in reported))}
    dp = absorbed.get("client_dp") or {}
    if dp.get("epsilon") is not None:
        spent[CLIENT] = {"epsilon": float(dp["epsilon"]), "delta": float(dp["delta"])}
    return guarantee(spent)


def guarantee(spent: dict[str, Any]) -> dict[str, Any]:
    """summary.json's ``privacy``: epsilon and delta of the run (sample-level where it ran,
    else client-level), each level's own, and its unit; {} without DP."""
    if not spent:
        return {}
    main = SAMPLE if SAMPLE in spent else CLIENT
    return {"epsilon": spent[main]["epsilon"], "delta": spent[main]["delta"], "unit": main,
            **{level: spent[level] for level in (SAMPLE, CLIENT) if level in spent}}
