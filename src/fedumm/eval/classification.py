"""Classification metrics for question families with a fixed answer set (FedMLLM's tasks).

FedMLLM (arXiv 2411.14717) scores a binary task (hateful memes) by AUC and a multi-class task
(CrisisMMD) by macro-F1, both on the answers the model *generates*: its "AUC" is
``roc_auc_score`` of the parsed hard label, with an unparseable answer as a third value. Here the
AUC comes from the model's answer probabilities (the likelihood of every class answer, normalised
over the classes), and the hard-label variant is kept beside it (``auc_hard``) so numbers can be
compared with the paper's. Answers are parsed with VQA's official normalisation; an answer that
is not one of the classes counts as wrong for accuracy and macro-F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedumm.eval.vqa_metric import normalize_answer

UNPARSEABLE = -1


def parse_labels(answers: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """The class index of every generated answer, or ``UNPARSEABLE``."""
    index = {normalize_answer(c): i for i, c in enumerate(classes)}
    return np.array([index.get(normalize_answer(a), UNPARSEABLE) for a in answers], dtype=np.int64)


def softmax_rows(log_likelihoods: np.ndarray) -> np.ndarray:
    z = log_likelihoods - log_likelihoods.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def classification_metrics(truth: Sequence[str], answers: Sequence[str], classes: Sequence[str],
                           log_likelihoods: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, AUC and FedMLLM's hard-label AUC of one task.

    ``truth`` and ``answers`` are the reference and the generated answers; ``classes`` the task's
    fixed answer set (two for a binary task, the second one the positive class: ``("no",
    "yes")``); ``log_likelihoods`` (N, C), where the backbone can score answers, the
    log-likelihood of each class answer. A metric that is undefined on these samples (an AUC
    when the truth holds one class only) is None.
    """
    # here, not at the top: scikit-learn (and the scipy and pandas it brings) costs ~2 s and
    # ~90 MiB in every run that imports the evaluation, and only this function needs it
    from sklearn.metrics import f1_score, roc_auc_score

    classes = list(classes)
    if len(classes) < 2:
        raise ValueError(f"a classification task needs at least 2 classes, got {classes}")
    y = parse_labels(truth, classes)
    if (y == UNPARSEABLE).any():
        bad = sorted({t for t, v in zip(truth, y, strict=True) if v == UNPARSEABLE})[:3]
        raise ValueError(f"reference answers {bad} are not among the classes {classes}")
    pred = parse_labels(answers, classes)
    out: dict[str, Any] = {
        "classes": classes, "n": int(len(y)),
        "accuracy": round(100.0 * float((pred == y).mean()), 2) if len(y) else None,
        "unparseable": int((pred == UNPARSEABLE).sum()),
        # every class counts, also one the truth lacks; an unparseable answer is just wrong
        "macro_f1": round(100.0 * float(f1_score(y, pred, labels=list(range(len(classes))),
                                                  average="macro", zero_division=0)), 2),
        "auc": None, "auc_hard": None,
    }
    present = np.unique(y)
    if len(present) < 2:
        return out
    if len(classes) == 2:
        # FedMLLM: no (0) < yes (1) < unparseable (2) as the score of the positive class
        hard = np.where(pred == UNPARSEABLE, 2, pred)
        out["auc_hard"] = round(100.0 * float(roc_auc_score(y, hard)), 2)
    if log_likelihoods is not None:
        ll = np.asarray(log_likelihoods, dtype=np.float64)
        if ll.shape != (len(y), len(classes)):
            raise ValueError(f"log_likelihoods of shape {ll.shape}, expected "
                             f"{(len(y), len(classes))}")
        if len(classes) == 2:
            out["auc"] = round(100.0 * float(roc_auc_score(y, softmax_rows(ll)[:, 1])), 2)
        else:  # one-vs-rest over the classes the truth holds, probabilities renormalised
            probs = softmax_rows(ll[:, present])
            yy = np.searchsorted(present, y)
            score = probs[:, 1] if len(present) == 2 else probs
            out["auc"] = round(100.0 * float(roc_auc_score(
                yy, score, multi_class="ovr", average="macro")), 2)
    return out


def summarise_tasks(tasks: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The headline numbers over tasks, as FedMLLM reports them: AUC and hard AUC of the
    binary tasks and macro-F1 of the multi-class tasks (each a mean over such tasks)."""

    def mean(key: str, binary: bool) -> float | None:
        vals = [t[key] for t in tasks.values()
                if (len(t["classes"]) == 2) == binary and t.get(key) is not None]
        return round(float(np.mean(vals)), 2) if vals else None

    return {"auc": mean("auc", True), "auc_hard": mean("auc_hard", True),
            "macro_f1": mean("macro_f1", False)}
