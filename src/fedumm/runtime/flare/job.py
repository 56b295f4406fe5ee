"""A FLARE job (Job API) from a fedumm config.

Server: :class:`~fedumm.runtime.flare.controller.FedUMMController` with the resolved config.
Sites (``site-1`` .. ``site-K``, or the names given): FLARE's Client API executor running
``fedumm_client.py`` in process, exchanging pytorch tensors (so bf16 payloads stay bf16). The
script and the config travel in each site's ``custom/`` folder under relative names, so the
folder works on remote sites; per-site ``key=value`` overrides (e.g. a site's own data
paths, then it trains on all of its files) go in its script args with its client number.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.client.config import ExchangeFormat
from nvflare.job_config.api import FedJob

from fedumm.config import Config, ConfigError, config_from_dict
from fedumm.fl.he_sum import CLIENT_CONTEXT
from fedumm.runtime.flare.client import CONFIG_FILE
from fedumm.runtime.flare.controller import FedUMMController, site_names
from fedumm.runtime.modes import LOCAL, num_clients, run_mode

JOB_NAME = "fedumm"
# what may differ between sites: where their data and weights are, and their hardware
SITE_KEYS = ("data.format", "data.understanding", "data.generation", "data.images",
             "data.understanding_val", "data.generation_val", "data.heldout_fraction",
             "data.max_samples", "backbone.path", "backbone.device", "train.threads")
CLIENT_SCRIPT = Path(__file__).with_name("fedumm_client.py")


def build_job(cfg: Config, *, run_dir: str = "", staging: Path | None = None,
              site_overrides: dict[str, list[str]] | None = None,
              sites: list[str] | None = None, task_request_interval: float = 0.1,
              he_contexts: str = "") -> FedJob:
    """The FLARE job for ``cfg``. ``run_dir``: where the server writes the run directory and
    sites report failures (empty for a real deployment: the server's job workspace).
    ``staging``: a folder for the files the job copies into ``custom/`` when it is exported
    (they must exist until then; a new temporary folder when omitted). ``sites``: the site
    name of each client (default ``site-1`` .. ``site-K``). ``he_contexts``: a folder with
    the HE contexts of ``secagg.method=he`` (the simulator's, :func:`fedumm.fl.he_sum.
    provision_contexts`); empty: each party takes its own from its provisioned startup kit."""
    if run_mode(cfg) == LOCAL:
        raise ConfigError("strategy.name=local runs only on the local runtime")
    k_total = num_clients(cfg)
    try:
        sites = site_names(k_total, sites)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    unknown = sorted(set(site_overrides or {}) - set(sites))
    if unknown:
        raise ConfigError(f"site overrides for {unknown}: the job has sites {sites} (name "
                          "the sites with --sites)")
    for site, ovs in (site_overrides or {}).items():  # validate now, not on the site
        for ov in ovs:
            key = ov.split("=", 1)[0].strip()
            if key not in SITE_KEYS:
                raise ConfigError(
                    f"--site {site}:{ov}: {key} must be the same on every site (the partition, "
                    f"the model and the algorithm are shared); a site may set only "
                    f"{', '.join(SITE_KEYS)}")
        config_from_dict(cfg.to_dict(), ovs)
    job = FedJob(name=JOB_NAME, min_clients=k_total)
    job.set_app_packages(["fedumm"])  # installed on every site: reference it, don't copy it
    job.to_server(FedUMMController(config=cfg.to_dict(), run_dir=run_dir, sites=sites,
                                   he_contexts=he_contexts), id="fedumm_controller")
    job.to_server({"server": {"task_request_interval": task_request_interval}})
    tmp = Path(staging) if staging else Path(tempfile.mkdtemp(prefix="fedumm_job_"))
    tmp.mkdir(parents=True, exist_ok=True)
    cfg.save(tmp / CONFIG_FILE)
    shutil.copy(CLIENT_SCRIPT, tmp / CLIENT_SCRIPT.name)
    for k, site in enumerate(sites):
        args = ["--config", CONFIG_FILE, "--client-id", str(k)]
        for ov in (site_overrides or {}).get(site, []):
            args += ["--override", ov]
        if run_dir:
            args += ["--run-dir", run_dir]
        if he_contexts:
            args += ["--he-context", str(Path(he_contexts) / CLIENT_CONTEXT)]
        job.to(str(tmp / CLIENT_SCRIPT.name), site)
        job.to(str(tmp / CONFIG_FILE), site)
        job.to(ClientAPIExecutor(execution_mode="in_process",
                                 task_script_path=CLIENT_SCRIPT.name,
                                 task_script_args=shlex.join(args),
                                 params_exchange_format=ExchangeFormat.PYTORCH,
                                 server_expected_format=ExchangeFormat.PYTORCH), site,
               tasks=["train"])
    return job
