"""TensorBoard scalars of a run (``<run>/tb``): values, steps, and consistency on resume."""

from __future__ import annotations

import warnings

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedumm.runtime import tracking
from fedumm.runtime.run_dir import RunDirectory

MIB = 2 ** 20


def read_tb(tb_dir, wall=False):
    """``{tag: [(step, value)]}`` of every scalar in ``tb_dir``, orphaned points included
    (no purge: what any reader of the files could show)."""
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0},
                           purge_orphaned_data=False)
    acc.Reload()
    return {tag: [(e.step, e.wall_time if wall else e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def eval_record(rnd, vqa, **extra):
    return {"type": "eval", "round": rnd, "vqa_accuracy": vqa,
            "vqa_by_answer_type": {"yes/no": vqa + 1, "number": vqa - 1}, **extra}


def round_record(rnd, upload, und=(1.0, 3.0), **extra):
    return {"type": "round", "round": rnd, "clients": [0, 1, 2],
            "num_samples": {0: {"understanding": 4}, 1: {"understanding": 4}},
            "train_loss": {0: {"und_loss": und[0], "gen_loss": 2.0}, 1: {"und_loss": und[1]}},
            "quality": {0: {"understanding": 0.5, "generation": 0.2},
                        1: {"understanding": 0.7}},
            "steps": 4, "upload_bytes": upload, "peak_rss_bytes": 3 * MIB, **extra}


def run_records(rounds, seed=0):
    """The records of an uninterrupted run of ``rounds`` rounds, in logging order."""
    out = [eval_record(-1, 10.0)]
    for r in range(rounds):
        out.append(round_record(r, 1000 + 100 * r + seed, und=(1.0 + r, 3.0 + seed)))
        out.append(eval_record(r, 20.0 + r + seed))
    return out


def test_records_become_scalars_at_round_plus_one(tmp_path):
    d = RunDirectory(tmp_path)
    d.log(eval_record(-1, 10.0))
    d.log(round_record(0, 1000, rejected=[{"client": 2, "reason": "bad"}],
                       aggregation_error={"und": 0.125, "gen": 0.25}))
    d.log({"type": "rejected", "round": 0, "client": 2, "reason": "bad"})
    d.log(eval_record(0, 20.0, geneval_overall=0.5, generation_quality=0.375,
                      geneval_by_task={"single_object": 1.0, "counting": 0.25},
                      per_client=[{"vqa_accuracy": 20.0}]))
    d.log(round_record(1, 500, und=(2.0, 4.0)))
    got = read_tb(tmp_path / "tb")
    assert got["eval/vqa_accuracy"] == [(0, 10.0), (1, 20.0)]
    assert got["eval/vqa_by_answer_type/yes/no"] == [(0, 11.0), (1, 21.0)]
    assert got["eval/vqa_by_answer_type/number"] == [(0, 9.0), (1, 19.0)]
    assert got["eval/geneval_overall"] == [(1, 0.5)]
    assert got["eval/generation_quality"] == [(1, 0.375)]
    assert got["eval/geneval_by_task/single_object"] == [(1, 1.0)]
    assert got["eval/geneval_by_task/counting"] == [(1, 0.25)]
    assert got["train/und_loss"] == [(1, 2.0), (2, 3.0)]  # mean over clients
    assert got["train/gen_loss"] == [(1, 2.0), (2, 2.0)]  # the one client reporting it
    assert got["quality/understanding"] == [(1, pytest.approx(0.6)), (2, pytest.approx(0.6))]
    assert got["quality/generation"] == [(1, pytest.approx(0.2)), (2, pytest.approx(0.2))]
    assert got["comm/upload_bytes"] == [(1, 1000.0), (2, 500.0)]
    assert got["comm/upload_bytes_cumulative"] == [(1, 1000.0), (2, 1500.0)]
    assert got["clients/selected"] == [(1, 3.0), (2, 3.0)]
    assert got["clients/rejected"] == [(1, 1.0), (2, 0.0)]
    assert got["memory/peak_rss_mib"] == [(1, 3.0), (2, 3.0)]
    assert got["aggregation/error/und"] == [(1, 0.125)]
    assert got["aggregation/error/gen"] == [(1, 0.25)]
    assert not [t for t in got if "per_client" in t or "rejected/" in t]


def test_a_resumed_run_has_one_point_per_step_equal_to_the_uninterrupted_run(tmp_path):
    full = RunDirectory(tmp_path / "full")
    full.path.mkdir()
    for rec in run_records(4):
        full.log(rec)

    cut = RunDirectory(tmp_path / "cut")
    cut.path.mkdir()
    records = run_records(4)
    for rec in records[:5]:  # base eval, rounds 0 and 1 with their evaluations
        cut.log(rec)
    # round 2 ran after the last checkpoint (round 1) with other numbers, then a kill
    for rec in run_records(3, seed=7)[5:]:
        cut.log(rec)
    before = read_tb(cut.path / "tb", wall=True)
    assert before["eval/vqa_accuracy"][-1][0] == 3  # the orphaned point is there

    cut = RunDirectory(tmp_path / "cut")  # a new process: the old writer is left open
    cut.truncate_metrics(1)
    assert read_tb(cut.path / "tb")["eval/vqa_accuracy"] == [(0, 10.0), (1, 20.0), (2, 21.0)]
    for rec in records[5:]:
        cut.log(rec)
    got, want = read_tb(cut.path / "tb"), read_tb(full.path / "tb")
    assert got == want
    for points in got.values():  # one value per step
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps))
    assert got["comm/upload_bytes_cumulative"][-1] == (4, 1000.0 + 1100 + 1200 + 1300)
    assert len(tracking.event_files(cut.path / "tb")) == 1
    # the kept points keep the time they were first written at
    after = read_tb(cut.path / "tb", wall=True)
    for tag in ("eval/vqa_accuracy", "train/und_loss", "comm/upload_bytes"):
        kept = [p for p in before[tag] if p[0] <= 2]
        assert after[tag][:len(kept)] == kept


def test_a_run_resumed_before_its_first_round_logs_the_base_once(tmp_path):
    d = RunDirectory(tmp_path)
    d.log(eval_record(-1, 10.0))
    d.log(round_record(0, 1000))  # no checkpoint yet: round 0 is redone
    d = RunDirectory(tmp_path)
    d.truncate_metrics(-1)
    d.log(eval_record(-1, 10.0))  # the round loop evaluates the frozen base again
    d.log(round_record(0, 900))
    d.log(round_record(0, 900))  # a round written twice counts once
    got = read_tb(tmp_path / "tb")
    assert got["eval/vqa_accuracy"] == [(0, 10.0)]
    assert got["comm/upload_bytes"] == [(1, 900.0)]
    assert got["comm/upload_bytes_cumulative"] == [(1, 900.0)]


def test_a_new_writer_continues_the_cumulative_bytes(tmp_path):
    d = RunDirectory(tmp_path)
    d.log(round_record(0, 1000))
    d.close()
    d.log(round_record(1, 500))  # reopened: replays metrics.jsonl first
    d = RunDirectory(tmp_path)
    d.log(round_record(2, 250))
    got = read_tb(tmp_path / "tb")
    assert got["comm/upload_bytes_cumulative"] == [(1, 1000.0), (2, 1500.0), (3, 1750.0)]
    assert len(tracking.event_files(tmp_path / "tb")) == 1


def test_odd_records_are_skipped_without_error(tmp_path):
    d = RunDirectory(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d.log({"type": "mystery", "round": 0, "x": 1.0})
        d.log({"no": "type"})
        d.log({"type": "eval", "round": "first", "vqa_accuracy": 1.0})
        d.log({"type": "eval", "round": 0, "vqa_accuracy": "n/a", "geneval_overall": None,
               "vqa_by_answer_type": ["not", "a", "dict"], "geneval_by_task": {"a": "b"}})
        d.log({"type": "round", "round": 0, "clients": None, "train_loss": "x",
               "quality": {0: None, 1: {"understanding": "good"}}, "upload_bytes": True,
               "peak_rss_bytes": None, "rejected": 3, "aggregation_error": {"und": "?"}})
        d.log(eval_record(1, 5.0))
    assert len(d.metrics()) == 6
    got = read_tb(tmp_path / "tb")
    assert got["eval/vqa_accuracy"] == [(2, 5.0)]
    assert got["comm/upload_bytes_cumulative"] == [(1, 0.0)]


def test_a_tracking_failure_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    d = RunDirectory(tmp_path)
    with pytest.warns(RuntimeWarning, match="disk full") as caught:
        d.log(eval_record(-1, 10.0))
        d.log(eval_record(0, 12.0))
        d.truncate_metrics(0)
        d.log(round_record(1, 10))
    assert len([w for w in caught if "disk full" in str(w.message)]) == 1
    assert [m["round"] for m in d.metrics()] == [-1, 0, 1]


def _tiny(tmp_path, overrides, name):
    from fedumm.config import config_from_dict
    from fedumm.runtime.dispatch import run_experiment

    out = tmp_path / name
    run_experiment(config_from_dict({"name": "t"}, overrides), out, progress=False)
    return out


def test_a_tiny_run_writes_tensorboard_scalars(tmp_path, tiny_overrides):
    run = _tiny(tmp_path, tiny_overrides, "run")
    got = read_tb(run / "tb")
    assert [s for s, _ in got["eval/vqa_accuracy"]] == [0, 1, 2]  # base + 2 rounds
    rounds = [m for m in RunDirectory(run).metrics() if m["type"] == "round"]
    assert got["comm/upload_bytes"] == [(m["round"] + 1, float(m["upload_bytes"]))
                                        for m in rounds]
    assert all(v > 0 for _, v in got["comm/upload_bytes"])
    evals = [m for m in RunDirectory(run).metrics() if m["type"] == "eval"]
    assert got["eval/vqa_accuracy"] == [(m["round"] + 1, pytest.approx(m["vqa_accuracy"]))
                                        for m in evals]
    assert {"train/und_loss", "clients/selected", "memory/peak_rss_mib"} <= set(got)


def test_a_tiny_run_resumed_after_a_crash_has_the_same_curves(tmp_path, tiny_overrides,
                                                            monkeypatch):
    from fedumm.fl.client import ClientTrainer
    from fedumm.runtime.dispatch import run_experiment

    overrides = [*tiny_overrides, "rounds=3"]
    full = _tiny(tmp_path, overrides, "full")
    real_train, calls = ClientTrainer.train, {"n": 0}

    def crashing_train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # round 1, second client
            raise KeyboardInterrupt("simulated kill")
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(ClientTrainer, "train", crashing_train)
    with pytest.raises(KeyboardInterrupt):
        _tiny(tmp_path, overrides, "cut")
    monkeypatch.setattr(ClientTrainer, "train", real_train)
    run_experiment(None, tmp_path / "cut", resume=True, progress=False)
    got, want = read_tb(tmp_path / "cut" / "tb"), read_tb(full / "tb")
    assert set(got) == set(want)
    for tag in want:
        if tag.startswith("memory/"):  # the process's peak memory: not deterministic
            assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]]
        else:
            assert got[tag] == want[tag], tag
