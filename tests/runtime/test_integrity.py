"""Backbone integrity: every client checks the frozen backbone the job names against the one it
loaded and refuses another; the server then fails the run, naming both."""

from __future__ import annotations

import pytest
import torch

from fedumm.config import config_from_dict
from fedumm.fl.endpoint import BACKBONE_MISMATCH, short
from fedumm.fl.pipeline import BACKBONE_FINGERPRINT
from fedumm.models.reference.micro import micro_backbone
from fedumm.runtime.experiment import (
    build_adapters,
    client_datasets,
    client_endpoint,
    load_backbone,
)
from fedumm.runtime.flare.client import SiteStates
from fedumm.runtime.local import LocalRuntime
from fedumm.runtime.run_dir import RunDirectory, RunFailedError


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A micro backbone with other weights (seed 1): a site's copy that is not the server's."""
    path = tmp_path_factory.mktemp("other") / "ck"
    micro_backbone(1).save(path)
    return path


def test_a_client_computes_the_fingerprint_as_the_server_does(tiny_overrides):
    cfg = config_from_dict({}, tiny_overrides)
    server = load_backbone(cfg).fingerprint()  # the local runtime: before the adapters
    site = load_backbone(cfg)
    endpoint = client_endpoint(cfg, build_adapters(cfg, site))  # a site: after them
    assert endpoint.fingerprint == server == site.fingerprint()


def test_a_client_refuses_a_job_for_another_backbone_and_touches_nothing(
        tiny_overrides, other_checkpoint):
    cfg = config_from_dict({}, tiny_overrides)
    rt_cfg = config_from_dict({}, [*tiny_overrides, f"backbone.path={other_checkpoint}"])
    theirs = load_backbone(rt_cfg)
    endpoint = client_endpoint(rt_cfg, build_adapters(rt_cfg, theirs))
    client = client_datasets(rt_cfg, theirs)[0][0]
    before = {k: p.detach().clone() for k, p in endpoint.trainer.adapters.params.items()}
    server = load_backbone(cfg).fingerprint()
    state = {"kept": torch.ones(2)}
    reply, after = endpoint.handle(client, 0, b"not even a payload",
                                   {BACKBONE_FINGERPRINT: server}, state)
    assert reply.payload == b"" and reply.meta.error.startswith(BACKBONE_MISMATCH)
    assert short(server) in reply.meta.error and short(theirs.fingerprint()) in reply.meta.error
    assert "same base weights" in reply.meta.error  # the fix
    assert after == state  # its state is as it was
    assert all(torch.equal(p.detach(), before[k])
               for k, p in endpoint.trainer.adapters.params.items())


def test_a_run_whose_client_holds_another_backbone_fails_naming_both(
        tmp_path, tiny_overrides, other_checkpoint):
    cfg = config_from_dict({"name": "i"}, [*tiny_overrides, "eval.base=false"])
    rt = LocalRuntime(cfg, tmp_path / "run", progress=False)
    rt.dir.create(cfg)
    other_cfg = config_from_dict({}, [*tiny_overrides, f"backbone.path={other_checkpoint}"])
    other = load_backbone(other_cfg)
    # the clients train on their own copy of the base, which is not the server's
    rt.transport.endpoint = client_endpoint(other_cfg, build_adapters(other_cfg, other))
    with pytest.raises(RunFailedError) as err:
        rt.run()
    msg = str(err.value)
    assert msg.startswith(f"client 0 refused round 0: {BACKBONE_MISMATCH}: the job is for the "
                          f"frozen backbone {short(rt.loop.fingerprint)}, this client loaded "
                          f"{short(other.fingerprint())}")
    assert "--resume" in msg
    d = RunDirectory(tmp_path / "run")
    assert d.load_checkpoint() is None  # no round was completed
    assert not [m for m in d.metrics() if m.get("type") == "round"]


def test_a_site_keeps_its_state_through_rounds_it_did_not_train_in(tmp_path):
    states = SiteStates(tmp_path / "site")
    assert states.before(0) is None
    states.after(0, {"r": torch.tensor(0)})
    # round 1: not selected or dropped out; round 2 starts from round 0's state
    assert int(states.before(2)["r"]) == 0
    assert int(SiteStates(tmp_path / "site").before(2)["r"]) == 0  # a restarted site too
    states.after(2, {"r": torch.tensor(2)})
    states.after(5, {"r": torch.tensor(5)})
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["round_2.pt",
                                                                     "round_5.pt"]
    # a resume at round 3 (round 5 never checkpointed by the server) or 6
    assert int(SiteStates(tmp_path / "site").before(3)["r"]) == 2
    assert int(SiteStates(tmp_path / "site").before(6)["r"]) == 5


@pytest.mark.slow
def test_a_flare_site_with_another_backbone_fails_the_run_naming_both(
        tmp_path, tiny_overrides, other_checkpoint):
    from fedumm.runtime.flare.runner import FlareRunError, run_flare_sim

    cfg = config_from_dict({"name": "f"}, [*tiny_overrides, "runtime=flare-sim",
                                           "eval.base=false"])
    with pytest.raises(FlareRunError, match=rf"server failed: .*client 1 refused round 0: "
                                            rf"{BACKBONE_MISMATCH}: .*this client loaded "
                                            rf"{short(micro_backbone(1).fingerprint())}"):
        run_flare_sim(cfg, tmp_path / "run", log=lambda s: None,
                      site_overrides={"site-2": [f"backbone.path={other_checkpoint}"]})
