"""Classification metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fedumm.eval.classification import classification_metrics, parse_labels, summarise_tasks


def _ll(p_yes):
    p = np.asarray(p_yes, dtype=float)
    return np.log(np.stack([1 - p, p], axis=1))


def test_binary_task_by_hand():
    truth = ["yes", "no", "yes", "no"]
    answers = ["yes", "no", "maybe", "Yes."]
    m = classification_metrics(truth, answers, ["no", "yes"], _ll([0.9, 0.2, 0.4, 0.6]))
    # positives score 0.9, 0.4; negatives 0.2, 0.6: 3 of 4 pairs ordered
    assert m["auc"] == 75.0
    # FedMLLM's hard scores: yes 1, no 0, unparseable 2 -> pairs (1,0) (1,1)=0.5 (2,0) (2,1)
    assert m["auc_hard"] == 87.5
    assert m["accuracy"] == 50.0 and m["unparseable"] == 1 and m["n"] == 4
    # yes: P = R = 1/2 -> F1 1/2; no: P = 1, R = 1/2 -> F1 2/3
    assert m["macro_f1"] == pytest.approx(100 * (0.5 + 2 / 3) / 2, abs=0.01)


def test_multiclass_task_by_hand():
    truth = ["a", "b", "a", "b"]
    answers = ["a", "b", "b", "b"]
    ll = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]]))
    m = classification_metrics(truth, answers, ["a", "b", "c"], ll)
    # class c is absent from the truth: AUC over a and b with P renormalised over {a, b}:
    # P(b) = .22, .75, .44, .78 -> positives (.75, .78) above both negatives
    assert m["auc"] == 100.0
    assert m["auc_hard"] is None  # FedMLLM's hard-label AUC is for binary tasks
    # a: P 1, R 1/2 -> 2/3; b: P 2/3, R 1 -> 4/5; c: never true nor predicted -> 0
    assert m["macro_f1"] == pytest.approx(100 * (2 / 3 + 0.8 + 0) / 3, abs=0.01)


def test_undefined_auc_is_none_and_bad_input_is_refused():
    m = classification_metrics(["yes", "yes"], ["yes", "no"], ["no", "yes"], _ll([0.9, 0.1]))
    assert m["auc"] is None and m["auc_hard"] is None and m["accuracy"] == 50.0
    with pytest.raises(ValueError, match="not among the classes"):
        classification_metrics(["maybe"], ["yes"], ["no", "yes"])
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(["yes", "no"], ["yes", "no"], ["no", "yes"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        classification_metrics(["yes"], ["yes"], ["yes"])


def test_parse_uses_the_official_normalisation():
    assert parse_labels(["Yes.", "two", "the circle", "blue"], ["yes", "2", "circle"]).tolist() \
        == [0, 1, 2, -1]


def test_summary_means_binary_auc_and_multiclass_f1():
    tasks = {"t1": {"classes": ["no", "yes"], "auc": 80.0, "auc_hard": 70.0, "macro_f1": 60.0},
             "t2": {"classes": ["no", "yes"], "auc": 60.0, "auc_hard": None, "macro_f1": 50.0},
             "t3": {"classes": ["a", "b", "c"], "auc": 90.0, "auc_hard": None, "macro_f1": 40.0}}
    assert summarise_tasks(tasks) == {"auc": 70.0, "auc_hard": 70.0, "macro_f1": 40.0}
