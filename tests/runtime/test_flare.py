"""The NVIDIA FLARE runtime against the local runtime (same config, same seed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedumm.cli import main
from fedumm.config import ConfigError, config_from_dict
from fedumm.models.reference.micro import MICRO_IMAGE_SIZE
from fedumm.runtime.dispatch import run_experiment
from fedumm.runtime.flare.job import build_job
from fedumm.runtime.flare.runner import FlareRunError, export_flare_job, run_flare_sim
from fedumm.runtime.run_dir import RunDirectory, RunDirError


def _cfg(overrides, *extra):
    return config_from_dict({"name": "tiny"}, [*overrides, *extra])


def _adapters(run: Path) -> dict:
    return load_file(str(run / "adapters" / "adapter_model.safetensors"))


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.parametrize("extra", [
    pytest.param(["strategy.name=fedavg"], id="fedavg"),
    pytest.param(["strategy.name=fedumm", "codec=bfloat16"], id="fedumm-bf16"),
    pytest.param(["strategy.name=fedavg", "codec=int8"], id="fedavg-int8"),
    # chains: several hops (transport calls) per round, each member from the one before
    pytest.param(["strategy.name=fedavg", "clients=4", "strategy.chain=2"], id="chains"),
    pytest.param(["strategy.name=scaffold"], id="scaffold", marks=pytest.mark.slow),
    pytest.param(["strategy.name=fedadam", "strategy.fraction=0.5"], id="fedadam-sampled",
                 marks=pytest.mark.slow),
])
def test_flare_simulator_gives_the_local_runtimes_adapters(tmp_path, tiny_overrides, extra):
    cfg = _cfg(tiny_overrides, *extra)
    local = run_experiment(cfg, tmp_path / "local", progress=False)
    flare = run_flare_sim(_cfg(tiny_overrides, *extra, "runtime=flare-sim"), tmp_path / "flare",
                          log=lambda s: None)
    a, b = _adapters(tmp_path / "local"), _adapters(tmp_path / "flare")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert flare["communication"] == local["communication"]  # bytes counted the same way
    assert flare["final"]["vqa_accuracy"] == local["final"]["vqa_accuracy"]
    assert set(flare) >= set(local) and flare["runtime"] == "flare-sim"
    for name in ("config.yaml", "metrics.jsonl", "report.md", "partition.json"):
        assert (tmp_path / "local" / name).is_file()
    for name in ("config.yaml", "metrics.jsonl", "report.md", "summary.json"):
        assert (tmp_path / "flare" / name).is_file(), name
    rounds = [m for m in RunDirectory(tmp_path / "flare").metrics() if m["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert not _processes_mentioning(str(tmp_path))


def test_a_failing_site_fails_the_run_with_its_message(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "runtime=flare-sim")
    with pytest.raises(FlareRunError, match=r"site-2 failed: .*no_such_checkpoint"):
        run_flare_sim(cfg, tmp_path / "run", site_overrides={
            "site-2": ["backbone.path=/no_such_checkpoint"]}, log=lambda s: None)
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not _processes_mentioning(str(tmp_path))


def test_exported_job_passes_flares_job_validation(tmp_path, tiny_overrides):
    from nvflare.apis.utils.job_utils import load_job_def_bytes
    from nvflare.private.fed.server.job_meta_validator import JobMetaValidator

    cfg = _cfg(tiny_overrides, "clients=3")
    own = ["data.format=files", "data.understanding=/data/site2.jsonl"]
    job = export_flare_job(cfg, tmp_path, {"site-2": own})
    ok, err, meta = JobMetaValidator().validate(job.name, load_job_def_bytes(
        str(tmp_path), job.name))
    assert ok, err
    assert meta["min_clients"] == 3
    assert sorted(s for v in meta["deploy_map"].values() for s in v) == [
        "server", "site-1", "site-2", "site-3"]
    for site in ("site-1", "site-2", "site-3"):
        custom = job / f"app_{site}" / "custom"
        assert {p.name for p in custom.iterdir()} == {"fedumm_client.py", "fedumm_config.yaml"}
        client = json.loads((job / f"app_{site}" / "config" / "config_fed_client.json")
                            .read_text())
        args = client["executors"][0]["executor"]["args"]
        assert args["params_exchange_format"] == "pytorch"
        assert ("data.understanding=/data/site2.jsonl" in args["task_script_args"]) == (
            site == "site-2")
        assert f"--client-id {int(site[-1]) - 1}" in args["task_script_args"]
        assert "/" not in args["task_script_path"]  # relative: works on remote hosts
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["config"] == {**cfg.to_dict()}
    assert export_flare_job(cfg, tmp_path) == job  # its own folder: exported afresh
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    with pytest.raises(RunDirError, match="not a fedumm export flare job folder .*notes.md"):
        export_flare_job(cfg, tmp_path / "mine")


def test_job_builder_rejects_what_flare_cannot_run(tiny_overrides):
    with pytest.raises(ConfigError, match="local runtime"):
        build_job(_cfg(tiny_overrides, "strategy.name=local"))
    with pytest.raises(ConfigError, match="site-9"):
        build_job(_cfg(tiny_overrides), site_overrides={"site-9": ["seed=1"]})
    for ov in ("partition.alpha=0.9", "seed=7", "lora.r=4", "data.train_scenes=10"):
        key = ov.split("=")[0]
        with pytest.raises(ConfigError, match=f"{key} must be the same on every site"):
            build_job(_cfg(tiny_overrides), site_overrides={"site-1": [ov]})
    with pytest.raises(ConfigError, match="train.threads"):
        build_job(_cfg(tiny_overrides), site_overrides={"site-1": ["train.threads=-1"]})
    with pytest.raises(ConfigError, match="3 site names for 2 clients"):
        build_job(_cfg(tiny_overrides), sites=["a", "b", "c"])
    with pytest.raises(ConfigError, match="site name 'a b'"):
        build_job(_cfg(tiny_overrides), sites=["a b", "c"])
    with pytest.raises(ConfigError, match="data.understanding is set but data.format=shapes"):
        build_job(_cfg(tiny_overrides), site_overrides={"site-1": ["data.understanding=/x"]})


def test_export_with_named_sites_and_their_own_data(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "job"
    assert main(["export-flare-job", "configs/quickstart.yaml", "--out", str(out),
                 "--sites", "hospital-a,bank_b,phones.eu",
                 "--site", "bank_b:data.format=files",
                 "--site", "bank_b:data.understanding=/srv/bank/vqa.jsonl"]) == 0
    job = out / "fedumm"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == 3
    assert sorted(s for v in meta["deploy_map"].values() for s in v) == [
        "bank_b", "hospital-a", "phones.eu", "server"]
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["sites"] == ["hospital-a", "bank_b", "phones.eu"]
    for k, site in enumerate(["hospital-a", "bank_b", "phones.eu"]):
        client = json.loads((job / f"app_{site}" / "config" / "config_fed_client.json")
                            .read_text())
        args = client["executors"][0]["executor"]["args"]["task_script_args"]
        assert f"--client-id {k}" in args
        assert ("data.understanding=/srv/bank/vqa.jsonl" in args) == (site == "bank_b")


def test_a_named_site_with_its_own_data_trains_on_all_of_it(tmp_path, tiny_overrides):
    from fedumm.data.export import export_official
    from fedumm.data.readers.shapes import generate_shapes

    own = generate_shapes("downstream", 12, seed=5, role="train", image_size=MICRO_IMAGE_SIZE)
    vqa = export_official(own, tmp_path / "hospital", "train2014")["vqa"]
    cfg = _cfg(tiny_overrides, "runtime=flare-sim")
    run_flare_sim(cfg, tmp_path / "run", sites=["hospital-a", "bank_b"], log=lambda s: None,
                  site_overrides={"hospital-a": ["data.format=files",
                                                 f"data.understanding={vqa}"]})
    rounds = [m for m in RunDirectory(tmp_path / "run").metrics() if m["type"] == "round"]
    n = len(own.vqa)
    held = max(1, round(n * cfg.train.val_fraction))  # the client's own quality samples
    assert rounds[0]["num_samples"]["0"] == {"understanding": n - held, "generation": 0,
                                              "understanding_with_image": n - held}
    assert rounds[0]["num_samples"]["1"]["generation"] > 0  # bank_b: its share of the config


def test_export_command(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "job"
    assert main(["export-flare-job", "configs/quickstart.yaml", "--out", str(out),
                 "--site", "site-1:train.threads=2", "clients=2"]) == 0
    assert "nvflare job submit" in capsys.readouterr().out
    assert (out / "fedumm" / "meta.json").is_file()
    assert main(["export-flare-job", "configs/quickstart.yaml", "--out", str(tmp_path / "x"),
                 "--site", "site-1=seed"]) == 2
    assert "SITE:key=value" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("he", [False, True], ids=["plain", "he"])
def test_poc_deployment_on_loopback_runs_and_leaves_nothing_behind(tmp_path, tiny_overrides,
                                                                   he):
    """A provisioned deployment on 127.0.0.1; with ``he``, provisioned with FLARE's HE keys,
    which the server and every site take from their own startup kits."""
    from fedumm.runtime.flare.runner import run_flare_poc

    home_flare = Path.home() / ".nvflare"
    existed = home_flare.exists()
    secure = ["secagg.enabled=true", "secagg.method=he"] if he else []
    cfg = _cfg(tiny_overrides, "runtime=flare-poc", *secure)
    summary = run_flare_poc(cfg, tmp_path / "poc", timeout_s=300)
    local = run_experiment(_cfg(tiny_overrides), tmp_path / "local", progress=False)
    a, b = _adapters(tmp_path / "local"), _adapters(tmp_path / "poc")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= (1e-5 if he else 1e-6)
    if he:
        kits = tmp_path / "poc" / "flare" / "poc"
        assert len(list(kits.rglob("startup/client_context.tenseal"))) == 2
        rounds = [m for m in RunDirectory(tmp_path / "poc").metrics() if m["type"] == "round"]
        assert all(r["secagg"]["method"] == "he" and r["secagg"]["inputs"] == 2
                   for r in rounds)
    else:
        assert summary["communication"] == local["communication"]
    assert not _processes_mentioning(str(tmp_path))
    assert home_flare.exists() == existed  # the POC workspace lived under the run directory


def test_a_flare_run_without_its_launch_record_does_not_resume(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    RunDirectory(run).create(_cfg(tiny_overrides, "runtime=flare-sim"))
    with pytest.raises(RunDirError, match="no FLARE run to resume"):
        run_experiment(None, run, resume=True)
    poc = tmp_path / "poc"
    RunDirectory(poc).create(_cfg(tiny_overrides, "runtime=flare-poc"))
    with pytest.raises(RunDirError, match="local and flare-sim runs resume"):
        run_experiment(None, poc, resume=True)


@pytest.mark.parametrize("algo", [
    pytest.param(["strategy.name=scaffold"], id="scaffold"),
    # SecAgg+: a resumed round draws new keys on restarted sites; the sums are the same
    pytest.param(["clients=4", "secagg.enabled=true", "faults.dropout=0.25",
                  "secagg.threshold=2"], id="secagg", marks=pytest.mark.slow),
])
def test_a_killed_flare_simulator_run_resumes_from_its_last_round(tmp_path, tiny_overrides,
                                                                  algo):
    """SCAFFOLD keeps client state on the sites: the resumed sites must continue from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from fedumm.runtime.procs import run_processes

    extra = ["rounds=4", *algo]
    local = run_experiment(_cfg(tiny_overrides, *extra), tmp_path / "local", progress=False)
    cfg_file = tmp_path / "cfg.yaml"
    _cfg(tiny_overrides, *extra, "runtime=flare-sim").save(cfg_file)
    run = tmp_path / "flare"
    proc = subprocess.Popen([sys.executable, "-m", "fedumm.cli", "run", str(cfg_file), "--out",
                             str(run), "--quiet"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file():
            try:
                if torch.load(ckpt, weights_only=False)["round"] >= 0:
                    break
            except (EOFError, RuntimeError):  # being written
                pass
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: FLARE's processes go with its guard
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and run_processes(str(run / "flare")):
        time.sleep(0.2)
    assert not run_processes(str(run / "flare"), by_command=True)
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    done = torch.load(ckpt, weights_only=False)["round"]
    assert done < 3
    summary = run_experiment(None, run, resume=True)
    a, b = _adapters(tmp_path / "local"), _adapters(run)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert summary["communication"] == local["communication"]
    rounds = [m["round"] for m in RunDirectory(run).metrics() if m["type"] == "round"]
    assert rounds == [0, 1, 2, 3]
    assert not _processes_mentioning(str(tmp_path))


@pytest.mark.slow
def test_sigterm_to_a_flare_simulator_run_leaves_no_process(tmp_path, tiny_overrides):
    import os
    import signal
    import subprocess
    import sys
    import time

    from fedumm.runtime.procs import run_processes

    cfg_file = tmp_path / "cfg.yaml"
    _cfg(tiny_overrides, "runtime=flare-sim", "rounds=30").save(cfg_file)
    run = tmp_path / "flare"
    proc = subprocess.Popen([sys.executable, "-m", "fedumm.cli", "run", str(cfg_file), "--out",
                             str(run), "--quiet"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (run / "checkpoint" / "state.pt").is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # the group, as timeout / scancel / systemd do
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "continue with: fedumm run --resume" in err
    time.sleep(1)
    assert not _processes_mentioning(str(run))
    assert not run_processes(str(run), by_command=True)  # FLARE's, in sessions of their own


def test_a_resume_is_refused_while_a_process_of_the_earlier_flare_run_is_alive(
        tmp_path, tiny_overrides):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    RunDirectory(run).create(_cfg(tiny_overrides, "runtime=flare-sim"))
    flare = (run / "flare").resolve()
    flare.mkdir()
    (flare / "launch.json").write_text(json.dumps({"sites": None, "site_overrides": None}))
    # a site of the earlier run, in a session of its own, that outlived its runner
    site = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "FEDUMM_RUN": str(flare)},
                            start_new_session=True)
    try:
        with pytest.raises(RunDirError, match=rf"still running: {site.pid} \(.*kill {site.pid}"):
            run_experiment(None, run, resume=True)
    finally:
        site.kill()
        site.wait(timeout=10)


@pytest.mark.parametrize("runtime", ["flare-sim", "flare-poc"])
def test_a_partition_that_cannot_be_made_fails_before_any_flare_process_starts(
        tmp_path, tiny_overrides, runtime):
    import time

    with pytest.raises(ValueError) as local:
        run_experiment(_cfg(tiny_overrides, "clients=1000"), tmp_path / "local", progress=False)
    t0 = time.monotonic()
    with pytest.raises(ValueError) as flare:
        run_experiment(_cfg(tiny_overrides, "clients=1000", f"runtime={runtime}"),
                       tmp_path / "flare")
    assert time.monotonic() - t0 < 20
    assert str(flare.value) == str(local.value) and "1000 clients" in str(local.value)
    assert not (tmp_path / "flare" / "flare").exists()  # no FLARE workspace, no site
    assert not _processes_mentioning(str(tmp_path))


def test_flare_secure_aggregation_equals_the_local_runtimes(tmp_path, tiny_overrides):
    """SecAgg+ with real sites: each site keeps its update and answers the protocol's stage
    tasks; the server only routes their messages. Same adapters, records and bytes as the
    local runtime, including a round in which two of four clients drop out."""
    extra = ["clients=4", "secagg.enabled=true", "secagg.threshold=2", "faults.dropout=0.25"]
    local = run_experiment(_cfg(tiny_overrides, *extra), tmp_path / "local", progress=False)
    flare = run_flare_sim(_cfg(tiny_overrides, *extra, "runtime=flare-sim"), tmp_path / "flare",
                          log=lambda s: None)
    a, b = _adapters(tmp_path / "local"), _adapters(tmp_path / "flare")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert flare["communication"] == local["communication"]

    def secagg(run):
        recs = [m for m in RunDirectory(run).metrics() if m["type"] == "round"]
        return [{k: v for k, v in r["secagg"].items() if k != "seconds"} for r in recs]

    ours, theirs = secagg(tmp_path / "local"), secagg(tmp_path / "flare")
    assert ours == theirs
    assert ours[0]["dropped_before_input"] == [0, 1] and ours[0]["inputs"] == 2
    assert not _processes_mentioning(str(tmp_path))


def test_flare_homomorphic_encryption_gives_the_plain_mean(tmp_path, tiny_overrides):
    """secagg.method=he: the sites encrypt their updates with FLARE's HE keys (made by FLARE's
    HEBuilder for the simulator), the server adds ciphertexts it cannot decrypt, one site
    decrypts the sum. The model is plain FedAvg's up to CKKS's error, with the same dropouts;
    the bytes are the ciphertexts'."""
    extra = ["clients=4", "faults.dropout=0.25"]
    plain = run_experiment(_cfg(tiny_overrides, *extra), tmp_path / "plain", progress=False)
    he = run_flare_sim(_cfg(tiny_overrides, *extra, "runtime=flare-sim", "secagg.enabled=true",
                            "secagg.method=he"), tmp_path / "he", log=lambda s: None)
    a, b = _adapters(tmp_path / "plain"), _adapters(tmp_path / "he")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    # not passed through; CKKS adds ~1e-9, which the second round's training carries on
    assert 0 < worst <= 1e-5
    recs = [m for m in RunDirectory(tmp_path / "he").metrics() if m["type"] == "round"]
    assert [r["secagg"]["method"] for r in recs] == ["he", "he"]
    assert recs[0]["secagg"]["dropped_before_input"] == [0, 1] and recs[0]["secagg"]["inputs"] == 2
    # a ciphertext of 4096 entries is far larger than their float32 bytes
    assert he["communication"]["upload_bytes_per_client_round"] > \
        10 * plain["communication"]["upload_bytes_per_client_round"]
    context = (tmp_path / "he" / "flare" / "he" / "server_context.tenseal").read_bytes()
    import tenseal as ts

    assert not ts.context_from(context).has_secret_key()
    assert not _processes_mentioning(str(tmp_path))
