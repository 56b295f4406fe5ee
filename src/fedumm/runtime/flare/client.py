"""Site side of a FLARE run: fedumm's client trainer behind FLARE's Client API.

Each site builds the same frozen backbone and adapters from the job's config and takes its
data: all of its own files when its overrides give ``data.*`` paths, else its share (client
``--client-id`` of the partition) of the config's data. Every ``train`` task is the round
loop's client side (:class:`~fedumm.fl.endpoint.ClientEndpoint`): the encoded global adapters
arrive as one uint8 tensor in an ``FLModel``, and the encoded update goes back the same way,
with sample counts, quality and metrics in ``meta``. Under secure aggregation the update stays
on the site (its reply is sealed: meta and tensor keys only) and the site answers SecAgg+'s
stage tasks (:class:`~fedumm.fl.secure_sum.SecAggSite`) with its keys, shares, masked input
and unmasking shares, or, under ``secagg.method=he``, HE's (:class:`~fedumm.fl.he_sum.HESite`)
with its encrypted input and a decrypted sum.
"""

from __future__ import annotations

import argparse
import functools
import traceback
from pathlib import Path

import torch

from fedumm.config import Config, load_config
from fedumm.fl.he_sum import CLIENT_CONTEXT, HESite, load_context
from fedumm.fl.pipeline import CLIENT_CONFIG, CLIENT_ID, PAYLOAD, SECAGG_ANSWER, SECAGG_STAGE
from fedumm.fl.secagg import client_input
from fedumm.fl.secure_sum import SecAggSite, Site
from fedumm.runtime.experiment import (
    build_adapters,
    client_datasets,
    client_endpoint,
    load_backbone,
    site_client_data,
)
from fedumm.runtime.flare.controller import ERRORS_DIR, to_bytes, to_tensor

CONFIG_FILE = "fedumm_config.yaml"
STATES_DIR = "site_states"  # under the run directory: each site's client state per round


OWN_DATA_KEYS = ("data.format", "data.understanding", "data.generation")


def has_own_data(overrides: list[str]) -> bool:
    """Whether a site's overrides point it at its own files (then it uses all of them)."""
    return any(o.split("=", 1)[0].strip() in OWN_DATA_KEYS for o in overrides)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser("fedumm_client")
    p.add_argument("--config", default=CONFIG_FILE, help="relative to this script's folder")
    p.add_argument("--client-id", type=int, required=True, help="this site's client number")
    p.add_argument("--override", action="append", default=[], help="key=value for this site")
    p.add_argument("--run-dir", default="", help="where to report a failure (simulator / POC)")
    p.add_argument("--he-context", default="", help="this site's HE context (secagg.method=he; "
                   "default: client_context.tenseal in its startup kit)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, script_dir: Path | None = None) -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel

    args = _parse(argv)
    flare.init()
    site = flare.get_site_name()
    try:
        _serve(flare, FLModel, site, args, script_dir or Path.cwd())
    except BaseException:
        if args.run_dir:  # FLARE may still exit 0: leave the runner this site's error
            d = Path(args.run_dir) / ERRORS_DIR
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{site}.txt").write_text(traceback.format_exc())
        raise


def _serve(flare, FLModel, site: str, args: argparse.Namespace,  # noqa: N803
           script_dir: Path) -> None:
    cfg_path = script_dir / args.config  # relative names: the job folder moves between hosts
    cfg = load_config(cfg_path, args.override)
    torch.set_num_threads(cfg.train.threads or 1)  # one thread per site process
    k = args.client_id
    backbone = load_backbone(cfg)
    adapters = build_adapters(cfg, backbone)
    if has_own_data(args.override):
        client = site_client_data(cfg, backbone, k)
    else:
        clients, _ = client_datasets(cfg, backbone)
        if k >= len(clients):
            raise ValueError(f"{site} has no data: the config has {len(clients)} client(s)")
        client = clients[k]
    endpoint = client_endpoint(cfg, adapters)
    states = SiteStates(Path(args.run_dir) / STATES_DIR / site if args.run_dir else None)
    # secure aggregation: this site's side of SecAgg+ (or HE); its update never leaves it
    # unmasked (unencrypted)
    secure = secure_site(cfg, k, args.he_context) if cfg.secagg.enabled else None
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        rnd = int(model.current_round)
        stage = model.meta.get(SECAGG_STAGE)
        if stage is not None:
            if secure is None:
                raise RuntimeError(f"{site}: a secure aggregation message, but this site's "
                                   "config has secagg.enabled=false")
            out, answer = secure.handle(rnd, stage, to_bytes(model.params[PAYLOAD]),
                                        model.meta)
            flare.send(FLModel(params={PAYLOAD: to_tensor(out)},
                               meta={SECAGG_ANSWER: answer, CLIENT_ID: k}))
            continue
        job = (client, rnd, to_bytes(model.params[PAYLOAD]),
               dict(model.meta.get(CLIENT_CONFIG, {})), states.before(rnd))
        if secure is None:
            reply, client_state = endpoint.handle(*job)
        else:  # the update stays here until the mask stage asks for it
            reply, client_state = endpoint.handle_sealed(
                *job, hold=lambda values, start, r=rnd: secure.hold(
                    r, functools.partial(client_input, values, start)))
        states.after(rnd, client_state)
        flare.send(FLModel(params={PAYLOAD: to_tensor(reply.payload)},
                           meta={**reply.meta.to_dict(), CLIENT_ID: k}))


def secure_site(cfg: Config, k: int, he_context: str) -> Site:
    """This site's side of secure aggregation: SecAgg+, or HE with its context (the given
    file, else ``startup/client_context.tenseal`` in the kit it runs from)."""
    if cfg.secagg.method != "he":
        return SecAggSite(k)
    path = Path(he_context) if he_context else startup_file(CLIENT_CONTEXT)
    return HESite(k, load_context(path, secret=True))


def startup_file(name: str, start: Path | None = None) -> Path:
    """``startup/<name>`` in the first of ``start`` (default: the working directory) and its
    parents that has it: a FLARE site runs its jobs inside its startup kit's folder."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "startup" / name).is_file():
            return folder / "startup" / name
    raise FileNotFoundError(f"no startup/{name} in {here} or above: this site was not "
                            f"provisioned with FLARE's HEBuilder (secagg.method=he needs it), "
                            f"or pass --he-context")


class SiteStates:
    """A site's client state (error-feedback residual, SCAFFOLD control, optimizer) per round.
    Kept in memory, and on disk when the site has a folder for it (simulator / POC), so a
    resumed run continues every site from the round the server resumes at."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.memory: tuple[int, dict] | None = None

    def before(self, rnd: int) -> dict | None:
        """The state after the last round before ``rnd`` this site trained in (None before
        its first): a site not selected, or dropped out, in round ``rnd - 1`` keeps it."""
        if self.memory is not None and self.memory[0] < rnd:
            return self.memory[1]
        done = [r for r in self._saved() if r < rnd]
        if done:
            return torch.load(self.folder / f"round_{max(done)}.pt",
                              weights_only=True)  # tensors and numbers only
        return None

    def _saved(self) -> list[int]:
        """The rounds whose states are on disk."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return [int(p.stem.split("_")[1]) for p in self.folder.glob("round_*.pt")]

    def after(self, rnd: int, state: dict) -> None:
        self.memory = (rnd, state)
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"round_{rnd}.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.folder / f"round_{rnd}.pt")
        # keep the two newest: a resume at the round before this one needs the one before it
        for old in sorted(self._saved())[:-2]:
            (self.folder / f"round_{old}.pt").unlink()
