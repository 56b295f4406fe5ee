"""Site side of a FLARE run: fedumm's client trainer behind FLARE's Client API.

Each site builds the same frozen backbone and adapters from the job's config and takes its
data: all of its own files when its overrides give ``data.*`` paths, else its share (client
``--client-id`` of the partition) of the config's data. It answers every ``train`` task with
a :class:`~fedumm.fl.updates.ClientUpdate` sent back as an ``FLModel``: adapter tensors in the
codec's dtype (pytorch exchange format, so bf16 travels as bf16) plus sample counts, quality
and metrics in ``meta``.
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch

from fedumm.config import load_config
from fedumm.fl.client import ClientTrainer
from fedumm.fl.codec import DTYPES
from fedumm.runtime.experiment import (
    build_adapters,
    client_datasets,
    load_backbone,
    pack,
    site_client_data,
    unpack,
)

CONFIG_FILE = "fedumm_config.yaml"
ERRORS_DIR = "site_errors"  # under the run directory (simulator / POC): one file per failed site


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
    trainer = ClientTrainer(adapters, cfg.train, cfg.local_epochs, cfg.seed)
    wire = DTYPES[cfg.codec]
    client_state: dict | None = None
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        received = {n: v.to(torch.float32) for n, v in model.params.items()}
        state, control = unpack(received)
        ccfg = dict(model.meta.get("client_config", {}))
        if control:
            ccfg["server_control"] = control
        upd, client_state = trainer.train(client, state, int(model.current_round), ccfg,
                                          client_state)
        payload = pack(upd.tensors, upd.extra.get("control_delta", {}))
        flare.send(FLModel(
            params={n: v.detach().to(wire).contiguous() for n, v in payload.items()},
            meta={"client_id": k, "num_samples": upd.num_samples, "quality": upd.quality,
                  "num_steps": upd.num_steps, "metrics": upd.metrics,
                  "has_control": bool(upd.extra.get("control_delta"))},
        ))

