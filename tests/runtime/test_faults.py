"""Client faults (fedumm.runtime.faults): dropouts, stragglers past a deadline, and rounds left
with fewer than strategy.min_clients updates."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from fedumm.config import ConfigError, config_from_dict
from fedumm.fl.pipeline import Reply, ReplyMeta
from fedumm.fl.sampling import draw
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.faults import arrivals, drops_out, outcome, stragglers
from fedumm.runtime.local import LocalRuntime
from fedumm.runtime.run_dir import RunFailedError
from makers import killed_at_training_call, round_records


def _survivors(seed: int, rnd: int, clients: int, p: float) -> list[int]:
    return [k for k in range(clients) if not drops_out(seed, rnd, k, p)]


def _seed_where(cond, tries: int = 200) -> int:
    """The first seed whose dropout draws satisfy ``cond(seed)`` (the tests need a shape of
    faults, not a particular seed)."""
    return next(s for s in range(tries) if cond(s))


# ------------------------------------------------------------------ the draws

def test_dropout_draws_depend_only_on_seed_round_and_client_and_have_rate_p():
    p = 0.3
    draws = [drops_out(7, r, k, p) for r in range(100) for k in range(100)]
    assert draws == [drops_out(7, r, k, p) for r in range(100) for k in range(100)]
    rate = sum(draws) / len(draws)
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / len(draws))  # 4 sigma: 0.018
    assert draws != [drops_out(8, r, k, p) for r in range(100) for k in range(100)]
    assert not any(drops_out(7, r, k, 0.0) for r in range(20) for k in range(20))
    # a client's fate in a round is its own: not rounds shifted, not its neighbour's
    assert [drops_out(7, 1, k, p) for k in range(100)] != [drops_out(7, 2, k, p)
                                                           for k in range(100)]


def test_stragglers_are_a_fixed_seeded_set_of_the_fraction_asked_for():
    assert stragglers(0, 10, 0.0) == frozenset()
    s = stragglers(0, 10, 0.25)
    assert len(s) == 3 and s == stragglers(0, 10, 0.25) and s <= set(range(10))
    assert len(stragglers(0, 3, 0.01)) == 1 and stragglers(0, 4, 1.0) == {0, 1, 2, 3}


def test_arrivals_sort_replies_into_on_time_late_and_dropped():
    def reply(k, t, error=None):
        return Reply(k, b"", ReplyMeta(train_s=t, error=error))

    came = arrivals([0, 1, 2, 3], [reply(3, 0.5), reply(1, 150.0), reply(0, 200.0, "boom")],
                    deadline_s=100.0)
    assert [r.client_id for r in came.on_time] == [0, 3]  # an error reply is not late
    assert came.late == [{"client": 1, "time_s": 150.0}] and came.dropped == [2]
    assert came.record() == {"dropped": [2], "late": [{"client": 1, "time_s": 150.0}]}
    assert arrivals([0], [reply(0, 1e6)], None).record() == {}  # no deadline: never late


def test_a_skipped_round_says_why_in_the_words_sampling_uses():
    assert outcome(2, 2) == outcome(3, 2) == "aggregated"
    assert outcome(1, 2) == "skipped: 1 update, fewer than strategy.min_clients=2"
    assert outcome(0, 1) == "skipped: 0 updates, fewer than strategy.min_clients=1"
    krum = (5, "strategy.robust=krum with strategy.robust_malicious=1")
    assert outcome(4, 2, None, krum) == ("skipped: 4 updates, fewer than the 5 "
                                         "strategy.robust=krum with strategy.robust_malicious=1 "
                                         "needs")
    assert outcome(5, 2, None, krum) == "aggregated"
    cfg = config_from_dict({}, ["strategy.availability=0.3", "strategy.min_clients=3"])
    why = next(d.skipped for r in range(50) if (d := draw(cfg.strategy, 4, 0, r)).skipped)
    assert outcome(4, 3, why) == f"skipped: {why}"
    assert why.split(" ", 2)[2] == "online, fewer than strategy.min_clients=3"


@pytest.mark.parametrize("overrides, match", [
    (["faults.dropout=1"], "faults.dropout=1 drops every client"),
    (["faults.straggler_fraction=0.5"], "slows no client; set both"),
    (["faults.straggler_delay_s=10"], "slows no client; set both"),
])
def test_config_refuses_faults_that_cannot_mean_anything(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({}, overrides)


# ------------------------------------------------------------------ runs

def test_a_run_with_dropout_logs_the_dropped_clients_and_aggregates_the_rest(
        tmp_path, tiny_overrides):
    p = 0.4
    # every round loses someone and keeps someone
    seed = _seed_where(lambda s: all(0 < len(_survivors(s, r, 4, p)) < 4 for r in range(2)))
    cfg = config_from_dict({"name": "d"}, [*tiny_overrides, "clients=4", f"seed={seed}",
                                           f"faults.dropout={p}", "eval.base=false"])
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    for rnd, rec in enumerate(round_records(tmp_path / "run")):
        kept = _survivors(seed, rnd, 4, p)
        assert rec["clients"] == [0, 1, 2, 3]
        assert rec["dropped"] == sorted(set(range(4)) - set(kept))
        assert sorted(int(k) for k in rec["num_samples"]) == kept  # only they trained
        assert rec["outcome"] == "aggregated" and "rejected" not in rec
        assert rec["participation"]["trained"] == len(kept)
    assert summary["updates"]["rejected"] == 0  # a dropout is not a rejected update
    dropped = sum(4 - len(_survivors(seed, r, 4, p)) for r in range(2))
    assert summary["updates"]["dropped"] == dropped and summary["updates"]["late"] == 0
    assert f"Faults: {dropped} client-round(s) dropped out, 0 late, 0 round(s) skipped" in \
        (tmp_path / "run" / "report.md").read_text()


def test_a_straggler_past_the_deadline_is_late_and_left_out(tmp_path, tiny_overrides):
    cfg = config_from_dict({"name": "s"}, [
        *tiny_overrides, "faults.straggler_fraction=0.5", "faults.straggler_delay_s=1000",
        "faults.deadline_s=100", "eval.base=false"])
    (slow,) = stragglers(cfg.seed, 2, 0.5)
    run_experiment(cfg, tmp_path / "run", progress=False)
    for rec in round_records(tmp_path / "run"):
        (late,) = rec["late"]
        assert late["client"] == slow and late["time_s"] >= 1000.0  # logged with its time
        assert [int(k) for k in rec["num_samples"]] == [1 - slow]
        assert rec["outcome"] == "aggregated" and "dropped" not in rec


def test_a_round_with_fewer_than_min_clients_updates_is_skipped_and_the_model_stays(
        tmp_path, tiny_overrides):
    cfg = config_from_dict({"name": "m"}, [
        *tiny_overrides, "rounds=1", "strategy.min_clients=2", "eval.base=false",
        "faults.straggler_fraction=0.5", "faults.straggler_delay_s=1000",
        "faults.deadline_s=100"])
    rt = LocalRuntime(cfg, tmp_path / "run", progress=False)
    rt.dir.create(cfg)
    before = {k: v.clone() for k, v in rt.loop.server.states[0].items()}
    with pytest.raises(RunFailedError, match=r"no round was aggregated in the 1 round\(s\): "
                                             r"client updates 1 accepted, 0 rejected, 0 "
                                             r"dropped out, 1 late"):
        rt.run()
    (rec,) = round_records(tmp_path / "run")
    assert rec["outcome"] == "skipped: 1 update, fewer than strategy.min_clients=2"
    assert "aggregation_error" not in rec and len(rec["late"]) == 1
    after = rt.loop.server.states[0]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit


def test_a_run_resumed_after_a_kill_with_dropout_equals_an_uninterrupted_one(
        tmp_path, tiny_overrides):
    p = 0.4
    # round 1 keeps at least two clients, so the kill can fall in its middle
    seed = _seed_where(lambda s: all(_survivors(s, r, 4, p) for r in range(3))
                       and len(_survivors(s, 1, 4, p)) >= 2)
    overrides = [*tiny_overrides, "rounds=3", "clients=4", f"seed={seed}",
                 f"faults.dropout={p}", "eval.base=false"]
    run_experiment(config_from_dict({"name": "r"}, overrides), tmp_path / "full",
                   progress=False)
    second_of_round_1 = len(_survivors(seed, 0, 4, p)) + 2
    with killed_at_training_call(second_of_round_1), pytest.raises(KeyboardInterrupt):
        run_experiment(config_from_dict({"name": "r"}, overrides), tmp_path / "cut",
                       progress=False)
    run_experiment(None, tmp_path / "cut", resume=True, progress=False)
    a, b = (load_file(str(tmp_path / r / "adapters" / "adapter_model.safetensors"))
            for r in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, cut = round_records(tmp_path / "full"), round_records(tmp_path / "cut")
    assert len(cut) == 3
    assert [r.get("dropped") for r in full] == [r.get("dropped") for r in cut]


def test_the_progress_hears_of_every_job_dropped_ones_included():
    from fedumm.config import FaultsConfig
    from fedumm.fl.pipeline import Reply
    from fedumm.runtime.faults import FaultyTransport

    class Inner:  # answers every job it is given
        def train(self, rnd, jobs, ccfg, on_reply):
            out = [Reply(k, b"x") for k in sorted(jobs)]
            for r in out:
                on_reply(r)
            return out

    heard: list[int] = []
    t = FaultyTransport(Inner(), FaultsConfig(dropout=0.5), seed=0, num_clients=8)
    replies = t.train(0, {k: b"" for k in range(8)}, {}, lambda r: heard.append(r.client_id))
    dropped = [k for k in range(8) if drops_out(0, 0, k, 0.5)]
    assert dropped and sorted(heard) == list(range(8))  # one tick per job
    assert sorted(r.client_id for r in replies) == sorted(set(range(8)) - set(dropped))
