"""The ``fedumm`` command. Thin: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

from fedumm.config import MAX_SEED, Config, ConfigError, load_config
from fedumm.outputs import claim_file
from fedumm.runtime.run_dir import RunDirError, RunFailedError

# Each subcommand is an ``_add_<name>(sub)`` that declares its parser and binds its handler,
# ``_cmd_<name>(args)``, defined right below it; ``build_parser`` lists them in help order.


# ---- argument types: every number is checked where it is parsed, so a bad one is argparse's
# one-line usage error (exit 2), never a traceback or a silently odd run

def int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (no upper bound when ``hi`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
        return value
    parse.__name__ = "int"
    return parse


def finite_float(lo: float | None = None):
    """An argparse type: a finite number (nan and inf refused), > ``lo`` when given."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and value <= lo:
            raise argparse.ArgumentTypeError(f"expected a number > {lo}, got {text!r}")
        return value
    parse.__name__ = "float"
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
seed_int = int_in(0, MAX_SEED)  # torch seeds take 64 bits
image_size_int = int_in(16, 256)  # ShapesWorld's sizes, as data.image_size
positive_float = finite_float(0.0)


def _load(args: argparse.Namespace, *first: str) -> Config:
    """The config ``args.config`` with the overrides *first*, then ``args.overrides``."""
    return load_config(args.config, [*first, *args.overrides])


def _load_optional(args: argparse.Namespace, *, unless_file: bool = False) -> Config:
    """``_load`` for an optional CONFIG positional: given only overrides, argparse puts the
    first one in CONFIG, so a CONFIG with an ``=`` goes back in front of the overrides (not
    when *unless_file* and a file of that name exists)."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not (unless_file and Path(config).is_file()):
        config, overrides = None, [config, *overrides]
    return load_config(config, overrides)


def _threads() -> None:
    """Commands that train or run a model use every core."""
    import os

    import torch

    torch.set_num_threads(os.cpu_count() or 1)


def _add_partition(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("partition", help="split a dataset over clients and show heterogeneity")
    p.add_argument("--config", help="YAML config (defaults when omitted)")
    p.add_argument("--split", default="downstream", choices=["base", "downstream"])
    p.add_argument("--clients", type=positive_int, default=4)
    p.add_argument("--alpha", type=positive_float,
                   help="Dirichlet concentration (partition.alpha)")
    p.add_argument("--method", help="iid | dirichlet | quantity_skew | domain")
    p.add_argument("--label", help="label key for Dirichlet (answer, question_type, tag, ...)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="heat map PNG path")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=_cmd_partition)


def _cmd_partition(args: argparse.Namespace) -> int:
    from fedumm.data.clients import split_clients
    from fedumm.data.readers import read_samples

    overrides = [f"clients={args.clients}", f"seed={args.seed}", f"data.split={args.split}"]
    if args.alpha is not None:
        overrides.append(f"partition.alpha={args.alpha}")
    if args.method is not None:
        overrides.append(f"partition.method={args.method}")
    if args.label is not None:
        overrides.append(f"partition.label={args.label}")
    cfg = _load(args, *overrides)
    heat_map = None if args.json else claim_file(  # checked before the work
        args.out or f"runs/partition_k{cfg.clients}_a{cfg.partition.alpha}_s{cfg.seed}.png",
        ".png", command="partition")
    data = read_samples(cfg.data)
    summary = split_clients(data, cfg.partition, cfg.clients, cfg.seed).summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    from fedumm.experiments.plots import partition_heatmap

    p = cfg.partition
    print(f"{cfg.clients} clients, {len(data)} samples, method={p.method} "
          f"alpha={p.alpha} label={p.label} seed={cfg.seed}")
    if "clients" not in summary:  # a large population: distributions, no row per client
        for key in ("client_sizes", "labels_per_client"):
            print(f"{key.replace('_', ' ')}: " + ", ".join(
                f"{q}={v:g}" for q, v in summary[key]["quantiles"].items()))
    for c in summary.get("clients", []):
        top = sorted(c["label_counts"].items(), key=lambda kv: -kv[1])[:4]
        print(f"{c['id']:>6} {c['num_samples']:>8} {len(c['label_counts']):>6}  "
              + ", ".join(f"{k}:{v}" for k, v in top))
    het = summary["heterogeneity"]
    print("heterogeneity: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in het.items()))
    print(f"heat map: {partition_heatmap(summary, heat_map, title=f'K={cfg.clients}')}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data: check your files; ShapesWorld preview, export")
    children = data.add_subparsers(dest="data_command", required=True)
    _add_data_preview(children)
    _add_data_check(children)
    _add_data_export(children)


def _add_data_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preview", help="PNG grid of samples with their questions / prompts")
    p.add_argument("--out", default="runs/preview")
    p.add_argument("--splits", nargs="+", default=["base", "downstream"])
    p.add_argument("--image-size", type=image_size_int, default=64)
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=_cmd_data_preview)


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from fedumm.data.readers.shapes import generate_shapes
    from fedumm.experiments.preview import write_preview

    for split in args.splits:
        data = generate_shapes(split, 24, seed=args.seed, image_size=args.image_size)
        path = write_preview(data, args.out)
        print(f"{split}: {len(data.vqa)} questions, {len(data.gen)} prompts -> {path}")
    return 0


def _add_data_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="read and check a config's data (every record and "
                       "image path) and print what each role holds")
    p.add_argument("config", nargs="?", help="YAML config (defaults when omitted)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. "
                   "data.format=files data.understanding=llava.json")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_data_check)


def _cmd_data_check(args: argparse.Namespace) -> int:
    from collections import Counter

    from fedumm.data.readers import read_samples
    from fedumm.data.vocabulary import describe as describe_unknown
    from fedumm.runtime.bars import reading_bars
    from fedumm.runtime.vocabulary import data_check_vocabulary

    cfg = _load_optional(args)
    report, splits = {}, {}
    for role in ("train", "val"):
        with reading_bars(not args.json):  # every record and image path is checked
            samples = splits[role] = read_samples(cfg.data, role)
        report[role] = {
            task: {"samples": n, "with_image": sum(s.image is not None for s in samples
                                                   if s.task == task)}
            for task, n in sorted(Counter(s.task for s in samples).items())}
        if role == "train" and samples:
            report["example"] = {task: {"id": s.id, "text": s.text, "answer": s.answer,
                                        "image": s.image.describe() if s.image else None,
                                        "labels": s.labels}
                                 for task in ("understanding", "generation")
                                 for s in samples[:1] + samples[-1:] if s.task == task}
    report["unknown_words"] = unknown = data_check_vocabulary(cfg, splits)
    if args.json:
        print(json.dumps(report))
        return 0
    for role in ("train", "val"):
        for task, c in report[role].items():
            print(f"{role:>5} {task:<13} {c['samples']:>8} samples ({c['with_image']} with "
                  "an image)")
    for task, ex in report.get("example", {}).items():
        print(f"example {task}: {json.dumps(ex)[:300]}")
    if "error" in unknown:
        print(f"unknown words: not checked: {unknown['error']}")
    else:
        for line in describe_unknown({r: unknown[r] for r in ("train", "val")}):
            print(f"{line} (backbone.kind={unknown['backbone']})")
        if unknown["run_stops"]:
            print(f"a run would stop: {unknown['run_stops']}")
    print("ok: every record and image path was read and checked")
    return 0


def _add_data_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write generated data as VQA v2 + GenEval files, or as "
                       "LLaVA JSON + a metadata.jsonl image folder")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="official", choices=["official", "llava"],
                   help="official: VQA v2 + GenEval; llava: llava.json + t2i/metadata.jsonl")
    p.add_argument("--split", default="downstream", choices=["base", "downstream"])
    p.add_argument("--role", default="val", choices=["train", "val", "test"])
    p.add_argument("--scenes", type=positive_int, default=200)
    p.add_argument("--image-size", type=image_size_int, default=48)
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=_cmd_data_export)


def _cmd_data_export(args: argparse.Namespace) -> int:
    from fedumm.data.export import export_conversation_files, export_official
    from fedumm.data.readers.shapes import generate_shapes

    data = generate_shapes(args.split, args.scenes, seed=args.seed, role=args.role,
                           image_size=args.image_size)
    if args.format == "llava":
        paths = export_conversation_files(data, args.out)
    else:
        paths = export_official(data, args.out, f"shapes_{args.split}_{args.role}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a federated experiment (runtime=local | flare-sim | "
                       "flare-poc)")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--out", help="run directory (default runs/<name>)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run directory")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--json", action="store_true", help="print summary.json")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from fedumm.runtime.dispatch import run_experiment

    _threads()
    if args.resume:
        if args.config or args.overrides:
            raise ValueError("--resume DIR continues a run with its saved config; "
                             "give no CONFIG or overrides")
        summary = run_experiment(None, args.resume, resume=True, progress=not args.quiet)
        out = args.resume
    else:
        if not args.config:
            raise ValueError("give a CONFIG (e.g. configs/quickstart.yaml) or --resume DIR")
        cfg = _load(args)
        out = args.out = args.out or f"runs/{cfg.name}"
        summary = run_experiment(cfg, out, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary))
        return 0
    fin, comm = summary["final"], summary["communication"]
    print(f"run: {out}")
    base = summary["base"]
    gen = "geneval_overall" if "geneval_overall" in fin else "generation_quality"
    print(f"  frozen base -> final:  VQA accuracy {base.get('vqa_accuracy', 'n/a')} -> "
          f"{fin.get('vqa_accuracy', 'n/a')}  |  "
          f"{'GenEval overall' if gen == 'geneval_overall' else 'generation held-out quality'} "
          f"{base.get(gen, 'n/a')} -> {fin.get(gen, 'n/a')}")
    if fin.get("classification"):
        print(f"  AUC {fin.get('auc')} (hard labels {fin.get('auc_hard')})  |  macro-F1 "
              f"{fin.get('macro_f1')}")
    reduction = comm["reduction_vs_full"]
    print(f"  upload {comm['upload_bytes_per_client_round'] / 2**20:.2f} MiB per client-round "
          f"({f'{reduction}x less than full fine-tuning' if reduction else 'nothing uploaded'})"
          f"  |  wall {summary['time']['wall_s']} s")
    upd = summary.get("updates", {})
    if upd.get("rejected"):
        print(f"  {upd['rejected']} of {upd['rejected'] + upd['accepted']} client updates were "
              f"rejected (first: {upd['first_rejection']}); see metrics.jsonl")
    print(f"  report: {Path(out) / 'report.md'}")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a grid of experiments (resumable) and report it")
    p.add_argument("config", help="YAML config; its sweep: section gives the default grid")
    p.add_argument("overrides", nargs="*", help="config overrides key=value for every cell")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis (repeatable); replaces the config's axis of the same key")
    p.add_argument("--baseline", action="append", default=[], metavar="'KEY=V ...'",
                   help="an extra cell (repeatable), e.g. 'strategy.name=centralized clients=1';"
                   " replaces the config's baselines")
    p.add_argument("--out", help="sweep directory (default runs/sweep_<config name>)")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress bars")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="run N cells at once, each in its own process (set train.threads so "
                   "that N x threads fits the cores; results equal a one-at-a-time sweep at "
                   "the same threads)")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedumm.config import read_yaml
    from fedumm.experiments.sweep import run_sweep
    from fedumm.experiments.sweep_report import write_sweep_report

    _threads()
    path = Path(args.config)
    raw = read_yaml(path)
    out = Path(args.out or f"runs/sweep_{path.stem}")
    result = run_sweep(raw, out, grid=args.grid, baselines=args.baseline,
                       overrides=list(args.overrides), progress=not args.quiet, jobs=args.jobs)
    report = write_sweep_report(out)
    failed = sum(r["status"] != "done" for r in result["cells"])
    print(f"sweep: {out} ({len(result['cells'])} cells, {failed} failed, "
          f"{result['wall_s']} s this time, {result['cells_wall_s']} s in all cells)")
    print(f"  table: {out / 'sweep.csv'}  report: {report}")
    return 1 if failed else 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write report.md with plots for a run or a sweep")
    p.add_argument("dir", help="a run directory or a sweep directory")
    p.add_argument("--out", help="folder for report.md and PNGs (default: DIR)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from fedumm.experiments.sweep import SWEEP_JSON
    from fedumm.experiments.sweep_report import write_sweep_report
    from fedumm.runtime.report import write_run_report

    src = Path(args.dir)
    if (src / SWEEP_JSON).is_file():
        path = write_sweep_report(src, args.out)
    elif (src / "summary.json").is_file():
        path = write_run_report(src, args.out)
    else:
        raise FileNotFoundError(f"{src} holds neither a sweep (sweep.json) nor a finished run "
                                "(summary.json)")
    print(f"report: {path}")
    return 0


def _add_export_flare_job(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-flare-job",
                       help="write an NVIDIA FLARE job folder for a real deployment")
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.add_argument("--out", required=True, help="folder to write the job into")
    p.add_argument("--site", action="append", default=[], metavar="SITE:KEY=VALUE",
                   help="an override for one site (repeatable), e.g. "
                        "site-2:data.understanding=/data/vqa.jsonl; a site given its own "
                        "data.understanding / data.generation trains on all of it")
    p.add_argument("--sites", metavar="NAME,NAME,...",
                   help="the sites' names, one per client (default site-1..site-K; sets "
                        "clients when not overridden)")
    p.set_defaults(func=_cmd_export_flare_job)


def _cmd_export_flare_job(args: argparse.Namespace) -> int:
    from fedumm.runtime.flare.runner import export_flare_job

    cfg = _load(args)
    sites: dict[str, list[str]] = {}
    for item in args.site:
        site, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ValueError(f"--site {item!r}: expected SITE:key=value, e.g. "
                             "site-1:data.understanding=/data/vqa.jsonl")
        sites.setdefault(site, []).append(override)
    names = [s.strip() for s in args.sites.split(",")] if args.sites else None
    if names and not any(o.split("=", 1)[0].strip() == "clients" for o in args.overrides):
        cfg = load_config(args.config, [*args.overrides, f"clients={len(names)}"])
    path = export_flare_job(cfg, args.out, sites, names)
    print(f"FLARE job: {path}  (submit: nvflare job submit -j {path})")
    return 0


def _add_backbone(sub: argparse._SubParsersAction) -> None:
    backbone = sub.add_parser("backbone", help="backbones: sizes and traffic; check a "
                              "checkpoint folder")
    children = backbone.add_subparsers(dest="backbone_command", required=True)
    _add_backbone_info(children)
    _add_backbone_check(children)


def _add_backbone_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, adapter and full-model bytes per client-round "
                       "of a backbone, built on the meta device (no weights needed)")
    p.add_argument("config", nargs="?", help="YAML config (defaults when omitted)")
    p.add_argument("overrides", nargs="*",
                   help="overrides, e.g. backbone.kind=janus backbone.preset=janus-pro-7b")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_backbone_info)


def _cmd_backbone_info(args: argparse.Namespace) -> int:
    from fedumm.models.info import backbone_info

    cfg = _load_optional(args, unless_file=True)
    info = backbone_info(cfg.backbone, cfg.lora.r, cfg.lora.groups)
    if args.json:
        print(json.dumps(info))
        return 0
    from fedumm.runtime.report import fmt_bytes

    print(f"{info['kind']} {info['preset'] or info['path']}: {info['params_total']:,} "
          f"parameters")
    for g, n in info["adapter_params"].items():
        print(f"  {g:<11} {n:>13,} adapter parameters (LoRA r={info['lora_r']})")
    print(f"  per client-round in bfloat16: adapters "
          f"{fmt_bytes(info['adapter_bytes_per_round']['bfloat16'])} vs full model "
          f"{fmt_bytes(info['full_model_bytes']['bfloat16'])} ({info['full_over_adapter']}x)")
    return 0


def _add_backbone_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a checkpoint folder against what its backbone "
                       "needs (files, dimensions, tokens, chat template), without loading the "
                       "weights; exit code 1 when a check FAILs")
    p.add_argument("path", help="checkpoint folder (base: the shipped reference checkpoint)")
    p.add_argument("--kind", choices=("janus", "blip3o", "reference"), default=None,
                   help="check as this kind (default: detected from the folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_backbone_check)


def _cmd_backbone_check(args: argparse.Namespace) -> int:
    from fedumm.models.conformance import check_backbone

    report = check_backbone(args.path, args.kind)
    print(json.dumps(report.to_dict()) if args.json else "\n".join(report.lines()))
    return 1 if report.failed else 0


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain the reference UMM on the ShapesWorld base split")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps (default: the recipe's, PretrainConfig.steps)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop early past this wall time (default: PretrainConfig.max_minutes)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from fedumm.models.reference.pretrain import PretrainConfig, pretrain

    _threads()
    given = {"seed": args.seed, "steps": args.steps, "max_minutes": args.max_minutes}
    cfg = PretrainConfig(**{k: v for k, v in given.items() if v is not None})
    out = pretrain(cfg, args.out, progress=not args.quiet)
    print(f"checkpoint: {out}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="VQA accuracy and GenEval score of a model (a run "
                       "directory: its final evaluation redone, = its summary.json)")
    p.add_argument("checkpoint", help="a finished run directory, 'base' (shipped) or a "
                   "reference checkpoint folder")
    question_set = ("a generated ShapesWorld question set: the default for 'base' and a "
                    "checkpoint folder; for a run directory, giving any of --split, --scenes, "
                    "--max-vqa, --max-gen, --seed scores it on that set instead of its own data")
    g = p.add_argument_group("generated question set", question_set)
    g.add_argument("--split", choices=["base", "downstream"], help="(default downstream)")
    g.add_argument("--scenes", type=positive_int, help="(default 200)")
    g.add_argument("--max-vqa", type=non_negative_int, help="(default 400)")
    g.add_argument("--max-gen", type=non_negative_int, help="(default 120)")
    g.add_argument("--seed", type=seed_int, help="(default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedumm.models.loading import is_run_folder
    from fedumm.runtime.saved_run import SavedRun

    generated = (args.split, args.scenes, args.max_vqa, args.max_gen, args.seed)
    run = None
    if is_run_folder(args.checkpoint) and all(v is None for v in generated):
        run = SavedRun(args.checkpoint)
        res = run.evaluate()  # with the run's own thread count
    else:
        res = _evaluate_generated(args)
    res.pop("vqa_by_question_type", None)
    if args.json:
        print(json.dumps(res))
        return 0
    for k, v in res.items():
        print(f"{k}: {v}")
    if run is not None:
        diff = run.differences(res)
        print("= summary.json's final numbers" if not diff else
              "differs from summary.json: " + "; ".join(diff))
    return 0


def _evaluate_generated(args: argparse.Namespace) -> dict:
    """``fedumm evaluate`` on a generated ShapesWorld question set."""
    from fedumm.data.readers.shapes import generate_shapes, shapes_samples
    from fedumm.eval.model_eval import evaluate_backbone
    from fedumm.runtime.saved_run import load_model

    _threads()
    backbone = load_model(args.checkpoint)
    seed = 0 if args.seed is None else args.seed
    data = generate_shapes(args.split or "downstream", args.scenes or 200, seed=seed,
                           role="test", image_size=backbone.image_size)
    return evaluate_backbone(backbone, shapes_samples(data),
                             max_vqa=400 if args.max_vqa is None else args.max_vqa,
                             max_gen=120 if args.max_gen is None else args.max_gen, seed=seed)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from prompts into a PNG grid")
    p.add_argument("checkpoint", help="a finished run directory, 'base' or a reference "
                   "checkpoint folder")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--out", default="runs/generated.png")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--cfg-scale", type=finite_float(), default=None,
                   help="classifier-free guidance scale (default: the backbone's own; "
                   "Janus takes values above 1)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from fedumm.experiments.plots import image_grid
    from fedumm.runtime.saved_run import load_model

    out = claim_file(args.out, ".png", command="generate")  # before loading the model
    _threads()
    backbone = load_model(args.checkpoint)
    images = backbone.generate(args.prompts, seed=args.seed, cfg_scale=args.cfg_scale)
    print(f"grid: {image_grid(list(images), args.prompts, out)}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a finished run's model with its adapters merged, in "
                       "its backbone's own format (loads without fedumm)")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--merged", required=True, metavar="OUT",
                   help="folder to write (new, empty, or an earlier export): the layout the "
                        "backbone's backbone.path loads (transformers' save_pretrained for "
                        "Janus, BLIP3o's published layout, the reference checkpoint layout)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from fedumm.runtime.saved_run import export_merged

    _threads()
    out = export_merged(args.run, args.merged)
    print(f"merged model: {out}  (use it as backbone.path={out}, no adapters needed)")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="official scoring of result files")
    children = ev.add_subparsers(dest="eval_command", required=True)
    _add_eval_vqa(children)
    _add_eval_geneval(children)


def _add_eval_vqa(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vqa", help="official VQA v2 accuracy of a results file")
    p.add_argument("--questions", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval_vqa)


def _cmd_eval_vqa(args: argparse.Namespace) -> int:
    from fedumm.eval.vqa_metric import evaluate_files

    res = evaluate_files(args.questions, args.annotations, args.results)
    res.pop("perQuestion", None)
    print(json.dumps(res) if args.json else
          f"overall {res['overall']}\nper answer type {res['perAnswerType']}")
    return 0


def _add_eval_geneval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("geneval", help="GenEval score of images in GenEval's folder layout")
    p.add_argument("--metadata", required=True, help="evaluation_metadata.jsonl")
    p.add_argument("--images", required=True, help="folder with <00000>/samples/0000.png")
    p.add_argument("--detector", default="shapes", choices=["shapes", "hf"],
                   help="shapes: ShapesWorld's classical detector; hf: Mask2Former + CLIP "
                        "through transformers ('GenEval (HF detectors)': never compare with "
                        "the official mmdet scorer's numbers)")
    p.add_argument("--segmenter", help="hf: local Mask2Former folder "
                   "(facebook/mask2former-swin-small-coco-instance, saved with save_pretrained)")
    p.add_argument("--clip", help="hf: local CLIP folder (openai/clip-vit-large-patch14)")
    p.add_argument("--device", default="cpu", help="hf: cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval_geneval)


def _cmd_eval_geneval(args: argparse.Namespace) -> int:
    from fedumm.eval.geneval import score_geneval_dir

    if args.detector == "hf":
        from fedumm.eval.hf_detector import DETECTOR_NAME, HFDetector

        if not (args.segmenter and args.clip):
            raise ValueError("--detector hf needs --segmenter (a Mask2Former COCO instance "
                             "folder) and --clip (a CLIP folder)")
        detector = HFDetector.from_paths(args.segmenter, args.clip, device=args.device)
        scorer = {"detector": DETECTOR_NAME, "segmenter": str(args.segmenter),
                  "clip": str(args.clip)}
    else:
        from fedumm.eval.shapes_detector import ShapesDetector

        detector, scorer = ShapesDetector(), {"detector": "ShapesWorld (classical)"}
    res = score_geneval_dir(args.metadata, args.images, detector)
    out = {"overall": res["overall"], "by_task": res["by_task"], **scorer}
    if res["missing_prompts"]:  # GenEval's evaluator scores the folders there are
        miss = res["missing_prompts"]
        out["missing_prompts"] = miss
        print(f"fedumm: note: {len(miss)} of {len(miss) + len(res['prompt_indices'])} prompts "
              f"have no images under {args.images} (e.g. {miss[:5]}); scored the others, as "
              "GenEval's evaluator does", file=sys.stderr)
    print(json.dumps(out) if args.json else
          f"{scorer['detector']}: overall {out['overall']:.4f}\nby task {out['by_task']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedumm",
        description="Federated fine-tuning of unified multimodal models (VQA + text-to-image) "
        "with LoRA adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_partition(sub)
    _add_data(sub)
    _add_run(sub)
    _add_export_flare_job(sub)
    _add_sweep(sub)
    _add_report(sub)
    _add_backbone(sub)
    _add_pretrain(sub)
    _add_evaluate(sub)
    _add_generate(sub)
    _add_export(sub)
    _add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options too: `fedumm run CFG --out D clients=8`
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-")
                                                 for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    # SIGTERM (timeout, scancel, systemd: often to the whole process group) ends like Ctrl-C:
    # a KeyboardInterrupt that stops the run's workers and FLARE processes on its way out
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _terminated)}
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, RunDirError,
            RunFailedError) as exc:
        print(f"fedumm: error: {_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        for s in (signal.SIGINT, signal.SIGTERM):  # stopping already: a repeat must not cut
            signal.signal(s, signal.SIG_IGN)       # this message short (restored below)
        sig = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        print(f"fedumm: stopped ({signal.Signals(sig).name}){_resume_hint(args)}",
              file=sys.stderr)
        return 128 + int(sig)
    except OSError as exc:  # a full disk, a read-only folder, ...: one line naming the file
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"fedumm: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: not set from Python, nothing to restore
                signal.signal(s, handler)


def _error_text(exc: BaseException) -> str:
    """The message of an error, one line. ``str(KeyError(msg))`` is ``repr(msg)`` (quoted,
    escaped): its message is shown as written, and a bare key as "no key 'name'"."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        arg = exc.args[0]
        if isinstance(arg, str) and " " in arg.strip():
            return arg
        return f"no key {arg!r}"
    return str(exc)


def _terminated(signum, frame) -> None:
    """SIGTERM as Ctrl-C, carrying its number (the exit code is 128 + it)."""
    raise KeyboardInterrupt(signum)


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted run, when the command was a run."""
    out = getattr(args, "resume", None) or getattr(args, "out", None)
    if getattr(args, "command", "") != "run" or not out:
        return ""
    return f"; continue with: fedumm run --resume {out}"


if __name__ == "__main__":
    sys.exit(main())
