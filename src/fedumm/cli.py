"""The ``fedumm`` command. Thin: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedumm.config import ConfigError, load_config


def _cmd_partition(args: argparse.Namespace) -> int:
    from fedumm.data.clients import build_dataset, split_clients

    overrides = [f"clients={args.clients}", f"seed={args.seed}", f"data.dataset={args.dataset}",
                 f"data.split={args.split}"]
    if args.alpha is not None:
        overrides.append(f"partition.alpha={args.alpha}")
    if args.method is not None:
        overrides.append(f"partition.method={args.method}")
    if args.label is not None:
        overrides.append(f"partition.label={args.label}")
    cfg = load_config(args.config, overrides + list(args.overrides))
    data = build_dataset(cfg.data)
    summary = split_clients(data, cfg.partition, cfg.clients, cfg.seed).summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    from fedumm.experiments.plots import partition_heatmap

    p = cfg.partition
    print(f"{cfg.clients} clients, {data.num_samples} samples, method={p.method} "
          f"alpha={p.alpha} label={p.label} seed={cfg.seed}")
    print(f"{'client':>6} {'samples':>8} {'labels':>6}  top labels")
    for c in summary["clients"]:
        top = sorted(c["label_counts"].items(), key=lambda kv: -kv[1])[:4]
        print(f"{c['id']:>6} {c['num_samples']:>8} {len(c['label_counts']):>6}  "
              + ", ".join(f"{k}:{v}" for k, v in top))
    het = summary["heterogeneity"]
    print("heterogeneity: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in het.items()))
    out = Path(args.out or f"runs/partition_k{cfg.clients}_a{p.alpha}_s{cfg.seed}.png")
    print(f"heat map: {partition_heatmap(summary, out, title=f'K={cfg.clients}')}")
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from fedumm.data.dataset import generate_shapes
    from fedumm.data.preview import preview_grid

    out = Path(args.out)
    for split in args.splits:
        data = generate_shapes(split, 24, seed=args.seed, image_size=args.image_size)
        path = preview_grid(data, out / f"preview_{split}.png")
        print(f"{split}: {len(data.vqa)} questions, {len(data.gen)} prompts -> {path}")
    return 0


def _cmd_data_export(args: argparse.Namespace) -> int:
    from fedumm.data.dataset import generate_shapes
    from fedumm.data.export import export_official

    data = generate_shapes(args.split, args.scenes, seed=args.seed, role=args.role,
                           image_size=args.image_size)
    paths = export_official(data, args.out, f"shapes_{args.split}_{args.role}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedumm",
        description="Federated fine-tuning of unified multimodal models (VQA + text-to-image) "
        "with LoRA adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("partition", help="split a dataset over clients and show heterogeneity")
    p.add_argument("--config", help="YAML config (defaults when omitted)")
    p.add_argument("--dataset", default="shapes", choices=["shapes"])
    p.add_argument("--split", default="downstream", choices=["base", "downstream"])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (partition.alpha)")
    p.add_argument("--method", help="iid | dirichlet | quantity_skew | domain")
    p.add_argument("--label", help="label key for Dirichlet (answer, question_type, tag, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="heat map PNG path")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=_cmd_partition)

    data = sub.add_parser("data", help="ShapesWorld data: preview, export").add_subparsers(
        dest="data_command", required=True)
    p = data.add_parser("preview", help="PNG grid of samples with their questions / prompts")
    p.add_argument("--out", default="runs/preview")
    p.add_argument("--splits", nargs="+", default=["base", "downstream"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data_preview)
    p = data.add_parser("export", help="write VQA v2 + GenEval files of generated data")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="downstream", choices=["base", "downstream"])
    p.add_argument("--role", default="val", choices=["train", "val", "test"])
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        print(f"fedumm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
